"""Sorting a list of digits: a long-answer task (8 answer tokens by default).

A problem is ``d1 d2 ... dn = s1 s2 ... sn``: ``n`` random digits, ``=``, and the same digits in
non-decreasing order.  The prompt is everything up to ``=``; the model fills the ``n`` answer
positions.  Each answer position depends on the counts of the whole list (position ``j`` holds
the ``j``-th smallest digit), so it is a many-token answer whose positions differ in
difficulty (the ends are easier than the middle) and unmasking order can matter.

Splits are disjoint by *multiset*: no test list is a permutation of a training list (so the
test answers are never seen in training).  Problems are int arrays ``(N, n)`` of digits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from genunc.errors import GenuncError
from genunc.tasks.base import FillInTask

SYMBOLS = "0123456789="


@dataclass(frozen=True)
class SortTask(FillInTask):
    size: int = 8
    train_size: int = 100_000
    test_size: int = 2_000

    def __post_init__(self) -> None:
        if not 2 <= self.size <= 32:
            raise GenuncError(f"size must lie in 2..32, got {self.size}")

    @property
    def name(self) -> str:
        return "sort"

    def spec(self) -> dict:
        return {"name": self.name, "size": self.size, "train_size": self.train_size,
                "test_size": self.test_size}

    # ------------------------------------------------------------------ vocabulary and layout
    @property
    def symbols(self) -> str:
        return SYMBOLS

    @property
    def prompt_length(self) -> int:
        return self.size + 1

    @property
    def answer_length(self) -> int:
        return self.size

    @property
    def length(self) -> int:
        return 2 * self.size + 1

    # ------------------------------------------------------------------ data
    def split(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Disjoint train / test digit lists (no multiset in both), seeded."""
        rng = np.random.default_rng([seed, self.size])
        lists = rng.integers(0, 10, size=(2 * (self.train_size + self.test_size), self.size))
        lists = np.unique(lists, axis=0)
        lists = lists[rng.permutation(len(lists))]
        keys = np.array([np.sort(row).tobytes() for row in lists])
        test_keys: set[bytes] = set()
        test_rows = []
        for i, key in enumerate(keys):
            if len(test_rows) == self.test_size:
                break
            if key not in test_keys:
                test_keys.add(key)
                test_rows.append(i)
        train = lists[[k not in test_keys for k in keys]][: self.train_size]
        if len(test_rows) < self.test_size or len(train) < self.train_size:
            raise GenuncError("too few distinct lists for these split sizes")
        return {"train": train, "test": lists[test_rows]}

    def sequences(self, problems: np.ndarray) -> Tensor:
        problems = np.asarray(problems).reshape(-1, self.size)
        eq = np.full((len(problems), 1), SYMBOLS.index("="))
        return torch.as_tensor(np.concatenate([problems, eq, np.sort(problems, 1)], 1),
                               dtype=torch.long)

    # ------------------------------------------------------------------ checking
    def check(self, tokens: Tensor) -> np.ndarray:
        """Whether each answer lists the prompt's digits in non-decreasing order."""
        tokens = self._token_rows(tokens)
        rows = tokens.cpu().numpy()
        digits, answer = rows[:, : self.size], rows[:, self.prompt_length :]
        valid = (digits <= 9).all(1) & (rows[:, self.size] == SYMBOLS.index("="))
        return valid & (np.sort(np.minimum(digits, 9), 1) == answer).all(1)
