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
* **one-trajectory semantic** (``semantic_x0``): along the MAP trajectory, at each chosen step,
  the clean sample each head draw predicts from the MAP's own features (one batched head op,
  then the scheduler's ``pred_original_sample`` rule, :func:`genunc.sampling.clean.predicted_clean`);
  the pipeline decodes and featurises them.

Where the posterior sits is the loop's one variable (``_Site``): the head alone (a hook applies
every group's head draw in one grouped op: the fast path) or a block that ends at the head (the
tail re-run per group on what entered it, batched over the draws).  Sampling, forking, and the
variability record are written once for both.

The M+1 generations differ only by their heads, for every scheduler: every trajectory group
draws the same step noise, so a posterior collapsed to its mean gives M+1 identical generations,
DDPM included, and the MAP trajectory is the same whether or not perturbed ones run beside it.
Stochastic schedulers need a ``generator`` for this.  How (``_GroupStepper``): where the batch
forks before the first step, one scheduler steps every group's rows in one call (it holds no
state to copy yet); after a late fork each group steps with a scheduler copy of its own.  Either
way the noise is drawn once per sample and shared: during the step, the scheduler's own
``randn_tensor`` (diffusers draws all step noise with it) is wrapped, for calls with this loop's
generators only, so that the rows of the first group are drawn and every other group gets the
same rows.  A scheduler whose module draws noise some other way falls back to rewinding the
generators before each group's step (the same numbers, one draw per group).
"""

from __future__ import annotations

import copy
import inspect
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from genunc.adapters.base import DenoiserAdapter
from genunc.errors import GenuncError
from genunc.sampling.clean import predicted_clean
from genunc.sampling.precision import backbone_autocast, full_precision
from genunc.sampling.tails import shared_tail

if TYPE_CHECKING:
    from genunc.posterior.draws import HeadDraws, Tail, TailDraws, TailInputs

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
    #: with a Monte-Carlo tail variance: name -> (S, M, B) per-step jackknife (leave-one-draw-out)
    #: replicates of ``variability_per_step``, for the score's standard error
    variability_replicates: dict[str, Tensor] | None = None
    #: with ``clean_draws``: ``(S, K, B, ...)`` the clean samples the K draws' heads predict at
    #: each of the S ``clean_steps`` of the MAP trajectory (the scheduler's own rule), on the CPU
    clean_per_step: Tensor | None = None
    clean_timesteps: Tensor | None = None  # the scheduler timestep of each of those steps


def repeat_batch(value: Any, reps: int) -> Any:
    """Repeat a batched conditioning value (tensor, or dict of them) along dim 0, draw-major."""
    if isinstance(value, Tensor):
        return value.repeat(reps, *([1] * (value.dim() - 1))) if value.dim() else value
    if isinstance(value, Mapping):
        return {k: repeat_batch(v, reps) for k, v in value.items()}
    return value


class _GroupStepper:
    """Steps G trajectory groups that share one batch, each with its own scheduler state (one
    scheduler for all when they fork before the first step) and the same sampler noise.

    `generator` is one generator or one per sample (diffusers' schedulers take either); with
    per-sample generators each sample's noise depends on that sample alone, not on the batch
    it runs in.
    """

    def __init__(self, scheduler: Any,
                 generator: torch.Generator | list[torch.Generator] | None) -> None:
        self.schedulers = [scheduler]
        self.groups = 1
        self.steps = 0
        self.generators = [] if generator is None else \
            list(generator) if isinstance(generator, (list, tuple)) else [generator]
        # stochastic schedulers take a generator; deterministic ones (PNDM, ...) may not accept one
        takes = "generator" in inspect.signature(scheduler.step).parameters
        self.kwargs = {"generator": generator} if takes else {}
        self.noise = _SharedNoise.of(scheduler, generator) if takes else None

    def fork(self, groups: int) -> None:
        """From now on G trajectories; after the first step, the MAP's scheduler state is
        copied to every group."""
        self.groups = groups
        if self.steps or self.noise is None:
            self.schedulers += [copy.deepcopy(self.schedulers[0]) for _ in range(groups - 1)]

    def step(self, out: Tensor, t: Tensor, x: Tensor) -> Tensor:
        self.steps += 1
        groups = self.groups
        if groups == 1:
            return self.schedulers[0].step(out, t, x, **self.kwargs).prev_sample
        rows = x.shape[0] // groups
        if len(self.schedulers) == 1:  # forked before any step: all groups in one call
            with self.noise.shared(groups, rows):
                return self.schedulers[0].step(out, t, x, **self.kwargs).prev_sample
        if self.noise is not None:
            with self.noise.shared(groups, rows) as replay:
                steps = []
                for g, (scheduler, out_g, x_g) in enumerate(zip(self.schedulers, out.chunk(groups),
                                                               x.chunk(groups))):
                    replay(g > 0)
                    steps.append(scheduler.step(out_g, t, x_g, **self.kwargs).prev_sample)
            return torch.cat(steps)
        states = [g.get_state() for g in self.generators]
        steps = []
        for scheduler, out_g, x_g in zip(self.schedulers, out.chunk(groups), x.chunk(groups)):
            for g, state in zip(self.generators, states):
                g.set_state(state)
            steps.append(scheduler.step(out_g, t, x_g, **self.kwargs).prev_sample)
        return torch.cat(steps)


#: held while a scheduler module's ``randn_tensor`` is wrapped (steps of concurrent loops wait)
_NOISE_LOCK = threading.Lock()


class _SharedNoise:
    """The step noise of G trajectory groups, drawn once per sample: within :meth:`shared`, the
    scheduler module's ``randn_tensor`` answers calls made with this loop's `generator` (and
    only those) with the first group's rows: repeated G times for a call over every group's
    rows, replayed for the later groups' own calls."""

    def __init__(self, module: Any, generator: Any) -> None:
        self.module, self.generator = module, generator

    @classmethod
    def of(cls, scheduler: Any, generator: Any) -> "_SharedNoise | None":
        """The shared noise of `scheduler`'s steps, or None where its step's module draws no
        noise through diffusers' ``randn_tensor`` or no generator makes the noise repeatable."""
        module = sys.modules.get(getattr(type(scheduler).step, "__module__", ""))
        if generator is None or not callable(getattr(module, "randn_tensor", None)):
            return None
        return cls(module, generator)

    @contextmanager
    def shared(self, groups: int, rows: int) -> Iterator[Callable[[bool], None]]:
        """Within the block, steps of `groups` groups of `rows` rows share one draw; yields
        ``replay(flag)``: whether the next group's own call repeats the first group's draws."""
        original = self.module.randn_tensor
        drawn: list[Tensor] = []
        state = {"replay": False, "next": 0}

        def replay(flag: bool) -> None:
            state["replay"], state["next"] = flag, 0

        def randn_tensor(shape: Any, generator: Any = None, **kwargs: Any) -> Tensor:
            if generator is not self.generator:
                return original(shape, generator=generator, **kwargs)
            if state["replay"] and state["next"] < len(drawn):
                state["next"] += 1
                return drawn[state["next"] - 1]
            if groups > 1 and shape[0] == rows * groups:  # one call over every group's rows
                noise = original((rows, *shape[1:]), generator=generator, **kwargs)
                return noise.repeat(groups, *([1] * (len(shape) - 1)))
            noise = original(shape, generator=generator, **kwargs)
            drawn.append(noise)
            return noise

        with _NOISE_LOCK:
            self.module.randn_tensor = randn_tensor
            try:
                yield replay
            finally:
                self.module.randn_tensor = original


@torch.no_grad()
def run_trajectory(
    adapter: DenoiserAdapter,
    scheduler: Any,
    x_T: Tensor,
    cond: Mapping[str, Any] | None = None,
    *,
    num_inference_steps: int = 50,
    trajectory_draws: HeadDraws | TailDraws | None = None,
    branch_at: int = 0,
    variability: HeadVariance | None = None,
    variability_steps: list[int] | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress: bool = False,
    precision: str = "float32",
    clean_draws: HeadDraws | TailDraws | None = None,
    clean_steps: list[int] | None = None,
) -> TrajectoryOutput:
    """Run the sampler from ``x_T``; optionally fork perturbed trajectories and score variability.

    Args:
        trajectory_draws: head draws that each get a trajectory of their own (semantic score).
            When draw 0 is the MAP (``with_map``), it is the MAP trajectory and the others
            may branch off it after ``branch_at`` steps; otherwise only the perturbed
            trajectories run, from step 0.  ``None``: the MAP trajectory alone.
        branch_at: number of initial steps the perturbed trajectories share with the MAP.
        variability: the head-output variance given the MAP features
            (:class:`~genunc.posterior.variance.ExactVariance` or ``MonteCarloVariance``),
            recorded at ``variability_steps`` (default: every step).
        precision: the backbone's precision (``float32``, ``bfloat16``, ``float16``: autocast);
            head draws, variances and sampler states stay in full precision.
        clean_draws: head (or tail) draws, usually the MAP first, whose predicted clean samples
            are recorded at ``clean_steps`` (default: every step) of the MAP trajectory, from
            the MAP's own features: the trajectory itself is not changed.

    Tail draws (:class:`~genunc.posterior.tail.TailDraws`: a tail posterior, over the blocks
    that end at the head) run the same way: the body runs on every trajectory's rows (the draws' states
    differ from the MAP's once they fork), and the tail is re-run per trajectory group on that
    group's recorded inputs, batched over the draws; for graph models whose recorded inputs do
    not split into row groups, each group runs the model with its draw's tail weights swapped
    in.  Variability needs only the MAP trajectory: its recorded tail inputs, the tail re-run
    under M draws (``MonteCarloTailVariance``).
    """
    cond = {k: v for k, v in (cond or {}).items() if v is not None}
    with_map = trajectory_draws is None or trajectory_draws.with_map
    if variability is not None and not with_map:
        raise GenuncError("variability is measured along the MAP trajectory: put the MAP "
                          "first in the trajectory draws")
    if not with_map and branch_at:
        raise GenuncError("without the MAP trajectory, perturbed trajectories start at step 0")
    if clean_draws is not None and not with_map:
        raise GenuncError("clean-sample predictions are read along the MAP trajectory: put the "
                          "MAP first in the trajectory draws")
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_inference_steps, device=x_T.device)
    timesteps = scheduler.timesteps
    n_steps = len(timesteps)
    if not 0 <= branch_at <= n_steps:
        raise GenuncError(f"branch_at must lie in [0, {n_steps}], got {branch_at}")
    vsteps = set(range(n_steps) if variability_steps is None else variability_steps)
    csteps = set(range(n_steps) if clean_steps is None else clean_steps)
    stepper = _GroupStepper(scheduler, generator)

    batch = x_T.shape[0]
    tail = shared_tail(trajectory_draws, variability, clean_draws)
    if tail is not None and precision != "float32":
        raise GenuncError("a tail posterior runs the backbone in float32 for now; "
                          f"precision={precision!r} needs a head posterior")
    draws = None if trajectory_draws is None else trajectory_draws.to(x_T.device)
    cdraws = None if clean_draws is None else clean_draws.to(x_T.device)
    x = adapter.project(x_T * scheduler.init_noise_sigma, cond)
    site: _Site = _HeadSite(adapter, draws, batch, with_map) if tail is None else \
        _TailSite(adapter, tail, draws, batch, with_map, scheduler, x, timesteps[0], cond)
    current_cond = cond
    if not with_map:
        site.groups = len(draws)
        x = repeat_batch(x, site.groups)
        current_cond = repeat_batch(cond, site.groups)
        stepper.fork(site.groups)
    per_step: dict[str, list[Tensor]] = {}
    replicas: dict[str, list[Tensor]] = {}
    measured_at: list[Tensor] = []
    cleans: list[Tensor] = []
    cleaned_at: list[Tensor] = []
    rows = 0
    with site.active():
        for i, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress, leave=False)):
            if draws is not None and with_map and site.groups == 1 and i == branch_at:
                site.groups = len(draws)
                x = repeat_batch(x, site.groups)
                current_cond = repeat_batch(cond, site.groups)
                stepper.fork(site.groups)
            model_in = scheduler.scale_model_input(x, t)
            t_batch = t.reshape(1).expand(x.shape[0]).to(x.device)
            with backbone_autocast(precision, x.device):
                out = site.denoise(model_in, t_batch, current_cond).to(x.dtype)
            rows += x.shape[0]
            if variability is not None and i in vsteps:
                inputs = {"x": model_in[:batch], "t": t_batch[:batch], **cond}
                variance = variability(site.map_features(), inputs)
                if getattr(variability, "replicates", False):
                    _append(per_step, adapter.reduce_variance(variance[0], inputs))
                    reduced = [adapter.reduce_variance(v, inputs) for v in variance[1:]]
                    _append(replicas, {name: torch.stack([r[name] for r in reduced])
                                       for name in reduced[0]})
                else:
                    _append(per_step, adapter.reduce_variance(variance, inputs))
                measured_at.append(t.reshape(()).cpu())
            if cdraws is not None and i in csteps:
                inputs = {"x": model_in[:batch], "t": t_batch[:batch], **cond}
                with full_precision(x.device):
                    heads = adapter.post_head(cdraws.apply(site.map_features()), inputs)
                sample = x[:batch]
                cleans.append(predicted_clean(scheduler, heads[:, :, : sample.shape[1]].float(),
                                              sample, t).cpu())
                cleaned_at.append(t.reshape(()).cpu())
            x = adapter.project(stepper.step(out, t, x), current_cond)

    groups = site.groups
    if groups > 1 or not with_map:
        grouped = x.reshape(groups, batch, *x.shape[1:])
        samples = grouped[0] if with_map else None
        draw_samples = grouped[1:] if with_map else grouped
    elif draws is not None:  # branch_at == n_steps: the draws never left the MAP path
        samples, draw_samples = x, x.unsqueeze(0).repeat(len(draws) - 1, *([1] * x.dim()))
    else:
        samples, draw_samples = x, None
    return TrajectoryOutput(
        samples=samples,
        draw_samples=draw_samples,
        variability_per_step={k: torch.stack(v) for k, v in per_step.items()} or None,
        variability_timesteps=torch.stack(measured_at) if measured_at else None,
        backbone_rows=rows,
        variability_replicates={k: torch.stack(v) for k, v in replicas.items()} or None,
        clean_per_step=torch.stack(cleans) if cleans else None,
        clean_timesteps=torch.stack(cleaned_at) if cleaned_at else None,
    )


def _append(lists: dict[str, list[Tensor]], values: Mapping[str, Tensor]) -> None:
    for name, value in values.items():
        lists.setdefault(name, []).append(value)


class _Site:
    """Where the posterior sits, for the one loop above: how a batch of ``groups`` trajectories
    (MAP first, then draws, ``batch`` rows each) runs through the denoiser with each group's
    own draw, and what the MAP rows' features were (what a variance estimator takes)."""

    def __init__(self, adapter: DenoiserAdapter, draws: Any, batch: int, with_map: bool) -> None:
        self.adapter, self.draws, self.batch, self.with_map = adapter, draws, batch, with_map
        self.groups = 1  # trajectories currently in the batch

    @property
    def unperturbed(self) -> bool:
        """Only the MAP runs: the model's own weights are the MAP's."""
        return self.groups == 1 and self.with_map

    def active(self) -> Any:  # a context manager: the hooks live while the loop runs
        raise NotImplementedError

    def denoise(self, model_in: Tensor, t_batch: Tensor, cond: Mapping[str, Any]) -> Tensor:
        return self.adapter.denoise(x=model_in, t=t_batch, **cond)

    def map_features(self) -> Any:
        raise NotImplementedError


class _HeadSite(_Site):
    """The head alone: a forward hook reads its input and, once the batch holds several
    trajectories, applies every group's head draw in one grouped op (the fast path)."""

    def __init__(self, adapter: DenoiserAdapter, draws: HeadDraws | None, batch: int,
                 with_map: bool) -> None:
        super().__init__(adapter, draws, batch, with_map)
        self.phi: Tensor | None = None

    @contextmanager
    def active(self) -> Iterator[None]:
        def hook(module: Any, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
            phi = args[0]
            self.phi = phi[: self.batch]
            if self.unperturbed:
                return None
            per_draw = phi.reshape(self.groups, self.batch, *phi.shape[1:])
            with full_precision(phi.device):
                out = self.draws.apply(per_draw, per_draw=True)
            return out.reshape(output.shape).to(output.dtype)

        handle = self.adapter.head.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def map_features(self) -> Tensor:
        return self.phi


class _TailSite(_Site):
    """A block that ends at the head: the body runs on every trajectory's rows (the draws'
    states differ from the MAP's once they fork), what enters the tail is recorded, and the
    head's output is replaced by the tail re-run per group under its draw, batched over the
    draws.  Graph models whose recorded inputs do not split into row groups (one probe call
    tells) run one body pass per group with that group's tail weights swapped in."""

    def __init__(self, adapter: DenoiserAdapter, tail: Tail, draws: TailDraws | None, batch: int,
                 with_map: bool, scheduler: Any, x: Tensor, t0: Tensor,
                 cond: Mapping[str, Any]) -> None:
        super().__init__(adapter, draws, batch, with_map)
        self.tail = tail
        self.separable = True
        self.map_inputs: TailInputs | None = None
        if draws is not None:  # do the recorded inputs split into trajectory groups?
            with tail.capture() as probe:
                two = repeat_batch(x[:1], 2)
                adapter.denoise(x=scheduler.scale_model_input(two, t0),
                                t=t0.reshape(1).expand(2).to(x.device),
                                **repeat_batch({k: _rows(v, 1) for k, v in cond.items()}, 2))
                self.separable = tail.inputs_of(probe, 2).separable

    @contextmanager
    def active(self) -> Iterator[None]:
        tail = self.tail

        def replace_output(module: Any, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
            if self.unperturbed or tail.rerunning:
                return None
            inputs = tail.inputs_of(self.recorder, self.groups * self.batch)
            return self.draws.apply(inputs, per_draw=True).reshape(output.shape).to(output.dtype)

        with tail.capture() as self.recorder:
            handle = tail.modules[-1].register_forward_hook(replace_output) \
                if self.separable else None
            try:
                yield
            finally:
                if handle is not None:
                    handle.remove()

    def denoise(self, model_in: Tensor, t_batch: Tensor, cond: Mapping[str, Any]) -> Tensor:
        batch, tail, recorder = self.batch, self.tail, self.recorder
        self.map_inputs = None
        if self.separable or self.groups == 1:
            recorder.reset()
            return self.adapter.denoise(x=model_in, t=t_batch, **cond)
        parts = []
        for g in range(self.groups):
            recorder.reset()
            rows = slice(g * batch, (g + 1) * batch)
            group_cond = {k: _rows(v, batch, g) for k, v in cond.items()}
            if g == 0 and self.with_map:
                parts.append(self.adapter.denoise(x=model_in[rows], t=t_batch[rows], **group_cond))
                self.map_inputs = tail.inputs_of(recorder, batch)
            else:
                self.draws.require_weights("the semantic score of a model whose recorded block "
                                           "inputs do not split into trajectory groups (graphs)")
                with tail.swapped(self.draws.draw(g)):
                    parts.append(self.adapter.denoise(x=model_in[rows], t=t_batch[rows],
                                                      **group_cond))
        return torch.cat(parts)

    def map_features(self) -> TailInputs:
        if self.map_inputs is None:  # the MAP rows lead the last pass's recorded inputs
            inputs = self.tail.inputs_of(self.recorder, self.groups * self.batch)
            self.map_inputs = inputs if self.groups == 1 else inputs.select(slice(0, self.batch))
        return self.map_inputs


def _rows(value: Any, size: int, group: int = 0) -> Any:
    """Rows ``[group*size, (group+1)*size)`` of a batched conditioning value."""
    if isinstance(value, Tensor) and value.dim():
        return value[group * size : (group + 1) * size]
    if isinstance(value, Mapping):
        return {k: _rows(v, size, group) for k, v in value.items()}
    return value
