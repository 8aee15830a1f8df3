"""A Laplace posterior over a denoiser's output head, fitted with laplace-torch.

laplace-torch's own last-layer mode needs an ``nn.Linear`` head and a model that takes one tensor.
genunc instead hands laplace-torch a tiny model whose input is the head's *input* (captured by
:mod:`genunc.posterior.capture`), so any head type (Linear, Conv2d, e3nn linears, small blocks)
gets a full-network Laplace over exactly the head's weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from laplace import Laplace
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from genunc._seed import as_generator
from genunc.adapters.base import DenoiserAdapter, Likelihood, resolve_module
from genunc.errors import FingerprintMismatchError, GenuncError, ShapeMismatchError
from genunc.posterior.base import (
    Posterior,
    check_fit_options,
    check_num_draws,
    check_output_groups,
    classes_without_data,
    fill_uncovered,
    group_noise_scales,
    method_info,
    tune_hyperparameters,
)
from genunc.posterior.capture import HeadData, collect_head_data
from genunc.posterior.curvature import LinearHeadGGN
from genunc.posterior.draws import HeadDraws, as_float32
from genunc.posterior.fingerprint import check_fingerprint, head_fingerprint
from genunc.posterior.heads import HeadOps, check_finite, head_ops_for
from genunc.posterior.laplace_state import laplace_tensors, restore_laplace

Structure = Literal["diag", "kron", "full"]
STRUCTURES: tuple[str, ...] = ("diag", "kron", "full")


class KeptRows(nn.Module):
    """A Linear head whose rows outside `kept` are buffers at their pretrained values, so a
    Laplace over its parameters covers only the kept rows (classes some target names); outputs
    come back in the head's own order.  Head posteriors (:class:`_RowModel`) and tail
    posteriors keep rows this one way."""

    def __init__(self, head: nn.Module, kept: Tensor) -> None:
        super().__init__()
        if type(head) is not nn.Linear:
            raise GenuncError(f"only Linear heads can keep a subset of output rows, not "
                              f"{type(head).__name__}")
        weight, bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
        kept = torch.as_tensor(kept, dtype=torch.long, device=weight.device).sort().values
        frozen = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        frozen[kept] = False
        frozen_idx = torch.nonzero(frozen).flatten()
        self.register_buffer("kept_outputs", kept)
        self.register_buffer("frozen_weight", weight[frozen_idx].clone())
        self.register_buffer("frozen_bias", None if bias is None else bias[frozen_idx].clone())
        # outputs are computed as [kept | frozen] and put back in vocabulary order
        self.register_buffer("order", torch.argsort(torch.cat([kept, frozen_idx])))
        self.kept = nn.Linear(weight.shape[1], len(kept), bias=bias is not None,
                              dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            self.kept.weight.copy_(weight[kept])
            if bias is not None:
                self.kept.bias.copy_(bias[kept])

    @staticmethod
    def merge(kept_out: Tensor, x: Tensor, frozen_weight: Tensor, frozen_bias: Tensor | None,
              order: Tensor) -> Tensor:
        """The kept rows' outputs and the frozen rows' (computed here), in the head's order."""
        frozen = nn.functional.linear(x, frozen_weight, frozen_bias)
        return torch.cat([kept_out, frozen], -1).index_select(-1, order)

    def forward(self, x: Tensor) -> Tensor:
        return self.merge(self.kept(x), x, self.frozen_weight, self.frozen_bias, self.order)


class _RowModel(nn.Module):
    """The head seen as a model over feature rows, with outputs flattened to ``(rows, D)``.

    Two optional changes of view leave the posterior one over the head's own weights:

    * ``output_scale`` ``(D,)`` divides outputs (and the fit divides targets) column-wise, which
      turns laplace-torch's one Gaussian noise scale into one per output group (molecule
      positions and atom features are predicted with residuals of different size);
    * ``kept_outputs`` makes only those output rows of a Linear head parameters; the others
      become buffers at their pretrained values, so classes no target ever names (a masked
      model's mask token) stay out of the posterior instead of sitting at the prior.

    ``softcap`` puts the outputs through ``softcap * tanh(out / softcap)`` (a model's final-logit
    softcapping, as DiffusionGemma's): the likelihood is then on the capped outputs, while the
    posterior stays one over the head's weights (draws give the head's raw outputs).
    """

    def __init__(self, head: nn.Module, row_wise: bool, output_scale: Tensor | None = None,
                 kept_outputs: Tensor | None = None, softcap: float | None = None) -> None:
        super().__init__()
        self.row_wise = row_wise
        if softcap is not None and not softcap > 0:
            raise GenuncError(f"softcap must be positive, got {softcap}")
        if softcap is not None and output_scale is not None:
            raise GenuncError("a softcapped head takes no per-output noise scales")
        self.softcap = None if softcap is None else float(softcap)
        self.kept_outputs: Tensor | None
        if kept_outputs is not None:
            head = self._keep_rows(head, kept_outputs)
        else:
            self.kept_outputs = None
        self.head = head
        if output_scale is not None and not row_wise:
            raise GenuncError("per-output noise scales need a head whose outputs are rows")
        self.output_scale: Tensor | None
        self.register_buffer("output_scale", output_scale)

    def _keep_rows(self, head: nn.Module, kept: Tensor) -> nn.Linear:
        rows = KeptRows(head, kept)
        self.register_buffer("kept_outputs", rows.kept_outputs)
        self.register_buffer("frozen_weight", rows.frozen_weight)
        self.register_buffer("frozen_bias", rows.frozen_bias)
        self.register_buffer("order", rows.order)
        return rows.kept

    def forward(self, rows: Tensor) -> Tensor:
        out = self.head(rows)
        if self.kept_outputs is not None:
            out = KeptRows.merge(out, rows, self.frozen_weight, self.frozen_bias, self.order)
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        if self.output_scale is not None:
            out = out / self.output_scale
        return out if self.row_wise else out.flatten(1)

    def flat_subset(self, ops: HeadOps) -> Tensor | None:
        """Which entries of the full head's flat parameter vector are this model's parameters
        (None: all of them, in the same order)."""
        if self.kept_outputs is None:
            return None
        rows = ops.output_rows()
        return torch.isin(rows.to(self.kept_outputs.device), self.kept_outputs)


def _fit_dtype(head: nn.Module) -> torch.dtype:
    """Curvature in float64 heads stays float64; everything else (bf16, fp16) is fit in float32."""
    dtype = next(head.parameters()).dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


class HeadPosterior(Posterior):
    """Gaussian posterior over a head's weights: fit, sample M draws, apply them in one op.

    Build it with :meth:`fit` (from an adapter and clean data), :meth:`fit_features` (from cached
    head inputs), or :meth:`load`.  The posterior mean is the pretrained head; draws are full
    parameter sets for the head, applied to shared or per-draw features by :meth:`apply`.
    """

    kind = "head"

    def __init__(
        self,
        laplace: Any,
        ops: HeadOps,
        head_name: str,
        structure: str,
        likelihood: Likelihood,
        fingerprint: dict[str, Any],
        info: dict[str, Any] | None = None,
        *,
        subset: Tensor | None = None,
        full_mean: Tensor | None = None,
    ) -> None:
        self.laplace = laplace
        self.ops = ops
        self.head_name = head_name
        self.structure = structure
        self.likelihood = likelihood
        self.fingerprint = fingerprint
        self.info = dict(info or {})
        if (subset is None) != (full_mean is None):
            raise GenuncError("a posterior over part of the head needs both subset and full_mean")
        #: which entries of the head's flat parameters the posterior covers (None: all); the
        #: rest stay at ``full_mean`` in every draw
        self.subset = subset
        self._full_mean = full_mean

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        adapter: DenoiserAdapter,
        batches: Iterable[Any],
        *,
        repeats: int = 1,
        max_rows: int | None = None,
        seed: int | torch.Generator | None = 0,
        progress: bool = True,
        noise_groups: bool = True,
        **fit_kwargs: Any,
    ) -> "HeadPosterior":
        """Fit on the adapter's head: collect head inputs on noisy `batches`, then Laplace.

        ``noise_groups``: one noise scale per output group the adapter declares
        (:attr:`DenoiserAdapter.output_groups`, e.g. molecule positions vs atom features) rather
        than one pooled scale.  ``fit_kwargs`` go to :meth:`fit_features` (structure,
        prior_precision, sigma_noise, ...).
        """
        data = collect_head_data(
            adapter, batches, repeats=repeats, max_rows=max_rows, seed=seed, progress=progress
        )
        groups = adapter.output_groups if noise_groups else None
        return cls.fit_features(
            adapter.head,
            data,
            likelihood=adapter.likelihood,
            head_name=adapter.head_name,
            progress=progress,
            output_groups=groups,
            **fit_kwargs,
        )

    @classmethod
    def fit_features(
        cls,
        head: nn.Module,
        data: HeadData | tuple[Tensor, Tensor],
        *,
        likelihood: Likelihood = "regression",
        structure: Structure = "diag",
        prior_precision: float | Literal["marglik"] = "marglik",
        sigma_noise: float | Literal["mle", "marglik"] = "mle",
        head_name: str = "head",
        batch_size: int = 256,
        backend: type | None = None,
        progress: bool = False,
        output_groups: Mapping[str, slice] | None = None,
        unseen_classes: Literal["freeze", "prior"] = "freeze",
        output_softcap: float | None = None,
    ) -> "HeadPosterior":
        """Laplace over `head`'s weights given its input rows and targets.

        Args:
            prior_precision: a fixed isotropic prior precision, or ``"marglik"`` to maximise
                laplace-torch's marginal likelihood over it.
            sigma_noise: regression noise scale; ``"mle"`` uses the root-mean-square residual of
                the pretrained head, ``"marglik"`` optimises it jointly with the prior precision.
            output_groups: name -> slice of the output's last axis; with ``sigma_noise="mle"``
                each group gets the RMS residual of its own columns as its noise scale (a
                Gaussian likelihood with per-group variance).  Ignored for a fixed or
                marginal-likelihood ``sigma_noise``, which is one scale for all outputs.
            unseen_classes: classification with a Linear head: output rows of classes that no
                target names have no data; ``"freeze"`` keeps them at their pretrained values
                (the posterior covers only rows that saw data), ``"prior"`` leaves them in the
                posterior, where they sit at the prior.
            backend: a laplace-torch curvature backend class.  The default,
                :class:`~genunc.posterior.curvature.LinearHeadGGN`, is CurvlinopsGGN with the exact
                diagonal of Linear/Conv2d heads computed in closed form.
        """
        if structure not in STRUCTURES:
            raise GenuncError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        prior0 = check_fit_options(likelihood, prior_precision, sigma_noise, unseen_classes,
                                   output_softcap)
        features, targets = (data.features, data.targets) if isinstance(data, HeadData) else data
        if features.shape[0] != targets.shape[0]:
            raise ShapeMismatchError(
                f"{features.shape[0]} feature rows but {targets.shape[0]} target rows"
            )
        if features.shape[0] == 0:
            raise ShapeMismatchError("no rows to fit on")
        check_finite(features, "head features")
        check_finite(targets, "targets")

        fingerprint = head_fingerprint(head_name, head)
        dtype = _fit_dtype(head)
        device = next(head.parameters()).device
        head_copy = copy.deepcopy(head).to(dtype).eval()
        for p in head_copy.parameters():
            p.requires_grad_(True)
        ops = head_ops_for(head_copy)
        if output_softcap is not None and output_groups and likelihood == "regression":
            raise GenuncError("output_softcap does not combine with per-group noise scales")
        cap = None if output_softcap is None else float(output_softcap)
        model = _RowModel(head_copy, ops.row_wise, softcap=cap)

        features = features.to(device, dtype)
        targets = targets.to(device, dtype if likelihood == "regression" else torch.long)
        _check_output_shape(model, features, targets, likelihood)
        info: dict[str, Any] = {}
        if likelihood == "classification":  # classes no target names: their rows have no data
            with torch.no_grad():
                n_classes = model(features[:1]).shape[-1]
            counts, unseen = classes_without_data(targets, n_classes)
            info["classes_without_data"] = unseen
            info["unseen_classes"] = "prior"
            if len(unseen) and unseen_classes == "freeze" and type(head_copy) is nn.Linear:
                kept = torch.nonzero(counts > 0).flatten().to(device)
                model = _RowModel(head_copy, ops.row_wise, kept_outputs=kept, softcap=cap)
                info["unseen_classes"] = "freeze"
        groups = None
        if output_groups and likelihood == "regression" and sigma_noise == "mle":
            groups = _group_scales(model, features, targets, output_groups, batch_size)
            scale = torch.ones(targets.shape[-1], dtype=dtype, device=device)
            for name, part in output_groups.items():
                scale[part] = groups[name]
            model = _RowModel(head_copy, ops.row_wise, output_scale=scale)
            targets = targets / scale
            # laplace's Gaussian log-likelihood is then in scaled units: put back -log(scale)
            # per output element, so that the marginal likelihood stays that of the data
            info["sigma_noise_groups"] = groups
            info["log_lik_offset"] = -float(features.shape[0]) * float(scale.double().log().sum())
        sigma0 = 1.0 if groups else _sigma_init(model, features, targets, likelihood, sigma_noise,
                                                 batch_size)

        la = Laplace(
            model,
            likelihood,
            subset_of_weights="all",
            hessian_structure=structure,
            sigma_noise=sigma0,
            prior_precision=prior0,
            backend=backend or LinearHeadGGN,
        )
        loader = DataLoader(TensorDataset(features, targets), batch_size=batch_size)
        la.fit(loader, progress_bar=progress)
        tune_hyperparameters(la, prior_precision, sigma_noise, likelihood)
        info.update({
            "output_softcap": cap,
            "n_rows": int(features.shape[0]),
            **method_info(prior_precision, sigma_noise),
            "backend": type(la.backend).__name__,
        })
        subset = model.flat_subset(ops)
        full_mean = None
        if subset is not None:
            full_mean = torch.cat([p.detach().reshape(-1) for p in head_copy.parameters()])
        posterior = cls(la, ops, head_name, structure, likelihood, fingerprint, info,
                        subset=subset, full_mean=full_mean)
        posterior.info["log_marglik"] = posterior.log_marginal_likelihood()
        return posterior

    # ------------------------------------------------------------------ quantities
    @property
    def n_data(self) -> int:
        return int(self.laplace.n_data)

    @property
    def mean(self) -> Tensor:
        """Flat posterior mean (the pretrained head's weights) over all of the head's weights,
        in ``named_parameters`` order."""
        return self.laplace.mean.detach() if self._full_mean is None else self._full_mean

    def _expand(self, flat: Tensor, fill: Tensor | float) -> Tensor:
        """``(..., n_params)`` over the covered weights -> ``(..., n_head_weights)``."""
        return flat if self.subset is None else fill_uncovered(flat, self.subset, fill)

    @property
    def posterior_variance(self) -> Tensor:
        """Marginal variances of every head weight (flat; frozen rows 0), for any structure."""
        return self._expand(self._laplace_variance(), 0.0)

    @property
    def posterior_covariance(self) -> Tensor:
        """Dense covariance (P, P); only sensible for small heads."""
        if self.structure == "diag":
            return torch.diag(self.posterior_variance)
        if self.structure == "full":
            cov = self.laplace.posterior_covariance.detach()
        else:
            cov = self.laplace.posterior_precision.to_matrix(exponent=-1).detach()
        if self.subset is None:
            return cov
        index = torch.nonzero(self.subset.to(cov.device)).flatten()
        full = cov.new_zeros(self.subset.numel(), self.subset.numel())
        full[index.unsqueeze(1), index.unsqueeze(0)] = cov
        return full

    def with_prior_precision(self, prior_precision: float) -> "HeadPosterior":
        """The same fit under another prior precision (the curvature is kept, nothing is
        refitted): what a sensitivity study over the prior needs.  Diagonal posteriors only."""
        if self.structure != "diag":
            raise GenuncError(f"with_prior_precision needs the diagonal posterior, not "
                              f"{self.structure!r}: refit with prior_precision={prior_precision}")
        if not prior_precision > 0:
            raise GenuncError(f"prior_precision must be positive, got {prior_precision}")
        laplace = copy.deepcopy(self.laplace)
        laplace.prior_precision = float(prior_precision)
        info = {**self.info, "prior_precision_method": "fixed"}
        other = HeadPosterior(laplace, self.ops, self.head_name, self.structure, self.likelihood,
                              self.fingerprint, info, subset=self.subset, full_mean=self._full_mean)
        other.info["log_marglik"] = other.log_marginal_likelihood()
        return other

    def recentre(self, head: nn.Module) -> None:
        """Move the posterior mean onto `head`'s current weights, in place; the curvature (and so
        every variance) is kept.  For a head that keeps training between refits (DUAL's online
        actor): draws then spread around the weights that act, not around stale ones."""
        if self.subset is not None:
            raise GenuncError("recentre needs a posterior over the whole head, not a row subset")
        flat = torch.cat([p.detach().reshape(-1) for _, p in head.named_parameters()])
        if flat.shape != self.laplace.mean.shape:
            raise GenuncError(f"recentre: the head has {flat.numel()} weights, the posterior "
                              f"{self.laplace.mean.numel()}")
        self.laplace.mean = flat.to(self.laplace.mean)
        self.fingerprint = head_fingerprint(self.head_name, head)

    # ------------------------------------------------------------------ draws
    def sample(self, num_draws: int, seed: int | torch.Generator | None = 0, *,
               with_map: bool = False) -> HeadDraws:
        """Draw `num_draws` head weight sets; the same seed gives the same draws.

        ``with_map=True`` puts the posterior mean in front (``num_draws + 1`` sets): the MAP
        generation of a loop that runs the MAP and its perturbed twins as one batch.
        """
        check_num_draws(num_draws)
        generator = as_generator(seed, device=self.mean.device)
        with torch.no_grad():
            flat = self._expand(self.laplace.sample(num_draws, generator=generator).detach(),
                                self.mean)
        if with_map:
            flat = torch.cat([self.mean.unsqueeze(0).to(flat), flat])
        return HeadDraws.from_flat(flat, self.ops, with_map=with_map)

    def output_variance(self, features: Tensor,
                        post: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Exact predictive variance of the head output (diag posterior, heads linear in their
        weights, any head type): no Monte-Carlo noise.  `post`: a linear map applied after the
        head (it may mix outputs, e.g. centre-of-mass removal), given ``(M, B, ...)`` outputs."""
        if self.structure != "diag":
            raise GenuncError(
                f"closed-form output variance needs the diagonal posterior; this one is "
                f"{self.structure!r} (use sample() + apply())"
            )
        check_finite(features, "features")
        features = as_float32(features)
        variances = HeadDraws.from_flat(self.posterior_variance.unsqueeze(0), self.ops)
        return self.ops.output_variance(features, {k: v[0] for k, v in variances.params.items()},
                                        post)

    def digest(self) -> str:
        """SHA-256 of everything the draws depend on (mean, curvature, prior, noise scale): two
        fits that could draw differently never share a digest."""
        h = self._state_digest()
        if self.subset is not None:
            h.update(self.subset.cpu().numpy().tobytes())
        return h.hexdigest()

    def summary(self) -> dict[str, Any]:
        """Numbers worth printing after a fit, including how large a typical draw's step is:
        ``E||theta - theta_MAP|| / ||theta_MAP||`` over the weights that saw data (output rows of
        classes no target named stay at the prior and would dominate it), and over all."""
        mean, var = self.mean, self.posterior_variance
        unseen = self.info.get("classes_without_data") or []
        rows = self.ops.output_rows()
        seen = torch.ones_like(mean, dtype=torch.bool)
        if self.subset is not None:
            seen = self.subset.to(mean.device)
        elif unseen and rows is not None:
            seen = ~torch.isin(rows.to(mean.device), torch.as_tensor(unseen, device=mean.device))

        def relative(keep: Tensor) -> float:
            return float(var[keep].sum().sqrt() / mean[keep].norm().clamp_min(1e-12))

        return {
            "head": self.head_name,
            "structure": self.structure,
            "likelihood": self.likelihood,
            "n_params": self.n_params,
            "n_data_rows": self.n_data,
            "prior_precision": self.prior_precision,
            "sigma_noise": self.sigma_noise if self.likelihood == "regression" else None,
            "log_marglik": self.info.get("log_marglik"),
            "relative_perturbation": relative(seen),
            "relative_perturbation_all_weights": relative(torch.ones_like(seen)),
            "classes_without_data": len(unseen) if self.likelihood == "classification" else None,
            "unseen_classes": self.info.get("unseen_classes"),
        }

    # ------------------------------------------------------------------ persistence
    def saved_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, laplace_meta = laplace_tensors(self.laplace, self.structure)
        if self.subset is not None:  # a posterior over some of the head's rows
            tensors["subset"] = self.subset.to(torch.uint8)
            tensors["full_mean"] = self.mean
        model = self.laplace.model
        if getattr(model, "output_scale", None) is not None:
            tensors["output_scale"] = model.output_scale
        meta = {"structure": self.structure, "likelihood": self.likelihood,
                "head_name": self.head_name, "row_wise": self.ops.row_wise,
                "output_softcap": getattr(model, "softcap", None),
                "fingerprint": self.fingerprint, **laplace_meta, "info": self.info}
        return tensors, meta

    @classmethod
    def from_saved(cls, meta: dict[str, Any], tensors: dict[str, Tensor],
                   model: nn.Module | DenoiserAdapter, *, stale: str = "error",
                   check_weights: bool = True) -> "HeadPosterior | None":
        module = model.model if isinstance(model, DenoiserAdapter) else model
        head = resolve_module(module, meta["head_name"])
        try:
            check_fingerprint(meta["fingerprint"], head_fingerprint(meta["head_name"], head),
                              check_weights)
        except FingerprintMismatchError:
            if stale == "none":
                return None
            raise
        device = next(head.parameters()).device
        tensors = {k: v.to(device) for k, v in tensors.items()}
        head_copy = copy.deepcopy(head).to(tensors["mean"].dtype).eval()
        for p in head_copy.parameters():
            p.requires_grad_(True)
        ops = head_ops_for(head_copy)
        subset = tensors["subset"].bool() if "subset" in tensors else None
        kept = None if subset is None else torch.unique(ops.output_rows().to(device)[subset])
        la = Laplace(_RowModel(head_copy, meta["row_wise"], output_scale=tensors.get("output_scale"),
                               kept_outputs=kept, softcap=meta.get("output_softcap")),
                     meta["likelihood"], subset_of_weights="all",
                     hessian_structure=meta["structure"])
        restore_laplace(la, tensors, meta, meta["structure"], meta["likelihood"])
        return cls(la, ops, meta["head_name"], meta["structure"], meta["likelihood"],
                   meta["fingerprint"], meta.get("info"), subset=subset,
                   full_mean=tensors.get("full_mean") if subset is not None else None)

    def check_matches(self, model: nn.Module | DenoiserAdapter, check_weights: bool = True) -> None:
        """Raise :class:`FingerprintMismatchError` unless `model`'s head is the one fitted on."""
        module = model.model if isinstance(model, DenoiserAdapter) else model
        head = resolve_module(module, self.head_name)
        check_fingerprint(self.fingerprint, head_fingerprint(self.head_name, head), check_weights)

    def __repr__(self) -> str:
        s = self.summary()
        return (
            f"HeadPosterior(head={s['head']!r}, structure={s['structure']!r}, "
            f"n_params={s['n_params']}, n_data_rows={s['n_data_rows']}, "
            f"prior_precision={s['prior_precision']:.4g}, sigma_noise={s['sigma_noise']})"
        )


# ---------------------------------------------------------------------- helpers
def _check_output_shape(model: _RowModel, features: Tensor, targets: Tensor, likelihood: str) -> None:
    with torch.no_grad():
        out = model(features[:2])
    if likelihood == "regression" and tuple(out.shape[1:]) != tuple(targets.shape[1:]):
        raise ShapeMismatchError(
            f"head outputs rows of shape {tuple(out.shape[1:])} but regression targets have "
            f"{tuple(targets.shape[1:])}"
        )
    if likelihood == "classification":
        if targets.dim() != 1:
            raise ShapeMismatchError(
                f"classification targets must be class indices, got {tuple(targets.shape)}")
        if int(targets.max()) >= out.shape[-1] or int(targets.min()) < 0:
            raise ShapeMismatchError(
                f"class targets span [{int(targets.min())}, {int(targets.max())}] but the head "
                f"has {out.shape[-1]} outputs"
            )


def _sigma_init(
    model: _RowModel,
    features: Tensor,
    targets: Tensor,
    likelihood: str,
    sigma_noise: float | str,
    batch_size: int,
) -> float:
    if likelihood == "classification":
        return 1.0
    if not isinstance(sigma_noise, str):
        return float(sigma_noise)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, features.shape[0], batch_size):
            residual = model(features[i : i + batch_size]) - targets[i : i + batch_size]
            total += float(residual.double().square().sum())
            count += residual.numel()
    return max(math.sqrt(total / count), 1e-6)


def _group_scales(model: _RowModel, features: Tensor, targets: Tensor,
                  groups: Mapping[str, slice], batch_size: int) -> dict[str, float]:
    """Root-mean-square residual of the pretrained head over each group's output columns."""
    width = targets.shape[-1]
    check_output_groups(groups, width)
    total = torch.zeros(width, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, features.shape[0], batch_size):
            residual = model(features[i : i + batch_size]) - targets[i : i + batch_size]
            total += residual.double().square().reshape(-1, width).sum(0).cpu()
    counts = torch.full((width,), targets.numel() // width, dtype=torch.float64)
    return group_noise_scales(total, counts, groups)
