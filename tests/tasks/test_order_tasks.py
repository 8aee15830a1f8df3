"""The tasks where unmasking order matters: sudoku (4x4, 9x9) and long addition."""

import numpy as np
import pytest
import torch

from genunc.errors import ConfigError, GenuncError
from genunc.tasks import AdditionTask, ArithmeticTask, SortTask, SudokuTask, task_from_spec
from genunc.tasks.sudoku import all_grids, is_valid_grid, solve

SMALL4 = SudokuTask(2, min_givens=4, max_givens=8, train_size=300, test_size=100)


def test_all_4x4_grids_are_288_valid_distinct_grids():
    grids = all_grids(2)
    assert grids.shape == (288, 16)
    assert len({g.tobytes() for g in grids}) == 288
    assert all(is_valid_grid(g, 2) for g in grids)


def test_4x4_puzzles_have_a_unique_solution_and_the_requested_givens():
    split = SMALL4.split(seed=0)
    for problems in split.values():
        givens = SMALL4.givens(problems)
        assert givens.min() >= 4 and givens.max() <= 8
        for puzzle, solution in problems[:60]:
            found = solve(puzzle, 2, limit=2)
            assert len(found) == 1 and np.array_equal(found[0], solution)
            assert np.array_equal(puzzle[puzzle > 0], solution[puzzle > 0])
    # every given count occurs (uniform over min..max)
    assert set(SMALL4.givens(split["test"]).tolist()) == set(range(4, 9))


def test_9x9_puzzles_are_unique_and_checked():
    task = SudokuTask(3, min_givens=32, max_givens=36, train_size=2, test_size=2)
    split = task.split(seed=1)
    assert split["test"].shape == (2, 2, 81) and task.length == 162 and task.vocab_size == 11
    for puzzle, solution in split["test"]:
        assert 32 <= (puzzle > 0).sum() <= 36
        assert len(solve(puzzle, 3, limit=2)) == 1 and is_valid_grid(solution, 3)
    solved = task.sequences(split["test"])
    assert task.check(solved).all()
    bad = solved.clone()
    bad[:, -1] = bad[:, -1] % 9 + 1
    assert not task.check(bad).any()


def test_splits_are_disjoint_by_solution_grid_and_seeded():
    split = SMALL4.split(seed=0)
    train = {s.tobytes() for s in split["train"][:, 1]}
    test = {s.tobytes() for s in split["test"][:, 1]}
    assert not train & test
    assert len({p.tobytes() for p in split["train"][:, 0]}) == len(split["train"])  # distinct
    again = SMALL4.split(seed=0)
    assert np.array_equal(again["test"], split["test"])
    assert not np.array_equal(SMALL4.split(seed=1)["test"], split["test"])


def test_sudoku_checker_accepts_solutions_and_rejects_corruptions():
    problems = SMALL4.split(seed=0)["test"][:50]
    solved = SMALL4.sequences(problems)
    assert solved.shape == (50, 32) and SMALL4.check(solved).all()
    swapped = solved.clone()  # swap two answer cells of a row: still digits, no longer valid
    swapped[:, 16], swapped[:, 17] = solved[:, 17], solved[:, 16]
    assert not SMALL4.check(swapped).any()
    assert not SMALL4.check(SMALL4.prompts(problems)).any()
    # another valid grid that breaks a given is wrong; a valid grid keeping the givens is right
    text = "1..." + "." * 12 + "1234341221434321"
    other = "2..." + "." * 12 + "1234341221434321"
    assert SMALL4.check(torch.tensor([SMALL4.encode(text), SMALL4.encode(other)])).tolist() == [True, False]
    assert SMALL4.decode(SMALL4.encode(text)) == text


def test_addition_task_is_long_disjoint_and_checked():
    task = AdditionTask(digits=6, train_size=3000, test_size=500)
    assert task.answer_length == 7 and task.length == 21
    split = task.split(seed=0)
    assert len(split["train"]) == 3000 and len(split["test"]) == 500
    assert not {tuple(p) for p in split["train"]} & {tuple(p) for p in split["test"]}
    solved = task.sequences(split["test"])
    assert task.check(solved).all()
    wrong = solved.clone()
    wrong[:, -1] = (wrong[:, -1] + 1) % 10
    assert not task.check(wrong).any()
    assert task.check(torch.tensor([task.encode("999999+100001=1100000")]))[0]


def test_sort_task_is_disjoint_by_multiset_and_checked():
    task = SortTask(8, train_size=3000, test_size=300)
    assert task.answer_length == 8 and task.length == 17
    split = task.split(seed=0)
    assert len(split["train"]) == 3000 and len(split["test"]) == 300
    multisets = lambda rows: {np.sort(r).tobytes() for r in rows}  # noqa: E731
    assert not multisets(split["train"]) & multisets(split["test"])
    assert np.array_equal(task.split(seed=0)["test"], split["test"])
    solved = task.sequences(split["test"])
    assert task.check(solved).all()
    assert task.decode(task.sequences(np.array([[3, 1, 2, 1, 0, 9, 9, 5]]))[0]) == "31210995=01123599"
    wrong = solved.clone()
    wrong[:, -1] = (wrong[:, -1] + 1) % 10  # the largest digit changed
    assert not task.check(wrong).any()
    assert not task.check(task.prompts(split["test"])).any()


def test_task_from_spec_round_trips():
    for task in (ArithmeticTask("+", 3), AdditionTask(digits=5, train_size=10), SMALL4, SortTask(6)):
        assert task_from_spec(task.spec()) == task
    with pytest.raises(ConfigError):
        task_from_spec({"name": "chess"})
    with pytest.raises(ConfigError):
        task_from_spec({"name": "sudoku", "rows": 4})
    with pytest.raises(GenuncError):
        SudokuTask(2, min_givens=3)
