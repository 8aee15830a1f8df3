"""The adapter contract: everything genunc needs to know about one kind of denoiser.

The posterior, the sampling loops, the scores, filtering and export are written once against
this contract; each modality (image, molecule, text) supplies one adapter.  An adapter answers:

1. how to call the denoiser (:meth:`DenoiserAdapter.denoise`);
2. how to turn clean data into ``(noisy input, target)`` training pairs
   (:meth:`DenoiserAdapter.training_pairs`), with the likelihood that links head output and target;
3. which module is the head (:attr:`DenoiserAdapter.head_name`);
4. what the model computes after the head (:meth:`DenoiserAdapter.post_head`), so that outputs
   produced by re-applied head draws match what the full model would return;
5. which subspace sampler states live in (:meth:`DenoiserAdapter.project`: identity, or
   centre-of-mass-free positions for molecules);
6. how M predictions of one sample disagree (:meth:`DenoiserAdapter.variability`).
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from genunc.errors import HeadNotFoundError

Likelihood = Literal["regression", "classification"]


@dataclass
class TrainingPairs:
    """One batch of denoising problems built from clean data.

    Attributes:
        inputs: keyword arguments for :meth:`DenoiserAdapter.denoise` (noisy sample, timestep,
            conditioning, ...).
        target: what the head should output, in head-output space: the true noise for
            regression (same shape as the output), class indices for classification (the output
            shape without its last axis).
        mask: optional boolean mask over rows that count (real atoms of a padded point cloud,
            masked tokens of a sequence, samples of a batch); its shape is the row index shape
            (see :mod:`genunc.posterior.heads`).
    """

    inputs: dict[str, Any]
    target: Tensor
    mask: Tensor | None = None


class DenoiserAdapter(ABC):
    """Base class for modality adapters; subclasses implement ``denoise`` and ``training_pairs``."""

    #: Likelihood linking head outputs and targets (noise regression or token classification).
    likelihood: ClassVar[Likelihood] = "regression"

    def __init__(self, model: nn.Module, head_name: str) -> None:
        self.model = model
        self.head_name = head_name
        resolve_module(model, head_name)  # now: a typo should fail at construction, not mid-fit

    @property
    def head(self) -> nn.Module:
        """The head module, looked up by name (the error lists the candidates)."""
        return resolve_module(self.model, self.head_name)

    @abstractmethod
    def denoise(self, **inputs: Any) -> Tensor:
        """Run the full denoiser and return its prediction (noise, velocity, logits)."""

    @abstractmethod
    def training_pairs(self, batch: Any, generator: torch.Generator) -> TrainingPairs:
        """Corrupt a batch of clean data at random timesteps and return the training pairs."""

    def tail_training_pairs(self, batch: Any, generator: torch.Generator) -> TrainingPairs:
        """The pairs a posterior over a tail (a block that ends at the head) fits on: targets in
        the tail's output space.  Default: the head's pairs (the tail ends at the head); an
        adapter whose tail outputs more than its head (EDM: positions too) overrides it."""
        return self.training_pairs(batch, generator)

    @property
    def tail_output_groups(self) -> Mapping[str, slice] | None:
        """:attr:`output_groups` of a tail's output (default: the head's)."""
        return self.output_groups

    def post_head(self, head_output: Tensor, inputs: Mapping[str, Any]) -> Tensor:
        """Map the head's output to the model's output; identity unless the model adds steps.

        ``head_output`` may carry a leading draw axis ``(M, B, ...)``; implementations must
        broadcast over it.
        """
        return head_output

    def project(self, x: Tensor, inputs: Mapping[str, Any]) -> Tensor:
        """Map a sampler state back onto the data's subspace (identity unless constrained).

        Called on ``x_T`` and after every sampler step; molecules remove the centre of mass and
        zero the padding here, which turns any diffusers scheduler into EDM's sampler.
        """
        return x

    def head_output_variance(self, posterior: Any, phi: Tensor,
                             inputs: Mapping[str, Any]) -> Tensor:
        """Exact ``(B, ...)`` variance of the model output under a diagonal head posterior.

        The default pushes the head's closed form through :meth:`post_head`, which must then be
        linear in the head output (adapters whose ``post_head`` is not override this).  Where
        ``post_head`` is the identity, the head's own closed form is used as it is: one op
        instead of one head evaluation per weight (DiT-XL/2's head has 36,896; at 256 px that
        route added 83% to the time of a plain two-step call on a CPU).
        """
        if type(self).post_head is DenoiserAdapter.post_head:
            return posterior.output_variance(phi)
        return posterior.output_variance(phi, post=lambda out: self.post_head(out, inputs))

    def reduce_variance(self, variance: Tensor, inputs: Mapping[str, Any]) -> dict[str, Tensor]:
        """Per-element output variances ``(B, ...)`` -> per-sample scores: their mean."""
        return {"variability": variance.double().flatten(1).mean(1)}

    def variability(self, eps_draws: Tensor, inputs: Mapping[str, Any]) -> dict[str, Tensor]:
        """Per-sample disagreement of M predictions ``(M, B, ...)``: the reduced sample variance."""
        return self.reduce_variance(eps_draws.double().var(0), inputs)

    def input_rows(self, inputs: Mapping[str, Any], index: slice, rows: int) -> dict[str, Any]:
        """A pair's denoiser inputs cut to the samples `index` of its `rows`: every tensor with
        the rows on its leading axis is cut, anything else is kept (how a tail whose recorded
        inputs mix samples is recorded one sample at a time).  Adapters whose inputs hold
        per-sample state in other objects (a KV cache) cut those too."""
        return _rows_of(dict(inputs), index, rows)

    @property
    def output_groups(self) -> Mapping[str, slice] | None:
        """Parts of the head output's last axis predicted with residuals of their own size (e.g.
        molecule positions and atom features): the posterior fits one noise scale per group.
        None: one scale for all outputs."""
        return None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """Return ``model.get_submodule(name)`` with an error that lists what could have been meant."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        pass
    candidates = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(False))]
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    tail = candidates[-12:]
    raise HeadNotFoundError(
        f"no module named '{name}' in {type(model).__name__}.{hint} "
        f"Modules with parameters ({len(candidates)} in all, last {len(tail)} shown): "
        f"{', '.join(tail)}"
    )


def _rows_of(value: Any, index: slice, rows: int) -> Any:
    if isinstance(value, Tensor) and value.dim() and value.shape[0] == rows:
        return value[index]
    if isinstance(value, Mapping):
        return {k: _rows_of(v, index, rows) for k, v in value.items()}
    return value
