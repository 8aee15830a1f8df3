"""The networks of DUAL: a conditional vector denoiser (actor, behaviour model, transition model)
and twin critics.

The denoiser ends in an ``nn.Linear`` named ``head`` so that genunc's head posterior attaches to
it as to any other modality's head (:class:`~genunc.adapters.vector.VectorDenoiserAdapter`).
Sizes follow Diffusion-QL (three hidden layers of 256), the usual choice for diffusion policies
on MuJoCo; the activation is SiLU rather than Diffusion-QL's Mish: as smooth, and on a CPU five
times faster forward and backward (Mish was half of an update's time here).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def mlp(sizes: list[int], activation: type[nn.Module] = nn.SiLU) -> nn.Sequential:
    """Linear layers of `sizes` with `activation` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class TimeEmbedding(nn.Module):
    """Sinusoidal features of an integer diffusion timestep, then a small MLP."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.dim = dim
        self.proj = mlp([dim, 2 * dim, dim])

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / max(half - 1, 1))
        angles = t.float().reshape(-1, 1) * freqs
        return self.proj(torch.cat([angles.sin(), angles.cos()], dim=-1))


class DiffusionMLP(nn.Module):
    """``model(x_t, t, cond) -> eps`` over vectors ``x (B, D)`` given a context ``cond (B, C)``.

    ``t`` is one integer timestep per row (or one for all rows); the last layer is the Linear
    ``head`` the Laplace posterior sits on.
    """

    def __init__(self, dim: int, cond_dim: int, width: int = 256, depth: int = 3,
                 time_dim: int = 16) -> None:
        super().__init__()
        self.dim, self.cond_dim, self.width, self.depth, self.time_dim = (
            dim, cond_dim, width, depth, time_dim)
        self.time = TimeEmbedding(time_dim)
        self.trunk = nn.Sequential(mlp([dim + cond_dim + time_dim] + [width] * depth), nn.SiLU())
        self.head = nn.Linear(width, dim)

    def forward(self, x: Tensor, t: Tensor | int, cond: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        return self.head(self.trunk(torch.cat([x, cond, self.time(t)], dim=-1)))

    def config(self) -> dict[str, int]:
        return {"dim": self.dim, "cond_dim": self.cond_dim, "width": self.width,
                "depth": self.depth, "time_dim": self.time_dim}


class TwinCritic(nn.Module):
    """Two independent Q networks ``Q_i(s, a)``; the pessimistic value is their minimum."""

    def __init__(self, state_dim: int, action_dim: int, width: int = 256, depth: int = 3) -> None:
        super().__init__()
        self.state_dim, self.action_dim, self.width, self.depth = state_dim, action_dim, width, depth
        self.q = nn.ModuleList(mlp([state_dim + action_dim] + [width] * depth + [1]) for _ in range(2))

    def forward(self, state: Tensor, action: Tensor) -> Tensor:
        """``(B, 2)``: both critics' values."""
        sa = torch.cat([state, action], dim=-1)
        return torch.cat([q(sa) for q in self.q], dim=-1)

    def min_q(self, state: Tensor, action: Tensor) -> Tensor:
        return self(state, action).min(dim=-1).values

    def config(self) -> dict[str, int]:
        return {"state_dim": self.state_dim, "action_dim": self.action_dim,
                "width": self.width, "depth": self.depth}
