"""Multi-digit arithmetic as a fill-in-the-answer task for masked-diffusion LMs.

A problem is the fixed-width token sequence ``a op b = c``: operands zero-padded to ``digits``
digits, the answer zero-padded to the width the operation can reach (``digits + 1`` for ``+``,
``2 * digits`` for ``*``).  The prompt is everything up to ``=``; the model fills the answer
positions.  Every answer is checked exactly, so accuracy and "is this sample wrong?" need no
judge model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from genunc.errors import GenuncError
from genunc.tasks.base import FillInTask

SYMBOLS = "0123456789+*="


@dataclass(frozen=True)
class ArithmeticTask(FillInTask):
    op: str = "*"
    digits: int = 2

    def __post_init__(self) -> None:
        if self.op not in "+*" or len(self.op) != 1:
            raise GenuncError(f"op must be '+' or '*', got {self.op!r}")
        if not 1 <= self.digits <= 6:
            raise GenuncError(f"digits must lie in 1..6, got {self.digits}")

    @property
    def name(self) -> str:
        return "arithmetic"

    def spec(self) -> dict:
        """What :func:`genunc.tasks.task_from_spec` rebuilds the task from (saved with a model)."""
        return {"name": self.name, "op": self.op, "digits": self.digits}

    # ------------------------------------------------------------------ vocabulary and layout
    @property
    def symbols(self) -> str:
        return SYMBOLS

    @property
    def answer_digits(self) -> int:
        return self.digits + 1 if self.op == "+" else 2 * self.digits

    @property
    def answer_length(self) -> int:
        return self.answer_digits

    @property
    def prompt_length(self) -> int:
        return 2 * self.digits + 2

    @property
    def length(self) -> int:
        return self.prompt_length + self.answer_digits

    def problem_text(self, a: int, b: int) -> str:
        return f"{a:0{self.digits}d}{self.op}{b:0{self.digits}d}="

    def solve(self, a: int, b: int) -> int:
        return a + b if self.op == "+" else a * b

    def answer_text(self, value: int) -> str:
        return f"{value:0{self.answer_digits}d}"

    # ------------------------------------------------------------------ data
    def all_pairs(self) -> np.ndarray:
        """Every operand pair ``(a, b)`` with exactly ``digits`` digits (no leading zero)."""
        lo, hi = 10 ** (self.digits - 1), 10**self.digits
        a, b = np.meshgrid(np.arange(lo, hi), np.arange(lo, hi), indexing="ij")
        return np.stack([a.ravel(), b.ravel()], 1)

    def split(self, test_fraction: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
        """Disjoint train / test operand pairs (the test problems are never seen in training)."""
        pairs = self.all_pairs()
        perm = np.random.default_rng(seed).permutation(len(pairs))
        n_test = int(round(test_fraction * len(pairs)))
        return {"train": pairs[perm[n_test:]], "test": pairs[perm[:n_test]]}

    def sequences(self, pairs: np.ndarray) -> Tensor:
        """Full solved sequences ``(N, length)`` for operand pairs ``(N, 2)``."""
        rows = [self.encode(self.problem_text(a, b) + self.answer_text(self.solve(a, b)))
                for a, b in np.asarray(pairs)]
        return torch.tensor(rows, dtype=torch.long)

    # ------------------------------------------------------------------ checking
    def check(self, tokens: Tensor) -> np.ndarray:
        """Whether each completed sequence ``(N, length)`` states a correct answer."""
        tokens = self._token_rows(tokens)
        out = np.zeros(len(tokens), dtype=bool)
        for i, row in enumerate(tokens.tolist()):
            text = self.decode(row)
            a_text, rest = text[: self.digits], text[self.digits + 1 :]
            b_text, answer = rest[: self.digits], rest[self.digits + 1 :]
            if not (a_text + b_text + answer).isdigit() or text[self.digits] != self.op:
                continue
            out[i] = int(answer) == self.solve(int(a_text), int(b_text))
        return out
