"""Tiny, untrained denoisers with the output layouts genunc serves (images, point clouds,
tokens, vectors).

They exist so that tests, benchmarks and smoke runs exercise the real code paths in seconds; they
are not reference models and produce nothing meaningful.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from genunc.zoo.pretrained import Pretrained


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of integer or continuous timesteps, ``(B,) -> (B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ToyImageDenoiser(nn.Module):
    """``(B, C, H, W), t -> eps``; the head is ``conv_out`` (as in diffusers' UNets)."""

    def __init__(self, channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.width = width
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Linear(width, width)
        self.body = nn.Sequential(nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU())
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = self.conv_in(x) + self.time(timestep_embedding(t, self.width))[:, :, None, None]
        return self.conv_out(self.body(h))


class ToyPointCloudDenoiser(nn.Module):
    """``(B, N, 3+K), t, node_mask -> eps`` per node; the head is the per-node ``head`` Linear."""

    def __init__(self, n_features: int = 8, width: int = 32) -> None:
        super().__init__()
        self.width = width
        self.embed = nn.Linear(n_features, width)
        self.time = nn.Linear(width, width)
        self.mix = nn.Sequential(nn.SiLU(), nn.Linear(2 * width, width), nn.SiLU())
        self.head = nn.Linear(width, n_features)

    def forward(self, x: Tensor, t: Tensor, node_mask: Tensor | None = None) -> Tensor:
        mask = torch.ones(x.shape[:2], device=x.device) if node_mask is None else node_mask.float()
        h = self.embed(x) + self.time(timestep_embedding(t, self.width))[:, None]
        pooled = (h * mask[..., None]).sum(1, keepdim=True) / mask.sum(1, keepdim=True)[..., None]
        h = self.mix(torch.cat([h, pooled.expand_as(h)], dim=-1))
        return self.head(h) * mask[..., None]


class ToyTokenDenoiser(nn.Module):
    """``(B, L) token ids -> logits (B, L, V)``; the head is ``lm_head`` (one mask token extra)."""

    def __init__(self, vocab_size: int = 12, width: int = 32, length: int = 16) -> None:
        super().__init__()
        self.mask_id = vocab_size
        self.embed = nn.Embedding(vocab_size + 1, width)
        self.position = nn.Parameter(torch.randn(length, width) * 0.1)
        self.mix = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=2 * width,
                                              batch_first=True, dropout=0.0)
        self.lm_head = nn.Linear(width, vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.position[: x.shape[1]]
        return self.lm_head(self.mix(h))


class ToyVectorDenoiser(Pretrained, nn.Module):
    """``x (B, D), t, cond (B, C) -> eps (B, D)``: an MLP over the noisy vector, the context and
    a timestep embedding; the head is the Linear ``head`` (the layout of a diffusion policy's
    actor, :class:`~genunc.adapters.vector.VectorDenoiserAdapter`).  ``depth`` hidden layers of
    ``width``; ``save_pretrained`` / ``from_pretrained`` keep its arguments."""

    def __init__(self, dim: int = 3, cond_dim: int = 11, width: int = 32, depth: int = 2,
                 time_dim: int = 16) -> None:
        super().__init__()
        self.config = dict(dim=dim, cond_dim=cond_dim, width=width, depth=depth,
                           time_dim=time_dim)
        self.dim, self.cond_dim, self.time_dim = dim, cond_dim, time_dim
        layers: list[nn.Module] = []
        sizes = [dim + cond_dim + time_dim] + [width] * depth
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(n_in, n_out), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, dim)

    def forward(self, x: Tensor, t: Tensor | int, cond: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        h = torch.cat([x, cond, timestep_embedding(t, self.time_dim).to(x.dtype)], dim=-1)
        return self.head(self.body(h))
