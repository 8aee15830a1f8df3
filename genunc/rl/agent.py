"""DUAL's agent: the networks, the scales they work in, and how they are saved.

Everything the agent learns works in normalised units: states standardised by the offline
data's mean and standard deviation, actions mapped from the environment's box to [-1, 1] (the
actor's chain clips its predicted clean action there), transition deltas ``s' - s``
standardised.  :class:`Scales` holds those maps and travels with the weights, so a loaded agent
acts exactly as the saved one.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from genunc._io import atomic_write
from genunc.errors import MissingFileError
from genunc.rl.diffusion import make_scheduler
from genunc.rl.networks import DiffusionMLP, TwinCritic

AGENT_FILE = "dual_agent.safetensors"
AGENT_META = "dual_agent.json"


@dataclass
class Scales:
    """The affine maps between environment units and the networks' units."""

    state_mean: list[float]
    state_std: list[float]
    action_low: list[float]
    action_high: list[float]
    delta_mean: list[float]
    delta_std: list[float]

    @classmethod
    def fit(cls, observations: np.ndarray, next_observations: np.ndarray,
            action_low: np.ndarray, action_high: np.ndarray) -> "Scales":
        delta = next_observations - observations
        return cls(observations.mean(0).tolist(), (observations.std(0) + 1e-3).tolist(),
                   np.asarray(action_low, float).tolist(), np.asarray(action_high, float).tolist(),
                   delta.mean(0).tolist(), (delta.std(0) + 1e-3).tolist())

    def _t(self, name: str) -> Tensor:
        return torch.tensor(getattr(self, name), dtype=torch.float32)

    def state(self, s: np.ndarray | Tensor) -> Tensor:
        return (torch.as_tensor(s, dtype=torch.float32) - self._t("state_mean")) / self._t("state_std")

    def action_to_unit(self, a: np.ndarray | Tensor) -> Tensor:
        low, high = self._t("action_low"), self._t("action_high")
        return (2 * (torch.as_tensor(a, dtype=torch.float32) - low) / (high - low) - 1).clamp(-1, 1)

    def unit_to_action(self, u: Tensor) -> np.ndarray:
        low, high = self._t("action_low"), self._t("action_high")
        return (low + (u.detach().cpu().float().clamp(-1, 1) + 1) * (high - low) / 2).numpy()

    def delta(self, s: np.ndarray | Tensor, s_next: np.ndarray | Tensor) -> Tensor:
        d = torch.as_tensor(s_next, dtype=torch.float32) - torch.as_tensor(s, dtype=torch.float32)
        return (d - self._t("delta_mean")) / self._t("delta_std")


class DUALAgent:
    """The actor (few-step, fast), its behaviour-model teacher, twin critics with their targets,
    and the transition model ``s' | s, a`` the shift detector samples."""

    def __init__(self, state_dim: int, action_dim: int, scales: Scales, *, width: int = 256,
                 depth: int = 3, actor_steps: int = 5, behaviour_steps: int = 20,
                 transition_steps: int = 10) -> None:
        self.state_dim, self.action_dim, self.scales = state_dim, action_dim, scales
        self.shape = {"width": width, "depth": depth, "actor_steps": actor_steps,
                      "behaviour_steps": behaviour_steps, "transition_steps": transition_steps}
        self.actor = DiffusionMLP(action_dim, state_dim, width, depth)
        self.behaviour = DiffusionMLP(action_dim, state_dim, width, depth)
        self.transition = DiffusionMLP(state_dim, state_dim + action_dim, width, depth)
        self.critic = TwinCritic(state_dim, action_dim, width, depth)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_scheduler = make_scheduler(actor_steps, clip=1.0)
        self.behaviour_scheduler = make_scheduler(behaviour_steps, clip=1.0)
        self.transition_scheduler = make_scheduler(transition_steps, clip=None)

    NETWORKS = ("actor", "behaviour", "transition", "critic", "actor_target", "critic_target")

    def init_weights(self, seed: int) -> None:
        """Each network's initial weights (PyTorch's default initialisation) from its own stream
        (``network_init``, index i), so that a seed fixes them whatever ran before."""
        from genunc import streams

        for i, name in enumerate(self.NETWORKS[:4]):
            state = streams.seed_sequence(seed, "network_init", i).generate_state(2, np.uint32)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((int(state[0]) << 31) ^ int(state[1]))
                for module in getattr(self, name).modules():
                    if isinstance(module, torch.nn.Linear):
                        module.reset_parameters()
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Weights (safetensors) and what rebuilds them (JSON), each written atomically."""
        directory = Path(directory)
        tensors = {f"{name}.{k}": v.detach().cpu().contiguous()
                   for name in self.NETWORKS for k, v in getattr(self, name).state_dict().items()}
        atomic_write(directory / AGENT_FILE, lambda p: save_file(tensors, str(p)))
        meta = {"state_dim": self.state_dim, "action_dim": self.action_dim, **self.shape,
                "scales": asdict(self.scales), **(extra or {})}
        atomic_write(directory / AGENT_META, json.dumps(meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> tuple["DUALAgent", dict[str, Any]]:
        """The saved agent and the metadata saved beside it."""
        directory = Path(directory)
        if not (directory / AGENT_FILE).exists() or not (directory / AGENT_META).exists():
            raise MissingFileError(f"{directory} holds no DUAL agent ({AGENT_FILE} + {AGENT_META}); "
                                   f"train one with `genunc rl offline -c CONFIG`")
        meta = json.loads((directory / AGENT_META).read_text())
        agent = cls(meta["state_dim"], meta["action_dim"], Scales(**meta["scales"]),
                    **{k: meta[k] for k in ("width", "depth", "actor_steps", "behaviour_steps",
                                            "transition_steps")})
        tensors = load_file(str(directory / AGENT_FILE))
        for name in cls.NETWORKS:
            prefix = f"{name}."
            getattr(agent, name).load_state_dict(
                {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        return agent, meta
