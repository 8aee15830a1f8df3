"""Transitions in the networks' units, and minibatches drawn from one or two of them.

The offline data and the online experience live in separate buffers so that the online phase
can choose, per minibatch, how much of each it trains on (DUAL down-weights offline data once
the shift detector fires).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from genunc.rl.agent import Scales


@dataclass
class Batch:
    state: Tensor
    action: Tensor  # in [-1, 1]
    reward: Tensor
    next_state: Tensor
    terminal: Tensor  # 1 where the episode ended in a terminal state (not a time limit)
    target: Tensor  # what the actor's denoising term imitates (teacher sample or taken action)

    def __len__(self) -> int:
        return self.state.shape[0]


FIELDS = ("state", "action", "reward", "next_state", "terminal", "target")


class ReplayBuffer:
    """A fixed-capacity ring of transitions, stored normalised (float32)."""

    def __init__(self, state_dim: int, action_dim: int, capacity: int) -> None:
        self.capacity, self.size, self._next = int(capacity), 0, 0
        shapes = {"state": state_dim, "action": action_dim, "reward": 1, "next_state": state_dim,
                  "terminal": 1, "target": action_dim}
        self.data = {k: torch.zeros(self.capacity, n) for k, n in shapes.items()}

    @classmethod
    def from_arrays(cls, scales: Scales, observations: np.ndarray, actions: np.ndarray,
                    rewards: np.ndarray, next_observations: np.ndarray, terminals: np.ndarray,
                    targets: Tensor | None = None) -> "ReplayBuffer":
        buffer = cls(observations.shape[1], actions.shape[1], len(observations))
        buffer.add(scales, observations, actions, rewards, next_observations, terminals, targets)
        return buffer

    def add(self, scales: Scales, observations: np.ndarray, actions: np.ndarray,
            rewards: np.ndarray, next_observations: np.ndarray, terminals: np.ndarray,
            targets: Tensor | None = None) -> None:
        """Append transitions given in environment units (a ring: the oldest go first)."""
        unit = scales.action_to_unit(np.atleast_2d(actions))
        rows = {"state": scales.state(np.atleast_2d(observations)), "action": unit,
                "reward": torch.as_tensor(np.asarray(rewards, np.float32).reshape(-1, 1)),
                "next_state": scales.state(np.atleast_2d(next_observations)),
                "terminal": torch.as_tensor(np.asarray(terminals, np.float32).reshape(-1, 1)),
                "target": unit if targets is None else targets}
        n = unit.shape[0]
        index = (self._next + torch.arange(n)) % self.capacity
        for key, value in rows.items():
            self.data[key][index] = value.float()
        self._next = int((self._next + n) % self.capacity)
        self.size = min(self.size + n, self.capacity)

    def rows(self, index: np.ndarray) -> Batch:
        idx = torch.as_tensor(index, dtype=torch.long)
        return Batch(**{k: self.data[k][idx] for k in FIELDS})

    def all(self) -> Batch:
        return self.rows(np.arange(self.size))


def minibatch(buffers: list[tuple[ReplayBuffer, float]], size: int, rng: np.random.Generator) -> Batch:
    """`size` transitions, a fraction from each non-empty buffer as given (fractions of empty
    buffers go to the others)."""
    live = [(b, f) for b, f in buffers if b.size > 0 and f > 0]
    if not live:
        raise ValueError("no transitions to train on: every buffer is empty")
    total = sum(f for _, f in live)
    counts = [int(round(size * f / total)) for _, f in live]
    counts[-1] = size - sum(counts[:-1])
    parts = [b.rows(rng.integers(0, b.size, n)) for (b, _), n in zip(live, counts, strict=True) if n > 0]
    return Batch(**{k: torch.cat([getattr(p, k) for p in parts]) for k in FIELDS})
