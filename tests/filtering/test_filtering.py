"""Selections: a fraction within each group."""

import numpy as np


def test_keep_fraction_within_keeps_the_same_share_of_every_group():
    from genunc.filtering import keep_fraction, keep_fraction_within

    rng = np.random.default_rng(0)
    groups = np.repeat([0, 1, 2], 50)
    scores = rng.random(150) + groups  # group 2 is the most uncertain
    within = keep_fraction_within(scores, groups, 0.8)
    assert [int((groups[within] == g).sum()) for g in range(3)] == [40, 40, 40]
    globally = keep_fraction(scores, 0.8)
    assert (groups[globally] == 2).sum() < 40  # the global cut changes the mix
    for g in range(3):  # inside a group, the least uncertain are kept
        kept = within[groups[within] == g]
        assert scores[kept].max() <= np.sort(scores[groups == g])[39]
