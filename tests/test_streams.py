"""Named random streams: reproducible, keyed by (seed, purpose, index), pairwise independent."""

import numpy as np
import pytest
import torch

from genunc import streams

N = 2000
PER_SAMPLE = ("initial_noise", "sampler_noise", "likelihood_noise", "random_baseline",
              "atom_counts")


def _first_normals(seed, purpose):
    return streams.randn_rows((), streams.sample_generators(seed, purpose, range(N))).double().numpy()


def test_same_key_same_numbers_other_key_other_numbers():
    a = torch.randn(5, generator=streams.torch_generator(3, "initial_noise", 7))
    b = torch.randn(5, generator=streams.torch_generator(3, "initial_noise", 7))
    assert torch.equal(a, b)
    for other in (streams.torch_generator(4, "initial_noise", 7),
                  streams.torch_generator(3, "initial_noise", 8),
                  streams.torch_generator(3, "sampler_noise", 7),
                  streams.torch_generator(3, "initial_noise", 7, 0)):
        assert not torch.equal(torch.randn(5, generator=other), a)


def test_purposes_are_pairwise_independent():
    """The first number of every per-sample stream, over 2,000 samples, and the run-wide head
    draws: no pair correlates beyond chance (|r| < 4 / sqrt(N)), and no stream repeats another
    (the bug this replaces: the head draws' normals were the first samples' initial noise)."""
    series = {p: _first_normals(0, p) for p in PER_SAMPLE}
    series["head_draws"] = torch.randn(N, generator=streams.torch_generator(0, "head_draws"),
                                       dtype=torch.float64).numpy()
    series["next seed's initial_noise"] = _first_normals(1, "initial_noise")
    names = list(series)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            r = np.corrcoef(series[a], series[b])[0, 1]
            assert abs(r) < 4 / np.sqrt(N), (a, b, r)
            assert not np.isin(series[a], series[b]).any(), (a, b)


def test_per_sample_streams_do_not_depend_on_which_samples_are_drawn_together():
    whole = streams.randn_rows((3, 4), streams.sample_generators(9, "initial_noise", range(10)))
    part = streams.randn_rows((3, 4), streams.sample_generators(9, "initial_noise", range(6, 10)))
    assert torch.equal(whole[6:], part)


def test_uniforms_are_uniform_and_reproducible():
    u = streams.sample_uniforms(0, "random_baseline", range(N))
    assert ((u >= 0) & (u < 1)).all()
    assert abs(u.mean() - 0.5) < 4 * np.sqrt(1 / 12 / N)
    np.testing.assert_array_equal(u[100:200], streams.sample_uniforms(0, "random_baseline",
                                                                     range(100, 200)))


def test_bad_keys_are_refused():
    with pytest.raises(ValueError, match="unknown random-stream purpose 'initial_nosie'"):
        streams.seed_sequence(0, "initial_nosie")
    with pytest.raises(ValueError, match="non-negative"):
        streams.seed_sequence(-1, "initial_noise")
