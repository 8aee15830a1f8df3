"""What the evaluation scripts share: the validation and test seeds, the step windows the
validation seed chooses the variability score's among, and that re-aggregation (README "How the
numbers are made")."""

from __future__ import annotations

import numpy as np

from genunc.scores import variability_score

#: anything chosen is chosen on the validation seed; every reported figure is on the test seed
VAL_SEED, TEST_SEED = 1000, 2000


def windows(steps: int) -> dict[str, np.ndarray]:
    """Step-index windows of a trajectory of `steps` steps."""
    idx = np.arange(steps)
    return {"all steps": idx, "first half": idx[: steps // 2], "second half": idx[steps // 2 :],
            "middle 20-80%": idx[int(0.2 * steps) : int(0.8 * steps)],
            "last 20%": idx[int(0.8 * steps) :]}


def windowed_variability(out, alphas_cumprod, rows: np.ndarray, target: str,
                         part: str = "variability") -> np.ndarray:
    """A pipeline output's variability re-aggregated over the steps `rows` with `target`."""
    return variability_score(out.variability_per_step[part][rows], out.variability_timesteps[rows],
                             alphas_cumprod, target)
