"""Metrics for sampled answers to verifiable text tasks: pass@k and diversity.

``correct`` / ``answers`` are ``(P, N)``: N samples for each of P prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from genunc.errors import GenuncError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of `k` samples drawn without replacement from `n`, of which
    `c` are correct, is correct: ``1 - C(n - c, k) / C(n, k)`` (the unbiased pass@k estimator of
    Chen et al., 2021), computed as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise GenuncError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_per_prompt(correct, k: int) -> np.ndarray:
    """``(P,)`` pass@k of each prompt from its N samples."""
    correct = _matrix(correct, "correct").astype(bool)
    n = correct.shape[1]
    return np.array([pass_at_k(n, int(c), k) for c in correct.sum(1)])


def pass_at_ks(correct, ks: Sequence[int]) -> dict[int, float]:
    """Mean pass@k over prompts for each k (k <= N)."""
    return {int(k): float(pass_at_k_per_prompt(correct, k).mean()) for k in ks}


def distinct_answers(answers) -> np.ndarray:
    """``(P,)`` how many different answers each prompt's N samples give."""
    answers = _matrix(answers, "answers")
    return np.array([len(set(row.tolist())) for row in answers])


def distinct_correct(answers, correct) -> np.ndarray:
    """``(P,)`` how many different *correct* answers each prompt's samples give."""
    answers, correct = _matrix(answers, "answers"), _matrix(correct, "correct").astype(bool)
    if answers.shape != correct.shape:
        raise GenuncError(f"answers {answers.shape} and correct {correct.shape} differ in shape")
    return np.array([len(set(a[c].tolist())) for a, c in zip(answers, correct)])


def _matrix(values, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[1] < 1:
        raise GenuncError(f"{name} must be (prompts, samples), got shape {values.shape}")
    return values
