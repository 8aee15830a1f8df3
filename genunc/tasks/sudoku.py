"""Sudoku as a fill-in-the-grid task for masked-diffusion LMs: a task where unmasking order matters.

A problem is the token sequence ``puzzle grid``: the ``n x n`` puzzle row by row with ``.`` for
a blank (``n = box**2``: 4 for ``box=2``, 9 for ``box=3``), then the full ``n x n`` solution.
The prompt is the puzzle; the model fills the ``n**2`` answer positions (copying the givens and
solving the blanks).  Every puzzle has exactly one solution (checked with an exact solver), and
the number of given cells sets its difficulty.  The checker accepts an answer that is a valid
sudoku consistent with the givens, so it needs neither the stored solution nor a judge.

Splits are disjoint by *solution grid*: no test puzzle shares its solution with a training
puzzle (so no test puzzle is a training puzzle either).  For 4x4 every one of the 288 grids is
enumerated and split; for 9x9 grids are drawn at random (seeded) per puzzle.

Problems are int arrays ``(N, 2, n*n)``: the puzzle (0 = blank) and its solution (digits 1..n).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch import Tensor

from genunc.errors import GenuncError
from genunc.tasks.base import FillInTask

BLANK = "."


# ---------------------------------------------------------------------- solver
def _units(box: int) -> list[list[int]]:
    n = box * box
    rows = [[r * n + c for c in range(n)] for r in range(n)]
    cols = [[r * n + c for r in range(n)] for c in range(n)]
    boxes = [[(br * box + i) * n + bc * box + j for i in range(box) for j in range(box)]
             for br in range(box) for bc in range(box)]
    return rows + cols + boxes


@cache
def _peers(box: int) -> tuple[tuple[int, ...], ...]:
    n = box * box
    peers: list[set[int]] = [set() for _ in range(n * n)]
    for unit in _units(box):
        for cell in unit:
            peers[cell].update(unit)
    return tuple(tuple(sorted(p - {cell})) for cell, p in enumerate(peers))


def solve(grid, box: int, limit: int = 2, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Up to `limit` solutions of `grid` (``n*n`` ints, 0 = blank), by backtracking on the cell
    with the fewest candidates.  ``rng`` shuffles the candidate order (random grids)."""
    n = box * box
    peers = _peers(box)
    cells = [int(v) for v in np.asarray(grid).ravel()]
    if len(cells) != n * n or any(not 0 <= v <= n for v in cells):
        raise GenuncError(f"a {n}x{n} grid holds {n * n} values in 0..{n}")
    for i, v in enumerate(cells):  # givens must not clash
        if v and any(cells[p] == v for p in peers[i]):
            return []
    found: list[np.ndarray] = []

    def candidates(i: int) -> list[int]:
        used = {cells[p] for p in peers[i]}
        return [d for d in range(1, n + 1) if d not in used]

    def search() -> None:
        best, best_cands = -1, None
        for i, v in enumerate(cells):
            if v == 0:
                cands = candidates(i)
                if best_cands is None or len(cands) < len(best_cands):
                    best, best_cands = i, cands
                    if len(cands) <= 1:
                        break
        if best < 0:
            found.append(np.array(cells, dtype=np.int64))
            return
        if rng is not None:
            best_cands = list(rng.permutation(best_cands))
        for d in best_cands:
            cells[best] = int(d)
            search()
            if len(found) >= limit:
                return
        cells[best] = 0

    search()
    return found


def is_valid_grid(grid, box: int) -> bool:
    """Whether a full grid is a sudoku solution: every row, column and box holds 1..n once."""
    g = np.asarray(grid).ravel()
    n = box * box
    want = set(range(1, n + 1))
    return len(g) == n * n and all(set(g[u].tolist()) == want for u in _units(box))


@cache
def all_grids(box: int = 2) -> np.ndarray:
    """Every solution grid ``(288, 16)`` of the 4x4 sudoku (only 4x4 is small enough)."""
    if box != 2:
        raise GenuncError("only the 4x4 grids can be enumerated")
    return np.stack(solve(np.zeros(16, dtype=np.int64), 2, limit=10_000))


def random_grid(box: int, rng: np.random.Generator) -> np.ndarray:
    """A random full grid (randomised backtracking from an empty grid)."""
    return solve(np.zeros(box**4, dtype=np.int64), box, limit=1, rng=rng)[0]


def carve(solution: np.ndarray, box: int, givens: int, rng: np.random.Generator,
          tries: int = 20) -> np.ndarray | None:
    """A puzzle of `solution` with exactly `givens` givens and a unique solution, by blanking
    cells in random order whenever the solution stays unique; None if no try reaches `givens`."""
    cells = len(solution)
    for _ in range(tries):
        puzzle = solution.copy()
        for i in rng.permutation(cells):
            if (puzzle != 0).sum() <= givens:
                break
            keep = puzzle[i]
            puzzle[i] = 0
            if len(solve(puzzle, box, limit=2)) != 1:
                puzzle[i] = keep
        if (puzzle != 0).sum() == givens:
            return puzzle
    return None


@cache
def _split(task: SudokuTask, seed: int) -> dict[str, np.ndarray]:
    return task._make_split(seed)


# ---------------------------------------------------------------------- the task
@dataclass(frozen=True)
class SudokuTask(FillInTask):
    """``box=2``: 4x4 (trains on a CPU); ``box=3``: 9x9 (generator and checker).

    Given-cell counts are uniform over ``min_givens..max_givens`` (fewer = harder; a 4x4 puzzle
    with a unique solution has at least 4 givens, a 9x9 one at least 17).  ``train_size`` /
    ``test_size`` puzzles per split; ``test_fraction`` of the 4x4 grids are held out.
    """

    box: int = 2
    min_givens: int = 4
    max_givens: int = 8
    train_size: int = 20_000
    test_size: int = 1_000
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.box not in (2, 3):
            raise GenuncError(f"box must be 2 (4x4) or 3 (9x9), got {self.box}")
        cells = self.cells
        least = 4 if self.box == 2 else 17
        if not least <= self.min_givens <= self.max_givens < cells:
            raise GenuncError(f"givens must satisfy {least} <= min_givens <= max_givens < {cells}")

    @property
    def name(self) -> str:
        return "sudoku"

    def spec(self) -> dict:
        return {"name": self.name, "box": self.box, "min_givens": self.min_givens,
                "max_givens": self.max_givens, "train_size": self.train_size,
                "test_size": self.test_size, "test_fraction": self.test_fraction}

    # ------------------------------------------------------------------ vocabulary and layout
    @property
    def n(self) -> int:
        return self.box * self.box

    @property
    def cells(self) -> int:
        return self.n * self.n

    @property
    def symbols(self) -> str:
        return BLANK + "123456789"[: self.n]

    @property
    def prompt_length(self) -> int:
        return self.cells

    @property
    def answer_length(self) -> int:
        return self.cells

    @property
    def length(self) -> int:
        return 2 * self.cells

    # ------------------------------------------------------------------ data
    def _puzzle(self, grids: np.ndarray | None, givens: int, rng: np.random.Generator) -> np.ndarray:
        """One ``(2, cells)`` puzzle with `givens` givens and a unique solution."""
        for _ in range(10_000):
            if grids is None:
                solution = random_grid(self.box, rng)
                puzzle = carve(solution, self.box, givens, rng)
                if puzzle is not None:
                    return np.stack([puzzle, solution])
                continue
            solution = grids[rng.integers(len(grids))]
            puzzle = solution.copy()
            puzzle[rng.choice(self.cells, self.cells - givens, replace=False)] = 0
            # unique iff exactly one of the enumerated grids agrees with the givens
            if ((all_grids(2) == puzzle) | (puzzle == 0)).all(1).sum() == 1:
                return np.stack([puzzle, solution])
        raise GenuncError(f"found no puzzle with {givens} givens and a unique solution")

    def _puzzles(self, grids: np.ndarray | None, size: int, rng: np.random.Generator) -> np.ndarray:
        """`size` distinct puzzles ``(size, 2, cells)`` from `grids` (4x4) or fresh random grids;
        the given count of each is uniform over ``min_givens..max_givens``."""
        seen: set[bytes] = set()
        out = []
        for _ in range(20 * size + 100):
            if len(out) == size:
                break
            givens = int(rng.integers(self.min_givens, self.max_givens + 1))
            problem = self._puzzle(grids, givens, rng)
            key = problem[0].astype(np.int8).tobytes()
            if key not in seen:
                seen.add(key)
                out.append(problem)
        if len(out) < size:
            raise GenuncError(f"could not make {size} distinct puzzles; lower the size")
        return np.stack(out).astype(np.int64)

    def split(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Disjoint train / test puzzles (disjoint by solution grid); computed once per task and
        seed (copies are returned)."""
        return {k: v.copy() for k, v in _split(self, seed).items()}

    def _make_split(self, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, self.box, self.min_givens, self.max_givens])
        if self.box == 2:
            grids = all_grids(2)[rng.permutation(288)]
            n_test = int(round(self.test_fraction * len(grids)))
            test = self._puzzles(grids[:n_test], self.test_size, rng)
            train = self._puzzles(grids[n_test:], self.train_size, rng)
        else:
            test = self._puzzles(None, self.test_size, rng)
            train = self._puzzles(None, self.train_size, rng)
            held = {s.tobytes() for s in test[:, 1].astype(np.int8)}
            train = train[[s.tobytes() not in held for s in train[:, 1].astype(np.int8)]]
        return {"train": train, "test": test}

    def sequences(self, problems: np.ndarray) -> Tensor:
        """Full solved sequences ``(N, length)``: puzzle (0 -> ``.``), then the solution."""
        problems = np.asarray(problems).reshape(-1, 2 * self.cells)
        return torch.as_tensor(problems, dtype=torch.long).clone()  # symbol index == digit

    def givens(self, problems: np.ndarray) -> np.ndarray:
        """Given-cell count of each puzzle (its difficulty)."""
        return (np.asarray(problems)[:, 0] != 0).sum(1)

    # ------------------------------------------------------------------ checking
    def check(self, tokens: Tensor) -> np.ndarray:
        """Whether each completed sequence's answer is a valid sudoku that keeps the givens."""
        tokens = self._token_rows(tokens)
        rows = tokens.cpu().numpy()
        puzzle, answer = rows[:, : self.cells], rows[:, self.cells :]
        digits = ((answer >= 1) & (answer <= self.n)).all(1)
        keeps = ((puzzle == 0) | (puzzle == answer)).all(1)
        out = np.zeros(len(rows), dtype=bool)
        for i in np.flatnonzero(digits & keeps):
            out[i] = is_valid_grid(answer[i], self.box)
        return out
