"""Token mutual information without materialising M head draws.

The ``mutual_information`` score (:func:`genunc.scores.tokens.mutual_information`) is read from
the logits of M head draws.  For a vocabulary head of LLaDA-8B's size (126,464 x 4,096) the M
draws alone take M x 2 GB; the estimators here never build them:

* :class:`ClosedFormMI` (``linearised``, ``bridge``): a linear head under a diagonal posterior
  gives every logit a Gaussian, mean = the MAP's logit, variance = ``phi^2 @ var(W)^T + var(b)``
  (one more head pass, :meth:`HeadOps.output_variance`, logits independent across the
  vocabulary); the mutual information then has a closed form, a second-order expansion
  (:func:`~genunc.scores.tokens.linearised_mutual_information`) or the Laplace bridge's
  Dirichlet (:func:`~genunc.scores.tokens.bridge_mutual_information`).  No Monte-Carlo noise.
* :class:`PrunedMI` (``pruned``): M draws of the MAP's top-K vocabulary rows only, plus one
  remainder bucket whose logit is the log-sum-exp of the other rows under the MAP.  Each row's
  M draws come from that row's own random stream (``head_draws`` of the run's seed, keyed by the
  row), so a row's draws are the same whichever positions, chunks or steps ask for it: at K = V
  the estimate equals :func:`mutual_information` over the M full heads made from the same
  numbers (:meth:`PrunedMI.materialise`, small heads only).

Both work in chunks of positions, so their extra memory is bounded (``max_bytes``) whatever the
batch.  Both need a head posterior with diagonal structure over an ``nn.Linear`` head; any other
posterior is refused in one line (``mi_estimator="sampled"`` handles them all).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from genunc import streams
from genunc.errors import GenuncError, ShapeMismatchError
from genunc.posterior.draws import HeadDraws, as_float32
from genunc.posterior.heads import HeadOps, LinearOps, check_finite
from genunc.scores.tokens import (
    MI_ESTIMATORS,
    dirichlet_mutual_information,
    laplace_bridge,
    linearised_mutual_information,
    mutual_information,
    mutual_information_leave_one_out,
    pruned_vocabulary,
    with_remainder,
)

if TYPE_CHECKING:
    from genunc.posterior.laplace_head import HeadPosterior

#: the default top-K of ``mi_estimator="pruned"``
DEFAULT_TOP_K = 64


@dataclass(frozen=True)
class LogitMap:
    """What a pipeline does to the head's raw logits before its softmax, elementwise:
    ``softcap`` (DiffusionGemma's ``cap * tanh(z / cap)``), then ``scale`` (1 / temperature)."""

    softcap: float | None = None
    scale: float = 1.0

    @classmethod
    def for_sampling(cls, temperature: float | None = 0.0, sampling_method: str = "auto",
                     top_k: int | None = None, top_p: float | None = None,
                     softcap: float | None = None) -> "LogitMap":
        """The map a diffusers text scheduler's sampling arguments apply (what
        :func:`~genunc.sampling.masked.sampling_logits` does): 1 / temperature when it samples
        multinomially, nothing when greedy; refuses top-k / top-p filtering, which acts on the
        whole vocabulary and so is not elementwise."""
        temperature = float(temperature or 0.0)
        multinomial = sampling_method == "multinomial" or (sampling_method == "auto" and temperature != 0)
        if temperature == 0 or not multinomial:
            return cls(softcap=softcap)
        if (top_k is not None and top_k > 0) or (top_p is not None and top_p < 1):
            raise GenuncError("mi_estimator 'linearised', 'bridge' and 'pruned' take greedy or "
                              "temperature sampling; top_k / top_p filter the whole vocabulary: use "
                              "mi_estimator='sampled'")
        return cls(softcap=softcap, scale=1.0 / temperature)

    def __call__(self, logits: Tensor) -> Tensor:
        out = logits
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out * self.scale if self.scale != 1.0 else out

    def gaussian(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """The Gaussian of the mapped logits: exact for the scale; to first order in the noise
        through the softcap (``var * (1 - tanh^2)^2``, the delta method)."""
        if self.softcap is not None:
            t = torch.tanh(mean / self.softcap)
            mean, var = t * self.softcap, var * (1 - t.square()).square()
        return mean * self.scale, var * self.scale ** 2


@dataclass
class TokenMIOutput:
    """Per position: ``mi`` ``(N,)``; with M >= 3 draws (pruned) ``leave_one_out`` ``(M, N)``;
    with ``tokens`` given, ``token_probability`` ``(N,)`` (the posterior predictive's
    probability of each token: the ``posterior_confidence`` statistic)."""

    mi: Tensor
    leave_one_out: Tensor | None = None
    token_probability: Tensor | None = None


def _linear_ops(posterior: HeadPosterior, estimator: str) -> LinearOps:
    if getattr(posterior, "kind", None) != "head":
        raise GenuncError(f"mi_estimator={estimator!r} needs a head posterior; a "
                          f"{getattr(posterior, 'kind', type(posterior).__name__)!r} posterior's "
                          "weights pass through nonlinearities: use mi_estimator='sampled'")
    if posterior.structure != "diag":
        raise GenuncError(f"mi_estimator={estimator!r} needs the diagonal posterior (independent "
                          f"logits); this one is {posterior.structure!r}: use mi_estimator='sampled'")
    if not isinstance(posterior.ops, LinearOps):
        raise GenuncError(f"mi_estimator={estimator!r} needs an nn.Linear vocabulary head, not "
                          f"{type(posterior.ops.module).__name__}: use mi_estimator='sampled'")
    return posterior.ops


def _check_inputs(ops: HeadOps, features: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    module = ops.module
    if features.dim() != 2 or features.shape[1] != module.in_features:
        raise ShapeMismatchError(f"token MI takes (N, {module.in_features}) head features, got "
                                 f"{tuple(features.shape)}")
    if logits.dim() != 2 or logits.shape != (features.shape[0], module.out_features):
        raise ShapeMismatchError(f"token MI takes (N, {module.out_features}) MAP logits for the "
                                 f"{features.shape[0]} positions, got {tuple(logits.shape)}")
    check_finite(features, "head features")
    return as_float32(features), logits


def _params(flat: Tensor, ops: HeadOps) -> dict[str, Tensor]:
    return {k: v[0] for k, v in HeadDraws.from_flat(flat.unsqueeze(0), ops).params.items()}


class TokenMI:
    """An estimator of each position's mutual information from its head features ``(N, F)``
    and the MAP's logits there ``(N, V)`` (what the model computed; forbidden classes at the
    dtype's lowest value stay forbidden).  ``logit_map``: what the pipeline does to the logits
    before its softmax."""

    estimator: str = ""
    num_draws: int | None = None

    def __call__(self, features: Tensor, logits: Tensor, logit_map: LogitMap | None = None,
                 tokens: Tensor | None = None) -> TokenMIOutput:
        raise NotImplementedError


class ClosedFormMI(TokenMI):
    """``linearised`` or ``bridge`` mutual information from the logits' Gaussian (see the module
    docstring); ``variances``: the head's parameter name -> posterior variance of each weight.

    ``top_k`` (``linearised`` only): the variance pass over each position's top-K rows of the
    MAP instead of the whole vocabulary (a gather of K rows, not a second head pass); the other
    rows' terms ``0.5 var_k p_k (1 - p_k)`` are dropped, at most ``0.5 * (their MAP mass) *
    max var``.  Exact at K = V.
    """

    def __init__(self, ops: HeadOps, variances: Mapping[str, Tensor], estimator: str = "linearised",
                 *, top_k: int | None = None, max_bytes: int = 2 ** 28) -> None:
        if estimator not in ("linearised", "bridge"):
            raise GenuncError(f"closed-form token MI is 'linearised' or 'bridge', got {estimator!r}")
        if top_k is not None:
            if estimator != "linearised":
                raise GenuncError("the bridge's Dirichlet needs every class's variance: mi_top_k "
                                  "applies to 'linearised' and 'pruned'")
            pruned_vocabulary(torch.zeros(1, 1), top_k)  # checks top_k
        self.ops, self.variances, self.estimator = ops, dict(variances), estimator
        self.top_k, self.max_bytes = top_k, max_bytes

    @classmethod
    def from_posterior(cls, posterior: HeadPosterior, estimator: str = "linearised",
                       **kwargs: Any) -> "ClosedFormMI":
        """The posterior's weight variances, computed once (one head-sized tensor)."""
        ops = _linear_ops(posterior, estimator)
        return cls(ops, _params(posterior.posterior_variance.detach(), ops), estimator, **kwargs)

    def __call__(self, features: Tensor, logits: Tensor, logit_map: LogitMap | None = None,
                 tokens: Tensor | None = None) -> TokenMIOutput:
        features, logits = _check_inputs(self.ops, features, logits)
        logit_map = logit_map or LogitMap()
        n, v = logits.shape
        if self.top_k is not None and self.top_k < v:
            return self._top_rows(features, logits, logit_map, tokens)
        # the variance pass in large chunks (a BLAS matmul streams var(W) once per chunk), the
        # float64 closed form in smaller ones: at most ~max_bytes together
        outer = max(1, self.max_bytes // (v * 4 * 2))
        inner = max(1, self.max_bytes // (v * 8 * 32))  # the bridge keeps ~16 (., V) float64s
        mi, prob = [], []
        for start in range(0, n, outer):
            part = slice(start, start + outer)
            var_part = self.ops.output_variance(features[part], self.variances)
            for sub in range(0, var_part.shape[0], inner):
                rows = slice(start + sub, start + min(sub + inner, var_part.shape[0]))
                m_i, p_i = self._closed_form(logits[rows], var_part[sub : sub + inner], logit_map,
                                             None if tokens is None else tokens[rows])
                mi.append(m_i)
                if p_i is not None:
                    prob.append(p_i)
            del var_part
        return TokenMIOutput(torch.cat(mi), None, torch.cat(prob) if prob else None)

    def _top_rows(self, features: Tensor, logits: Tensor, logit_map: LogitMap,
                  tokens: Tensor | None) -> TokenMIOutput:
        """``linearised`` over each position's top-K rows (see the class docstring)."""
        n, f = features.shape
        k = self.top_k
        chunk = max(1, self.max_bytes // (4 * k * f + 8 * 8 * logits.shape[1]))
        var_w = self.variances["weight"].to(features)
        var_b = self.variances["bias"].to(features) if "bias" in self.variances else None
        mi, prob = [], []
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            raw, phi2 = logits[rows].double(), features[rows].square()
            index, _ = pruned_vocabulary(raw, k)
            var = torch.einsum("nkf,nf->nk", var_w[index], phi2)
            if var_b is not None:
                var = var + var_b[index]
            mean_all, _ = logit_map.gaussian(raw, torch.zeros_like(raw))
            mean_all = torch.where(raw > -1e30, mean_all, raw)
            _, var = logit_map.gaussian(raw.gather(-1, index), var.double())
            p_all = torch.softmax(mean_all, -1)
            p = p_all.gather(-1, index)
            mi.append(0.5 * (var * p * (1 - p)).sum(-1))
            if tokens is not None:  # probit on the top rows, the MAP's softmax elsewhere
                kappa = torch.ones_like(mean_all).scatter(-1, index, (1 + math.pi / 8 * var).rsqrt())
                q = torch.softmax(torch.where(mean_all > -1e30, mean_all * kappa, mean_all), -1)
                prob.append(q.gather(-1, tokens[rows].long().unsqueeze(-1)).squeeze(-1))
        return TokenMIOutput(torch.cat(mi), None, torch.cat(prob) if prob else None)

    def _closed_form(self, logits: Tensor, var: Tensor, logit_map: LogitMap,
                     tokens: Tensor | None) -> tuple[Tensor, Tensor | None]:
        raw = logits.double()
        mean, var = logit_map.gaussian(raw, var.double())
        mean = torch.where(raw > -1e30, mean, raw)  # forbidden classes stay forbidden
        prob = None
        if self.estimator == "bridge":
            alpha = laplace_bridge(mean, var)
            mi = torch.where((alpha > 0).sum(-1) >= 2, dirichlet_mutual_information(alpha),
                             torch.zeros(alpha.shape[0], dtype=torch.float64, device=alpha.device))
            if tokens is not None:
                p = alpha / alpha.sum(-1, keepdim=True).clamp_min(1e-300)
                prob = p.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
            return mi, prob
        mi = linearised_mutual_information(mean, var)
        if tokens is not None:  # the probit predictive (laplace-torch's link_approx="probit")
            kappa = (1 + math.pi / 8 * var).rsqrt()
            p = torch.softmax(torch.where(mean > -1e30, mean * kappa, mean), -1)
            prob = p.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
        return mi, prob


class PrunedMI(TokenMI):
    """``pruned`` mutual information: M draws of each position's top-K rows (see the module
    docstring).  ``stds``: parameter name -> posterior standard deviation of each weight;
    ``means``: the posterior mean, needed only by :meth:`materialise`."""

    estimator = "pruned"

    def __init__(self, ops: HeadOps, stds: Mapping[str, Tensor], num_draws: int, top_k: int,
                 seed: int = 0, *, means: Mapping[str, Tensor] | None = None,
                 max_bytes: int = 2 ** 28) -> None:
        if not isinstance(ops, LinearOps):
            raise GenuncError("mi_estimator='pruned' needs an nn.Linear vocabulary head")
        if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 2:
            raise GenuncError(f"mutual information compares draws: num_draws must be >= 2, got "
                              f"{num_draws!r}")
        pruned_vocabulary(torch.zeros(1, 1), top_k)  # checks top_k
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise GenuncError(f"seed must be a non-negative integer, got {seed!r}")
        self.ops, self.stds, self.means = ops, dict(stds), None if means is None else dict(means)
        self.num_draws, self.top_k, self.seed, self.max_bytes = num_draws, top_k, seed, max_bytes

    @classmethod
    def from_posterior(cls, posterior: HeadPosterior, num_draws: int, top_k: int = DEFAULT_TOP_K,
                       seed: int = 0, **kwargs: int) -> "PrunedMI":
        ops = _linear_ops(posterior, "pruned")
        return cls(ops, _params(posterior.posterior_variance.detach().sqrt(), ops), num_draws,
                   top_k, seed, means=_params(posterior.mean.detach(), ops), **kwargs)

    def row_noise(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Standard normals of rows `rows` ``(R,)``: weight ``(R, M, F)`` and bias ``(R, M)``,
        row r from its own stream (the same numbers wherever row r is drawn); views of one
        ``(R, M, F + 1)`` tensor, filled in place."""
        f = self.ops.module.in_features
        z = torch.empty(len(rows), self.num_draws, f + 1)
        for j, g in enumerate(streams.sample_generators(self.seed, "head_draws", rows.tolist())):
            torch.randn(self.num_draws, f + 1, generator=g, out=z[j])
        return z[..., :f], z[..., f]

    def materialise(self) -> HeadDraws:
        """The M full heads whose top-K rows :meth:`__call__` draws (every row from its own
        stream): the reference the pruned estimate equals at K = V.  Small heads only."""
        if self.means is None:
            raise GenuncError("materialise() needs the posterior mean (build with from_posterior)")
        zw, zb = self.row_noise(torch.arange(self.ops.module.out_features))
        params = {"weight": self.means["weight"] + self.stds["weight"] * zw.transpose(0, 1)}
        if "bias" in self.stds:
            params["bias"] = self.means["bias"] + self.stds["bias"] * zb.T
        return HeadDraws(params, self.ops)

    def __call__(self, features: Tensor, logits: Tensor, logit_map: LogitMap | None = None,
                 tokens: Tensor | None = None) -> TokenMIOutput:
        features, logits = _check_inputs(self.ops, features, logits)
        logit_map = logit_map or LogitMap()
        n, f = features.shape
        k = min(self.top_k, logits.shape[1])
        m = self.num_draws
        # per position at most K new rows: their (M, F + 1) noise and one (K, F) gather
        chunk = max(1, self.max_bytes // (4 * k * (f + 1) * (m + 2)))
        std_w = self.stds["weight"].to(features)
        std_b = self.stds["bias"].to(features) if "bias" in self.stds else None
        mi, loo, prob = [], [], []
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            phi, raw = features[rows], logits[rows]
            index, _ = pruned_vocabulary(raw, k)  # (n, K)
            mapped = logit_map(raw.double())
            remainder = None if k == raw.shape[1] else \
                torch.logsumexp(mapped.scatter(-1, index, -torch.inf), -1)
            unique, inverse = torch.unique(index, return_inverse=True)
            zw, zb = self.row_noise(unique.cpu())
            zw, zb = zw.to(features), zb.to(features)
            zw.mul_(std_w[unique].unsqueeze(1))  # (U, M, F): the rows' weight deviations
            delta = torch.stack([torch.einsum("nkf,nf->nk", zw[:, d][inverse], phi)
                                 for d in range(m)])  # (M, n, K)
            if std_b is not None:
                delta = delta + (zb * std_b[unique].unsqueeze(1)).T[:, inverse]
            top = raw.double().gather(-1, index)
            drawn = with_remainder(torch.where(top > -1e30, logit_map(top + delta.double()), top),
                                   remainder)  # (M, n, K [+ 1])
            mi.append(mutual_information(drawn))
            if m >= 3:
                loo.append(mutual_information_leave_one_out(drawn))
            if tokens is not None:
                token = tokens[rows].long().unsqueeze(-1)
                where = index == token
                mean_p = torch.softmax(drawn, -1)[..., :k].mean(0)  # (n, K)
                in_top = (mean_p * where).sum(-1)
                map_p = torch.softmax(mapped, -1).gather(-1, token).squeeze(-1)
                prob.append(torch.where(where.any(-1), in_top, map_p))
            del zw, zb, delta, drawn
        return TokenMIOutput(torch.cat(mi), torch.cat(loo, 1) if loo else None,
                             torch.cat(prob) if prob else None)


def token_mi(posterior: HeadPosterior, estimator: str, *, num_draws: int,
             top_k: int | None = None, seed: int = 0) -> TokenMI:
    """The draw-free estimator named `estimator` (one of ``MI_ESTIMATORS`` but ``sampled``,
    which reads materialised draws) for `posterior`; refuses in one line what it cannot do.
    ``top_k``: the pruned vocabulary (``pruned``: default :data:`DEFAULT_TOP_K`;
    ``linearised``: default None, the whole vocabulary)."""
    if estimator not in MI_ESTIMATORS:
        raise GenuncError(f"mi_estimator must be one of {MI_ESTIMATORS}, got {estimator!r}")
    if estimator == "sampled":
        raise GenuncError("mi_estimator='sampled' reads materialised draws (posterior.sample)")
    if posterior is None:
        raise GenuncError("no posterior: call fit_posterior(...) or load one first")
    if estimator == "pruned":
        return PrunedMI.from_posterior(posterior, num_draws,
                                       DEFAULT_TOP_K if top_k is None else top_k, seed)
    if estimator == "bridge" and top_k is not None:
        raise GenuncError("the bridge's Dirichlet needs every class's variance: mi_top_k "
                          "applies to 'linearised' and 'pruned'")
    return ClosedFormMI.from_posterior(posterior, estimator, top_k=top_k)


def check_mi_estimator(estimator: str, top_k: int | None) -> None:
    """Refuse an unknown estimator or a bad ``mi_top_k`` before anything runs."""
    if estimator not in MI_ESTIMATORS:
        raise GenuncError(f"mi_estimator must be one of {MI_ESTIMATORS}, got {estimator!r}")
    if top_k is not None:
        pruned_vocabulary(torch.zeros(1, 1), top_k)
        if estimator in ("sampled", "bridge"):
            raise GenuncError(f"mi_top_k applies to 'linearised' and 'pruned', not {estimator!r}")


__all__ = ["DEFAULT_TOP_K", "ClosedFormMI", "LogitMap", "PrunedMI", "TokenMI", "TokenMIOutput",
           "check_mi_estimator", "token_mi"]
