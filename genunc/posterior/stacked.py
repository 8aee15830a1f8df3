"""What every set of M posterior draws shares, whichever weights it perturbs: named parameter
tensors with a leading draw axis, and whether draw 0 is the posterior mean."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor


class StackedDraws:
    """Mixin for frozen dataclasses with fields ``params`` (name -> ``(M, *shape)``) and
    ``with_map`` (:class:`~genunc.posterior.draws.HeadDraws`,
    :class:`~genunc.posterior.tail.TailDraws`)."""

    params: Mapping[str, Tensor]
    with_map: bool

    @property
    def flat(self) -> Tensor:
        """The ``(M, P)`` layout laplace-torch uses (parameters in ``named_parameters`` order)."""
        return torch.cat([p.reshape(p.shape[0], -1) for p in self.params.values()], dim=1)

    def draw(self, m: int) -> dict[str, Tensor]:
        """Draw `m`'s parameters (name -> tensor, no draw axis)."""
        return {k: v[m] for k, v in self.params.items()}

    def __len__(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def __getitem__(self, index: int | slice) -> Any:
        """Select draws (an int keeps a draw axis of size 1); the MAP stays marked if kept."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        keeps_map = self.with_map and index.indices(len(self))[0] == 0
        return replace(self, params={k: v[index] for k, v in self.params.items()},
                       with_map=keeps_map)

    def to(self, *args: Any, **kwargs: Any) -> Any:
        return replace(self, params={k: v.to(*args, **kwargs) for k, v in self.params.items()})
