"""Named random streams: every purpose draws from its own stream, keyed by (seed, purpose, index).

A run's randomness serves several purposes: the initial noise of each sample, the head draws,
the sampler's step noise, the random baseline, the likelihood baseline's noise, the molecule
sizes.  Deriving them all from one integer by hand (``seed``, ``seed + 1 + start``, ...) made
streams coincide: the head draws' normals were the first samples' initial noise, a chunk's seed
was the next chunk's, and results changed with the chunk size.  Here a stream is a numpy
:class:`~numpy.random.SeedSequence` with the run's seed as entropy and ``(purpose, index, ...)``
as its spawn key, so

* streams of different purposes, or of different samples, are statistically independent;
* sample ``i`` draws the same numbers whether it is generated alone, in a chunk of 64 or by the
  third of eight processes: every per-sample stream is keyed by the *global* sample index;
* run-wide draws (the head draws) are keyed by no index and so are shared by every chunk.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

#: the purposes genunc draws for (a typo in a purpose name is an error, not a new stream)
PURPOSES = frozenset({
    "initial_noise",     # x_T of each sample
    "head_draws",        # the M posterior head draws, one set per run
    "sampler_noise",     # a stochastic sampler's per-step noise, per sample
    "random_baseline",   # the "random" score, per sample
    "likelihood_noise",  # the denoising-loss baseline's noise, per sample
    "atom_counts",       # a molecule's size, per sample
    "prompt_order",      # which prompts a text export takes, per run
    "bootstrap",         # evaluation resampling
    # reinforcement learning (genunc.rl)
    "network_init",      # a network's initial weights, per network
    "training_noise",    # diffusion losses' timesteps and noise, per training step
    "replay_sampling",   # which transitions a training minibatch takes, per training step
    "env_reset",         # an episode's environment seed, per episode
    "bonus_noise",       # the matched-noise control's exploration bonus, per online step
    "transition_samples",  # the shift detector's transition-model samples, per transition
    "dataset_split",     # which episodes of an offline dataset are held out, per split
    "behaviour_policy",  # the behaviour policy's sampling while offline data is made
    "random_policy",     # the uniform-random policy's actions (the normalisation return)
})


def _purpose_key(purpose: str) -> int:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown random-stream purpose {purpose!r}; known: {sorted(PURPOSES)}")
    return zlib.crc32(purpose.encode())


def seed_sequence(seed: int, purpose: str, *index: int) -> np.random.SeedSequence:
    """The stream for `purpose` (and a sample index, step, ...) of a run seeded with `seed`."""
    if int(seed) < 0 or any(int(i) < 0 for i in index):
        raise ValueError(f"seeds and stream indices must be non-negative, got {seed}, {index}")
    return np.random.SeedSequence(int(seed), spawn_key=(_purpose_key(purpose), *map(int, index)))


def torch_generator(seed: int, purpose: str, *index: int,
                    device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on `device` for one stream."""
    state = seed_sequence(seed, purpose, *index).generate_state(2, np.uint32)
    generator = torch.Generator(device=device)
    generator.manual_seed((int(state[0]) << 31) ^ int(state[1]))  # 63 bits of the stream
    return generator


def numpy_generator(seed: int, purpose: str, *index: int) -> np.random.Generator:
    """A numpy generator for one stream."""
    return np.random.default_rng(seed_sequence(seed, purpose, *index))


def sample_generators(seed: int, purpose: str, indices: Sequence[int] | range, *sub: int,
                      device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One torch generator per sample (global indices), e.g. for diffusers' per-row noise."""
    return [torch_generator(seed, purpose, i, *sub, device=device) for i in indices]


def sample_uniforms(seed: int, purpose: str, indices: Sequence[int] | range) -> np.ndarray:
    """One uniform number in [0, 1) per sample (53 bits), each from the sample's own stream."""
    out = np.empty(len(indices), dtype=np.float64)
    for j, i in enumerate(indices):
        hi, lo = seed_sequence(seed, purpose, i).generate_state(2, np.uint32)
        out[j] = ((int(hi) >> 5) * 67108864 + (int(lo) >> 6)) / 9007199254740992.0
    return out


def randn_rows(shape: Sequence[int], generators: Sequence[torch.Generator],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(len(generators), *shape)`` standard normals, row r from generator r."""
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=dtype) for g in generators])


def rand_rows(shape: Sequence[int], generators: Sequence[torch.Generator],
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(len(generators), *shape)`` uniforms, row r from generator r."""
    return torch.stack([torch.rand(tuple(shape), generator=g, dtype=dtype) for g in generators])
