"""Saving and loading head posteriors: two files beside (or anywhere away from) the model.

``genunc_posterior.safetensors`` holds the posterior's tensors (mean, curvature, prior), the
``.json`` its structure, likelihood and the fingerprint of the head it was fitted on, so that a
posterior is never loaded onto another head or other weights unnoticed.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from laplace import Laplace
from torch import nn

from genunc._io import atomic_write
from genunc._version import __version__
from genunc.adapters.base import DenoiserAdapter, resolve_module
from genunc.errors import FingerprintMismatchError, GenuncError, MissingFileError
from genunc.posterior.fingerprint import check_fingerprint, head_fingerprint
from genunc.posterior.heads import head_ops_for
from genunc.posterior.laplace_state import laplace_tensors, restore_laplace

if TYPE_CHECKING:
    from genunc.posterior.laplace_head import HeadPosterior

FORMAT_VERSION = 1
TENSORS_FILE = "genunc_posterior.safetensors"
META_FILE = "genunc_posterior.json"
#: Folder name for a posterior saved beside a model (``<model>/genunc_posterior``).
POSTERIOR_DIR = "genunc_posterior"


def save_posterior(posterior: "HeadPosterior", directory: str | os.PathLike[str]) -> Path:
    """Write the posterior's two files into `directory`, each atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, laplace_meta = laplace_tensors(posterior.laplace, posterior.structure)
    if posterior.subset is not None:  # a posterior over some of the head's rows
        tensors["subset"] = posterior.subset.to(torch.uint8)
        tensors["full_mean"] = posterior.mean
    model = posterior.laplace.model
    if getattr(model, "output_scale", None) is not None:
        tensors["output_scale"] = model.output_scale
    meta = {
        "format_version": FORMAT_VERSION,
        "genunc_version": __version__,
        "structure": posterior.structure,
        "likelihood": posterior.likelihood,
        "head_name": posterior.head_name,
        "row_wise": posterior.ops.row_wise,
        "output_softcap": getattr(model, "softcap", None),
        "fingerprint": posterior.fingerprint,
        **laplace_meta,
        "info": posterior.info,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(directory / TENSORS_FILE, lambda p: save_file(tensors, str(p)))
    atomic_write(directory / META_FILE, json.dumps(meta, indent=2) + "\n")
    return directory



def load_posterior(
    directory: str | os.PathLike[str],
    model: nn.Module | DenoiserAdapter,
    *,
    missing: Literal["error", "none"] = "error",
    stale: Literal["error", "none"] = "error",
    check_weights: bool = True,
) -> "HeadPosterior | None":
    """Load the posterior saved in `directory` onto `model`'s head (or an adapter's).

    One policy with two explicit choices: ``missing="none"`` returns None where nothing was
    saved; ``stale="none"`` returns None where the saved posterior belongs to another head or
    other weights (a retrained model).  Anything else wrong (a half-written folder, a format
    this genunc cannot read) raises.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from genunc.posterior.laplace_head import HeadPosterior, _RowModel

    directory = Path(directory)
    meta_path, tensor_path = directory / META_FILE, directory / TENSORS_FILE
    if not meta_path.exists() and not tensor_path.exists() and missing == "none":
        return None
    if not meta_path.exists() or not tensor_path.exists():
        raise MissingFileError(
            f"no complete genunc posterior in {directory} (expected {META_FILE} and {TENSORS_FILE})"
        )
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(tensor_path))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, SafetensorError) as err:
        raise GenuncError(f"the posterior in {directory} is damaged ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'unreadable'}); refit it "
                          "with genunc fit, or fit_posterior(...) and save()") from None
    if not isinstance(meta, dict):
        raise GenuncError(f"{meta_path} is not a genunc posterior description; refit it")
    if meta.get("format_version") != FORMAT_VERSION:
        raise GenuncError(
            f"posterior format {meta.get('format_version')} is not supported by genunc "
            f"{__version__} (expects {FORMAT_VERSION})"
        )
    module = model.model if isinstance(model, DenoiserAdapter) else model
    head = resolve_module(module, meta["head_name"])
    try:
        check_fingerprint(
            meta["fingerprint"], head_fingerprint(meta["head_name"], head), check_weights
        )
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
    kept = None
    if subset is not None:
        rows = ops.output_rows()
        kept = torch.unique(rows.to(device)[subset])
    la = Laplace(
        _RowModel(head_copy, meta["row_wise"], output_scale=tensors.get("output_scale"),
                  kept_outputs=kept, softcap=meta.get("output_softcap")),
        meta["likelihood"],
        subset_of_weights="all",
        hessian_structure=meta["structure"],
    )
    restore_laplace(la, tensors, meta, meta["structure"], meta["likelihood"])
    return HeadPosterior(
        la, ops, meta["head_name"], meta["structure"], meta["likelihood"],
        meta["fingerprint"], meta.get("info"), subset=subset,
        full_mean=tensors.get("full_mean") if subset is not None else None,
    )

