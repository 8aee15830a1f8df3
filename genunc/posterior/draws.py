"""A set of M posterior weight draws for one head."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class HeadDraws:
    """M draws of the head's parameters, each stored with a leading draw axis.

    ``params[name]`` has shape ``(M, *param_shape)``; :attr:`flat` is the ``(M, P)`` layout that
    laplace-torch uses (parameters concatenated in ``named_parameters`` order).
    """

    params: Mapping[str, Tensor]

    @classmethod
    def from_flat(cls, flat: Tensor, shapes: Mapping[str, tuple[int, ...]]) -> "HeadDraws":
        """Split laplace-torch's ``(M, P)`` samples into named parameter tensors."""
        out: dict[str, Tensor] = {}
        offset = 0
        for name, shape in shapes.items():
            size = int(torch.Size(shape).numel())
            out[name] = flat[:, offset : offset + size].reshape(flat.shape[0], *shape)
            offset += size
        if offset != flat.shape[1]:
            raise ValueError(f"flat draws have {flat.shape[1]} columns, the head has {offset}")
        return cls(out)

    @property
    def flat(self) -> Tensor:
        return torch.cat([p.reshape(p.shape[0], -1) for p in self.params.values()], dim=1)

    def __len__(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def __getitem__(self, index: int | slice) -> "HeadDraws":
        """Select draws (an int keeps a draw axis of size 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return HeadDraws({k: v[index] for k, v in self.params.items()})

    def to(self, *args, **kwargs) -> "HeadDraws":
        return HeadDraws({k: v.to(*args, **kwargs) for k, v in self.params.items()})

    def cat(self, other: "HeadDraws") -> "HeadDraws":
        return HeadDraws({k: torch.cat([v, other.params[k]]) for k, v in self.params.items()})
