"""One folder, one saved posterior: over the head or over a block (a tail).

Pipelines and jobs look a folder up here instead of assuming the kind, so a posterior fitted
over a block is found where a head posterior would have been, and a folder never holds both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from torch import nn

from genunc.adapters.base import DenoiserAdapter
from genunc.errors import GenuncError
from genunc.posterior import io, laplace_tail
from genunc.posterior.laplace_head import HeadPosterior
from genunc.posterior.laplace_tail import TailPosterior

Kind = Literal["head", "tail"]
FILES: dict[str, tuple[str, str]] = {
    "head": (io.TENSORS_FILE, io.META_FILE),
    "tail": (laplace_tail.TENSORS_FILE, laplace_tail.META_FILE),
}


def saved_kind(directory: str | os.PathLike[str]) -> Kind | None:
    """Which kind of posterior `directory` holds (a file of it is enough), or None."""
    directory = Path(directory)
    kinds = [kind for kind, names in FILES.items() if any((directory / n).exists() for n in names)]
    if len(kinds) > 1:
        raise GenuncError(f"{directory} holds both a head and a block posterior; remove the one "
                          "you do not want")
    return kinds[0] if kinds else None  # type: ignore[return-value]


def saved_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The files a complete saved posterior of `directory`'s kind has (head files if none)."""
    kind = saved_kind(directory) or "head"
    return [Path(directory) / name for name in FILES[kind]]


def load_saved(directory: str | os.PathLike[str], model: nn.Module | DenoiserAdapter, *,
               missing: Literal["error", "none"] = "error",
               stale: Literal["error", "none"] = "error",
               check_weights: bool = True) -> HeadPosterior | TailPosterior | None:
    """The posterior saved in `directory`, whichever kind it is (see each kind's ``load``)."""
    kind = saved_kind(directory)
    loader = TailPosterior.load if kind == "tail" else HeadPosterior.load
    return loader(directory, model, missing=missing, stale=stale, check_weights=check_weights)


def remove_saved(directory: str | os.PathLike[str]) -> None:
    """Delete a saved posterior's files (a refit of another kind replaces it)."""
    for names in FILES.values():
        for name in names:
            (Path(directory) / name).unlink(missing_ok=True)
