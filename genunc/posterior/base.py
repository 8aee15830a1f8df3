"""The one posterior type: a Laplace approximation over some of a denoiser's weights.

Its scope is a ``kind``: ``"head"`` (the output layer, with closed-form draws and variances:
:class:`~genunc.posterior.HeadPosterior`) or ``"tail"`` (the blocks that end at the head, whose
draws re-run them: :class:`~genunc.posterior.TailPosterior`); its ``structure`` is laplace-torch's
(diag, kron, full; lowrank for tails).  As laplace-torch's ``Laplace(...)`` picks a class from
(subset of weights x Hessian structure), :meth:`Posterior.fit` picks the kind from ``tail`` and
:meth:`Posterior.load` from the saved folder; the fit core below (prior, likelihood, noise
groups, classes without data, evidence) is the one both kinds use.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor, nn

from genunc.errors import GenuncError
from genunc.posterior.io import META_FILE, damaged_if_unreadable, read_saved, write_saved
from genunc.posterior.laplace_state import LaplaceQuantities

if TYPE_CHECKING:
    from genunc.adapters.base import DenoiserAdapter

LIKELIHOODS = ("regression", "classification")


class Posterior(LaplaceQuantities):
    """A fitted Laplace posterior of some ``kind``; draws come from :meth:`sample` and act
    through the draws' own ``apply``.  Subclasses register themselves by ``kind``."""

    kind: ClassVar[str] = ""
    _kinds: ClassVar[dict[str, type["Posterior"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            Posterior._kinds[cls.kind] = cls

    # ------------------------------------------------------------------ the factory
    @classmethod
    def fit(cls, adapter: "DenoiserAdapter", batches: Iterable[Any], *,
            tail: int | Sequence[str] | None = None, **fit_kwargs: Any) -> "Posterior":
        """Fit on the adapter's noisy training pairs of `batches`: over the head
        (``tail=None``), or over a tail (the last `tail` blocks, or its module names)."""
        if tail is None:
            return cls._kinds["head"].fit(adapter, batches, **fit_kwargs)
        return cls._kinds["tail"].fit(adapter, batches, tail=tail, **fit_kwargs)

    # ------------------------------------------------------------------ persistence
    def saved_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The tensors and description entries this posterior is saved as."""
        raise NotImplementedError

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the posterior's two files into `directory` (:mod:`genunc.posterior.io`)."""
        return write_saved(directory, self.kind, *self.saved_state())  # type: ignore[arg-type]

    @classmethod
    def load(cls, directory: str | os.PathLike[str], model: nn.Module | "DenoiserAdapter", *,
             missing: Literal["error", "none"] = "error",
             stale: Literal["error", "none"] = "error",
             check_weights: bool = True) -> "Posterior | None":
        """The posterior saved in `directory` on `model` (``Posterior.load``: of either kind).

        One policy with two explicit choices: ``missing="none"`` returns None where nothing was
        saved; ``stale="none"`` returns None where the saved posterior belongs to other weights
        (a retrained model).  Anything else wrong (a half-written folder, a damaged file, a
        format this genunc cannot read, another kind than the class asked) raises one line
        naming the file.
        """
        read = read_saved(directory, missing=missing)
        if read is None:
            return None
        kind = read[0]
        target = cls._kinds[kind] if cls is Posterior else cls
        if target.kind != kind:
            raise GenuncError(f"{directory} holds a {kind} posterior, not a {target.kind} "
                              "posterior")
        with damaged_if_unreadable(Path(directory) / META_FILE):
            return target.from_saved(read[1], read[2], model, stale=stale,
                                     check_weights=check_weights)

    @classmethod
    def from_saved(cls, meta: dict[str, Any], tensors: dict[str, Tensor],
                   model: nn.Module | "DenoiserAdapter", *, stale: str = "error",
                   check_weights: bool = True) -> "Posterior | None":
        """The posterior :func:`~genunc.posterior.io.read_saved` read, on `model`."""
        raise NotImplementedError


def fill_uncovered(covered: Tensor, mask: Tensor, fill: Tensor | float) -> Tensor:
    """``(..., covered entries)`` -> ``(..., every weight)``: `covered` where `mask` (over every
    weight) is True, `fill` (a value, or a flat tensor over every weight) elsewhere: how a
    posterior that leaves some weights at their pretrained values reports all of them."""
    mask = mask.to(covered.device)
    full = torch.empty(*covered.shape[:-1], mask.numel(), dtype=covered.dtype,
                       device=covered.device)
    full[..., ~mask] = fill if isinstance(fill, float) else fill.to(covered)[~mask]
    full[..., mask] = covered
    return full


# ---------------------------------------------------------------------- the fit core
def check_fit_options(likelihood: str, prior_precision: float | str, sigma_noise: float | str,
                      unseen_classes: str, output_softcap: float | None) -> float:
    """Every option of a fit checked before any data is touched; returns the prior precision
    laplace-torch starts from."""
    check_likelihood(likelihood)
    check_unseen_classes(unseen_classes)
    prior0 = initial_prior(prior_precision)
    if likelihood == "regression":
        check_sigma_noise(sigma_noise)
    if output_softcap is not None and not output_softcap > 0:
        raise GenuncError(f"softcap must be positive, got {output_softcap}")
    return prior0


def check_num_draws(num_draws: int) -> None:
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1:
        raise GenuncError(f"num_draws must be at least 1, got {num_draws}")


def check_likelihood(likelihood: str) -> None:
    if likelihood not in LIKELIHOODS:
        raise GenuncError(f"likelihood must be regression or classification, got {likelihood!r}")


def initial_prior(prior_precision: float | str) -> float:
    """The prior precision laplace-torch starts from (1 where the evidence will choose it)."""
    if prior_precision == "marglik":
        return 1.0
    if isinstance(prior_precision, str):
        raise GenuncError(f"prior_precision must be a number or 'marglik', got {prior_precision!r}")
    if not float(prior_precision) > 0:
        raise GenuncError(f"prior precision must be positive, got {float(prior_precision)}")
    return float(prior_precision)


def check_sigma_noise(sigma_noise: float | str) -> None:
    if isinstance(sigma_noise, str):
        if sigma_noise not in ("mle", "marglik"):
            raise GenuncError(f"sigma_noise must be a number, 'mle' or 'marglik', got "
                              f"{sigma_noise!r}")
    elif not sigma_noise > 0:
        raise GenuncError(f"sigma_noise must be positive, got {sigma_noise}")


def check_output_groups(groups: Mapping[str, slice], width: int) -> None:
    """Output groups must tile the output's last axis, without overlap."""
    covered = torch.zeros(width, dtype=torch.bool)
    for name, part in groups.items():
        if covered[part].any() or not covered[part].numel():
            raise GenuncError(f"output group {name!r} ({part}) is empty or overlaps another")
        covered[part] = True
    if not covered.all():
        raise GenuncError(f"output groups {dict(groups)} leave columns of the {width} outputs out")


def group_noise_scales(square_sums: Tensor, counts: Tensor,
                       groups: Mapping[str, slice]) -> dict[str, float]:
    """The root-mean-square residual of each output group, from per-column sums of squared
    residuals and per-column counts of the elements that are data (1 where a group has none)."""
    scales = {}
    for name, part in groups.items():
        n = float(counts[part].sum())
        scales[name] = max(math.sqrt(float(square_sums[part].sum()) / n), 1e-6) if n else 1.0
    return scales


def classes_without_data(targets: Tensor, n_classes: int) -> tuple[Tensor, list[int]]:
    """Per-class target counts and the classes no target names (their rows have no data)."""
    counts = torch.bincount(targets.reshape(-1).cpu(), minlength=n_classes)
    return counts, torch.nonzero(counts == 0).flatten().tolist()


def check_unseen_classes(unseen_classes: str) -> None:
    if unseen_classes not in ("freeze", "prior"):
        raise GenuncError(f"unseen_classes must be 'freeze' or 'prior', got {unseen_classes!r}")


def tune_hyperparameters(la: Any, prior_precision: float | str, sigma_noise: float | str,
                         likelihood: str) -> None:
    """Maximise the evidence over what was asked to be chosen by it."""
    tune_prior = prior_precision == "marglik"
    tune_sigma = sigma_noise == "marglik" and likelihood == "regression"
    if tune_prior or tune_sigma:
        optimise_marglik(la, tune_prior, tune_sigma)


def method_info(prior_precision: float | str, sigma_noise: float | str) -> dict[str, str]:
    """How the prior precision and noise scale were chosen, for the posterior's ``info``."""
    return {"prior_precision_method": "marglik" if prior_precision == "marglik" else "fixed",
            "sigma_noise_method": sigma_noise if isinstance(sigma_noise, str) else "fixed"}


def optimise_marglik(la: Any, tune_prior: bool, tune_sigma: bool) -> None:
    """Maximise laplace-torch's log marginal likelihood over log prior precision / log sigma.

    A quasi-Newton solve on one or two log-scale hyperparameters converges to machine precision in
    a few dozen evaluations, where a fixed Adam schedule may stop short.
    """
    prior0 = float(la.prior_precision.reshape(-1)[0])
    sigma0 = float(torch.as_tensor(la.sigma_noise).reshape(-1)[0])
    x0 = np.array([math.log(prior0)] * tune_prior + [math.log(sigma0)] * tune_sigma)
    dtype = la.mean.dtype
    device = la.mean.device

    def unpack(x: Tensor) -> tuple[Tensor, Tensor | None]:
        fixed_prior = torch.tensor([prior0], dtype=dtype, device=device)
        prior = x[0].exp().reshape(1) if tune_prior else fixed_prior
        sigma = x[-1].exp().reshape(1) if tune_sigma else None  # None: laplace keeps its own
        return prior, sigma

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        xt = torch.tensor(x, dtype=dtype, device=device, requires_grad=True)
        prior, sigma = unpack(xt)
        loss = -la.log_marginal_likelihood(prior, sigma)
        (grad,) = torch.autograd.grad(loss, xt)
        return float(loss.detach()), grad.detach().cpu().double().numpy()

    result = minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=[(-23.0, 23.0)] * len(x0))
    prior, sigma = unpack(torch.tensor(result.x, dtype=dtype, device=device))
    la.prior_precision = prior.detach()
    if tune_sigma:
        la.sigma_noise = sigma.detach()  # type: ignore[union-attr]
