"""The shared generation loop: the M+1 trajectories differ only by their heads, for every
scheduler, and the MAP trajectory does not depend on what runs beside it."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
)

from genunc.adapters.image import DiffusersImageAdapter
from genunc.posterior import HeadDraws, HeadPosterior
from genunc.sampling import diffusers_loop, run_trajectory

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler,
              "euler_ancestral": EulerAncestralDiscreteScheduler}


@pytest.fixture(scope="module")
def fitted(tiny_unet):
    adapter = DiffusersImageAdapter(tiny_unet(), DDPMScheduler(num_train_timesteps=100))
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(16, 1, 8, 8, generator=g).clamp(-1, 1), torch.randint(0, 3, (16,), generator=g))
    posterior = HeadPosterior.fit(adapter, [{"x": data[0], "class_labels": data[1]}], progress=False)
    return adapter, posterior


def _run(adapter, kind, draws=None, branch_at=0, seed=0):
    scheduler = SCHEDULERS[kind].from_config(adapter.scheduler.config)
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return run_trajectory(adapter, scheduler, x_T, {"class_labels": torch.tensor([0, 1, 2])},
                          num_inference_steps=5, trajectory_draws=draws, branch_at=branch_at,
                          generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", SCHEDULERS)
@pytest.mark.parametrize("branch_at", [0, 2])
def test_a_collapsed_posterior_gives_identical_generations(fitted, kind, branch_at):
    adapter, posterior = fitted
    at_mean = HeadDraws.from_flat(posterior.mean.repeat(4, 1), posterior.ops, with_map=True)
    out = _run(adapter, kind, at_mean, branch_at)
    for draw in out.draw_samples:
        torch.testing.assert_close(draw, out.samples, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_the_map_trajectory_does_not_depend_on_the_draws_beside_it(fitted, kind):
    adapter, posterior = fitted
    alone = _run(adapter, kind)
    beside = _run(adapter, kind, posterior.sample(3, seed=0, with_map=True))
    # float32 rounding differs with the batch's size and thread count (1.4e-6 seen on 1 thread)
    torch.testing.assert_close(beside.samples, alone.samples, rtol=0, atol=1e-5)
    assert not torch.allclose(beside.draw_samples[0], alone.samples)  # the draws do move


def _run_per_sample(adapter, kind, draws, branch_at):
    scheduler = SCHEDULERS[kind].from_config(adapter.scheduler.config)
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return run_trajectory(adapter, scheduler, x_T, {"class_labels": torch.tensor([0, 1, 2])},
                          num_inference_steps=5, trajectory_draws=draws, branch_at=branch_at,
                          generator=[torch.Generator().manual_seed(10 + i) for i in range(3)])


@pytest.mark.parametrize("kind", SCHEDULERS)
@pytest.mark.parametrize("branch_at", [0, 2])
def test_shared_step_noise_is_what_rewinding_the_generators_gives(fitted, kind, branch_at,
                                                                   monkeypatch):
    """Each sample's step noise is drawn once and shared by every trajectory group (one
    scheduler call for all groups when they fork before the first step, replayed draws after
    a late fork): the numbers of rewinding each sample's generator before each group's step,
    with one draw per sample and step instead of one per group."""
    from diffusers.schedulers import scheduling_ddpm

    adapter, posterior = fitted
    draws = posterior.sample(3, seed=0, with_map=True)
    drawn = []
    original = scheduling_ddpm.randn_tensor

    def counting(shape, generator=None, **kwargs):
        drawn.append(shape[0])
        return original(shape, generator=generator, **kwargs)

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", counting)
    shared = _run_per_sample(adapter, kind, draws, branch_at)
    if kind == "ddpm":  # 4 noisy steps (the last adds none), 3 rows each: never once per group
        assert drawn == [3] * 4
    monkeypatch.setattr(diffusers_loop._SharedNoise, "of", classmethod(lambda cls, s, g: None))
    rewound = _run_per_sample(adapter, kind, draws, branch_at)
    torch.testing.assert_close(shared.samples, rewound.samples, rtol=0, atol=0)
    torch.testing.assert_close(shared.draw_samples, rewound.draw_samples, rtol=0, atol=0)
    assert not torch.allclose(shared.draw_samples[0], shared.samples)
