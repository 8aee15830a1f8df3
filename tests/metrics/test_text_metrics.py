"""pass@k and diversity of sampled answers."""

from math import comb

import numpy as np
import pytest

from genunc.errors import GenuncError
from genunc.metrics.text import (
    distinct_answers,
    distinct_correct,
    pass_at_k,
    pass_at_k_per_prompt,
    pass_at_ks,
)


def test_pass_at_k_by_hand():
    # 5 samples, 2 right: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 4) == 1.0  # only 3 wrong: any 4 hold a right one
    assert pass_at_k(5, 0, 3) == 0.0
    for n, c, k in [(16, 3, 5), (10, 7, 2), (8, 1, 8)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    with pytest.raises(GenuncError):
        pass_at_k(4, 5, 1)


def test_pass_at_k_tables_and_diversity():
    correct = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    assert pass_at_k_per_prompt(correct, 1) == pytest.approx([0.5, 0.0, 1.0])
    assert pass_at_ks(correct, [1, 2]) == pytest.approx({1: 0.5, 2: (5 / 6 + 0 + 1) / 3})
    answers = np.array([["12", "13", "13", "12"], ["1", "2", "3", "4"], ["7", "7", "7", "7"]])
    assert distinct_answers(answers).tolist() == [2, 4, 1]
    assert distinct_correct(answers, correct).tolist() == [1, 0, 1]
    with pytest.raises(GenuncError):
        distinct_answers(np.array(["a", "b"]))
