"""DUAL's offline phase: behaviour model, transition model, distilled actor and critics, then
the Laplace posterior on the actor's head and the shift detector's calibration.

Order and data: the held-out episodes (``data.held_out``) are split off first and used only to
calibrate the detector; everything is trained on the rest.  The behaviour model (a many-step
diffusion policy) is fitted by denoising; the actor's imitation targets are one behaviour-model
sample per training state (``offline.distill`` of them; dataset actions for the rest), drawn
once; actor and critics are then trained together (:mod:`genunc.rl.learner`).  The posterior is
fitted on (dataset action, state) denoising pairs with its prior precision by marginal
likelihood, through genunc's vector pipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from genunc import streams
from genunc.rl.agent import DUALAgent, Scales
from genunc.rl.detector import (
    DetectorState,
    ShiftDetector,
    support_distances,
    transition_distances,
)
from genunc.rl.diffusion import denoising_loss, sample
from genunc.rl.learner import ActorCritic, LearnerSettings
from genunc.rl.replay import ReplayBuffer, minibatch

#: learner phases (the ``training_noise`` / ``replay_sampling`` streams' first index)
BEHAVIOUR, TRANSITION, ACTOR_CRITIC, ONLINE = 0, 1, 2, 3


@dataclass
class OfflineResult:
    agent: DUALAgent
    detector: ShiftDetector
    held_out_distances: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    losses: dict[str, list[float]] = field(default_factory=dict)


def train_denoiser(model: torch.nn.Module, x: torch.Tensor, cond: torch.Tensor, scheduler: Any, *,
                   updates: int, batch_size: int, lr: float, seed: int, phase: int,
                   desc: str, progress: bool = True) -> list[float]:
    """Fit ``model(x_t, t, cond)`` to the noise by minibatch DDPM regression; the loss every 100
    updates."""
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in tqdm(range(updates), desc=desc, disable=not progress, mininterval=2):
        idx = streams.numpy_generator(seed, "replay_sampling", phase, step).integers(0, len(x), batch_size)
        loss = denoising_loss(model, x[idx], cond[idx], scheduler,
                              streams.torch_generator(seed, "training_noise", phase, step))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step % 100 == 0:
            losses.append(loss.item())
    return losses


def behaviour_samples(agent: DUALAgent, states: torch.Tensor, seed: int, chunk: int = 4096) -> torch.Tensor:
    """One behaviour-model action per state (the actor's distillation targets)."""
    out = []
    g = streams.torch_generator(seed, "training_noise", BEHAVIOUR, 10**9)
    with torch.no_grad():
        for start in range(0, len(states), chunk):
            out.append(sample(agent.behaviour, states[start:start + chunk],
                              agent.behaviour_scheduler, agent.action_dim, g))
    return torch.cat(out)


def actor_pipeline(agent: DUALAgent):
    """genunc's vector pipeline over the actor (its head posterior, candidates and scores)."""
    from genunc.pipelines.vector import VectorUncertaintyPipeline

    return VectorUncertaintyPipeline(agent.actor, agent.actor_scheduler, head_name="head")


def fit_actor_posterior(pipe: Any, buffers: list[ReplayBuffer], settings: dict[str, Any],
                        seed: int) -> None:
    """The Laplace posterior on the actor's head from (action, state) pairs of `buffers`
    (at most ``max_samples``, the same share from each)."""
    rng = streams.numpy_generator(seed, "replay_sampling", ONLINE, 10**9)
    parts = minibatch([(b, 1.0) for b in buffers], min(settings["max_samples"],
                                                       sum(b.size for b in buffers)), rng)
    pipe.fit_posterior({"x": parts.action, "cond": parts.state},
                       structure=settings["structure"], prior_precision=settings["prior_precision"],
                       progress=False)


def set_imitation_targets(agent: DUALAgent, buffer: ReplayBuffer, distill: float, seed: int) -> None:
    """The actor's imitation targets for the offline rows: a behaviour-model sample for a
    ``distill`` fraction of them (drawn once, from fixed streams: the same for the offline and
    the online phase), the dataset action for the rest."""
    if distill <= 0:
        return
    data = buffer.all()
    teacher = behaviour_samples(agent, data.state, seed)
    use = torch.from_numpy(streams.numpy_generator(seed, "training_noise", BEHAVIOUR, 10**9 + 1)
                           .random(len(teacher)) < distill)
    buffer.data["target"][: buffer.size] = torch.where(use.unsqueeze(-1), teacher, data.action)


def offline_buffer(agent: DUALAgent, train: Any, config: dict[str, Any]) -> ReplayBuffer:
    """The training split as a buffer in the agent's units, with its imitation targets."""
    limit = config["data"]["max_transitions"]
    buffer = ReplayBuffer.from_arrays(agent.scales, *(np.asarray(getattr(train, k))[:limit] for k in (
        "observations", "actions", "rewards", "next_observations", "terminals")))
    set_imitation_targets(agent, buffer, config["offline"]["distill"], config["seed"])
    return buffer


def train_offline(dataset: Any, config: dict[str, Any], *, progress: bool = True
                  ) -> tuple[OfflineResult, Any, ReplayBuffer]:
    """The whole offline phase for `dataset` (an :class:`~genunc.rl.data.OfflineDataset`):
    the trained agent with its detector, the actor's pipeline (posterior fitted), and the
    training buffer."""
    seed, off, det = config["seed"], config["offline"], config["detector"]
    timings: dict[str, float] = {}
    train, held = dataset.split(config["data"]["held_out"], seed)
    limit = config["data"]["max_transitions"]
    obs, act, nxt = (np.asarray(getattr(train, k))[:limit] for k in
                     ("observations", "actions", "next_observations"))
    scales = Scales.fit(obs, nxt, dataset.action_low, dataset.action_high)
    agent = DUALAgent(obs.shape[1], act.shape[1], scales, **config["agent"])
    agent.init_weights(seed)
    buffer = ReplayBuffer.from_arrays(scales, *(np.asarray(getattr(train, k))[:limit] for k in (
        "observations", "actions", "rewards", "next_observations", "terminals")))
    data = buffer.all()
    losses: dict[str, list[float]] = {}
    kw = {"batch_size": off["batch_size"], "lr": off["lr"], "seed": seed, "progress": progress}

    t0 = time.perf_counter()
    losses["behaviour"] = train_denoiser(agent.behaviour, data.action, data.state,
                                         agent.behaviour_scheduler, updates=off["behaviour_updates"],
                                         phase=BEHAVIOUR, desc="behaviour model", **kw)
    timings["behaviour_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    delta = scales.delta(obs, nxt)
    losses["transition"] = train_denoiser(agent.transition, delta, torch.cat([data.state, data.action], -1),
                                          agent.transition_scheduler, updates=off["transition_updates"],
                                          phase=TRANSITION, desc="transition model", **kw)
    timings["transition_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    set_imitation_targets(agent, buffer, off["distill"], seed)
    learner = ActorCritic(agent, LearnerSettings(off["lr"], off["gamma"], off["tau"], off["eta"]),
                          seed, ACTOR_CRITIC)
    losses["critic"], losses["q_mean"] = [], []
    for step in tqdm(range(off["actor_updates"]), desc="actor and critics", disable=not progress,
                     mininterval=2):
        batch = minibatch([(buffer, 1.0)], off["batch_size"],
                          streams.numpy_generator(seed, "replay_sampling", ACTOR_CRITIC, step))
        stats = learner.update(batch, step, actor=step % off["actor_every"] == 0)
        if step % 100 == 0:
            losses["critic"].append(stats["critic_loss"])
            losses["q_mean"].append(stats["q_mean"])
    timings["actor_critic_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pipe = actor_pipeline(agent)
    fit_actor_posterior(pipe, [buffer], config["posterior"], seed)
    timings["posterior_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    detector = make_detector(buffer, config)
    held_distances = held_out_distances(agent, held, det["samples"], seed)
    held_support = support_distances(detector.support, agent.scales.state(held.observations),
                                     agent.scales.action_to_unit(held.actions))
    detector.calibrate(held_distances, held_support)
    timings["detector_s"] = time.perf_counter() - t0
    return OfflineResult(agent, detector, held_distances, timings, losses), pipe, buffer


def make_detector(buffer: ReplayBuffer, config: dict[str, Any],
                  state: DetectorState | None = None) -> ShiftDetector:
    """The detector over the training pairs' support (at most ``support_size`` of them, a fixed
    subsample), calibrated later or restored from `state`."""
    det = config["detector"]
    n = min(buffer.size, det["support_size"])
    rows = np.sort(streams.numpy_generator(config["seed"], "replay_sampling", ONLINE, 10**9 + 2)
                   .permutation(buffer.size)[:n])
    pairs = buffer.rows(rows)
    state = state or DetectorState(det["level"], det["samples"], det["window"], det["confidence"],
                                   det["support_level"], bins=det["bins"])
    return ShiftDetector(state, support=torch.cat([pairs.state, pairs.action], -1))


def held_out_distances(agent: DUALAgent, transitions: Any, samples: int, seed: int,
                       chunk: int = 1024, stream_offset: int = 0) -> np.ndarray:
    """The detector's distance for every transition of `transitions` (environment units)."""
    s = agent.scales
    obs, act, nxt = (np.asarray(getattr(transitions, k)) for k in
                     ("observations", "actions", "next_observations"))
    out = []
    for i, start in enumerate(range(0, len(obs), chunk)):
        part = slice(start, start + chunk)
        out.append(transition_distances(agent, s.state(obs[part]), s.action_to_unit(act[part]),
                                        s.delta(obs[part], nxt[part]), samples, seed,
                                        stream_offset + i))
    return np.concatenate(out) if out else np.zeros(0)
