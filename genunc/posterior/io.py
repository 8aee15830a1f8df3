"""The one on-disk format of a genunc posterior, whatever it covers (the head or a tail).

Two files beside (or anywhere away from) the model: ``genunc_posterior.safetensors`` holds the
tensors (mean, curvature, prior), ``genunc_posterior.json`` the ``kind`` (``"head"`` or
``"tail"``), structure, likelihood and the fingerprint of the weights it was fitted on, so that
a posterior is never loaded onto other weights unnoticed.  The description is written last: a
folder whose description is there holds a complete posterior.

Older folders still load: format 1 head posteriors (no ``kind``), and tail posteriors saved
as ``genunc_tail_posterior.{json,safetensors}``.  Every unreadable, torn or inconsistent file is
one :class:`~genunc.errors.GenuncError` naming it; the classes build themselves from what
:func:`read_saved` returns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

from genunc._io import atomic_write
from genunc._version import __version__
from genunc.errors import GenuncError, MissingFileError, describe

Kind = Literal["head", "tail"]
KINDS: tuple[str, ...] = ("head", "tail")
FORMAT_VERSION = 2
TENSORS_FILE = "genunc_posterior.safetensors"
META_FILE = "genunc_posterior.json"
#: Folder name for a posterior saved beside a model (``<model>/genunc_posterior``).
POSTERIOR_DIR = "genunc_posterior"
#: tail posteriors of genunc <= 0.x: their own file names, format 1
LEGACY_TAIL_FILES = ("genunc_tail_posterior.json", "genunc_tail_posterior.safetensors")
#: format versions each kind's reader accepts
READABLE = {"head": (1, 2), "tail": (1, 2)}

_REFIT = "refit it with genunc fit, or fit_posterior(...) and save()"


def _files(directory: Path) -> tuple[Path, Path, bool]:
    """(description, tensors, legacy) of the posterior saved in `directory`."""
    legacy = [directory / name for name in LEGACY_TAIL_FILES]
    current = [directory / META_FILE, directory / TENSORS_FILE]
    if not any(p.exists() for p in current) and any(p.exists() for p in legacy):
        return legacy[0], legacy[1], True
    return current[0], current[1], False


def saved_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The two files a complete posterior in `directory` has."""
    meta, tensors, _ = _files(Path(directory))
    return [meta, tensors]


def saved_kind(directory: str | os.PathLike[str]) -> Kind | None:
    """The kind of posterior `directory` holds, or None while its description is not there."""
    meta_path, _, legacy = _files(Path(directory))
    if not meta_path.exists():
        return None
    if legacy:
        return "tail"
    kind = _read_meta(meta_path).get("kind", "head")
    if kind not in KINDS:
        raise GenuncError(f"{meta_path} is damaged (unknown posterior kind {kind!r}); {_REFIT}")
    return kind


def write_saved(directory: str | os.PathLike[str], kind: Kind, tensors: dict[str, torch.Tensor],
                meta: dict[str, Any]) -> Path:
    """Write a posterior's tensors, then its description (each atomically); a posterior of
    the old block format in the folder is replaced."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format_version": FORMAT_VERSION, "genunc_version": __version__, "kind": kind, **meta}
    (directory / META_FILE).unlink(missing_ok=True)  # a reader never pairs new tensors with it
    atomic_write(directory / TENSORS_FILE, lambda p: save_file(tensors, str(p)))
    atomic_write(directory / META_FILE, json.dumps(meta, indent=2) + "\n")
    for name in LEGACY_TAIL_FILES:
        (directory / name).unlink(missing_ok=True)
    return directory


def remove_saved(directory: str | os.PathLike[str]) -> None:
    """Delete a saved posterior's files, of the current or the old block format."""
    for name in (META_FILE, TENSORS_FILE, *LEGACY_TAIL_FILES):
        (Path(directory) / name).unlink(missing_ok=True)


def read_saved(directory: str | os.PathLike[str], *, missing: Literal["error", "none"] = "error",
               ) -> tuple[Kind, dict[str, Any], dict[str, torch.Tensor]] | None:
    """A saved posterior's kind, description and tensors, or None where nothing was saved and
    ``missing="none"``; an incomplete, unreadable or foreign folder is a one-line error naming
    the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path, tensor_path, legacy = _files(directory)
    if not meta_path.exists() and not tensor_path.exists() and missing == "none":
        return None
    if not meta_path.exists() or not tensor_path.exists():
        raise MissingFileError(f"no complete genunc posterior in {directory} (expected "
                               f"{meta_path.name} and {tensor_path.name})")
    meta = _read_meta(meta_path)
    try:
        tensors = load_file(str(tensor_path))
    except (OSError, SafetensorError) as err:
        raise GenuncError(f"{tensor_path} is damaged ({describe(err)}); {_REFIT}") from None
    kind = "tail" if legacy else meta.get("kind", "head")
    if kind not in KINDS:
        raise GenuncError(f"{meta_path} is damaged (unknown posterior kind {kind!r}); {_REFIT}")
    if meta.get("format_version") not in READABLE[kind]:
        raise GenuncError(
            f"{meta_path}: posterior format {meta.get('format_version')} is not supported by "
            f"genunc {__version__} (reads {list(READABLE[kind])}); {_REFIT}")
    return kind, meta, tensors


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise GenuncError(f"{path} is damaged ({describe(err)}); {_REFIT}") from None
    if not isinstance(meta, dict):
        raise GenuncError(f"{path} is damaged (not a genunc posterior description); {_REFIT}")
    return meta


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
