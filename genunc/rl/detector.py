"""The transition-state-shift detector: is the world still the one the offline data came from?

For an observed transition ``(s, a, s')`` the diffusion transition model draws ``J`` next states
``ŝ'_j | s, a``; the transition's *distance* is the Euclidean distance, in standardised delta
units, from ``s'`` to the nearest of them.  A large distance means either that the dynamics
changed or that ``(s, a)`` lies where the model never saw data (an online policy soon leaves
the offline data's support, and the model's error there is not evidence of a shift).  So the
detector only judges transitions *inside the support*: ``(s, a)`` whose distance to the nearest
offline training pair is within the ``support_level`` quantile of held-out offline pairs'.

Calibration on held-out offline transitions (never trained on) sets the distance threshold at
the conformal ``(1 - level)`` quantile of the in-support ones, so an in-support transition of
the offline world raises an alarm with probability at most ``level`` (exchangeability; the
``ceil((n + 1)(1 - level))``-th smallest distance).  Single alarms are noisy: the detector
*fires* when the alarms among the last ``window`` in-support transitions exceed what ``level``
explains, i.e. when a Binomial(window, level) count that large has probability below
``confidence``.

The online policy is not the offline one: even inside the support its pairs sit nearer the
support's edge, where the model errs more, so a single pooled threshold over-alarms online
(measured on Pendulum).  With ``bins > 1`` the calibration is *Mondrian*: held-out in-support
transitions are split into ``bins`` equal-count bins of their support distance and each bin gets
its own conformal threshold, so the level holds within each bin and therefore for any mix of
bins an online policy visits (a shift of the pairs' distance to the data no longer counts as a
shift of the dynamics; a shift within a bin still does).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.stats import binom

from genunc import streams
from genunc.rl.agent import DUALAgent
from genunc.rl.diffusion import sample


@dataclass
class DetectorState:
    level: float
    samples: int
    window: int
    confidence: float
    support_level: float = 0.95
    threshold: float = math.inf
    support_threshold: float = math.inf
    calibration_size: int = 0
    bins: int = 1
    #: with bins > 1: the inner support-distance edges (bins - 1) and one threshold per bin
    bin_edges: list[float] = field(default_factory=list)
    bin_thresholds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def transition_distances(agent: DUALAgent, state: torch.Tensor, action: torch.Tensor,
                         delta: torch.Tensor, samples: int, seed: int, index: int) -> np.ndarray:
    """Distance of each observed normalised delta to the nearest of `samples` model draws
    (all inputs in the networks' units; one batched chain of ``B * samples`` rows)."""
    b = state.shape[0]
    cond = torch.cat([state, action], -1).repeat_interleave(samples, 0)
    g = streams.torch_generator(seed, "transition_samples", index)
    with torch.no_grad():
        drawn = sample(agent.transition, cond, agent.transition_scheduler, agent.state_dim, g)
    gaps = (drawn.view(b, samples, -1) - delta.unsqueeze(1)).norm(dim=-1)
    return gaps.min(dim=1).values.numpy()


def support_distances(support: torch.Tensor, state: torch.Tensor, action: torch.Tensor,
                      chunk: int = 1024) -> np.ndarray:
    """Distance of each ``(s, a)`` (networks' units) to its nearest pair in `support`."""
    query = torch.cat([state, action], -1)
    return torch.cat([torch.cdist(query[i:i + chunk], support).min(dim=1).values
                      for i in range(0, len(query), chunk)]).numpy()


class ShiftDetector:
    """Calibrated alarms on in-support transitions and a windowed test that fires on a shift."""

    def __init__(self, state: DetectorState, support: torch.Tensor | None = None) -> None:
        if not 0 < state.level < 1 or not 0 < state.confidence < 1:
            raise ValueError("the detector's level and confidence must lie in (0, 1)")
        if state.bins < 1:
            raise ValueError(f"the detector's bins must be >= 1, got {state.bins}")
        self.state, self.support = state, support
        self.recent: deque[bool] = deque(maxlen=state.window)
        self.fire_count = self._fire_count(state.window, state.level, state.confidence)

    @staticmethod
    def _fire_count(window: int, level: float, confidence: float) -> int:
        """The fewest alarms in a full window whose Binomial(window, level) tail is < confidence."""
        k = np.arange(window + 1)
        tail = binom.sf(k - 1, window, level)  # P(X >= k)
        return int(k[np.argmax(tail < confidence)]) if (tail < confidence).any() else window + 1

    def in_support(self, support_distance: np.ndarray | None) -> np.ndarray | None:
        if support_distance is None:
            return None
        return np.asarray(support_distance) <= self.state.support_threshold

    def calibrate(self, distances: np.ndarray, support_distance: np.ndarray | None = None) -> float:
        """Set the thresholds from held-out offline transitions (conformal quantiles; with
        ``bins > 1`` one per support-distance bin).  Returns the pooled threshold."""
        d = np.asarray(distances, dtype=np.float64)
        if support_distance is not None:
            self.state.support_threshold = float(np.quantile(support_distance,
                                                             self.state.support_level))
            inside = self.in_support(support_distance)
            d, near = d[inside], np.asarray(support_distance, dtype=np.float64)[inside]
        elif self.state.bins > 1:
            raise ValueError("a binned detector calibrates on support distances: pass them")
        self.state.threshold = self._conformal(d)
        self.state.calibration_size = len(d)
        if self.state.bins > 1:
            edges = np.quantile(near, np.arange(1, self.state.bins) / self.state.bins)
            which = np.searchsorted(edges, near, side="right")
            self.state.bin_edges = [float(e) for e in edges]
            self.state.bin_thresholds = [self._conformal(d[which == b], f"bin {b} of")
                                         for b in range(self.state.bins)]
        return self.state.threshold

    def _conformal(self, d: np.ndarray, what: str = "") -> float:
        """The ``ceil((n + 1)(1 - level))``-th smallest of `d`."""
        d = np.sort(d)
        n = len(d)
        rank = math.ceil((n + 1) * (1 - self.state.level))
        if rank > n:
            raise ValueError(f"{n} calibration transitions{' in ' + what if what else ''} cannot "
                             f"certify level {self.state.level}; need at least "
                             f"{math.ceil(1 / self.state.level) - 1}")
        return float(d[rank - 1])

    def thresholds(self, support_distance: np.ndarray | None) -> np.ndarray | float:
        """Each transition's threshold: its support-distance bin's, or the pooled one."""
        if self.state.bins == 1 or support_distance is None or not self.state.bin_thresholds:
            return self.state.threshold
        which = np.searchsorted(self.state.bin_edges, np.asarray(support_distance), side="right")
        return np.asarray(self.state.bin_thresholds)[which]

    def alarms(self, distances: np.ndarray, support_distance: np.ndarray | None = None) -> np.ndarray:
        """Alarm per transition (False outside the support: no evidence either way)."""
        alarm = np.asarray(distances) > self.thresholds(support_distance)
        inside = self.in_support(support_distance)
        return alarm if inside is None else alarm & inside

    def update(self, distances: np.ndarray, support_distance: np.ndarray | None = None) -> bool:
        """Record in-support transitions' alarms; True when the window's count says: shifted."""
        alarm = self.alarms(distances, support_distance)
        inside = self.in_support(support_distance)
        self.recent.extend(bool(x) for x, keep in zip(alarm, inside if inside is not None
                                                      else np.ones(len(alarm), bool)) if keep)
        return len(self.recent) == self.recent.maxlen and sum(self.recent) >= self.fire_count
