"""Generation with posterior head draws, on any diffusers scheduler (``scheduler.step``).

diffusers' DDPM/DDIM pipelines take no per-step callbacks, so genunc runs its own loop.  It takes
head draws, never the posterior: draws apply themselves (:meth:`HeadDraws.apply`), and whether
draw 0 is the MAP decides whether a MAP trajectory runs beside the perturbed ones.  One loop
serves both uncertainty signals:

* **semantic** (Jazbec et al., UAI 2025): the MAP and M perturbed generations start from the
  same ``x_T`` (and conditioning).  They run as one batch of ``(M+1)·B`` rows through the backbone;
  a forward hook swaps the head's output for each row's own head draw, so the M heads cost one
  grouped convolution, not M models.  With ``branch_at = k`` the perturbed trajectories share the
  MAP's first ``k`` steps and only then fork (the prefix is computed once).
* **variability** (noise-prediction variability): along the MAP trajectory, at each chosen
  step, the variance of the predicted noise under the head posterior given the MAP's own
  features (:mod:`genunc.posterior.variance`: exact, or over M draws), reduced per sample by the
  adapter.  This costs one head op per step on top of plain generation.

The M+1 generations differ only by their heads, for every scheduler: once the batch forks, each
trajectory steps with a scheduler copy of its own, and every copy draws the same step noise
(the generator is rewound to the same state before each), so a posterior collapsed to its mean
gives M+1 identical generations, DDPM included, and the MAP trajectory is the same whether or
not perturbed ones run beside it.  Stochastic schedulers need a ``generator`` for this.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from genunc.adapters.base import DenoiserAdapter
from genunc.errors import GenuncError
from genunc.sampling.precision import backbone_autocast, full_precision

if TYPE_CHECKING:
    from genunc.posterior.draws import HeadDraws

#: ``(phi, inputs) -> (B, ...)``: the variance of the model output under the head posterior,
#: given the backbone features of the MAP trajectory (:mod:`genunc.posterior.variance`)
HeadVariance = Callable[[Tensor, Mapping[str, Any]], Tensor]


@dataclass
class TrajectoryOutput:
    """What one batched run returns."""

    samples: Tensor | None  # (B, ...) from the MAP head; None when no MAP trajectory ran
    draw_samples: Tensor | None = None  # (M, B, ...) from the perturbed heads
    #: name -> (S, B) per-step variability (the adapter names the parts, e.g. positions / types)
    variability_per_step: dict[str, Tensor] | None = None
    #: the scheduler timestep of each row of ``variability_per_step``
    variability_timesteps: Tensor | None = None
    backbone_rows: int = 0  # rows pushed through the backbone (cost in units of one sample-step)


def repeat_batch(value: Any, reps: int) -> Any:
    """Repeat a batched conditioning value (tensor, or dict of them) along dim 0, draw-major."""
    if isinstance(value, Tensor):
        return value.repeat(reps, *([1] * (value.dim() - 1))) if value.dim() else value
    if isinstance(value, Mapping):
        return {k: repeat_batch(v, reps) for k, v in value.items()}
    return value


class _GroupStepper:
    """Steps G trajectories that share one batch, each with its own scheduler state and the same
    sampler noise (the generators are rewound before each group's step).

    `generator` is one generator or one per sample (diffusers' schedulers take either); with
    per-sample generators each sample's noise depends on that sample alone, not on the batch
    it runs in.
    """

    def __init__(self, scheduler: Any,
                 generator: torch.Generator | list[torch.Generator] | None) -> None:
        self.schedulers = [scheduler]
        self.generators = [] if generator is None else \
            list(generator) if isinstance(generator, (list, tuple)) else [generator]
        # stochastic schedulers take a generator; deterministic ones (PNDM, ...) may not accept one
        self.kwargs = {"generator": generator} \
            if "generator" in inspect.signature(scheduler.step).parameters else {}

    def fork(self, groups: int) -> None:
        """From now on G trajectories: the MAP's scheduler state is copied to every group."""
        self.schedulers += [copy.deepcopy(self.schedulers[0]) for _ in range(groups - 1)]

    def step(self, out: Tensor, t: Tensor, x: Tensor) -> Tensor:
        groups = len(self.schedulers)
        if groups == 1:
            return self.schedulers[0].step(out, t, x, **self.kwargs).prev_sample
        states = [g.get_state() for g in self.generators]
        steps = []
        for scheduler, out_g, x_g in zip(self.schedulers, out.chunk(groups), x.chunk(groups)):
            for g, state in zip(self.generators, states):
                g.set_state(state)
            steps.append(scheduler.step(out_g, t, x_g, **self.kwargs).prev_sample)
        return torch.cat(steps)


@torch.no_grad()
def run_trajectory(
    adapter: DenoiserAdapter,
    scheduler: Any,
    x_T: Tensor,
    cond: Mapping[str, Any] | None = None,
    *,
    num_inference_steps: int = 50,
    trajectory_draws: HeadDraws | None = None,
    branch_at: int = 0,
    variability: HeadVariance | None = None,
    variability_steps: list[int] | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress: bool = False,
    precision: str = "float32",
) -> TrajectoryOutput:
    """Run the sampler from ``x_T``; optionally fork perturbed trajectories and score variability.

    Args:
        trajectory_draws: head draws that each get a trajectory of their own (semantic score).
            When draw 0 is the MAP (``includes_map``), it is the MAP trajectory and the others
            may branch off it after ``branch_at`` steps; otherwise only the perturbed
            trajectories run, from step 0.  ``None``: the MAP trajectory alone.
        branch_at: number of initial steps the perturbed trajectories share with the MAP.
        variability: the head-output variance given the MAP features
            (:class:`~genunc.posterior.variance.ExactVariance` or ``MonteCarloVariance``),
            recorded at ``variability_steps`` (default: every step).
        precision: the backbone's precision (``float32``, ``bfloat16``, ``float16``: autocast);
            head draws, variances and sampler states stay in full precision.
    """
    cond = {k: v for k, v in (cond or {}).items() if v is not None}
    include_map = trajectory_draws is None or trajectory_draws.includes_map
    if variability is not None and not include_map:
        raise GenuncError("variability is measured along the MAP trajectory: put the MAP "
                          "first in the trajectory draws")
    if not include_map and branch_at:
        raise GenuncError("without the MAP trajectory, perturbed trajectories start at step 0")
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_inference_steps, device=x_T.device)
    timesteps = scheduler.timesteps
    n_steps = len(timesteps)
    if not 0 <= branch_at <= n_steps:
        raise GenuncError(f"branch_at must lie in [0, {n_steps}], got {branch_at}")
    vsteps = set(range(n_steps) if variability_steps is None else variability_steps)
    stepper = _GroupStepper(scheduler, generator)

    batch = x_T.shape[0]
    head = adapter.head
    fork_heads = None if trajectory_draws is None else trajectory_draws.to(x_T.device)
    groups = 1  # trajectories currently in the batch (MAP first, then draws)
    state: dict[str, Tensor | None] = {"phi": None}

    def hook(module: Any, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        phi = args[0]
        state["phi"] = phi[:batch]
        if groups == 1 and include_map:
            return None  # the model's own head is the MAP head
        per_draw = phi.reshape(groups, batch, *phi.shape[1:])
        with full_precision(phi.device):
            out = fork_heads.apply(per_draw, per_draw=True)
        return out.reshape(output.shape).to(output.dtype)

    x = adapter.project(x_T * scheduler.init_noise_sigma, cond)
    current_cond = cond
    if not include_map:
        groups = len(fork_heads)
        x = repeat_batch(x, groups)
        current_cond = repeat_batch(cond, groups)
        stepper.fork(groups)
    per_step: dict[str, list[Tensor]] = {}
    measured_at: list[Tensor] = []
    rows = 0
    handle = head.register_forward_hook(hook)
    try:
        for i, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress, leave=False)):
            if fork_heads is not None and include_map and groups == 1 and i == branch_at:
                groups = len(fork_heads)
                x = repeat_batch(x, groups)
                current_cond = repeat_batch(cond, groups)
                stepper.fork(groups)
            model_in = scheduler.scale_model_input(x, t)
            t_batch = t.reshape(1).expand(x.shape[0]).to(x.device)
            with backbone_autocast(precision, x.device):
                out = adapter.denoise(x=model_in, t=t_batch, **current_cond)
            out = out.to(x.dtype)
            rows += x.shape[0]
            if variability is not None and i in vsteps:
                inputs = {"x": model_in[:batch], "t": t_batch[:batch], **cond}
                variance = variability(state["phi"], inputs)
                for name, value in adapter.reduce_variance(variance, inputs).items():
                    per_step.setdefault(name, []).append(value)
                measured_at.append(t.reshape(()).cpu())
            x = adapter.project(stepper.step(out, t, x), current_cond)
    finally:
        handle.remove()

    if groups > 1 or not include_map:
        grouped = x.reshape(groups, batch, *x.shape[1:])
        samples = grouped[0] if include_map else None
        draw_samples = grouped[1:] if include_map else grouped
    elif fork_heads is not None:  # branch_at == n_steps: the draws never left the MAP path
        samples, draw_samples = x, x.unsqueeze(0).repeat(len(fork_heads) - 1, *([1] * x.dim()))
    else:
        samples, draw_samples = x, None
    return TrajectoryOutput(
        samples=samples,
        draw_samples=draw_samples,
        variability_per_step={k: torch.stack(v) for k, v in per_step.items()} or None,
        variability_timesteps=torch.stack(measured_at) if measured_at else None,
        backbone_rows=rows,
    )
