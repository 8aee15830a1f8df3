"""How genunc treats each kind of output head.

A *head* is the last module of a denoiser: it maps cached features ``phi`` to the output (noise,
point-cloud velocities, token logits).  The posterior lives on the head's weights only, so all
M posterior draws can share one backbone pass: the backbone's features are computed once and the
M heads are applied to them in a single batched op (grouped conv, batched matmul, or
``torch.func.vmap`` over ``functional_call`` as the general fallback).

Each :class:`HeadOps` also says how the head's input/output tensors break into the *rows* that
laplace-torch sees as independent data points:

* row-wise heads (``nn.Linear`` and anything acting on the last axis) produce one row per leading
  index, e.g. one per atom of a point cloud or per token of a sequence;
* spatial heads (``nn.Conv2d``) mix neighbouring pixels, so one whole sample is one row with its
  output flattened to ``C*H*W``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from genunc.errors import GenuncError, NonFiniteError, ShapeMismatchError

ParamDict = Mapping[str, Tensor]


def check_finite(tensor: Tensor, what: str) -> None:
    """Raise a clear error (with counts) if `tensor` holds NaN or inf.  A finite sum means every
    entry is finite (a NaN or inf would reach it), so the elementwise test runs only when the
    sum is not (a NaN, an inf, or an overflow of finite entries)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum())) \
            and not bool(torch.isfinite(tensor).all()):
        n_nan = int(torch.isnan(tensor).sum())
        n_inf = int(torch.isinf(tensor).sum())
        raise NonFiniteError(
            f"{what} contains {n_nan} NaN and {n_inf} infinite values out of {tensor.numel()}; "
            "check the model inputs (and the dtype: fp16 overflows easily)."
        )


class HeadOps(ABC):
    """Operations genunc needs from one head module: rows for fitting, batched draws, variance."""

    #: True when each leading index of the features is an independent row (Linear-like heads).
    row_wise: bool = True

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.param_names = [name for name, _ in module.named_parameters()]
        self.param_shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
        if not self.param_names:
            raise ShapeMismatchError(f"head {type(module).__name__} has no parameters to perturb")

    # ---------------------------------------------------------------- rows for laplace-torch
    @abstractmethod
    def to_rows(self, features: Tensor, mask: Tensor | None) -> Tensor:
        """Split captured head inputs into laplace-torch data rows (masked rows dropped)."""

    @abstractmethod
    def target_rows(self, target: Tensor, mask: Tensor | None, likelihood: str) -> Tensor:
        """Split targets (in head-output space) into rows aligned with :meth:`to_rows`."""

    # ---------------------------------------------------------------- batched draws
    @abstractmethod
    def apply(self, features: Tensor, params: ParamDict, per_draw: bool = False) -> Tensor:
        """Evaluate the head under M parameter draws in one op.

        ``params`` maps every parameter name to a tensor with a leading draw axis ``M``.
        With ``per_draw=False`` the features ``(B, ...)`` are shared by all draws; with
        ``per_draw=True`` they carry their own leading axis ``(M, B, ...)`` (perturbed
        trajectories).  Returns ``(M, B, ...)``.
        """

    def output_variance(self, features: Tensor, variances: ParamDict,
                        post: Callable[[Tensor], Tensor] | None = None,
                        chunk: int = 64) -> Tensor:
        """Exact output variance under a *diagonal* weight posterior, for heads linear in their
        weights: ``Var[post(f)] = sum_p v_p post(f(phi; e_p))^2`` for a linear map `post`
        (what the model computes after the head, e.g. removing the centre of mass).

        The head is evaluated at every unit parameter vector ``e_p``, `chunk` at a time, as one
        batch of draws: P head evaluations, no Monte-Carlo noise.  Linearity is checked first.
        """
        self._check_linear(features)
        post = post or (lambda x: x)
        total: Tensor | None = None
        for name in self.param_names:
            var = variances[name].reshape(-1).to(features)
            for start in range(0, var.numel(), chunk):
                rows = torch.arange(start, min(start + chunk, var.numel()))
                basis = self._basis(name, rows, features)
                g = post(self.apply(features, basis))  # (m, B, ...)
                part = (g.square() * var[rows].reshape(-1, *([1] * (g.dim() - 1)))).sum(0)
                total = part if total is None else total + part
        return total

    def _basis(self, name: str, rows: Tensor, like: Tensor) -> dict[str, Tensor]:
        """Parameter sets that are zero except entry ``rows[i]`` of parameter `name` in set i."""
        m = len(rows)
        params = {k: like.new_zeros(m, *self.param_shapes[k]) for k in self.param_names}
        params[name].reshape(m, -1)[torch.arange(m), rows] = 1.0
        return params

    def _check_linear(self, features: Tensor) -> None:
        g = torch.Generator().manual_seed(0)
        a, b = ({k: torch.randn(1, *s, generator=g).to(features) for k, s in self.param_shapes.items()}
                for _ in range(2))
        both = {k: a[k] + b[k] for k in a}
        sample = features[:2]
        fa, fb, fab = (self.apply(sample, p) for p in (a, b, both))
        if not torch.allclose(fab, fa + fb, rtol=1e-4, atol=1e-5 * float(fab.abs().max()) + 1e-6):
            raise GenuncError(
                f"closed-form output variance needs a head linear in its weights; "
                f"{type(self.module).__name__} is not: estimate the variance from draws "
                "(sample() + apply()) instead"
            )

    def output_rows(self) -> Tensor | None:
        """For each flat parameter (laplace-torch's order), the output unit it feeds; None
        where parameters do not belong to single outputs."""
        return None

    # ---------------------------------------------------------------- helpers
    def num_draws(self, params: ParamDict) -> int:
        missing = [n for n in self.param_names if n not in params]
        if missing:
            raise ShapeMismatchError(f"draws lack head parameters {missing}")
        sizes = set()
        for name in self.param_names:
            value = params[name]
            if tuple(value.shape[1:]) != self.param_shapes[name]:
                raise ShapeMismatchError(
                    f"draw for '{name}' has shape {tuple(value.shape)}, expected "
                    f"(M, {', '.join(map(str, self.param_shapes[name]))})"
                )
            sizes.add(value.shape[0])
        if len(sizes) != 1:
            raise ShapeMismatchError(f"draws disagree on M: {sorted(sizes)}")
        return sizes.pop()

    def _check_per_draw(self, features: Tensor, n: int, per_draw: bool) -> None:
        if per_draw and (features.dim() < 2 or features.shape[0] != n):
            raise ShapeMismatchError(
                f"per_draw=True needs features with a leading draw axis of size {n}, "
                f"got shape {tuple(features.shape)}"
            )

    def loop_apply(self, features: Tensor, params: ParamDict, per_draw: bool = False) -> Tensor:
        """One ``functional_call`` per draw: the reference the batched paths are tested
        against, and the fallback where ``vmap`` cannot batch a head's ops."""
        n = self.num_draws(params)
        outs = []
        for m in range(n):
            p = {k: v[m] for k, v in params.items()}
            x = features[m] if per_draw else features
            outs.append(functional_call(self.module, p, (x,)))
        return torch.stack(outs)


class LinearOps(HeadOps):
    """``nn.Linear`` heads: bmm over draws; one row per leading index."""

    module: nn.Linear
    row_wise = True

    def _check(self, features: Tensor) -> None:
        if features.shape[-1] != self.module.in_features:
            raise ShapeMismatchError(
                f"Linear head expects {self.module.in_features} input features on the last axis, "
                f"got shape {tuple(features.shape)}"
            )

    def to_rows(self, features: Tensor, mask: Tensor | None) -> Tensor:
        self._check(features)
        rows = features.reshape(-1, features.shape[-1])
        return rows if mask is None else rows[_row_mask(mask, features.shape[:-1])]

    def target_rows(self, target: Tensor, mask: Tensor | None, likelihood: str) -> Tensor:
        if likelihood == "classification":
            rows = target.reshape(-1).long()
            lead = target.shape
        else:
            if target.shape[-1] != self.module.out_features:
                raise ShapeMismatchError(
                    f"regression target has {target.shape[-1]} values on the last axis but the "
                    f"head outputs {self.module.out_features}"
                )
            rows = target.reshape(-1, target.shape[-1])
            lead = target.shape[:-1]
        return rows if mask is None else rows[_row_mask(mask, lead)]

    def apply(self, features: Tensor, params: ParamDict, per_draw: bool = False) -> Tensor:
        n = self.num_draws(params)
        self._check(features)
        self._check_per_draw(features, n, per_draw)
        weight = params["weight"].to(features)  # (M, O, F)
        lead = features.shape[1:-1] if per_draw else features.shape[:-1]
        flat = features.reshape(n if per_draw else 1, -1, features.shape[-1])  # (M|1, N, F)
        out = torch.matmul(flat, weight.transpose(1, 2))  # (M, N, O)
        if "bias" in params:
            out = out + params["bias"].to(features).unsqueeze(1)
        return out.reshape(n, *lead, weight.shape[1])

    def output_rows(self) -> Tensor:
        rows = []
        for name in self.param_names:  # weight (O, F): row-major; bias (O,)
            shape = self.param_shapes[name]
            rows.append(torch.arange(shape[0]).repeat_interleave(int(torch.Size(shape[1:]).numel())))
        return torch.cat(rows)

    def output_variance(self, features: Tensor, variances: ParamDict,
                        post: Callable[[Tensor], Tensor] | None = None, chunk: int = 64) -> Tensor:
        if post is not None:  # a map that mixes outputs: the general route
            return super().output_variance(features, variances, post, chunk)
        self._check(features)
        out = torch.matmul(features.square(), variances["weight"].to(features).T)
        if "bias" in variances:
            out = out + variances["bias"].to(features)
        return out


class Conv2dOps(HeadOps):
    """``nn.Conv2d`` heads: all draws in one convolution; one row per sample."""

    module: nn.Conv2d
    row_wise = False

    def _check(self, features: Tensor, lead_dims: int = 1) -> None:
        if features.dim() != 3 + lead_dims or features.shape[lead_dims] != self.module.in_channels:
            raise ShapeMismatchError(
                f"Conv2d head expects features shaped ({'M, ' * (lead_dims - 1)}B, "
                f"{self.module.in_channels}, H, W), got {tuple(features.shape)}"
            )

    def to_rows(self, features: Tensor, mask: Tensor | None) -> Tensor:
        self._check(features)
        return features if mask is None else features[_row_mask(mask, features.shape[:1])]

    def target_rows(self, target: Tensor, mask: Tensor | None, likelihood: str) -> Tensor:
        if likelihood != "regression":
            raise ShapeMismatchError("Conv2d heads support the regression likelihood only")
        if target.dim() != 4 or target.shape[1] != self.module.out_channels:
            raise ShapeMismatchError(
                f"regression target must be (B, {self.module.out_channels}, H, W), "
                f"got {tuple(target.shape)}"
            )
        rows = target.flatten(1)
        return rows if mask is None else rows[_row_mask(mask, target.shape[:1])]

    def _pad(self, x: Tensor) -> tuple[Tensor, str | tuple[int, ...]]:
        conv = self.module
        if conv.padding_mode == "zeros":
            return x, conv.padding
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), 0

    def apply(self, features: Tensor, params: ParamDict, per_draw: bool = False) -> Tensor:
        n = self.num_draws(params)
        conv = self.module
        self._check(features, lead_dims=2 if per_draw else 1)
        self._check_per_draw(features, n, per_draw)
        g, co = conv.groups, conv.out_channels
        weight = params["weight"].to(features)  # (M, Co, Ci/g, k, k)
        bias = params["bias"].to(features) if "bias" in params else None  # (M, Co)
        if per_draw:
            # (M, B, Ci, H, W) -> (B, M*Ci, H, W): draw m's channels meet only draw m's kernels
            b = features.shape[1]
            x, padding = self._pad(features.transpose(0, 1).reshape(b, -1, *features.shape[-2:]))
            out = F.conv2d(x, weight.reshape(n * co, *weight.shape[2:]),
                           None if bias is None else bias.reshape(-1),
                           conv.stride, padding, conv.dilation, groups=n * g)
            return out.reshape(b, n, co, *out.shape[-2:]).transpose(0, 1)
        # Shared features: the M heads are one conv with M*Co output channels, ordered
        # (group, draw, channel) so that each group's output block sees that group's inputs.
        b = features.shape[0]
        x, padding = self._pad(features)
        w = weight.reshape(n, g, co // g, *weight.shape[2:]).transpose(0, 1)
        bb = None if bias is None else bias.reshape(n, g, co // g).transpose(0, 1).reshape(-1)
        out = F.conv2d(x, w.reshape(g * n * (co // g), *weight.shape[2:]), bb,
                       conv.stride, padding, conv.dilation, groups=g)  # (B, g*M*Co/g, H', W')
        out = out.reshape(b, g, n, co // g, *out.shape[-2:]).permute(2, 0, 1, 3, 4, 5)
        return out.reshape(n, b, co, *out.shape[-2:])

    def output_variance(self, features: Tensor, variances: ParamDict,
                        post: Callable[[Tensor], Tensor] | None = None, chunk: int = 64) -> Tensor:
        if post is not None:
            return super().output_variance(features, variances, post, chunk)
        conv = self.module
        self._check(features)
        x, padding = self._pad(features.square())
        bias = variances.get("bias")
        return F.conv2d(
            x,
            variances["weight"].to(features),
            None if bias is None else bias.to(features),
            conv.stride,
            padding,
            conv.dilation,
            conv.groups,
        )


class GenericOps(HeadOps):
    """Any other head (e3nn linears, small MLP blocks): ``vmap`` over ``functional_call``.

    Rows follow the last axis, as for ``nn.Linear``; heads that mix positions should get their own
    :class:`HeadOps` subclass registered with :func:`register_head_ops`.
    """

    row_wise = True

    def to_rows(self, features: Tensor, mask: Tensor | None) -> Tensor:
        rows = features.reshape(-1, features.shape[-1])
        return rows if mask is None else rows[_row_mask(mask, features.shape[:-1])]

    def target_rows(self, target: Tensor, mask: Tensor | None, likelihood: str) -> Tensor:
        if likelihood == "classification":
            rows, lead = target.reshape(-1).long(), target.shape
        else:
            rows, lead = target.reshape(-1, target.shape[-1]), target.shape[:-1]
        return rows if mask is None else rows[_row_mask(mask, lead)]

    def apply(self, features: Tensor, params: ParamDict, per_draw: bool = False) -> Tensor:
        n = self.num_draws(params)
        self._check_per_draw(features, n, per_draw)
        names = list(self.param_names)

        def one(p: tuple[Tensor, ...], x: Tensor) -> Tensor:
            return functional_call(self.module, dict(zip(names, p)), (x,))

        stacked = tuple(params[k].to(features) for k in names)
        try:
            return vmap(one, in_dims=(0, 0 if per_draw else None))(stacked, features)
        except (RuntimeError, NotImplementedError):  # ops vmap cannot batch: fall back to a loop
            return self.loop_apply(features, dict(zip(names, stacked)), per_draw)


_REGISTRY: list[tuple[type[nn.Module], type[HeadOps]]] = [
    (nn.Linear, LinearOps),
    (nn.Conv2d, Conv2dOps),
]


def register_head_ops(module_type: type[nn.Module], ops: type[HeadOps]) -> None:
    """Teach genunc a fast path for a new head type (checked before the built-ins)."""
    _REGISTRY.insert(0, (module_type, ops))


def head_ops_for(module: nn.Module) -> HeadOps:
    """Pick the fastest :class:`HeadOps` implementation for `module`."""
    for module_type, ops in _REGISTRY:
        if type(module) is module_type or (
            isinstance(module, module_type) and type(module).forward is module_type.forward
        ):
            return ops(module)
    return GenericOps(module)


def _row_mask(mask: Tensor, lead_shape: torch.Size) -> Tensor:
    """Flatten a boolean mask over the leading (row) dimensions, checking its shape."""
    if tuple(mask.shape) != tuple(lead_shape):
        raise ShapeMismatchError(
            f"mask has shape {tuple(mask.shape)} but the rows are indexed by {tuple(lead_shape)}"
        )
    flat = mask.reshape(-1).bool()
    if not bool(flat.any()):
        raise ShapeMismatchError("mask selects no rows")
    return flat
