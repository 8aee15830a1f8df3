"""A low-rank-plus-diagonal Laplace posterior, for blocks where ``full`` does not fit in memory
and ``kron`` does not apply (LayerNorm, attention, GroupNorm and e3nn parameters).

The GGN is ``G = A^T A``, with one row of ``A`` per (data row, output direction): exactly
``C^T J`` for each data row (``C C^T`` the loss Hessian in output space: the identity for
regression, ``diag(p) - p p^T`` for the softmax), or, where the exact rows would take one backward
pass per output, ``mc_samples`` random projections whose outer products equal the loss Hessian in
expectation (as the Monte-Carlo GGN diagonal).  Randomised subspace iteration on the streamed
``A^T (A Q)`` finds its top ``rank`` eigenpairs ``U diag(lam) U^T``; the diagonal that they leave
out is kept, so the posterior precision is

    P = h (U diag(lam) U^T + R) + prior,     R = diag(G) - diag(U diag(lam) U^T)  (clipped at 0)

with ``h`` laplace-torch's likelihood factor (1 / sigma^2 / temperature).  Its diagonal is the
diagonal GGN's (:class:`DiagLaplace` with the same data, exactly where ``R`` is not clipped), and
its leading ``rank`` directions are the GGN's own: a diag posterior that knows how the weights
that matter most are correlated.  Memory is ``P x (rank + oversample)``; sampling, marginal
variances and the log-determinant of the evidence cost ``O(P rank^2)`` through the Woodbury
identity, and stay differentiable in the prior precision and noise scale, so laplace-torch's
marginal likelihood tunes the prior exactly as for the other structures.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from laplace.baselaplace import DiagLaplace
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


class LowRankDiagLaplace(DiagLaplace):
    """laplace-torch's diagonal Laplace plus the GGN's top eigenpairs (see the module docstring).

    ``fit`` (inherited) records the data loss and a first diagonal; :meth:`fit_low_rank` then
    finds the eigenpairs and replaces the diagonal with the one of the same ``A``, so that the
    low-rank part and the diagonal describe one matrix.
    """

    _key = ("all", "lowrank_diag")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eigenvectors: Tensor | None = None
        self.eigenvalues: Tensor | None = None

    # ------------------------------------------------------------------ fitting
    def fit_low_rank(self, loader: DataLoader, rank: int, *, exact: bool = True,
                     mc_samples: int = 8, oversample: int = 8, power_iterations: int = 1,
                     seed: int = 0, progress: bool = False) -> None:
        """Top-`rank` eigenpairs of the GGN on `loader` (the data ``fit`` saw) by randomised
        subspace iteration: ``power_iterations + 2`` passes over the data."""
        if self.H is None:
            raise RuntimeError("call fit() before fit_low_rank()")
        rank = min(rank, self.n_params)
        width = min(rank + oversample, self.n_params)
        params = [p for p in self.model.parameters() if p.requires_grad]
        rows = GGNRows(self.model, params, loader, self.likelihood, exact=exact,
                       mc_samples=mc_samples, seed=seed)
        start = torch.Generator(device="cpu").manual_seed(seed + 1)
        omega = torch.randn(self.n_params, width, generator=start, dtype=torch.float64)
        bar = tqdm(total=power_iterations + 2, desc="low-rank GGN", disable=not progress)
        product, diag = rows.matmat(omega.to(self.mean))
        bar.update()
        q = torch.linalg.qr(product.double())[0]
        for _ in range(power_iterations):
            q = torch.linalg.qr(rows.matmat(q.to(self.mean))[0].double())[0]
            bar.update()
        gq = rows.matmat(q.to(self.mean))[0].double()
        bar.update()
        bar.close()
        small = q.T @ gq
        values, vectors = torch.linalg.eigh((small + small.T) / 2)
        top = values.argsort(descending=True)[:rank]
        self.eigenvalues = values[top].clamp_min(0).to(self.mean)
        self.eigenvectors = (q @ vectors[:, top]).to(self.mean)
        self.H = diag.to(self.mean)

    # ------------------------------------------------------------------ the precision
    def _parts(self) -> tuple[Tensor, Tensor]:
        """``(d, V)`` with posterior precision ``diag(d) + V V^T``."""
        self._check_H_init()
        if self.eigenvectors is None or self.eigenvalues is None:
            raise RuntimeError("the low-rank part is not fitted (fit_low_rank)")
        u, lam = self.eigenvectors, self.eigenvalues
        residual = (self.H - (u.square() * lam).sum(1)).clamp_min(0)
        d = self._H_factor * residual + self.prior_precision_diag
        v = u * (self._H_factor * lam).sqrt()
        return d, v

    def _whitened(self) -> tuple[Tensor, Tensor, Tensor]:
        """``d``, ``W = d^{-1/2} V`` and ``K = I + W^T W`` (the Woodbury core)."""
        d, v = self._parts()
        w = v / d.sqrt().unsqueeze(1)
        core = torch.eye(w.shape[1], dtype=w.dtype, device=w.device) + w.T @ w
        return d, w, core

    @property
    def posterior_precision(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """``(d, V)``: the precision is ``diag(d) + V V^T`` (never formed)."""
        return self._parts()

    @property
    def posterior_variance(self) -> Tensor:
        d, w, core = self._whitened()
        explained = (w * torch.linalg.solve(core, w.T).T).sum(1)
        return (1 - explained) / d

    @property
    def posterior_scale(self) -> Tensor:
        """Marginal standard deviations (the posterior is not diagonal: not a sampling scale)."""
        return self.posterior_variance.sqrt()

    @property
    def log_det_posterior_precision(self) -> Tensor:
        d, _, core = self._whitened()
        return d.log().sum() + torch.linalg.cholesky(core).diagonal().log().sum() * 2

    def square_norm(self, value: Tensor) -> Tensor:
        d, v = self._parts()
        delta = value - self.mean
        return delta @ (delta * d) + (delta @ v).square().sum()

    def functional_variance(self, Js: Tensor) -> Tensor:
        self._check_jacobians(Js)
        d, w, core = self._whitened()
        js = Js / d.sqrt()
        jw = js @ w
        return torch.einsum("ncp,nkp->nck", js, js) - jw @ torch.linalg.solve(core, jw.transpose(1, 2))

    def functional_covariance(self, Js: Tensor) -> Tensor:
        n, c, p = Js.shape
        return self.functional_variance(Js.reshape(1, n * c, p))[0]

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:
        """Exact draws from ``N(mean, (diag(d) + V V^T)^{-1})``: with ``W = d^{-1/2} V = Q R`` and
        ``R R^T = E diag(s) E^T``, ``(I + W W^T)^{-1/2} = I + Q E (diag((1+s)^{-1/2}) - 1) E^T Q^T``."""
        d, w, _ = self._whitened()
        eps = torch.randn(n_samples, self.n_params, device=self._device, dtype=self._dtype,
                          generator=generator)
        q, r = torch.linalg.qr(w)
        s, e = torch.linalg.eigh(r @ r.T)
        basis = q @ e
        shrink = (1 + s.clamp_min(0)).rsqrt() - 1
        eps = eps + ((eps @ basis) * shrink) @ basis.T
        return self.mean.reshape(1, -1) + eps / d.sqrt()

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["eigenvectors"] = self.eigenvectors
        state["eigenvalues"] = self.eigenvalues
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self.eigenvectors = state.pop("eigenvectors")
        self.eigenvalues = state.pop("eigenvalues")
        super().load_state_dict(state)


class GGNRows:
    """The rows of ``A`` (``G = A^T A``) for each data row, recomputed on every pass from the same
    random stream, so every pass multiplies by one fixed matrix."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], loader: DataLoader,
                 likelihood: Any, *, exact: bool, mc_samples: int, seed: int) -> None:
        self.model, self.params, self.loader = model, params, loader
        self.classification = str(getattr(likelihood, "value", likelihood)) == "classification"
        self.exact, self.mc_samples, self.seed = exact, mc_samples, seed

    def _directions(self, f: Tensor, generator: torch.Generator) -> Tensor:
        """Output-space vectors ``c`` with ``sum c c^T`` the loss Hessian at ``f`` (1, D)."""
        width = f.shape[-1]
        if self.classification:
            p = torch.softmax(f.detach().double().reshape(-1), -1)
            if self.exact:  # columns of diag(sqrt p) - p sqrt(p)^T
                root = p.sqrt()
                c = torch.diag(root) - root[:, None] * p[None, :]
            else:  # p - onehot(y), y drawn from the softmax
                ys = torch.multinomial(p.cpu(), self.mc_samples, replacement=True,
                                       generator=generator)
                c = (p.cpu() - nn.functional.one_hot(ys, width).double()) / self.mc_samples ** 0.5
        elif self.exact:
            c = torch.eye(width, dtype=torch.float64)
        else:
            c = torch.randn(self.mc_samples, width, generator=generator, dtype=torch.float64)
            c = c / self.mc_samples ** 0.5
        return c.reshape(-1, *f.shape).to(f)

    def rows(self) -> Iterator[Tensor]:
        """One ``(directions, P)`` block of ``A`` per data row, in a fixed order."""
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        for x, _ in self.loader:
            for n in range(x.shape[0]):
                with torch.enable_grad():
                    f = self.model(x[n : n + 1])
                c = self._directions(f, generator)
                try:
                    grads = torch.autograd.grad(f, self.params, grad_outputs=c, is_grads_batched=True)
                    yield torch.cat([g.reshape(len(c), -1) for g in grads], 1).detach()
                except (RuntimeError, NotImplementedError):  # vmap over the backward failed
                    yield torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
                        f, self.params, grad_outputs=c[s], retain_graph=s < len(c) - 1)])
                        for s in range(len(c))]).detach()

    def matmat(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(A^T A x, diag(A^T A))`` in one pass."""
        out = torch.zeros_like(x)
        diag = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for a in self.rows():
            out += a.T @ (a @ x)
            diag += a.square().sum(0)
        return out, diag


__all__ = ["GGNRows", "LowRankDiagLaplace"]
