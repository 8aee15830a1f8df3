"""One folder, one saved posterior, of whichever kind (over the head or over a tail).

Pipelines and jobs load a folder here instead of assuming the kind: the description's ``kind``
(:mod:`genunc.posterior.io`) picks the class, with the one error policy of
:func:`~genunc.posterior.io.read_saved`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from torch import nn

from genunc.adapters.base import DenoiserAdapter
from genunc.posterior.io import (
    META_FILE,
    damaged_if_unreadable,
    read_saved,
    remove_saved,
    saved_files,
    saved_kind,
)
from genunc.posterior.laplace_head import HeadPosterior
from genunc.posterior.laplace_tail import TailPosterior

__all__ = ["load_saved", "remove_saved", "saved_files", "saved_kind"]

_CLASSES = {"head": HeadPosterior, "tail": TailPosterior}


def load_saved(directory: str | os.PathLike[str], model: nn.Module | DenoiserAdapter, *,
               missing: Literal["error", "none"] = "error",
               stale: Literal["error", "none"] = "error",
               check_weights: bool = True) -> HeadPosterior | TailPosterior | None:
    """The posterior saved in `directory` on `model`, whichever kind it is: None where nothing
    was saved (``missing="none"``) or it belongs to other weights (``stale="none"``); anything
    else wrong raises one line naming the file."""
    read = read_saved(directory, missing=missing)
    if read is None:
        return None
    kind = read[0]
    with damaged_if_unreadable(Path(directory) / META_FILE):
        return _CLASSES[kind].from_saved(*read, model, stale=stale, check_weights=check_weights)
