"""One update of DUAL's actor and critics, shared by the offline and the online phase.

* Critics: twin Q networks, TD targets from the target actor's sampled next action and the
  minimum of the two target critics (clipped double Q), Polyak-averaged targets.
* Actor (Diffusion-QL's objective): the denoising loss on the batch's imitation targets (the
  behaviour model's samples offline: the few-step actor is *distilled* from the many-step
  behaviour model; the taken actions online) plus ``eta`` times the Q term
  ``-Q(s, a_pi) / mean|Q|``, with ``a_pi`` sampled through the actor's chain with gradients.

Every update draws its timesteps and noise from the ``training_noise`` stream of
``(seed, phase, step)``, so a run is reproducible from its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from genunc import streams
from genunc.rl.agent import DUALAgent
from genunc.rl.diffusion import denoising_loss, sample
from genunc.rl.replay import Batch


@dataclass
class LearnerSettings:
    lr: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005
    eta: float = 1.0
    grad_clip: float = 10.0


def _step(optimiser: torch.optim.Optimizer, loss: torch.Tensor, params, clip: float) -> None:
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(params, clip)
    optimiser.step()


def _polyak(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters(), strict=True):
            t.lerp_(s, tau)


class ActorCritic:
    """Optimisers and the update rule for an agent's actor and critics."""

    def __init__(self, agent: DUALAgent, settings: LearnerSettings, seed: int, phase: int) -> None:
        self.agent, self.settings, self.seed, self.phase = agent, settings, seed, phase
        self.actor_opt = torch.optim.Adam(agent.actor.parameters(), lr=settings.lr)
        self.critic_opt = torch.optim.Adam(agent.critic.parameters(), lr=settings.lr)

    def update(self, batch: Batch, step: int, actor: bool = True) -> dict[str, float]:
        """One critic update and, when `actor`, one actor update (TD3's delayed policy updates
        call it with ``actor`` every other step); targets move after each."""
        a, s = self.agent, self.settings
        g = streams.torch_generator(self.seed, "training_noise", self.phase, step)
        with torch.no_grad():
            next_action = sample(a.actor_target, batch.next_state, a.actor_scheduler, a.action_dim, g)
            next_q = a.critic_target(batch.next_state, next_action).min(-1, keepdim=True).values
            y = batch.reward + s.gamma * (1 - batch.terminal) * next_q
        q = a.critic(batch.state, batch.action)
        critic_loss = (q - y).pow(2).mean()
        _step(self.critic_opt, critic_loss, a.critic.parameters(), s.grad_clip)

        _polyak(a.critic_target, a.critic, s.tau)
        stats = {"critic_loss": critic_loss.item(), "q_mean": q.mean().item()}
        if not actor:
            return stats
        bc_loss = denoising_loss(a.actor, batch.target, batch.state, a.actor_scheduler, g)
        new_action = sample(a.actor, batch.state, a.actor_scheduler, a.action_dim, g)
        q_new = a.critic(batch.state, new_action)
        q_loss = -q_new[:, 0].mean() / q_new[:, 1].abs().mean().detach().clamp_min(1e-6)
        actor_loss = bc_loss + s.eta * q_loss
        _step(self.actor_opt, actor_loss, a.actor.parameters(), s.grad_clip)
        a.critic.zero_grad(set_to_none=True)

        _polyak(a.actor_target, a.actor, s.tau)
        return {**stats, "bc_loss": bc_loss.item(), "q_loss": q_loss.item()}
