"""Risk-controlled thresholds: the guarantee holds empirically over many calibration draws."""

import math

import numpy as np
import pytest

from genunc.errors import GenuncError
from genunc.risk import calibrate_threshold, hoeffding_bentkus_p_value


def true_risk(threshold):
    """Synthetic generator: s ~ U(0, 1), P(fail | s) = 0.02 + 0.5 s^2, so
    P(fail | s <= t) = 0.02 + t^2 / 6."""
    t = min(max(threshold, 0.0), 1.0)
    return 0.02 + t * t / 6 if t > 0 else 0.0


def calibration(n, rng):
    s = rng.random(n)
    return s, rng.random(n) < 0.02 + 0.5 * s**2


@pytest.mark.parametrize("method,min_power", [("binomial", 0.35), ("hoeffding_bentkus", 0.15)])
def test_violation_frequency_is_at_most_delta(method, min_power):
    alpha, delta, trials = 0.10, 0.10, 400
    rng = np.random.default_rng(0)
    violations, kept = 0, []
    for _ in range(trials):
        result = calibrate_threshold(*calibration(400, rng), alpha=alpha, delta=delta, method=method)
        violations += true_risk(result.threshold) > alpha
        kept.append(min(max(result.threshold, 0), 1))
    frequency = violations / trials
    slack = 3 * math.sqrt(delta * (1 - delta) / trials)
    print(f"{method}: violation frequency {frequency:.3f} (delta {delta}), "
          f"mean kept fraction {np.mean(kept):.3f} (oracle {math.sqrt(6 * (alpha - 0.02)):.3f})")
    assert frequency <= delta + slack
    assert np.mean(kept) > min_power  # and it is not trivially conservative (HB is looser)


def test_alpha_above_base_rate_keeps_everything_and_impossible_alpha_keeps_nothing():
    rng = np.random.default_rng(1)
    s, failed = calibration(2000, rng)
    loose = calibrate_threshold(s, failed, alpha=0.4, delta=0.1)
    assert loose.kept_fraction == 1.0 and "keep score <=" in loose.describe()
    strict = calibrate_threshold(s, failed, alpha=0.001, delta=0.1)
    assert not strict.certified and strict.select(s).size == 0
    assert "no threshold certifies" in strict.describe()


def test_bad_inputs():
    with pytest.raises(GenuncError):
        calibrate_threshold([0.1, 0.2], [True], alpha=0.1)
    with pytest.raises(GenuncError):
        calibrate_threshold([0.1], [True], alpha=1.5)
    with pytest.raises(GenuncError, match="unknown method"):
        calibrate_threshold([0.1], [True], alpha=0.1, method="vibes")


def test_hoeffding_bentkus_is_more_conservative_than_the_exact_tail():
    from scipy.stats import binom

    for failures, n in [(3, 100), (10, 200), (0, 50)]:
        assert hoeffding_bentkus_p_value(failures, n, 0.1) >= binom.cdf(failures, n, 0.1) - 1e-12
