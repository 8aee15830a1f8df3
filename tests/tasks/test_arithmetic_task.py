"""The arithmetic task's checker and layout."""

import numpy as np
import pytest
import torch

from genunc.errors import GenuncError
from genunc.tasks import ArithmeticTask


@pytest.mark.parametrize("op,digits", [("*", 2), ("+", 3)])
def test_checker_accepts_solutions_and_rejects_errors(op, digits):
    task = ArithmeticTask(op, digits)
    pairs = task.split(seed=0)["test"][:50]
    solved = task.sequences(pairs)
    assert solved.shape == (50, task.length)
    assert task.check(solved).all()
    wrong = solved.clone()
    last = wrong[:, -1]
    wrong[:, -1] = torch.where(last == 9, torch.zeros_like(last), last + 1)  # off by one digit
    assert not task.check(wrong).any()
    masked = task.prompts(pairs)
    assert not task.check(masked).any()
    assert (masked[:, task.prompt_length :] == task.mask_id).all()


def test_known_answers():
    task = ArithmeticTask("*", 2)
    assert task.length == 10 and task.prompt_length == 6 and task.vocab_size == 14
    ok = torch.tensor([task.encode("12*34=0408"), task.encode("99*99=9801")])
    bad = torch.tensor([task.encode("12*34=0409"), task.encode("99+99=9801")])
    assert task.check(ok).tolist() == [True, True]
    assert task.check(bad).tolist() == [False, False]
    assert ArithmeticTask("+", 3).check(torch.tensor([ArithmeticTask("+", 3).encode("999+001=1000")]))[0]


def test_split_is_disjoint_and_complete():
    task = ArithmeticTask("*", 2)
    split = task.split(0.2, seed=3)
    train = {tuple(p) for p in split["train"]}
    test = {tuple(p) for p in split["test"]}
    assert not train & test and len(train) + len(test) == 90 * 90
    np.testing.assert_array_equal(task.split(0.2, seed=3)["test"], split["test"])


def test_bad_inputs():
    with pytest.raises(GenuncError):
        ArithmeticTask("-", 2)
    with pytest.raises(GenuncError, match="outside"):
        ArithmeticTask().encode("1a")
    with pytest.raises(GenuncError, match="expected"):
        ArithmeticTask().check(torch.zeros(2, 3, dtype=torch.long))
