"""How well each score of an export ranks its quality column: the numbers ``genunc evaluate``
prints and ``genunc report`` draws, computed once here so the two can never disagree."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from genunc import filtering, labels
from genunc.errors import GenuncError
from genunc.export import Export

#: kept fraction of the ``q@80%`` column (quality of the kept 80%)
KEPT = 0.8


@dataclass(frozen=True)
class ScoreRow:
    """One score column against the quality column (higher quality is better)."""

    name: str
    spearman: float
    auroc: float  # NaN when the quality is continuous and no failure rule was given
    area_under_retention: float
    quality_kept: float  # mean quality of the KEPT fraction the score keeps


@dataclass(frozen=True)
class Evaluation:
    quality_column: str
    quality: np.ndarray  # (N,) float
    failed: np.ndarray | None  # (N,) bool; None for a continuous column without a rule
    rule: str  # what counts as a failure, in words
    rows: list[ScoreRow]
    scores: dict[str, np.ndarray]

    def retention(self, name: str, fractions=None) -> tuple[np.ndarray, np.ndarray]:
        return filtering.retention_curve(self.scores[name], self.quality, fractions)


def held_columns(export: Export, columns: list[str]) -> list[str]:
    """Those of `columns` that every sample of `export` holds, in their order."""
    return [c for c in columns if all(c in r for r in export.records)]


def evaluate_export(export: Export, quality: str, scores: list[str],
                    fail_below: float | None = None,
                    fail_above: float | None = None) -> Evaluation:
    """Every requested score column held by all samples, against the `quality` column."""
    if len(export) == 0:
        raise GenuncError(f"{export.directory} holds no samples to evaluate")
    column = export.column(quality).tolist()
    failed = None
    flags = labels.as_boolean(column)
    if flags is not None or fail_below is not None or fail_above is not None:
        failed = labels.failures(column, quality, fail_below=fail_below, fail_above=fail_above)
    try:
        values = (flags if flags is not None else np.asarray(column)).astype(float)
    except (TypeError, ValueError):
        raise GenuncError(f"quality column {quality!r} is neither boolean nor numeric") from None
    names = held_columns(export, scores)
    if not names:
        raise GenuncError("the export holds none of the requested score columns")
    rule = ("n/a (continuous quality: give --fail-below/--fail-above)" if failed is None
            else f"failure = {labels.describe(quality, fail_below, fail_above)}")
    columns = {name: export.column(name).astype(float) for name in names}
    rows = []
    for name, score in columns.items():
        stats = filtering.summarize(score, values, failed)
        kept = filtering.keep_fraction(score, KEPT)
        rows.append(ScoreRow(name, stats["spearman"], stats["auroc"],
                             stats["area_under_retention"], float(values[kept].mean())))
    return Evaluation(quality, values, failed, rule, rows, columns)
