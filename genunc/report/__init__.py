"""``genunc report``: one self-contained HTML page per export, to look at rather than read.

The page shows the most and least uncertain samples of every score side by side, the score
distributions (passing and failing samples apart), retention curves against the random
ranking, the risk-control certificate of a filtered export, and what made the run.  Its
numbers come from :func:`evaluate_export`, the function behind ``genunc evaluate``.  Only the
samples shown are read, so a 100,000-sample export gives a page of the same size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from genunc._io import atomic_write
from genunc.errors import GenuncError
from genunc.export import Export
from genunc.report.evaluation import Evaluation, ScoreRow, evaluate_export, held_columns

if TYPE_CHECKING:
    from genunc.jobs.base import Job

__all__ = ["Evaluation", "ScoreRow", "evaluate_export", "score_columns", "write_report"]


def _export_job(export: Export) -> Job | None:
    """The job of the modality the export names (None where it names none genunc knows)."""
    from genunc.jobs import job_for, modalities

    modality = export.metadata.get("modality")
    return job_for(modality) if modality in modalities() else None


def score_columns(export: Export) -> list[str]:
    """The score columns the export's modality can hold (every modality's, if it names none)."""
    from genunc.jobs import job_for, modalities

    job = _export_job(export)
    jobs = [job] if job is not None else [job_for(name) for name in modalities()]
    columns: list[str] = []
    for each in jobs:
        columns += [c for c in each.pipeline_class.score_columns() if c not in columns]
    return columns


def default_quality(export: Export) -> str | None:
    """The quality column the export's job writes, if every sample holds it."""
    job = _export_job(export)
    column = job.quality_column if job is not None else None
    return column if column and held_columns(export, [column]) else None


def write_report(export: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
                 quality: str | None = None, scores: list[str] | None = None,
                 fail_below: float | None = None, fail_above: float | None = None,
                 extremes: int = 12) -> Path:
    """Write the report of `export` to `out` (default ``<export>/report.html``) and return its
    path.  `quality`: the column scores are judged against (default: the one the export's job
    writes, when present); `scores`: the score columns (default: all the export holds);
    `extremes`: how many most and least uncertain samples each score shows."""
    from genunc.report.page import render

    if extremes < 1:
        raise GenuncError(f"extremes must be at least 1, got {extremes}")
    source = Export(export)
    if len(source) == 0:
        raise GenuncError(f"{source.directory} holds no samples to report")
    # a score's Monte-Carlo error is not a score of its own
    wanted = scores or [c for c in score_columns(source) if not c.endswith("_mc_error")]
    names = held_columns(source, wanted)
    if not names:
        raise GenuncError(f"{source.directory} holds none of the score columns {wanted}")
    quality = quality or default_quality(source)
    evaluation = None if quality is None else evaluate_export(
        source, quality, names, fail_below=fail_below, fail_above=fail_above)
    path = Path(out) if out is not None else source.directory / "report.html"
    atomic_write(path, render(source, names, evaluation, extremes))
    return path
