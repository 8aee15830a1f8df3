"""Scored SDF files outside an export directory: read their properties, filter them.

genunc's molecule exports carry every score and quality flag as SD properties, so the combined
``samples.sdf`` (or any SDF a user scored elsewhere) can be filtered on its own, without the
manifest.  Records are copied verbatim, so nothing about a kept molecule changes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from genunc import filtering
from genunc._io import atomic_write
from genunc.errors import GenuncError


def split_records(text: str) -> list[str]:
    """The records of an SDF file, each ending with its ``$$$$`` line."""
    records, current = [], []
    for line in text.splitlines(keepends=True):
        current.append(line)
        if line.rstrip("\r\n") == "$$$$":
            records.append("".join(current))
            current = []
    if "".join(current).strip():
        raise GenuncError("the SDF file ends inside a record (truncated?): no closing '$$$$'")
    return records


def record_properties(record: str) -> dict[str, str]:
    """The ``> <name>`` data items of one SDF record, as strings."""
    props: dict[str, str] = {}
    lines = record.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(">") and "<" in line and ">" in line[1:]:
            name = line[line.index("<") + 1 : line.rindex(">")]
            values = []
            i += 1
            while i < len(lines) and lines[i].strip() and lines[i] != "$$$$":
                values.append(lines[i])
                i += 1
            props[name] = "\n".join(values)
        i += 1
    return props


def read_sdf_scores(path: str | os.PathLike[str], score: str) -> tuple[list[str], np.ndarray]:
    """Records of `path` and the float value of property `score` in each (missing -> error)."""
    records = split_records(Path(path).read_text())
    if not records:
        raise GenuncError(f"{path} holds no SDF records")
    values = []
    for i, record in enumerate(records):
        props = record_properties(record)
        if score not in props:
            raise GenuncError(f"record {i} of {path} has no property {score!r}; it has "
                              f"{sorted(props)}")
        try:
            values.append(float(props[score]))
        except ValueError:
            raise GenuncError(f"record {i} of {path}: {score}={props[score]!r} is not a number") from None
    return records, np.asarray(values)


def filter_sdf(source: str | os.PathLike[str], destination: str | os.PathLike[str], score: str,
               *, fraction: float | None = None, k: int | None = None,
               threshold: float | None = None) -> dict[str, Any]:
    """Write the least uncertain records of `source` (lower `score` is better) to `destination`.

    Exactly one of ``fraction``, ``k``, ``threshold``.  Records keep the source's order.  The
    output is written to a temporary file and renamed, so it is never half-written.
    """
    source, destination = Path(source), Path(destination)
    if source.resolve() == destination.resolve():
        raise GenuncError("write the filtered SDF to a new file; the source is never modified")
    records, scores = read_sdf_scores(source, score)
    keep = filtering.select(scores, fraction=fraction, k=k, threshold=threshold)
    atomic_write(destination, "".join(records[i] for i in keep))
    given = {n: v for n, v in {"fraction": fraction, "k": k, "threshold": threshold}.items()
             if v is not None}
    return {"kept": int(len(keep)), "total": len(records), "score": score, **given}
