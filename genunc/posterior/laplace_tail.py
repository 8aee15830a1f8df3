"""A Laplace posterior over a *tail* of a denoiser (a chain of modules ending at the head).

laplace-torch sees the tail as a model whose input is an index into recorded tail inputs
(:class:`~genunc.posterior.tail.TailInputs`, captured on the same noisy training pairs the head
fit uses) and whose output is the head's output flattened per sample.  Rows are samples: one
row per sample of a row-separable pass (UNets, transformers), one body pass per sample
otherwise (graph models).

Likelihoods: ``regression`` (images, molecules: the head output against the denoising target)
and ``classification`` (masked-diffusion text: the head's logits against the clean token, one
laplace-torch row per masked position; the tail is re-run on the sequences those positions
belong to, so a transformer block sees the whole sequence while each position is a data point).
As for the head, output classes that no target names (prompt-only tokens, the mask token) keep
their pretrained head rows in every draw (``info["classes_without_data"]``).

Curvature (the GGN):

* ``curvature="exact"``: laplace-torch's own backend (``CurvlinopsGGN``).  Its diagonal comes from
  full Jacobians, ``(rows, D, P)`` with D the output size of one sample (``C*H*W`` for an image),
  and ``jacrev`` costs one backward pass per output: fine for small tails and outputs.
* ``curvature="mc"``: the GGN diagonal as ``E_v[(J^T v)^2]`` with ``v ~ N(0, I)`` per row
  (:class:`MonteCarloDiagGGN`): ``mc_samples`` vector-Jacobian products per row, memory
  ``(mc_samples, P)``, unbiased for the exact diagonal; ``kron`` uses curvlinops' Monte-Carlo
  KFAC (laplace-torch's ``stochastic=True``).
  For classification the projections are ``p - onehot(y)`` with ``y`` drawn from the
  softmax (the Monte-Carlo Fisher, which is the GGN of the cross-entropy in expectation).
* ``"auto"`` (default): exact where ``D * P <= 2**22`` (16 MiB of Jacobian per row; D is the
  number of classes for classification), else mc.

KFAC covers ``nn.Linear`` and ``nn.Conv2d`` parameters only: a ``kron`` posterior over a tail
with any other parameter (GroupNorm, LayerNorm, attention projections held by
``MultiheadAttention``, e3nn modules) is refused; use ``diag`` or ``lowrank``.  ``full`` is for
small tails (``P x P``).  ``lowrank`` (:mod:`genunc.posterior.lowrank`) is the diagonal plus the
GGN's top ``rank`` eigenpairs, for any parameter type, in ``P x rank`` memory; its eigenpairs come
from the exact GGN rows or from the same Monte-Carlo projections as the diagonal (``curvature``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from laplace import Laplace
from laplace.curvature import CurvlinopsGGN
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from genunc._seed import as_generator
from genunc.adapters.base import DenoiserAdapter
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
from genunc.posterior.fingerprint import check_fingerprint, head_fingerprint
from genunc.posterior.heads import check_finite
from genunc.posterior.laplace_head import STRUCTURES, KeptRows
from genunc.posterior.laplace_state import laplace_tensors, restore_laplace
from genunc.posterior.lowrank import LowRankDiagLaplace
from genunc.posterior.tail import Tail, TailDraws, TailInputs, math_attention

Curvature = Literal["auto", "exact", "mc"]
TailStructure = Literal["diag", "kron", "full", "lowrank"]
TAIL_STRUCTURES: tuple[str, ...] = (*STRUCTURES, "lowrank")
PREDICTIVES: tuple[str, ...] = ("sample", "linearised")
_EXACT_LIMIT = 2**22


# ---------------------------------------------------------------------- fitting data
class TailData:
    """Recorded tail inputs and regression targets, one row per sample.

    ``chunks``: recorded passes; ``targets[i]`` ``(rows_i, *out_shape)`` and ``masks[i]``
    (broadcastable to it, or None) are the targets of chunk i in head-output space and which of
    their elements are data (real atoms).
    """

    def __init__(self) -> None:
        self.chunks: list[TailInputs] = []
        self.targets: list[Tensor] = []
        self.masks: list[Tensor | None] = []

    def add(self, inputs: TailInputs, target: Tensor, mask: Tensor | None = None) -> None:
        if target.shape[0] != inputs.rows:
            raise ShapeMismatchError(f"{inputs.rows} recorded rows but {target.shape[0]} targets")
        check_finite(target, "targets")
        self.chunks.append(inputs)
        self.targets.append(target)
        self.masks.append(mask)

    def __len__(self) -> int:
        return sum(c.rows for c in self.chunks)


class _TailModel(nn.Module):
    """The tail as laplace-torch's model: row indices -> head output flattened per row.

    Its parameters are copies of the tail's (module ``k``'s are ``mods.k.*``: the order of the
    flat posterior vector, and real ``Linear``/``Conv2d`` modules for KFAC).  Outputs are divided
    column-wise by ``output_scale`` (one noise scale per output group), zero-padded to the
    longest row and multiplied by the row's data mask (padding atoms carry no data).
    """

    def __init__(self, tail: Tail, dtype: torch.dtype, data: TailData | None = None,
                 output_scale: Tensor | None = None, likelihood: str = "regression",
                 softcap: float | None = None) -> None:
        super().__init__()
        self.likelihood = likelihood
        self.softcap = softcap
        self.tail = tail
        self.mods = nn.ModuleList(copy.deepcopy(m).to(dtype).eval() for m in tail.modules)
        for m in self.mods:
            m._forward_pre_hooks.clear()
            m._forward_hooks.clear()
            for p in m.parameters():
                p.requires_grad_(True)
        self.dtype = dtype
        self.output_scale: Tensor | None
        self.register_buffer("output_scale", output_scale)
        self.data = data
        self.width = 0
        self.chunk_of: Tensor | None = None
        if data is not None:
            self.width = max(int(t[0].numel()) for t in data.targets)
            sizes = torch.tensor([c.rows for c in data.chunks])
            self.chunk_of = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
            self.local = torch.cat([torch.arange(int(s)) for s in sizes])
            if likelihood == "classification":
                self._index_positions(data)

    def freeze_rows(self, classes: Sequence[int]) -> None:
        """Keep the head's rows of `classes` out of the Laplace (buffers at their values)."""
        head = self.mods[-1]
        if type(head) is not nn.Linear:
            raise GenuncError(f"only a Linear head keeps classes without data at their values, not "
                              f"{type(head).__name__}: fit with unseen_classes='prior'")
        kept = torch.ones(head.out_features, dtype=torch.bool)
        kept[torch.as_tensor(list(classes), dtype=torch.long)] = False
        self.mods[-1] = KeptRows(head, torch.nonzero(kept).flatten())

    def _index_positions(self, data: TailData) -> None:
        """Classification: one laplace-torch row per data position, ``(chunk, row, position)``
        (the position flat over the target's trailing axes)."""
        entries = []
        for c, (target, mask) in enumerate(zip(data.targets, data.masks)):
            keep = torch.ones_like(target, dtype=torch.bool) if mask is None \
                else mask.to(target.device).bool().expand_as(target)
            where = torch.nonzero(keep.reshape(target.shape[0], -1))
            entries.append(torch.cat([torch.full((len(where), 1), c), where], 1))
        self.entries = torch.cat(entries)
        if not len(self.entries):
            raise ShapeMismatchError("no data positions to fit on (every mask is empty)")
        self.chunk_of = self.entries[:, 0]
        self.local = self.entries[:, 1]

    def __len__(self) -> int:
        return len(self.entries) if self.likelihood == "classification" else len(self.local)

    def run(self, inputs: TailInputs) -> Tensor:
        """The copies' output on recorded inputs (the tail's chain, with these modules)."""
        shadow = copy.copy(self.tail)
        shadow.modules = list(self.mods)
        return shadow.run(None, inputs)

    def forward(self, index: Tensor) -> Tensor:
        if self.data is None:
            raise GenuncError("a loaded tail posterior holds no fitting data")
        index = index.reshape(-1).long().cpu()
        chunks, local = self.chunk_of[index], self.local[index]
        out = []
        start = 0
        while start < len(index):  # consecutive rows of one chunk run together
            c = int(chunks[start])
            stop = start
            while stop < len(index) and int(chunks[stop]) == c:
                stop += 1
            inputs = self.data.chunks[c]
            if self.likelihood == "classification":  # each needed sequence once, then positions
                needed, where = torch.unique(local[start:stop], return_inverse=True)
                if inputs.separable:
                    inputs = inputs.select(needed)
                logits = self.run(_floating(inputs, self.dtype))
                if self.softcap is not None:  # the likelihood is on the model's capped logits
                    logits = self.softcap * torch.tanh(logits / self.softcap)
                logits = logits.reshape(logits.shape[0], -1, logits.shape[-1])
                out.append(logits[where, self.entries[index[start:stop], 2]])
                start = stop
                continue
            if inputs.separable:
                inputs = inputs.select(local[start:stop])
            rows = self.run(_floating(inputs, self.dtype))
            mask = self.data.masks[c]
            if mask is not None:
                mask = mask[local[start:stop]]
                rows = rows * mask.to(rows)
            if self.output_scale is not None:
                rows = rows / self.output_scale
            rows = rows.flatten(1)
            if rows.shape[1] < self.width:
                rows = nn.functional.pad(rows, (0, self.width - rows.shape[1]))
            out.append(rows)
            start = stop
        return torch.cat(out)

    def targets(self) -> Tensor:
        assert self.data is not None
        if self.likelihood == "classification":  # class indices, one per data position
            parts = []  # entries run chunk by chunk, in order
            for c, target in enumerate(self.data.targets):
                mine = self.entries[self.chunk_of == c]
                parts.append(target.reshape(target.shape[0], -1)[mine[:, 1], mine[:, 2]])
            return torch.cat(parts).long()
        rows = []
        for target, mask in zip(self.data.targets, self.data.masks):
            t = target.to(self.dtype)
            if mask is not None:
                t = t * mask.to(t)
            if self.output_scale is not None:
                t = t / self.output_scale.to(t.device)
            t = t.flatten(1)
            rows.append(nn.functional.pad(t, (0, self.width - t.shape[1])))
        return torch.cat(rows)

    def element_mask(self) -> Tensor:
        """Which flat output elements are data, ``(rows, width)``."""
        assert self.data is not None
        rows = []
        for target, mask in zip(self.data.targets, self.data.masks):
            m = torch.ones_like(target, dtype=torch.bool) if mask is None \
                else mask.to(target.device).bool().expand_as(target)
            m = m.flatten(1)
            rows.append(nn.functional.pad(m, (0, self.width - m.shape[1])))
        return torch.cat(rows)


def _floating(inputs: TailInputs, dtype: torch.dtype) -> TailInputs:
    return inputs._map(lambda x: x.to(dtype) if isinstance(x, Tensor) and x.is_floating_point()
                       else x)


class ExactDiagGGN(CurvlinopsGGN):
    """laplace-torch backend whose ``diag`` is the exact GGN diagonal, one row at a time.

    laplace-torch's own exact diagonal takes ``jacrev`` of a whole batch: ``(rows, D, P)``
    Jacobians, and ``rows * D`` vector-Jacobian products each through the whole batch's graph
    (memory and time grow with rows^2 D; 20 GB for a tiny Stable Diffusion up-block at D = 256,
    where attention's CPU kernel has no vmap rule either).  Here each row's D output directions
    go through that row's graph alone, ``chunk`` of them per batched backward pass, and only
    the running sum of squares is kept: memory ``chunk x P`` plus one row's activations.
    Classification uses the softmax output Hessian ``diag(p) - p p^T``:
    ``sum_d p_d J_d^2 - (sum_d p_d J_d)^2``.  Everything else is ``CurvlinopsGGN``.
    """

    #: floats of one batched backward pass's gradients (chunk x P)
    chunk_elements: int = 2**22

    def diag(self, x: Tensor, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.stochastic or self.last_layer or self.subnetwork_indices is not None:
            return super().diag(x, y, **kwargs)
        params = [p for p in self.model.parameters() if p.requires_grad]
        n_params = sum(p.numel() for p in params)
        total = torch.zeros(n_params, dtype=params[0].dtype, device=params[0].device)
        loss = torch.zeros((), dtype=total.dtype, device=total.device)
        with math_attention():
            for n in range(x.shape[0]):
                with torch.enable_grad():
                    f = self.model(x[n : n + 1])
                loss = loss + self.factor * self.lossfunc(f.detach(), y[n : n + 1])
                width = f.shape[-1]
                p = torch.softmax(f.detach(), -1).reshape(-1) if self.likelihood == "classification" \
                    else None
                weighted = torch.zeros_like(total) if p is not None else None
                chunk = max(1, min(width, self.chunk_elements // max(n_params, 1)))
                for start in range(0, width, chunk):
                    stop = min(start + chunk, width)
                    eye = torch.zeros((stop - start, *f.shape), dtype=f.dtype, device=f.device)
                    eye.view(stop - start, -1)[torch.arange(stop - start), torch.arange(start, stop)] = 1
                    rows = _batched_vjp(f, params, eye, retain=stop < width)  # (chunk, P)
                    if p is None:
                        total += rows.square().sum(0)
                    else:
                        part = p[start:stop, None]
                        total += (part * rows.square()).sum(0)
                        weighted += (part * rows).sum(0)
                if weighted is not None:
                    total -= weighted.square()
        return loss.detach(), total.detach()


def _batched_vjp(f: Tensor, params: list[Tensor], cotangents: Tensor, retain: bool) -> Tensor:
    """``(k, P)``: the flat parameter gradients of ``<v, f>`` for each of the k cotangents."""
    k = cotangents.shape[0]
    try:
        grads = torch.autograd.grad(f, params, grad_outputs=cotangents, is_grads_batched=True,
                                    retain_graph=retain)
        return torch.cat([g.reshape(k, -1) for g in grads], dim=1)
    except (RuntimeError, NotImplementedError):  # vmap over the backward failed: one at a time
        return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            f, params, grad_outputs=cotangents[s], retain_graph=retain or s < k - 1)])
            for s in range(k)])


class MonteCarloDiagGGN(CurvlinopsGGN):
    """laplace-torch backend whose ``diag`` is the GGN diagonal estimated by random projections:
    for each row, ``mc_samples`` vectors ``v ~ N(0, I)`` over the outputs and the squared
    vector-Jacobian products ``(J^T v)^2`` (one batched backward pass per row), averaged.
    Unbiased; memory ``(mc_samples, P)`` instead of the ``(rows, D, P)`` Jacobians.  Everything
    else is ``CurvlinopsGGN`` (``kron``: Monte-Carlo KFAC)."""

    mc_samples: int = 8
    seed: int = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stochastic", True)
        super().__init__(*args, **kwargs)
        self._generator = torch.Generator().manual_seed(self.seed)

    def diag(self, x: Tensor, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        k = self.mc_samples
        total = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype,
                            device=params[0].device)
        loss = torch.zeros((), dtype=total.dtype, device=total.device)
        for n in range(x.shape[0]):
            with torch.enable_grad():
                f = self.model(x[n : n + 1])
            loss = loss + self.factor * self.lossfunc(f.detach(), y[n : n + 1])
            if self.likelihood == "classification":  # p - onehot(y), y from the softmax
                p = torch.softmax(f.detach().double(), -1).reshape(-1)
                ys = torch.multinomial(p.cpu(), k, replacement=True, generator=self._generator)
                v = (p.cpu() - nn.functional.one_hot(ys, p.numel()).double())
                v = v.reshape(k, *f.shape).to(f)
            else:
                v = torch.randn((k, *f.shape), generator=self._generator, dtype=torch.float64)
                v = v.to(f)
            total += _batched_vjp(f, params, v, retain=False).square().mean(0).detach()
        return loss.detach(), total


def _kron_ready(tail: Tail) -> None:
    bad = sorted({f"{name}.{sub} ({type(m).__name__})"
                  for name, module in zip(tail.names, tail.modules)
                  for sub, m in module.named_modules()
                  if any(True for _ in m.parameters(recurse=False))
                  and type(m) not in (nn.Linear, nn.Conv2d)})
    if bad:
        raise GenuncError(f"kron (KFAC) covers Linear and Conv2d parameters only; this tail also "
                          f"has parameters in {bad}: use structure='diag' or 'lowrank'")


# ---------------------------------------------------------------------- the posterior
class TailPosterior(Posterior):
    """Gaussian posterior over the weights of a tail: fit, sample M draws, apply them batched.

    The same draw/apply contract as :class:`~genunc.posterior.HeadPosterior`:
    ``sample(M, seed, with_map=)`` returns :class:`~genunc.posterior.tail.TailDraws`, whose
    ``apply(inputs)`` re-runs the tail under every draw, and ``with_map``.
    """

    kind = "tail"

    def __init__(self, laplace: Any, tail: Tail, structure: str, fingerprint: dict[str, Any],
                 info: dict[str, Any] | None = None, likelihood: str = "regression") -> None:
        self.laplace = laplace
        self.tail = tail
        self.structure = structure
        self.likelihood = likelihood
        self.fingerprint = fingerprint
        self.info = dict(info or {})
        #: flat entries that keep their pretrained value in every draw (head rows of classes
        #: no target names, unless they were left at the prior: ``unseen_classes="prior"``)
        frozen = self.info.get("unseen_classes", "freeze") == "freeze"
        self.frozen = _frozen_entries(tail, (self.info.get("classes_without_data") or [])
                                      if frozen else [])
        #: which tail weights the Laplace covers, where it leaves the frozen ones out (format
        #: 2; None: all of them, as a format-1 posterior that froze them in each draw did)
        self._pretrained = self._covered = None
        if len(self.frozen) and int(laplace.n_params) < tail.n_params:
            self._pretrained = tail.flat_parameters().to(laplace.mean)
            self._covered = torch.ones(tail.n_params, dtype=torch.bool)
            self._covered[self.frozen] = False

    @property
    def names(self) -> list[str]:
        return list(self.tail.names)

    @property
    def head_name(self) -> str:
        return self.tail.names[-1]

    @property
    def n_params(self) -> int:
        """Weights the posterior moves (head rows frozen at their pretrained values not
        counted)."""
        n = int(self.laplace.n_params)
        return n if self._covered is not None else n - len(self.frozen)

    def _full(self, covered: Tensor, fill: Tensor | float) -> Tensor:
        """``(..., covered entries)`` -> ``(..., every tail weight)``, `fill` at the frozen ones."""
        if self._covered is None:
            return covered
        return fill_uncovered(covered, self._covered, fill)

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, adapter: DenoiserAdapter, batches: Iterable[Any],  # type: ignore[override]
            tail: int | Sequence[str] | Tail, *, repeats: int = 1, max_rows: int | None = None,
            seed: int | torch.Generator | None = 0, progress: bool = False,
            noise_groups: bool = True, tied: str = "untie",
            **fit_kwargs: Any) -> "TailPosterior":
        """Record the tail's inputs on the adapter's noisy training pairs of `batches` (as the
        head fit does), then Laplace over the tail's weights (``fit_kwargs``: see
        :meth:`fit_data`).  `tail`: the last `tail` blocks (:func:`default_tail`), module
        names, or a :class:`Tail`."""
        if isinstance(tail, int) and not isinstance(tail, bool):
            tail = default_tail(adapter.model, tail)
        tail = tail if isinstance(tail, Tail) else Tail(adapter.model, list(tail), tied=tied)
        data = collect_tail_data(adapter, tail, batches, repeats=repeats, max_rows=max_rows,
                                 seed=seed, progress=progress)
        groups = adapter.tail_output_groups if noise_groups else None
        return cls.fit_data(tail, data, output_groups=groups, likelihood=adapter.likelihood,
                            **fit_kwargs)

    @classmethod
    def fit_data(cls, tail: Tail, data: TailData, *, structure: TailStructure = "diag",
                 prior_precision: float | Literal["marglik"] = "marglik",
                 sigma_noise: float | Literal["mle", "marglik"] = "mle",
                 curvature: Curvature = "auto", mc_samples: int = 8, batch_size: int = 16,
                 output_groups: Mapping[str, slice] | None = None,
                 seed: int = 0, likelihood: str = "regression", rank: int = 32,
                 predictive: str = "sample",
                 unseen_classes: Literal["freeze", "prior"] = "freeze",
                 output_softcap: float | None = None) -> "TailPosterior":
        """Laplace over the tail's weights given recorded inputs and targets.

        ``prior_precision`` and ``sigma_noise`` as for the head (``"marglik"``: maximise
        laplace-torch's marginal likelihood; ``"mle"``: the RMS residual, per output group;
        ignored for classification).  ``structure="lowrank"``: the GGN diagonal plus its top
        ``rank`` eigenpairs (:class:`~genunc.posterior.lowrank.LowRankDiagLaplace`), for any
        parameter type, in ``P x rank`` memory.  ``predictive``: how draws act (see
        :attr:`predictive`; settable after the fit).  ``unseen_classes`` and ``output_softcap``
        as for the head (:meth:`HeadPosterior.fit_features`).
        """
        _check_predictive(predictive)  # before the fit, not after it
        prior0 = check_fit_options(likelihood, prior_precision, sigma_noise, unseen_classes,
                                   output_softcap)
        if output_softcap is not None and likelihood == "regression":
            raise GenuncError("output_softcap caps logits: it is for a classification likelihood")
        if structure not in TAIL_STRUCTURES:
            raise GenuncError(f"structure must be one of {TAIL_STRUCTURES}, got {structure!r}")
        if structure == "lowrank" and (not isinstance(rank, int) or rank < 1):
            raise GenuncError(f"rank must be a positive integer, got {rank!r}")
        if curvature not in ("auto", "exact", "mc"):
            raise GenuncError(f"curvature must be auto, exact or mc, got {curvature!r}")
        if structure == "kron":
            _kron_ready(tail)
        if len(data) == 0:
            raise ShapeMismatchError("no rows to fit on")
        dtype = torch.float64 if next(iter(tail.parameters().values())).dtype == torch.float64 \
            else torch.float32
        if likelihood == "classification":
            posterior = cls._fit_classification(tail, data, dtype, structure, prior_precision,
                                                 prior0, curvature, mc_samples, batch_size, seed,
                                                 rank, unseen_classes, output_softcap)
            posterior.predictive = predictive
            return posterior
        model = _TailModel(tail, dtype, data)
        masked = any(m is not None for m in data.masks)
        if sigma_noise == "marglik" and masked:
            raise GenuncError("sigma_noise='marglik' counts padded outputs as data; use 'mle' or "
                              "a number for masked (padded) outputs")
        index = torch.arange(len(data))
        targets = model.targets()
        with torch.no_grad():
            residual = torch.cat([model(index[i : i + batch_size]) for i in
                                  range(0, len(data), batch_size)]) - targets
        elements = model.element_mask()
        info: dict[str, Any] = {}
        sigma0 = 1.0
        if output_groups and sigma_noise == "mle":
            width = data.targets[0].shape[-1]
            check_output_groups(output_groups, width)
            # per column of the last axis (which repeats over the flat outputs), over data only
            data_only = elements.reshape(len(data), -1)
            square = residual.reshape(len(data), -1).double().square() * data_only
            square = square.reshape(len(data), -1, width)
            counts = data_only.reshape(len(data), -1, width).sum((0, 1)).double()
            groups = group_noise_scales(square.sum((0, 1)), counts, output_groups)
            scale = torch.ones(width, dtype=dtype)
            for name, part in output_groups.items():
                scale[part] = groups[name]
            model.output_scale = scale
            targets = model.targets()
            info["sigma_noise_groups"] = groups
            n_elements = elements.reshape(len(data), -1, width).sum((0, 1)).double()
            info["log_lik_offset"] = -float((n_elements * scale.double().log()).sum())
        elif isinstance(sigma_noise, str):
            sigma0 = max(float(residual[elements].double().square().mean().sqrt()), 1e-6)
        else:
            sigma0 = float(sigma_noise)

        curvature, backend, backend_kwargs = _backend(curvature, structure, model.width * tail.n_params,
                                                      mc_samples, seed)
        la = _laplace(model, "regression", structure, sigma_noise=sigma0, prior_precision=prior0,
                      backend=backend, backend_kwargs=backend_kwargs)
        _fit_laplace(la, DataLoader(TensorDataset(index, targets), batch_size=batch_size), structure,
                     rank, curvature, mc_samples, seed)
        tune_hyperparameters(la, prior_precision, sigma_noise, "regression")
        info.update({
            "tail": tail.names, "n_rows": len(data), "output_width": model.width,
            "curvature": curvature, "mc_samples": mc_samples if curvature == "mc" else None,
            "backend": backend.__name__, "tied": tail.tied,
            "rank": rank if structure == "lowrank" else None,
            **method_info(prior_precision, sigma_noise),
        })
        posterior = cls(la, tail, structure, tail_fingerprint(tail), info)
        posterior.info["log_marglik"] = posterior.log_marginal_likelihood()
        posterior.predictive = predictive
        return posterior

    @classmethod
    def _fit_classification(cls, tail: Tail, data: TailData, dtype: torch.dtype,
                            structure: str, prior_precision: float | str, prior0: float,
                            curvature: str, mc_samples: int, batch_size: int, seed: int,
                            rank: int, unseen_classes: str,
                            softcap: float | None) -> "TailPosterior":
        """Categorical likelihood, one laplace-torch row per data position (masked token)."""
        model = _TailModel(tail, dtype, data, likelihood="classification", softcap=softcap)
        targets = model.targets()
        index = torch.arange(len(model))
        with torch.no_grad():
            n_classes = int(model(index[:1]).shape[-1])
        if int(targets.min()) < 0 or int(targets.max()) >= n_classes:
            raise ShapeMismatchError(f"class targets span [{int(targets.min())}, "
                                     f"{int(targets.max())}] but the tail has {n_classes} outputs")
        _, unseen = classes_without_data(targets, n_classes)
        if unseen and unseen_classes == "freeze":
            model.freeze_rows(unseen)
        curvature, backend, backend_kwargs = _backend(curvature, structure, n_classes * tail.n_params,
                                                      mc_samples, seed)
        la = _laplace(model, "classification", structure, prior_precision=prior0, backend=backend,
                      backend_kwargs=backend_kwargs)
        _fit_laplace(la, DataLoader(TensorDataset(index, targets), batch_size=batch_size), structure,
                     rank, curvature, mc_samples, seed)
        tune_hyperparameters(la, prior_precision, "mle", "classification")
        info = {"tail": tail.names, "n_rows": len(model), "n_sequences": len(data),
                "output_width": n_classes, "curvature": curvature,
                "mc_samples": mc_samples if curvature == "mc" else None,
                "backend": backend.__name__, "tied": tail.tied,
                "rank": rank if structure == "lowrank" else None,
                "classes_without_data": unseen, "unseen_classes": unseen_classes,
                "output_softcap": softcap,
                "prior_precision_method": method_info(prior_precision, "mle")[
                    "prior_precision_method"]}
        posterior = cls(la, tail, structure, tail_fingerprint(tail), info, "classification")
        posterior.info["log_marglik"] = posterior.log_marginal_likelihood()
        return posterior

    # ------------------------------------------------------------------ quantities
    @property
    def mean(self) -> Tensor:
        """Flat posterior mean over every tail weight (frozen rows at their values)."""
        return self._full(self.laplace.mean.detach(), self._pretrained)

    @property
    def posterior_variance(self) -> Tensor:
        """Marginal variances of every tail weight (flat; frozen rows 0), for any structure."""
        variance = self._laplace_variance()
        if self._covered is None and len(self.frozen):
            variance = variance.clone()
            variance[self.frozen.to(variance.device)] = 0.0
        return self._full(variance, 0.0)

    def sample(self, num_draws: int, seed: int | torch.Generator | None = 0, *,
               with_map: bool = False) -> TailDraws:
        """`num_draws` tail weight sets (``with_map``: the posterior mean first)."""
        check_num_draws(num_draws)
        generator = as_generator(seed, device=self.mean.device)
        with torch.no_grad():
            flat = self._full(self.laplace.sample(num_draws, generator=generator).detach(),
                              self._pretrained)
        if self._covered is None and len(self.frozen):
            frozen = self.frozen.to(flat.device)
            flat[:, frozen] = self.mean.to(flat)[frozen]
        if with_map:
            flat = torch.cat([self.mean.unsqueeze(0).to(flat), flat])
        device = next(iter(self.tail.parameters().values())).device
        return TailDraws.from_flat(flat.to(device), self.tail, with_map=with_map,
                                   linearised=self.predictive == "linearised")

    @property
    def predictive(self) -> str:
        """How draws act: ``"sample"`` re-runs the block at each drawn weight set;
        ``"linearised"`` applies the block's first-order expansion around the fitted weights
        (:meth:`~genunc.posterior.tail.Tail.apply_linearised`, the GLM predictive)."""
        return str(self.info.get("predictive", "sample"))

    @predictive.setter
    def predictive(self, value: str) -> None:
        _check_predictive(value)
        self.info["predictive"] = value

    def linearised_output_variance(self, inputs: TailInputs, chunk: int = 64) -> Tensor:
        """Closed-form variance of the tail's output under its first-order expansion,
        ``diag(J diag(s2) J^T)`` per row (``(B, ...)``, like one output), for a diagonal
        posterior.

        This is the exact variance of the linearised predictive
        (:meth:`~genunc.posterior.tail.Tail.apply_linearised`): no draw noise; where the block
        is linear in its weights it is the exact variance of the re-run too, and elsewhere it
        agrees with Monte Carlo of re-run draws to first order in the posterior's width.  Each
        output element costs one vector-Jacobian product through the block for its own row
        (``chunk`` of them per batched backward pass): ``B x`` (outputs per row) products, so
        it is for small outputs (a molecule: ``N x (3+K)``), not for images.  Needs
        row-separable inputs (every row's outputs depend on its own recorded inputs).
        """
        if self.structure != "diag":
            raise GenuncError(f"the linearised closed form needs a diagonal posterior; this one "
                              f"is {self.structure!r}: use Monte Carlo over draws")
        inputs._require_separable("the linearised closed form")
        tail = self.tail
        keys = list(tail.param_shapes)
        own = tail.parameters()
        primals = tuple(own[k].detach() for k in keys)
        variance = tail.split_flat(self.posterior_variance.unsqueeze(0))
        weights = tuple(variance[k][0].to(p) for k, p in zip(keys, primals))
        rows = []
        with math_attention():
            for b in range(inputs.rows):
                row = inputs.select([b])
                out, pullback = torch.func.vjp(
                    lambda *p, row=row: tail.run(dict(zip(keys, p)), row), *primals)
                flat = out.reshape(-1)
                total = torch.zeros_like(flat)
                for start in range(0, flat.numel(), chunk):
                    stop = min(start + chunk, flat.numel())
                    cotangents = torch.zeros(stop - start, flat.numel(), dtype=out.dtype,
                                             device=out.device)
                    cotangents[torch.arange(stop - start), torch.arange(start, stop)] = 1
                    grads = torch.func.vmap(pullback)(cotangents.reshape(-1, *out.shape))
                    total[start:stop] = sum((g.reshape(stop - start, -1).square() * w.reshape(1, -1))
                                            .sum(1) for g, w in zip(grads, weights))
                rows.append(total.reshape(out.shape[1:]))
        return torch.stack(rows).detach()

    def summary(self) -> dict[str, Any]:
        mean, var = self.mean, self.posterior_variance
        return {
            "tail": self.names, "structure": self.structure, "likelihood": self.likelihood,
            "n_params": self.n_params,
            "n_data_rows": int(self.laplace.n_data), "prior_precision": self.prior_precision,
            "sigma_noise": self.sigma_noise if self.likelihood == "regression" else None,
            "log_marglik": self.info.get("log_marglik"),
            "curvature": self.info.get("curvature"), "tied": self.info.get("tied"),
            "predictive": self.predictive,
            "relative_perturbation": float(var.sum().sqrt() / mean.norm().clamp_min(1e-12)),
        }

    def digest(self) -> str:
        h = self._state_digest()
        h.update(json.dumps(self.names).encode())
        if self.predictive != "sample":
            h.update(self.predictive.encode())
        return h.hexdigest()

    def check_matches(self, model: nn.Module | DenoiserAdapter, check_weights: bool = True) -> None:
        """Raise :class:`FingerprintMismatchError` unless `model` has this tail, with the weights
        fitted at."""
        module = model.model if isinstance(model, DenoiserAdapter) else model
        check_tail_fingerprint(self.fingerprint, tail_fingerprint(Tail(module, self.names)),
                               check_weights)

    def bind(self, model: nn.Module) -> "TailPosterior":
        """This posterior on another copy of the model it was fitted on (checked)."""
        self.check_matches(model)
        other = copy.copy(self)
        other.tail = Tail(model, self.names)
        return other

    # ------------------------------------------------------------------ persistence
    def saved_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, laplace_meta = laplace_tensors(self.laplace, self.structure)
        if self.laplace.model.output_scale is not None:
            tensors["output_scale"] = self.laplace.model.output_scale
        meta = {"structure": self.structure, "tail": self.names, "likelihood": self.likelihood,
                "fingerprint": self.fingerprint, **laplace_meta, "info": self.info}
        return tensors, meta

    @classmethod
    def from_saved(cls, meta: dict[str, Any], tensors: dict[str, Tensor],
                   model: nn.Module | DenoiserAdapter, *, stale: str = "error",
                   check_weights: bool = True) -> "TailPosterior | None":
        module = model.model if isinstance(model, DenoiserAdapter) else model
        try:
            tail = Tail(module, meta["tail"])
            check_tail_fingerprint(meta["fingerprint"], tail_fingerprint(tail), check_weights)
        except (FingerprintMismatchError, GenuncError) as err:
            if stale == "none":
                return None
            if isinstance(err, FingerprintMismatchError):
                raise
            raise FingerprintMismatchError(f"this posterior was fitted on another tail: {err}") \
                from None
        device = next(iter(tail.parameters().values())).device
        tensors = {k: v.to(device) for k, v in tensors.items()}
        likelihood = meta.get("likelihood", "regression")
        lap_model = _TailModel(tail, tensors["mean"].dtype, None, tensors.get("output_scale"))
        info = meta.get("info") or {}
        unseen = info.get("classes_without_data") or []
        if meta.get("format_version", 1) >= 2 and unseen and \
                info.get("unseen_classes", "freeze") == "freeze":
            lap_model.freeze_rows(unseen)  # format 1 covered them in the Laplace
        la = _laplace(lap_model, likelihood, meta["structure"], backend=CurvlinopsGGN)
        restore_laplace(la, tensors, meta, meta["structure"], likelihood)
        return cls(la, tail, meta["structure"], meta["fingerprint"], meta.get("info"), likelihood)

    def __repr__(self) -> str:
        return (f"TailPosterior(tail={self.names}, structure={self.structure!r}, "
                f"n_params={self.n_params}, prior_precision={self.prior_precision:.4g})")


def _laplace(model: nn.Module, likelihood: str, structure: str, **kwargs: Any) -> Any:
    """laplace-torch's object for `structure`; ``lowrank`` is genunc's low-rank-plus-diagonal
    subclass of its diagonal Laplace."""
    if structure == "lowrank":
        return LowRankDiagLaplace(model, likelihood, **kwargs)
    return Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure, **kwargs)


def _fit_laplace(la: Any, loader: DataLoader, structure: str, rank: int, curvature: str,
                 mc_samples: int, seed: int) -> None:
    """laplace-torch's fit, then a low-rank structure's eigenpairs on the same data."""
    la.fit(loader, progress_bar=False)
    if structure == "lowrank":
        la.fit_low_rank(loader, rank, exact=curvature == "exact", mc_samples=mc_samples, seed=seed)


def _check_predictive(value: str) -> None:
    if value not in PREDICTIVES:
        raise GenuncError(f"predictive must be one of {PREDICTIVES}, got {value!r}")


def _backend(curvature: str, structure: str, jacobian_size: int, mc_samples: int,
             seed: int) -> tuple[str, type, dict[str, Any]]:
    """The resolved curvature and laplace-torch backend (``jacobian_size``: D * P per row)."""
    if curvature == "auto":
        curvature = "exact" if jacobian_size <= _EXACT_LIMIT else "mc"
    if curvature == "mc" and structure == "full":
        raise GenuncError("structure='full' needs curvature='exact' (a P x P GGN is for small "
                          "tails)")
    if curvature == "exact":
        return curvature, ExactDiagGGN, {}
    backend = type("MonteCarloDiagGGN", (MonteCarloDiagGGN,), {"mc_samples": mc_samples, "seed": seed})
    return curvature, backend, {"stochastic": True}


def _frozen_entries(tail: Tail, classes: Sequence[int]) -> Tensor:
    """Flat positions of the last tail module's output rows for `classes` (its ``weight`` rows
    and ``bias`` entries, the vocabulary head's layout)."""
    if not classes:
        return torch.zeros(0, dtype=torch.long)
    head = tail.names[-1]
    rows = torch.as_tensor(list(classes), dtype=torch.long)
    out, offset = [], 0
    for key, shape in tail.param_shapes.items():
        size = int(torch.Size(shape).numel())
        if key in (f"{head}.weight", f"{head}.bias"):
            per_row = size // shape[0]
            out.append(offset + (rows[:, None] * per_row + torch.arange(per_row)).reshape(-1))
        offset += size
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


# ---------------------------------------------------------------------- fingerprints
def tail_fingerprint(tail: Tail) -> dict[str, Any]:
    """Names, classes, parameter shapes and weight hashes of every tail module."""
    return {"tail": list(tail.names),
            "modules": [head_fingerprint(n, m) for n, m in zip(tail.names, tail.modules)]}


def check_tail_fingerprint(saved: dict[str, Any], current: dict[str, Any],
                           check_weights: bool = True) -> None:
    if saved["tail"] != current["tail"]:
        raise FingerprintMismatchError(f"this posterior was fitted on the tail {saved['tail']}, "
                                       f"not {current['tail']}")
    for s, c in zip(saved["modules"], current["modules"]):
        check_fingerprint(s, c, check_weights)


# ---------------------------------------------------------------------- collection
@torch.no_grad()
def collect_tail_data(adapter: DenoiserAdapter, tail: Tail, batches: Iterable[Any], *,
                      repeats: int = 1, max_rows: int | None = None,
                      seed: int | torch.Generator | None = 0, progress: bool = False) -> TailData:
    """Record the tail's inputs on noisy versions of clean `batches` (one row per sample).

    A row-separable pass is recorded once per batch; otherwise every sample gets a body pass of
    its own, so that each row's recorded inputs are its alone.
    """
    generator = as_generator(seed)
    data = TailData()
    was_training = adapter.model.training
    adapter.model.eval()
    bar = tqdm(desc="recording tail inputs", unit="row", disable=not progress, total=max_rows)
    try:
        for batch in batches:
            for _ in range(repeats):
                pairs = adapter.tail_training_pairs(batch, generator)
                b = pairs.target.shape[0]
                with tail.capture() as rec:
                    adapter.denoise(**pairs.inputs)
                    inputs = tail.inputs_of(rec, b)
                    parts = [(inputs, slice(0, b))]
                    if not inputs.separable:
                        parts = []
                        for i in range(b):
                            rec.reset()
                            adapter.denoise(**adapter.input_rows(pairs.inputs, slice(i, i + 1), b))
                            parts.append((tail.inputs_of(rec, 1), slice(i, i + 1)))
                for part, rows in parts:
                    mask = None
                    if pairs.mask is not None:
                        mask = pairs.mask[rows].to(pairs.target.device)
                        mask = mask.reshape(*mask.shape, *([1] * (pairs.target.dim() - mask.dim())))
                    data.add(part.to("cpu"), pairs.target[rows].cpu(),
                             None if mask is None else mask.cpu())
                bar.update(b)
                if max_rows is not None and len(data) >= max_rows:
                    return data
    finally:
        bar.close()
        adapter.model.train(was_training)
    if not data.chunks:
        raise ShapeMismatchError("no data: the batch iterable was empty")
    return data


def default_tail(model: nn.Module, blocks: int = 1, head_name: str | None = None) -> list[str]:
    """The last `blocks` blocks and what follows them, for genunc's model families: diffusers
    UNets (``up_blocks``), the text transformer (``blocks.layers``), the e3nn molecule denoiser
    (``layers``) and transformers language models (``model.layers``, ``model.decoder.layers``,
    ``bert.encoder.layer``).  A model with a ``tail_modules(blocks)`` method names its own tail
    (EDM's: :meth:`genunc.zoo.edm.EDMModel.tail_modules`)."""
    if blocks < 1:
        raise GenuncError(f"blocks must be at least 1, got {blocks}")
    own = getattr(model, "tail_modules", None)  # a model that names its own tail (EDM)
    if callable(own):
        return list(own(blocks))
    families = [("up_blocks", ["conv_norm_out", "conv_act", "conv_out"]),
                ("blocks.layers", ["norm", "head"]),
                ("layers", ["head"]),
                # transformers language models (LLaDA2-style, DiffusionGemma's decoder, BERT)
                ("model.layers", ["model.norm", "lm_head"]),
                ("model.decoder.layers", ["model.decoder.norm", "lm_head"]),
                ("bert.encoder.layer", ["cls.predictions.transform", "cls.predictions.decoder"])]
    for container, after in families:
        try:
            seq = model.get_submodule(container)
        except AttributeError:
            continue
        n = len(seq)
        if blocks > n:
            raise GenuncError(f"{container} has {n} blocks, asked for the last {blocks}")
        names = [f"{container}.{i}" for i in range(n - blocks, n)]
        after = [a for a in after if _has(model, a)]
        return names + after
    raise GenuncError(f"no default tail for {type(model).__name__}: name its modules")


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


__all__ = ["MonteCarloDiagGGN", "TailData", "TailPosterior", "check_tail_fingerprint",
           "collect_tail_data", "default_tail", "tail_fingerprint"]
