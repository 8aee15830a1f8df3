"""Posterior draws inside a pipeline someone else runs: what a wrapper needs of either kind.

A wrapped pipeline (image or text) never runs its own loop, so it meets the posterior in two
ways only, and this module answers both for head draws and tail draws alike:

* :func:`under_draw`: a whole generation under one draw (the semantic score's re-runs): the
  head's output replaced by a hook, or the tail's drawn weights swapped in and restored.
* :class:`DrawObserver`: the forward pass the pipeline just made, kept as an
  :class:`ObservedPass` whose draws' outputs are evaluated at the positions a step committed:
  head draws apply to the head's input a hook kept; tail draws re-run the tail on the inputs its
  pre-hooks recorded in that pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from genunc.errors import HeadNotCalledError
from genunc.posterior.capture import head_replaced
from genunc.posterior.draws import HeadDraws
from genunc.posterior.tail import TailDraws, TailInputs


def under_draw(head: nn.Module, draw: HeadDraws | TailDraws) -> Any:
    """A context in which the model runs under one posterior draw: the head's output replaced
    by a hook, or the tail's weights swapped in (restored on exit)."""
    if isinstance(draw, TailDraws):
        draw.require_weights("a wrapped pipeline's semantic score")
        return draw.tail.swapped(draw.draw(0))
    return head_replaced(head, draw)


@dataclass(frozen=True)
class ObservedPass:
    """One forward pass as the draws see it: the head's input ``features`` (its MAP features)
    and, for tail draws, the tail's recorded inputs."""

    features: Tensor
    draws: HeadDraws | TailDraws | None
    tail_inputs: TailInputs | None = None

    def draw_outputs(self, rows: Tensor, cols: Tensor, last: int | None = None) -> Tensor:
        """The M draws' head outputs ``(M, K, ...)`` at positions ``(rows, cols)`` (of the pass's
        `last` positions, where given), in the draws' precision."""
        draws = self.draws
        if draws is None:
            raise HeadNotCalledError("this pass was observed without posterior draws")
        if self.tail_inputs is None:
            phi = self.features if last is None else self.features[:, -last:]
            return draws.apply(phi[rows, cols].to(next(iter(draws.params.values())).dtype))
        outputs = draws.apply(self.tail_inputs)
        outputs = outputs if last is None else outputs[:, :, -last:]
        return outputs[:, rows, cols]


class DrawObserver:
    """Keeps the latest forward pass of `model` as an :class:`ObservedPass` (see there).

    Args:
        model: the module the pipeline calls once per denoising evaluation (the tail's
            recording is reset at each of its calls).
        head: the head; its input must be its first positional tensor.
        draws: M head or tail draws, or None (only the MAP features are kept).
    """

    def __init__(self, model: nn.Module, head: nn.Module, draws: HeadDraws | TailDraws | None) -> None:
        self.model, self.head, self.draws = model, head, draws
        self.tail = draws.tail if isinstance(draws, TailDraws) else None
        self.features: Tensor | None = None
        self._recorder: Any = None

    @contextmanager
    def watching(self) -> Iterator["DrawObserver"]:
        """Install the hooks for one pipeline call; they are removed on exit."""
        with ExitStack() as stack:
            if self.tail is not None:
                self._recorder = stack.enter_context(self.tail.capture())
                reset = self.model.register_forward_pre_hook(lambda *_: self._recorder.reset())
                stack.callback(reset.remove)
            handle = self.head.register_forward_hook(self._head_hook)
            stack.callback(handle.remove)
            yield self

    def _head_hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if self.tail is not None and self.tail.rerunning:
            return  # the draws' own re-run of the tail
        if not args or not isinstance(args[0], Tensor):
            raise HeadNotCalledError("the head must take its features as its first positional tensor")
        self.features = args[0].detach()

    def latest(self) -> ObservedPass | None:
        """The latest pass (None before the head's first call)."""
        if self.features is None:
            return None
        inputs = None
        if self.tail is not None and self.draws is not None:
            inputs = self.tail.inputs_of(self._recorder, self.features.shape[0])
        return ObservedPass(self.features, self.draws, inputs)

    def take(self) -> ObservedPass | None:
        """:meth:`latest`, after which the next pass starts empty (each model call feeds exactly
        one scheduler call)."""
        observed, self.features = self.latest(), None
        return observed
