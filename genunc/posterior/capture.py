"""Capture what flows into the head during a forward pass, and build the head's fitting data.

This is the "head on cached features" construction: the posterior over the head's weights is a
Laplace approximation of a model whose *input* is the head's input.  Fitting therefore needs only
the head's inputs on noisy training pairs, which a forward hook records.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from genunc._seed import as_generator
from genunc.adapters.base import DenoiserAdapter
from genunc.errors import HeadNotCalledError, ShapeMismatchError
from genunc.posterior.heads import HeadOps, check_finite, head_ops_for

if TYPE_CHECKING:
    from genunc.posterior.draws import HeadDraws


@dataclass
class HeadCapture:
    """What one forward pass fed into (and got out of) the head."""

    calls: int = 0
    features: Tensor | None = None
    output: Tensor | None = None

    def require_single_call(self, head_name: str) -> Tensor:
        if self.calls == 0 or self.features is None:
            raise HeadNotCalledError(
                f"head '{head_name}' was not called during the forward pass: it is not on the "
                "path from input to output (wrong head name, or the model skips it)"
            )
        if self.calls > 1:
            raise HeadNotCalledError(
                f"head '{head_name}' was called {self.calls} times in one forward pass; genunc "
                "needs a head evaluated exactly once per forward (name the module that is)"
            )
        return self.features


@contextmanager
def capture_head(head: nn.Module, keep_output: bool = False) -> Iterator[HeadCapture]:
    """Record the head's (single, positional) input while the block runs."""
    record = HeadCapture()

    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        record.calls += 1
        if not args or not isinstance(args[0], Tensor):
            raise HeadNotCalledError(
                f"head {type(module).__name__} must take its features as the first positional "
                "tensor argument"
            )
        record.features = args[0].detach()
        if keep_output:
            record.output = output.detach()

    handle = head.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


@dataclass
class HeadData:
    """Fitting data for the head: feature rows and target rows, on the CPU."""

    features: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return self.features.shape[0]


@torch.no_grad()
def collect_head_data(
    adapter: DenoiserAdapter,
    batches: Iterable[Any],
    *,
    repeats: int = 1,
    max_rows: int | None = None,
    seed: int | torch.Generator | None = 0,
    progress: bool = True,
    ops: HeadOps | None = None,
) -> HeadData:
    """Run the denoiser on noisy versions of clean `batches`; keep the head's inputs and targets.

    Every clean batch is corrupted `repeats` times (fresh timesteps and noise each time), which
    stretches a small data set over the timestep range.  Collection stops after `max_rows` rows.
    """
    generator = as_generator(seed)
    head = adapter.head
    ops = ops or head_ops_for(head)
    was_training = adapter.model.training
    adapter.model.eval()
    feats: list[Tensor] = []
    targs: list[Tensor] = []
    n_rows = 0
    bar = tqdm(desc="collecting head features", unit="row", disable=not progress, total=max_rows)
    try:
        for batch in batches:
            for _ in range(repeats):
                pairs = adapter.training_pairs(batch, generator)
                with capture_head(head) as record:
                    adapter.denoise(**pairs.inputs)
                features = record.require_single_call(adapter.head_name)
                check_finite(features, f"features entering head '{adapter.head_name}'")
                rows = ops.to_rows(features, pairs.mask)
                targets = ops.target_rows(pairs.target, pairs.mask, adapter.likelihood)
                if rows.shape[0] != targets.shape[0]:
                    raise ShapeMismatchError(
                        f"{rows.shape[0]} feature rows but {targets.shape[0]} target rows: the "
                        "adapter's target does not match the head's output layout"
                    )
                check_finite(targets, "training targets")
                feats.append(rows.float().cpu() if rows.dtype in _LOW else rows.cpu())
                targs.append(targets.cpu())
                n_rows += rows.shape[0]
                bar.update(rows.shape[0])
                if max_rows is not None and n_rows >= max_rows:
                    raise _Enough
    except _Enough:
        pass
    finally:
        bar.close()
        adapter.model.train(was_training)
    if not feats:
        raise ShapeMismatchError("no data: the batch iterable was empty")
    features = torch.cat(feats)
    targets = torch.cat(targs)
    if max_rows is not None:
        features, targets = features[:max_rows], targets[:max_rows]
    return HeadData(features=features, targets=targets)


_LOW = (torch.float16, torch.bfloat16)


class _Enough(Exception):
    """Internal signal: enough rows were collected."""


@contextmanager
def head_replaced(head: nn.Module, draw: "HeadDraws") -> Iterator[None]:
    """Every call of `head` returns the head under `draw` (one parameter set) on its own input,
    computed in the draw's precision: how a wrapped pipeline runs a whole generation under one
    posterior draw without writing a weight."""
    dtype = next(iter(draw.params.values())).dtype

    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        return draw.apply(args[0].to(dtype))[0].to(output.dtype)

    handle = head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
