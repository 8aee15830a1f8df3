"""DUAL's online phase: act by ``Q + beta * u`` among the actor's candidates, watch for a shift,
keep learning.

At each step the actor proposes ``N`` candidate actions for the current state with their
epistemic score ``u`` (the spread of each candidate's final action across the ``M`` head draws
of the Laplace posterior, ``online.score``: ``action_variance`` over the draws' own chains, or
``action_variance_x0`` from the MAP chain alone; genunc's vector pipeline, one batched call).
The agent takes

    argmax_n  Q(s, a_n) + beta_t * sd_n(Q) * u_n / mean_n(u)

(the bonus in units of the candidates' own Q spread, so ``beta`` needs no per-task scale;
``beta_t`` anneals linearly from ``beta`` to ``beta_final``).  Controls: ``bonus: none`` is the
same agent with ``beta = 0``; ``bonus: noise`` replaces ``u`` by Gaussian noise with the same
mean and spread over the candidates (is it the uncertainty, or just more exploration?).

Each observed transition goes to the shift detector; once it fires, the run stays in "shifted"
mode: ``beta`` is multiplied by ``detector.beta_boost`` and offline data's share of each
minibatch drops to ``detector.offline_fraction``.  Every ``posterior.refresh_every`` steps the
posterior is refitted on offline and online data (half each).  Evaluation episodes act greedily
(``beta = 0``) with seeds disjoint from everything else.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from genunc import streams
from genunc.rl.agent import DUALAgent
from genunc.rl.config import parse_shift
from genunc.rl.detector import ShiftDetector, support_distances, transition_distances
from genunc.rl.envs import episode_seeds, evaluate_policy, make_env
from genunc.rl.learner import ActorCritic, LearnerSettings
from genunc.rl.offline import ONLINE, fit_actor_posterior
from genunc.rl.replay import ReplayBuffer, minibatch

#: evaluation calls draw their candidates from this seed offset (disjoint streams)
EVAL_STREAM = 7_919
#: the ``env_reset`` streams of training and evaluation episodes
TRAINING, EVALUATION = 1, 2


@dataclass
class OnlineResult:
    """What one online run produced (JSON-ready)."""

    curve: list[dict[str, float]] = field(default_factory=list)  # step, mean return, returns
    episodes: list[dict[str, float]] = field(default_factory=list)  # training episodes
    detector: dict[str, Any] = field(default_factory=dict)
    bonus_stats: list[dict[str, float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class CandidatePolicy:
    """Candidates from the actor pipeline, chosen by Q and an exploration bonus."""

    def __init__(self, agent: DUALAgent, pipe: Any, candidates: int, num_draws: int, seed: int,
                 score: str = "action_variance") -> None:
        self.agent, self.pipe, self.n, self.m, self.seed = agent, pipe, candidates, num_draws, seed
        self.score = score  # the vector pipeline's score that is u

    def propose(self, state: torch.Tensor, index: int, with_scores: bool, seed: int | None = None
                ) -> tuple[torch.Tensor, np.ndarray | None]:
        """``(B, N, A)`` candidates (unit actions) and their ``(B, N)`` epistemic scores."""
        out = self.pipe(state, num_candidates=self.n, num_draws=self.m if with_scores else 0,
                        num_inference_steps=len(self.agent.actor_scheduler.alphas_cumprod),
                        scores=(self.score,) if with_scores else (),
                        seed=self.seed if seed is None else seed,
                        first_sample=index * self.n * state.shape[0], progress=False)
        return out.samples, (out.scores[self.score] if with_scores else None)

    def q_values(self, state: torch.Tensor, actions: torch.Tensor) -> np.ndarray:
        b, n, _ = actions.shape
        with torch.no_grad():
            q = self.agent.critic.min_q(state.repeat_interleave(n, 0), actions.reshape(b * n, -1))
        return q.view(b, n).numpy()

    @staticmethod
    def choose(q: np.ndarray, bonus: np.ndarray | None, beta: float) -> np.ndarray:
        """Index of the best candidate per state under ``Q + beta * sd(Q) * bonus / mean(bonus)``."""
        score = q
        if bonus is not None and beta > 0:
            mean = np.abs(bonus.mean(axis=1, keepdims=True))
            scale = q.std(axis=1, keepdims=True) / np.maximum(mean, 1e-12)
            score = q + beta * scale * bonus
        return score.argmax(axis=1)

    def greedy(self, state: torch.Tensor, index: int, seed: int) -> torch.Tensor:
        actions, _ = self.propose(state, index, with_scores=False, seed=seed)
        pick = self.choose(self.q_values(state, actions), None, 0.0)
        return actions[torch.arange(len(pick)), torch.as_tensor(pick)]


def greedy_returns(policy: CandidatePolicy, env_id: str, shift: Mapping[str, Any] | None,
                   episode_seeds: list[int], stream_seed: int) -> list[float]:
    """Undiscounted return of the greedy policy (argmax Q among the candidates, no bonus), one
    episode per seed, the episodes batched into one pipeline call per step."""
    scales, step = policy.agent.scales, [0]

    def act(observations: np.ndarray) -> np.ndarray:
        step[0] += 1
        return scales.unit_to_action(policy.greedy(scales.state(observations), step[0], stream_seed))

    return [float(r) for r in evaluate_policy(act, env_id, episode_seeds, shift=shift)]


def run_online(agent: DUALAgent, pipe: Any, detector: ShiftDetector | None,
               offline_buffer: ReplayBuffer, config: dict[str, Any], *,
               normalise: Callable[[float], float] = lambda r: r,
               progress: bool = True) -> OnlineResult:
    """The online phase of one run (see the module docstring)."""
    seed, on, det, post = config["seed"], config["online"], config["detector"], config["posterior"]
    off = config["offline"]
    result = OnlineResult()
    policy = CandidatePolicy(agent, pipe, on["candidates"], on["num_draws"], seed, on["score"])
    learner = ActorCritic(agent, LearnerSettings(off["lr"], off["gamma"], off["tau"], off["eta"]),
                          seed, ONLINE)
    online_buffer = ReplayBuffer(agent.state_dim, agent.action_dim, max(on["steps"], 1))
    env_id, shift = config["env"]["id"], parse_shift(config["env"]["shift"])
    eval_seeds = episode_seeds(on["eval_seed_offset"] + seed, on["eval_episodes"], stream=EVALUATION)
    use_scores = on["bonus"] != "none" and on["beta"] > 0
    shifted_at: int | None = None
    alarms = judged = 0
    timings = {"act_s": 0.0, "update_s": 0.0, "detector_s": 0.0, "eval_s": 0.0, "refresh_s": 0.0}

    def record_eval(step: int) -> None:
        t0 = time.perf_counter()
        returns = greedy_returns(policy, env_id, shift, eval_seeds, seed + EVAL_STREAM)
        timings["eval_s"] += time.perf_counter() - t0
        result.curve.append({"step": step, "return": float(np.mean(returns)),
                             "normalised": float(np.mean([normalise(r) for r in returns])),
                             "returns": [float(r) for r in returns]})

    record_eval(0)
    env, episode, ep_return = make_env(env_id, shift=shift), 0, 0.0
    obs, _ = env.reset(seed=episode_seeds(seed, 1, stream=TRAINING, start=episode)[0])
    bar = tqdm(range(on["steps"]), desc=f"online ({on['bonus']})", disable=not progress, mininterval=2)
    for step in bar:
        shifted = shifted_at is not None
        beta = on["beta"] + (on["beta_final"] - on["beta"]) * min(1.0, step / on["anneal_steps"])
        beta *= det["beta_boost"] if shifted else 1.0

        t0 = time.perf_counter()
        state = agent.scales.state(obs[None])
        actions, u = policy.propose(state, step, with_scores=use_scores)
        q = policy.q_values(state, actions)
        if u is not None and on["bonus"] == "noise":
            z = streams.numpy_generator(seed, "bonus_noise", step).standard_normal(u.shape)
            u = u.mean(axis=1, keepdims=True) + u.std(axis=1, keepdims=True) * z
        pick = int(policy.choose(q, u, beta)[0])
        action_unit = actions[0, pick]
        if u is not None and step % 1000 == 0:
            result.bonus_stats.append({"step": step, "u_mean": float(u.mean()), "u_sd": float(u.std()),
                                       "beta": beta})
        timings["act_s"] += time.perf_counter() - t0

        next_obs, reward, terminated, truncated, _ = env.step(agent.scales.unit_to_action(action_unit))
        online_buffer.add(agent.scales, obs[None], agent.scales.unit_to_action(action_unit)[None],
                          [reward], next_obs[None], [terminated])
        ep_return += float(reward)

        if detector is not None:
            t0 = time.perf_counter()
            delta = agent.scales.delta(obs[None], next_obs[None])
            d = transition_distances(agent, state, action_unit[None], delta, det["samples"], seed,
                                     10**7 + step)
            near = support_distances(detector.support, state, action_unit[None])
            alarms += int(detector.alarms(d, near).sum())
            judged += int(detector.in_support(near).sum())
            if detector.update(d, near) and shifted_at is None:
                shifted_at = step
            timings["detector_s"] += time.perf_counter() - t0

        obs = next_obs
        if terminated or truncated:
            result.episodes.append({"step": step + 1, "return": ep_return,
                                    "normalised": normalise(ep_return)})
            episode, ep_return = episode + 1, 0.0
            obs, _ = env.reset(seed=episode_seeds(seed, 1, stream=TRAINING, start=episode)[0])

        if step >= on["start_updates"] and step % on["update_every"] == 0:
            t0 = time.perf_counter()
            offline_share = det["offline_fraction"] if shifted else on["offline_fraction"]
            for k in range(on["updates_per_step"]):
                index = step * on["updates_per_step"] + k
                batch = minibatch([(offline_buffer, offline_share), (online_buffer, 1 - offline_share)],
                                  off["batch_size"],
                                  streams.numpy_generator(seed, "replay_sampling", ONLINE, index))
                learner.update(batch, index, actor=index % off["actor_every"] == 0)
            if use_scores and pipe.posterior is not None:  # draws spread around the acting head
                pipe.posterior.recentre(agent.actor.head)
            timings["update_s"] += time.perf_counter() - t0

        if use_scores and post["refresh_every"] and (step + 1) % post["refresh_every"] == 0:
            t0 = time.perf_counter()
            fit_actor_posterior(pipe, [offline_buffer, online_buffer], post, seed + step + 1)
            timings["refresh_s"] += time.perf_counter() - t0

        if (step + 1) % on["eval_every"] == 0 or step + 1 == on["steps"]:
            record_eval(step + 1)
            bar.set_postfix(normalised=f"{result.curve[-1]['normalised']:.1f}")
    env.close()
    result.detector = {"shifted_at": shifted_at, "alarms": alarms, "judged": judged,
                       "alarm_rate": alarms / max(judged, 1),
                       "support_threshold": detector.state.support_threshold if detector else None,
                       "threshold": detector.state.threshold if detector else None}
    result.timings = timings
    return result
