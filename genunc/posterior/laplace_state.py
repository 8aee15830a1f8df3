"""What every genunc posterior reads off, writes out of and restores into its laplace-torch
object the same way, whether it covers the head or a tail of the network."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import Tensor

#: the extra state of a low-rank-plus-diagonal posterior (:mod:`genunc.posterior.lowrank`)
LOW_RANK_KEYS = ("eigenvectors", "eigenvalues")


class LaplaceQuantities:
    """Hyperparameters, marginal variances, evidence and digest of a fitted ``self.laplace``
    (with ``self.structure`` and ``self.info``), shared by head and tail posteriors."""

    laplace: Any
    structure: str
    info: dict[str, Any]

    @property
    def n_params(self) -> int:
        """Weights the posterior covers (rows frozen at their pretrained values not counted)."""
        return int(self.laplace.n_params)

    @property
    def prior_precision(self) -> float:
        return float(self.laplace.prior_precision.reshape(-1)[0])

    @property
    def sigma_noise(self) -> float | dict[str, float]:
        """The regression noise scale, or one per output group (see ``output_groups``)."""
        groups = self.info.get("sigma_noise_groups")
        if groups:
            return dict(groups)
        return float(torch.as_tensor(self.laplace.sigma_noise).reshape(-1)[0])

    def _laplace_variance(self) -> Tensor:
        """Marginal variances of the weights laplace-torch covers, for any structure."""
        if self.structure in ("diag", "lowrank"):
            return self.laplace.posterior_variance.detach()
        if self.structure == "full":
            return torch.diagonal(self.laplace.posterior_covariance).detach()
        return self.laplace.posterior_precision.diag(exponent=-1).detach()

    def log_marginal_likelihood(self) -> float:
        """laplace-torch's evidence, in the data's units (per-group noise scales fit in scaled
        units; ``log_lik_offset`` puts the scales' log-determinant back)."""
        with torch.no_grad():
            return float(self.laplace.log_marginal_likelihood()) + self.info.get("log_lik_offset", 0.0)

    def _state_digest(self) -> "hashlib._Hash":
        """SHA-256 over everything the draws depend on (mean, curvature, prior, noise scale)."""
        state = self.laplace.state_dict()
        h = hashlib.sha256(self.structure.encode())
        hessian = state["H"] if self.structure != "kron" else [f for g in state["H"] for f in g]
        for value in [state["mean"], state["prior_precision"], state["sigma_noise"],
                      state["prior_mean"], *(hessian if isinstance(hessian, list) else [hessian]),
                      *(state[k] for k in LOW_RANK_KEYS if k in state)]:
            h.update(torch.as_tensor(value).detach().to("cpu", torch.float64).numpy().tobytes())
        if self.info.get("sigma_noise_groups"):  # the scales only enter through the curvature
            h.update(repr(sorted(self.info["sigma_noise_groups"].items())).encode())
        return h


def laplace_tensors(la: Any, structure: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A fitted laplace-torch object as named tensors plus the JSON entries its restore needs."""
    state = la.state_dict()
    tensors: dict[str, Tensor] = {
        "mean": state["mean"],
        "prior_precision": torch.as_tensor(state["prior_precision"]).reshape(-1),
        "sigma_noise": torch.as_tensor(state["sigma_noise"], dtype=torch.float64).reshape(-1),
        "prior_mean": torch.as_tensor(state["prior_mean"]).reshape(-1),
    }
    kron_layout = None
    if structure == "kron":
        kron_layout = [len(group) for group in state["H"]]
        for i, group in enumerate(state["H"]):
            for j, factor in enumerate(group):
                tensors[f"H.{i}.{j}"] = factor
    else:
        tensors["H"] = state["H"]
    for key in LOW_RANK_KEYS:
        if key in state:
            tensors[key] = state[key]
    meta = {"kron_layout": kron_layout,
            "laplace": {"cls_name": state["cls_name"], "loss": float(state["loss"]),
                        "n_data": int(state["n_data"]), "n_outputs": int(state["n_outputs"]),
                        "temperature": float(state["temperature"])}}
    return tensors, meta


def restore_laplace(la: Any, tensors: dict[str, Tensor], meta: dict[str, Any], structure: str,
                    likelihood: str) -> None:
    """Load what :func:`laplace_tensors` wrote into a freshly built laplace-torch object."""
    if structure == "kron":
        hessian: Any = [[tensors[f"H.{i}.{j}"] for j in range(n)]
                        for i, n in enumerate(meta["kron_layout"])]
    else:
        hessian = tensors["H"]
    _check_sizes(int(la.n_params), tensors["mean"], hessian, structure)
    lap = meta["laplace"]
    prior_mean = tensors["prior_mean"]
    la.load_state_dict({
        "mean": tensors["mean"], "H": hessian, "loss": lap["loss"],
        "prior_mean": prior_mean if prior_mean.numel() > 1 else float(prior_mean),
        "prior_precision": tensors["prior_precision"],
        "sigma_noise": float(tensors["sigma_noise"]), "n_data": lap["n_data"],
        "n_outputs": lap["n_outputs"], "likelihood": likelihood,
        "temperature": lap["temperature"], "enable_backprop": False, "cls_name": lap["cls_name"],
        **{key: tensors[key] for key in LOW_RANK_KEYS if key in tensors},
    })


def _check_sizes(n_params: int, mean: Tensor, hessian: Any, structure: str) -> None:
    """laplace-torch's load_state_dict checks names, not sizes: a mean or curvature of the
    wrong size would load and give wrong draws later."""
    if structure == "kron":
        size = sum(math.prod(int(f.shape[0]) for f in group) for group in hessian)
        square = all(f.ndim == 2 and f.shape[0] == f.shape[1] for g in hessian for f in g)
    else:
        size = int(hessian.shape[0]) if hessian.ndim else 0
        square = structure != "full" or tuple(hessian.shape) == (size, size)
    if mean.numel() != n_params or size != n_params or not square:
        raise ValueError(f"the saved mean ({mean.numel()}) and curvature ({size}) do not "
                         f"cover the {n_params} weights the posterior is over")
