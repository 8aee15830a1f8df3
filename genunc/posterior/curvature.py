"""A laplace-torch curvature backend with closed-form GGNs for heads linear in their weights.

laplace-torch's default backend gets the GGN diagonal from full per-row Jacobians ``(N, D, P)``
and its KFAC from ``D`` backward passes per row.  For an image head ``D = C*H*W`` runs into the
thousands: hundreds of GB for the diagonal, minutes for KFAC.  But a head that is linear in its
weights has Jacobians made of its inputs, so both reduce to sums over (unfolded) inputs:

* diag: squared inputs weighted by the likelihood's output-Hessian diagonal (exact);
* kron, Gaussian likelihood, ungrouped Linear/Conv2d: the weight block of the Hessian *is*
  ``I ⊗ sum x x^T``, so each block is exact; only the weight-bias cross terms are dropped, as in
  any KFAC.  (It also honours non-zero padding modes, which curvlinops' KFAC treats as zeros.)

Everything else (full, classification KFAC, other head types) goes to ``CurvlinopsGGN`` unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from laplace.curvature import CurvlinopsGGN
from laplace.utils import Kron
from torch import Tensor, nn


class LinearHeadGGN(CurvlinopsGGN):
    """``CurvlinopsGGN`` whose ``diag`` is closed-form for ``nn.Linear`` and ``nn.Conv2d`` heads."""

    def _closed_form_head(self) -> nn.Module | None:
        head = getattr(self.model, "head", None)
        if self.stochastic or self.subnetwork_indices is not None or self.last_layer:
            return None
        if type(head) is nn.Linear:
            return head
        if type(head) is nn.Conv2d and self.likelihood == "regression":
            return head
        return None

    def _output_hessian(self, f: Tensor) -> Tensor:
        """Diagonal of the likelihood's Hessian w.r.t. the head's own outputs, per row.

        The model may rescale the head's outputs (one noise scale per output group) or compute
        some of its outputs without parameters (frozen classes), or cap them
        (``f = c tanh(z / c)``): the chain rule then scales by 1/scale^2, by
        ``(dz f)^2 = (1 - (f / c)^2)^2``, and keeps the head's own columns.
        """
        if self.likelihood == "regression":
            lam = torch.ones_like(f)
        else:  # softmax cross-entropy: the output Hessian's diagonal is p (1 - p)
            p = torch.softmax(f, dim=-1)
            lam = p * (1 - p)
        cap = getattr(self.model, "softcap", None)
        if cap is not None:
            lam = lam * (1 - (f / cap).square()).square()
        scale = getattr(self.model, "output_scale", None)
        if scale is not None:
            lam = lam / scale.square()
        kept = getattr(self.model, "kept_outputs", None)
        return lam if kept is None else lam[:, kept]

    def diag(self, x: Tensor, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        head = self._closed_form_head()
        if head is None:
            return super().diag(x, y, **kwargs)
        with torch.no_grad():
            f = self.model(x)
            loss = self.factor * self.lossfunc(f, y)
            if isinstance(head, nn.Linear):
                parts = _linear_diag(head, x, self._output_hessian(f))
            else:
                parts = _conv2d_diag(head, x)
        return loss.detach(), torch.cat([p.reshape(-1) for p in parts])

    def kron(self, x: Tensor, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        head = self._closed_form_head()
        if (head is None or self.likelihood != "regression" or getattr(head, "groups", 1) != 1
                or getattr(self.model, "softcap", None) is not None):
            return super().kron(x, y, N=N, **kwargs)
        with torch.no_grad():
            f = self.model(x)
            loss = self.factor * self.lossfunc(f, y)
            if isinstance(head, nn.Conv2d):
                cols = F.unfold(
                    _pad_like_conv(head, x), head.kernel_size, dilation=head.dilation,
                    stride=head.stride,
                )  # (M, Ci*k*k, L)
                n_positions = cols.shape[2]
                inputs = cols.transpose(1, 2).reshape(-1, cols.shape[1])
                n_out = head.out_channels
            else:
                n_positions, inputs, n_out = 1, x, head.out_features
            m = x.shape[0]
            # the output Hessian of a Gaussian likelihood: identity, or 1/scale^2 per output
            scale = getattr(self.model, "output_scale", None)
            eye = torch.eye(n_out, dtype=x.dtype, device=x.device)
            if scale is not None:
                eye = torch.diag(scale.to(x.dtype).square().reciprocal())
            # Batches add factor-wise in laplace-torch, so output factor m*I and input factor
            # (sum x x^T)/N accumulate to N*I and X^T X/N, whose product is the exact I (x) X^T X.
            kfacs = [[m * eye, inputs.T @ inputs / N]]
            if head.bias is not None:
                kfacs.append([m * n_positions * eye])
        return loss.detach(), Kron(kfacs)


def _linear_diag(head: nn.Linear, x: Tensor, lam: Tensor) -> list[Tensor]:
    """diag GGN of y = W x + b: weight (o, i) gets sum_n lambda_no x_ni^2, bias gets sum_n lambda_no."""
    parts = [lam.T @ x.square()]
    if head.bias is not None:
        parts.append(lam.sum(0))
    return parts


def _conv2d_diag(head: nn.Conv2d, x: Tensor) -> list[Tensor]:
    """diag GGN of a conv with Gaussian likelihood: squared unfolded inputs summed over rows/positions."""
    x = _pad_like_conv(head, x)
    cols = F.unfold(x, head.kernel_size, dilation=head.dilation, stride=head.stride)  # (N, Ci*k*k, L)
    sq = cols.square().sum(dim=(0, 2))
    groups = head.groups
    per_group = sq.reshape(groups, head.in_channels // groups, *head.kernel_size)
    weight = per_group.repeat_interleave(head.out_channels // groups, dim=0)
    parts = [weight]
    if head.bias is not None:
        n_positions = cols.shape[0] * cols.shape[2]
        parts.append(torch.full((head.out_channels,), float(n_positions), dtype=x.dtype, device=x.device))
    return parts


def _pad_like_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Apply the conv's own padding explicitly, so unfold can run with padding 0."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return x
        pads: list[int] = []  # 'same' (stride 1): F.pad order is (left, right, top, bottom)
        for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
    else:
        pads = [p for p in reversed(conv.padding) for _ in range(2)]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pads, mode=mode) if any(pads) else x
