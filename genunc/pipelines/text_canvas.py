"""Commit-time scores inside diffusers' ``DiffusionGemmaPipeline`` (uniform-corruption canvases).

``DiffusionGemmaPipeline`` denoises a canvas of ``canvas_length`` tokens per block.  Its step
callback sees only ``canvas`` and ``logits``; which positions a step commits is the scheduler's
business (``BlockRefinementScheduler`` tracks them as private state), a corrector calls the model
again between callbacks, and after the callback the pipeline may overwrite whole rows with the
argmax of the step's logits (its adaptive stop).  So genunc observes the scheduler itself: for the
duration of one call the user's own scheduler instance gets thin wrappers around ``step`` (and
``step_correct``) that call the original and read its output; they are removed in ``finally``.
Each model call is followed by exactly one of those calls, so the head input kept by a forward
hook is always the one of the call whose logits the scheduler consumes, corrector calls included.

What counts as a commit, and with which distribution ``p_m`` under head draw m (the draw's head
output put through the model's post-head transform, DiffusionGemma's final-logit softcapping,
then through what the scheduler applies before sampling):

* ``BlockRefinementScheduler`` (uniform mode): the positions of ``transfer_index`` (newly
  committed) and ``editing_transfer_index`` (edited); ``p_m`` as :func:`sampling_logits` with the
  step's temperature.
* ``EntropyBoundScheduler``: the positions of ``accepted_index``; ``p_m`` the logits divided by the
  scheduler's annealed temperature of that step (``t_min + (t_max - t_min) (N - t) / N``).
* ``DiscreteDDIMScheduler``: no commit mask exists; a position counts as written by a step when it
  holds that step's predicted token afterwards (its final step writes every position); ``p_m`` the
  logits divided by the temperature (raw logits when greedy).  Corrector sweeps
  (``step_correct``) resample a few positions from a leave-one-out conditional: such a resample is
  not a commit, it clears the position's record (the predictor's final step, which never has a
  corrector after it, rewrites every position).
* The pipeline's adaptive stop (``confidence_threshold``): genunc mirrors its rule on the MAP
  logits it observed (same tensors, same ops, so the same decisions); when a row freezes, its
  canvas becomes the argmax of that step's logits: positions whose token that changes, or that had
  no commit yet, are committed there, with ``p_m`` the draws' logits before sampling (argmax does
  not depend on temperature); positions whose committed token it confirms keep their commit.
  Rows frozen earlier ignore later scheduler writes, as the pipeline does.

A position whose token changed without a commit (renoised, corrector, a user callback's edit)
loses its record.  Each canvas's expected final tokens are checked against what the pipeline
returns; a position that differs gets NaN and a warning.

Fitting data (``DiffusionGemmaTextPipeline.collect_head_data``) is collected by the shared
:func:`~genunc.posterior.collect_head_data` over :class:`~genunc.adapters.text.CanvasLMAdapter`,
which encodes the prompt and calls ``pipe.model`` on a corrupted canvas as the pipeline does; this
module only encodes prompts as the pipeline does (:func:`canvas_prompt_ids`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from genunc.errors import GenuncError, HeadNotCalledError, ShapeMismatchError
from genunc.posterior.observe import DrawObserver, ObservedPass
from genunc.posterior.token_mi import LogitMap, TokenMI
from genunc.sampling.masked import sampling_logits
from genunc.scores.tokens import mutual_information

#: scheduler classes whose commits genunc reads (by class name, any subclass)
SUPPORTED_SCHEDULERS = ("BlockRefinementScheduler", "EntropyBoundScheduler", "DiscreteDDIMScheduler")


def scheduler_kind(scheduler: Any) -> str:
    """The supported scheduler class `scheduler` is (or derives from); refuses any other."""
    names = [cls.__name__ for cls in type(scheduler).__mro__]
    for name in SUPPORTED_SCHEDULERS:
        if name in names:
            return name
    raise GenuncError(f"genunc reads the commits of {list(SUPPORTED_SCHEDULERS)} inside "
                      f"DiffusionGemmaPipeline; got {type(scheduler).__name__}")


def softcap(logits: Tensor, cap: float | None) -> Tensor:
    """``cap * tanh(logits / cap)`` in float32 (DiffusionGemma's final-logit softcapping)."""
    logits = logits.float()
    return logits if not cap else torch.tanh(logits / cap) * cap


@contextmanager
def wrapped_scheduler(scheduler: Any, recorder: CanvasRecorder):
    """Wrap the instance's ``step`` / ``step_correct`` for one call; restore them in ``finally``."""
    patched = []
    for name, observe in (("step", recorder.on_step), ("step_correct", recorder.on_correct)):
        original = getattr(scheduler, name, None)
        if original is None:
            continue

        @functools.wraps(original)  # the pipeline inspects step's signature
        def wrapper(*args: Any, _original: Any = original, _observe: Any = observe, **kwargs: Any) -> Any:
            out = _original(*args, **kwargs)
            _observe(args, kwargs, out)
            return out

        had_own = name in vars(scheduler)
        patched.append((name, had_own, vars(scheduler).get(name)))
        setattr(scheduler, name, wrapper)
    try:
        yield
    finally:
        for name, had_own, own in patched:
            if had_own:
                setattr(scheduler, name, own)
            else:
                delattr(scheduler, name)


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs[name]


class CanvasRecorder:
    """Per-call state for ``DiffusionGemmaPipeline``: head input, mirrored adaptive stop, and the
    record (mutual information, confidence, step) of each canvas position's last commit.
    ``estimator``: a draw-free MI estimator, given the MAP head's input and logits at the commits
    and the step's elementwise logit map (softcap, then 1 / temperature), instead of M draws."""

    def __init__(self, observer: DrawObserver, scheduler: Any, *, cap: float | None,
                 stability_threshold: int, confidence_threshold: float | None,
                 user_callback: Any, user_inputs: Sequence[str],
                 estimator: TokenMI | None = None) -> None:
        self.observer = observer
        self.estimator = estimator
        self.scheduler = scheduler
        self.kind = scheduler_kind(scheduler)
        self.cap = cap
        self.stability_threshold = int(stability_threshold)
        self.confidence_threshold = confidence_threshold
        self.user_callback = user_callback
        self.user_inputs = tuple(user_inputs)
        self.canvases: list[dict[str, Tensor]] = []
        self.global_step = -1
        self.outside_changes = 0
        #: the step's pass, MAP logits and temperature, for the adaptive stop
        self._pred: tuple[ObservedPass, Tensor, float | None] | None = None

    # ---------------------------------------------------------------- scheduler calls
    @torch.no_grad()
    def on_step(self, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        timestep = int(_argument(args, kwargs, 1, "timestep"))
        sample = _argument(args, kwargs, 2, "sample")
        if isinstance(out, tuple):
            raise GenuncError("genunc reads the scheduler's output object: keep return_dict=True")
        self.global_step += 1
        if timestep == 0:
            self._new_canvas(sample)
        canvas = self.canvases[-1]
        self._outside(canvas, sample)
        observed = self._observed(sample)
        live = ~canvas["finished"][:, None]  # rows the adaptive stop froze ignore this step
        if self.kind == "BlockRefinementScheduler":
            written = out.transfer_index | out.editing_transfer_index
            arguments = _block_refinement_arguments(kwargs)
            sampling = functools.partial(sampling_logits, **arguments)
            logit_map = self._logit_map(LogitMap.for_sampling, **arguments)
            scale = None
        elif self.kind == "EntropyBoundScheduler":
            written = out.accepted_index
            config = self.scheduler.config
            n = self.scheduler.num_inference_steps
            scale = config.t_min + (config.t_max - config.t_min) * (n - timestep) / n
            sampling = functools.partial(torch.div, other=scale)
            logit_map = self._logit_map(LogitMap, scale=1.0 / scale)
        else:
            written = out.prev_sample == out.sampled_tokens
            temperature = float(kwargs.get("temperature", 0.0))
            scale = None
            sampling = (lambda z: z) if temperature == 0 else functools.partial(torch.div, other=temperature)
            logit_map = self._logit_map(LogitMap, scale=1.0 if temperature == 0 else 1.0 / temperature)
        written = written & live
        noise = (out.prev_sample != sample) & ~written & live
        self._clear(canvas, noise)
        self._commit(canvas, written, out.sampled_probs.double(), observed, sampling, logit_map)
        canvas["expected"] = out.prev_sample  # what the callback sees (frozen rows: until the stop)
        self._pred = (observed, out.pred_logits, scale)

    @torch.no_grad()
    def on_correct(self, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        sample = _argument(args, kwargs, 2, "sample")
        canvas = self.canvases[-1]
        live = ~canvas["finished"][:, None]
        self._clear(canvas, (out.prev_sample != sample) & live)
        canvas["expected"] = out.prev_sample

    # ---------------------------------------------------------------- step callback
    def callback(self, pipe: Any, step: int, timestep: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        result = kwargs
        if self.user_callback is not None:
            mine = {k: kwargs[k] for k in self.user_inputs if k in kwargs}
            result = self.user_callback(pipe, step, timestep, mine)
        with torch.no_grad():
            canvas = self.canvases[-1]
            # a frozen row's canvas is overwritten by its argmax right after the callback
            self._outside(canvas, result.get("canvas", kwargs["canvas"]), ~canvas["finished"][:, None])
            if self.confidence_threshold is not None:
                self._adaptive_stop(canvas)
        return result

    # ---------------------------------------------------------------- end of the call
    def finish(self, sequences: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, L)`` mutual information, confidence and step of each returned position."""
        if not self.canvases:
            raise HeadNotCalledError("the pipeline never called its scheduler")
        length = self.canvases[0]["mi"].shape[1]
        out = [torch.cat([c[k] for c in self.canvases], 1) for k in ("mi", "confidence", "step")]
        expected = torch.cat([c["expected"].cpu() for c in self.canvases], 1)
        returned = sequences.cpu()
        if returned.shape != expected.shape:
            raise ShapeMismatchError(f"the pipeline returned {tuple(returned.shape)} tokens, genunc saw "
                                     f"{len(self.canvases)} canvases of {length}")
        differ = returned != expected
        self.outside_changes += int(differ.sum())
        out[0][differ], out[1][differ], out[2][differ] = math.nan, math.nan, -1
        return out[0], out[1], out[2]

    # ---------------------------------------------------------------- internals
    def _new_canvas(self, sample: Tensor) -> None:
        batch, length = sample.shape
        history = torch.full((max(self.stability_threshold, 1), batch, length), -1, dtype=torch.long,
                             device=sample.device)
        self.canvases.append({
            "mi": torch.full((batch, length), math.nan, dtype=torch.float64),
            "confidence": torch.full((batch, length), math.nan, dtype=torch.float64),
            "step": torch.full((batch, length), -1, dtype=torch.long),
            "expected": sample.clone(), "argmax": sample.clone(), "history": history,
            "finished": torch.zeros(batch, dtype=torch.bool, device=sample.device)})

    def _observed(self, sample: Tensor) -> ObservedPass:
        observed = self.observer.take()  # each model call feeds exactly one scheduler call
        if observed is None:
            raise HeadNotCalledError("the scheduler stepped before the head was called")
        features = observed.features
        if features.dim() != 3 or features.shape[:2] != sample.shape:
            raise ShapeMismatchError(f"the head's input {tuple(features.shape)} does not line up with the "
                                     f"canvas {tuple(sample.shape)}")
        return observed

    def _outside(self, canvas: dict[str, Tensor], seen: Tensor, rows: Tensor | None = None) -> None:
        """Positions changed by something genunc does not model lose their record."""
        changed = seen != canvas["expected"]
        if rows is not None:
            changed &= rows
        canvas["expected"] = seen.clone()
        if bool(changed.any()):
            self.outside_changes += int(changed.sum())
            self._clear(canvas, changed)

    @staticmethod
    def _clear(canvas: dict[str, Tensor], where: Tensor) -> None:
        where = where.cpu()
        canvas["mi"][where] = math.nan
        canvas["confidence"][where] = math.nan
        canvas["step"][where] = -1

    def _logit_map(self, make: Any, **kwargs: Any) -> LogitMap | None:
        """The step's elementwise logit map with the model's softcap (only for an estimator)."""
        return None if self.estimator is None else make(softcap=self.cap, **kwargs)

    def _commit(self, canvas: dict[str, Tensor], where: Tensor, confidence: Tensor,
                observed: ObservedPass, sampling: Any, logit_map: LogitMap | None) -> None:
        rows, cols = torch.nonzero(where, as_tuple=True)
        if not len(rows):
            return
        rows_cpu, cols_cpu = rows.cpu(), cols.cpu()
        canvas["confidence"][rows_cpu, cols_cpu] = confidence[rows, cols].cpu()
        canvas["step"][rows_cpu, cols_cpu] = self.global_step
        if self.estimator is not None:  # draw-free: the MAP head's input at the commits
            phi, head = observed.features[rows, cols], self.observer.head
            raw = F.linear(phi.to(head.weight.dtype), head.weight, head.bias).float()
            canvas["mi"][rows_cpu, cols_cpu] = self.estimator(phi.float(), raw, logit_map).mi.cpu()
            return
        if observed.draws is None:
            return
        logits = sampling(softcap(observed.draw_outputs(rows, cols), self.cap))  # (M, K, V)
        canvas["mi"][rows_cpu, cols_cpu] = mutual_information(logits).cpu()

    def _adaptive_stop(self, canvas: dict[str, Tensor]) -> None:
        """The pipeline's freeze rule on the step's MAP logits; frozen rows become their argmax."""
        observed, pred, scale = self._pred
        finished = canvas["finished"]
        following = torch.where(finished[:, None], canvas["argmax"], pred.argmax(dim=-1))
        history = canvas["history"]
        stable = (history == following[None]).all(dim=-1).all(dim=0)
        history = torch.roll(history, shifts=-1, dims=0)
        history[-1] = following
        canvas["history"] = history
        entropy = torch.distributions.Categorical(logits=pred.float()).entropy().mean(-1)
        now = finished | (stable & (entropy < self.confidence_threshold))
        canvas["argmax"] = following
        frozen = now & ~finished
        canvas["finished"] = now
        if bool(frozen.any()):
            uncommitted = (canvas["step"] < 0).to(following.device)
            where = frozen[:, None] & ((following != canvas["expected"]) | uncommitted)
            confidence = torch.softmax(pred.float(), -1).gather(-1, following[..., None])[..., 0]
            sampling = (lambda z: z) if scale is None else functools.partial(torch.div, other=scale)
            logit_map = self._logit_map(LogitMap, scale=1.0 if scale is None else 1.0 / scale)
            self._commit(canvas, where, confidence.double(), observed, sampling, logit_map)
        canvas["expected"] = torch.where(now[:, None], following, canvas["expected"])


def _block_refinement_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The sampling arguments BlockRefinementScheduler.step was given (its defaults otherwise)."""
    return dict(temperature=float(kwargs.get("temperature", 0.0)), top_k=kwargs.get("top_k"),
                top_p=kwargs.get("top_p"), sampling_method=kwargs.get("sampling_method", "auto"))


# ---------------------------------------------------------------------- fitting data
def canvas_prompt_ids(processor: Any, prompt: str) -> tuple[Tensor, Tensor]:
    """``(P,)`` prompt ids and attention mask as ``DiffusionGemmaPipeline(prompt=prompt)`` encodes
    them: one user turn through the processor's chat template, generation prompt added."""
    encoded = processor.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=True,
                                            return_tensors="pt", return_dict=True)
    ids = torch.as_tensor(encoded["input_ids"]).reshape(-1)
    mask = encoded.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(-1)
    return ids.long(), mask.long()
