"""Filter an existing export by one of its score columns into a new export."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
    within: str | None = None,
    link: str = "copy",
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Keep the least uncertain samples of `source` by column `score`; write them to `destination`.

    Exactly one rule: ``fraction`` (keep that share), ``k`` (keep that many), ``threshold`` (keep
    score <= threshold) or ``group_by`` (best of N: the least uncertain sample per value of that
    column, e.g. the condition or prompt).  ``within``: keep the `fraction` of every value of
    that column (``condition``, ``n_atoms``), so the kept set keeps the source's mix of it.
    The source export is never modified.  `provenance`
    (e.g. a certified risk-control threshold) is recorded in the new export's ``run.json``.
    """
    export = Export(source)
    if len(export) == 0:
        raise GenuncError(f"{source} holds no samples")
    scores = export.column(score).astype(np.float64)
    keep = filtering.select(scores, fraction=fraction, k=k, threshold=threshold,
                            groups=None if group_by is None else export.column(group_by),
                            within=None if within is None else export.column(within))
    given = {name: value for name, value in {"fraction": fraction, "k": k, "threshold": threshold,
                                             "group_by": group_by, "within": within}.items()
             if value is not None}
    record = {"score": score, **given, "link": link, **dict(provenance or {})}
    return write_subset(export, keep.tolist(), destination, record, link=link)
