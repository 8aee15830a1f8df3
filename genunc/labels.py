"""One rule for turning a quality column into pass / fail, shared by every command that needs it.

Risk control (``genunc filter --risk-alpha``) and ``genunc evaluate`` must agree on which
samples failed, or a threshold is certified on one definition and judged on another.  The rule:

* a boolean column (``true`` / ``false``, ``1`` / ``0``, or those words as strings, any case)
  fails where it is false;
* any other column is continuous, and a sample fails only below ``fail_below`` or above
  ``fail_above``, which must then be given explicitly;
* anything else (missing values, other words, NaN) is an error, never a guess.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from genunc.errors import GenuncError

_TRUE, _FALSE = {"true", "1"}, {"false", "0"}


def as_boolean(values: Sequence[Any]) -> np.ndarray | None:
    """The column as booleans if every value is one (strictly), else None."""
    out = []
    for value in values:
        if isinstance(value, (bool, np.bool_)):
            out.append(bool(value))
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value in (0, 1):
            out.append(bool(value))
        elif isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            out.append(value.strip().lower() in _TRUE)
        else:
            return None
    return np.asarray(out, dtype=bool)


def failures(values: Sequence[Any], column: str, *, fail_below: float | None = None,
             fail_above: float | None = None) -> np.ndarray:
    """Which samples failed, by the rule in the module docstring."""
    if fail_below is None and fail_above is None:
        flags = as_boolean(values)
        if flags is None:
            raise GenuncError(f"column {column!r} is not boolean (values like "
                              f"{list(values)[:3]!r}); say what counts as a failure with "
                              "--fail-below or --fail-above")
        return ~flags
    for name, bound in (("fail_below", fail_below), ("fail_above", fail_above)):
        if bound is not None and not math.isfinite(bound):
            raise GenuncError(f"{name} must be a finite number, got {bound}")
    try:
        numbers = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise GenuncError(f"column {column!r} is not numeric; --fail-below / --fail-above "
                          "need numbers") from None
    if not np.isfinite(numbers).all():
        raise GenuncError(f"column {column!r} holds NaN or infinite values")
    failed = np.zeros(len(numbers), dtype=bool)
    if fail_below is not None:
        failed |= numbers < fail_below
    if fail_above is not None:
        failed |= numbers > fail_above
    return failed


def describe(column: str, fail_below: float | None, fail_above: float | None) -> str:
    """The rule in words, for run.json and printed summaries."""
    if fail_below is None and fail_above is None:
        return f"{column} is false"
    parts = [f"{column} < {fail_below:g}"] if fail_below is not None else []
    parts += [f"{column} > {fail_above:g}"] if fail_above is not None else []
    return " or ".join(parts)
