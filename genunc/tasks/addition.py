"""Long multi-digit addition: a long-answer task where unmasking order matters (carries).

``a + b = c`` with ``digits``-digit operands and a ``digits + 1``-token answer (7 tokens for the
default 6 digits), in the layout of :class:`~genunc.tasks.ArithmeticTask` (same vocabulary and
checker).  The operand space is too large to enumerate, so each split is a seeded sample of
distinct pairs, the test pairs removed from the training ones; a carry can run across the whole
answer, so the order in which the answer digits are committed matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from genunc.errors import GenuncError
from genunc.tasks.arithmetic import ArithmeticTask


@dataclass(frozen=True)
class AdditionTask(ArithmeticTask):
    op: str = "+"
    digits: int = 6
    train_size: int = 200_000
    test_size: int = 2_000

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.op != "+":
            raise GenuncError("AdditionTask adds; use ArithmeticTask for other operations")

    @property
    def name(self) -> str:
        return "addition"

    def spec(self) -> dict:
        return {"name": self.name, "digits": self.digits, "train_size": self.train_size,
                "test_size": self.test_size}

    def split(self, test_fraction: float | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """Disjoint train / test operand pairs (seeded samples; no pair in both)."""
        if test_fraction is not None:
            raise GenuncError("AdditionTask sets its split sizes with train_size / test_size")
        rng = np.random.default_rng([seed, self.digits])
        lo, hi = 10 ** (self.digits - 1), 10**self.digits

        def draw(size: int) -> np.ndarray:
            pairs = np.unique(rng.integers(lo, hi, size=(size, 2)), axis=0)
            return pairs[rng.permutation(len(pairs))]

        test = draw(self.test_size)
        train = draw(self.train_size + self.test_size)
        held = {(int(a), int(b)) for a, b in test}
        train = train[[(int(a), int(b)) not in held for a, b in train]][: self.train_size]
        return {"train": train, "test": test}
