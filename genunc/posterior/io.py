"""Saving and loading head posteriors: two files beside (or anywhere away from) the model.

``genunc_posterior.safetensors`` holds the posterior's tensors (mean, curvature, prior), the
``.json`` its structure, likelihood and the fingerprint of the head it was fitted on, so that a
posterior is never loaded onto another head or other weights unnoticed.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from laplace import Laplace
from torch import nn

from genunc._io import atomic_write
from genunc._version import __version__
from genunc.adapters.base import DenoiserAdapter, resolve_module
from genunc.errors import FingerprintMismatchError, GenuncError, MissingFileError, describe
from genunc.posterior.fingerprint import check_fingerprint, head_fingerprint
from genunc.posterior.heads import head_ops_for
from genunc.posterior.laplace_state import laplace_tensors, restore_laplace

_REFIT = "refit it with genunc fit, or fit_posterior(...) and save()"

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



def read_saved(directory: Path, meta_name: str, tensors_name: str, format_version: int, *,
               missing: Literal["error", "none"] = "error",
               ) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """A saved posterior's description and tensors, or None where nothing was saved and
    ``missing="none"``; an incomplete, unreadable or foreign folder is one-line error naming the
    file, for every kind of posterior."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path, tensor_path = directory / meta_name, directory / tensors_name
    if not meta_path.exists() and not tensor_path.exists() and missing == "none":
        return None
    if not meta_path.exists() or not tensor_path.exists():
        raise MissingFileError(
            f"no complete genunc posterior in {directory} (expected {meta_name} and {tensors_name})"
        )
    for path, read in ((meta_path, lambda: json.loads(meta_path.read_text())),
                       (tensor_path, lambda: load_file(str(tensor_path)))):
        try:
            value = read()
        except (json.JSONDecodeError, UnicodeDecodeError, OSError, SafetensorError) as err:
            raise GenuncError(f"{path} is damaged ({describe(err)}); {_REFIT}") from None
        if path == meta_path:
            meta = value
        else:
            tensors = value
    if not isinstance(meta, dict):
        raise GenuncError(f"{meta_path} is damaged (not a genunc posterior description); {_REFIT}")
    if meta.get("format_version") != format_version:
        raise GenuncError(
            f"{meta_path}: posterior format {meta.get('format_version')} is not supported by "
            f"genunc {__version__} (expects {format_version}); {_REFIT}"
        )
    return meta, tensors


@contextmanager
def damaged_if_unreadable(path: Path) -> Iterator[None]:
    """Turn a saved posterior whose entries do not fit together (a key missing, a tensor of
    the wrong shape) into the same one-line error as an unreadable file."""
    try:
        yield
    except GenuncError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise GenuncError(f"{path} is damaged ({describe(err)}); {_REFIT}") from None


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
    directory = Path(directory)
    read = read_saved(directory, META_FILE, TENSORS_FILE, FORMAT_VERSION, missing=missing)
    if read is None:
        return None
    meta, tensors = read
    with damaged_if_unreadable(directory / META_FILE):
        return _load_head(meta, tensors, model, stale, check_weights)


def _load_head(meta: dict[str, Any], tensors: dict[str, torch.Tensor],
               model: nn.Module | DenoiserAdapter, stale: str,
               check_weights: bool) -> "HeadPosterior | None":
    from genunc.posterior.laplace_head import HeadPosterior, _RowModel

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

