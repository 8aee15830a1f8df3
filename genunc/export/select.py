"""Filter an existing export by one of its score columns into a new export."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from genunc import filtering
from genunc.errors import GenuncError
from genunc.export.store import Export, write_subset


def filter_export(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    score: str,
    *,
    fraction: float | None = None,
    k: int | None = None,
    threshold: float | None = None,
    group_by: str | None = None,
    link: str = "copy",
) -> Path:
    """Keep the least uncertain samples of `source` by column `score`; write them to `destination`.

    Exactly one rule: ``fraction`` (keep that share), ``k`` (keep that many), ``threshold`` (keep
    score <= threshold) or ``group_by`` (best of N: the least uncertain sample per value of that
    column, e.g. the condition or prompt).  The source export is never modified.
    """
    rules = {"fraction": fraction, "k": k, "threshold": threshold, "group_by": group_by}
    given = {name: value for name, value in rules.items() if value is not None}
    if len(given) != 1:
        raise GenuncError(f"give exactly one of {sorted(rules)}; got {sorted(given) or 'none'}")
    export = Export(source)
    if len(export) == 0:
        raise GenuncError(f"{source} holds no samples")
    scores = export.column(score).astype(np.float64)
    if fraction is not None:
        keep = filtering.keep_fraction(scores, fraction)
    elif k is not None:
        keep = filtering.keep_top_k(scores, k)
    elif threshold is not None:
        keep = filtering.keep_below(scores, threshold)
    else:
        keep = np.sort(filtering.best_of_n(scores, export.column(group_by)))
    provenance = {"score": score, **given, "link": link}
    return write_subset(export, keep.tolist(), destination, provenance, link=link)
