"""d3rlpy baselines for genunc.rl (issue 29): IQL and Cal-QL, offline then online fine-tuning, on
DUAL's dataset, online budget and evaluation seeds, written where ``genunc rl evaluate`` finds them.

    make baselines        # d3rlpy in .venv-baselines (benchmarks/requirements-baselines.txt)
    .venv-baselines/bin/python benchmarks/rl_baselines.py --config configs/pendulum.yaml \\
        --algo iql --seeds 0 1 2 3 4 [--offline-steps N] [--set KEY=VALUE ...]
    .venv/bin/genunc rl evaluate -c configs/pendulum.yaml     # DUAL and the baselines, one table

For each seed, as DUAL does (genunc/rl/run.py, genunc/rl/online.py):

* data: the config's ``data.path``, and only the kept part of ``dataset.split(data.held_out,
  seed)``: the episodes DUAL holds out to calibrate its shift detector are not trained on;
* offline: ``--offline-steps`` gradient steps (default: DUAL's ``offline.actor_updates``);
* online: ``fit_online`` for ``online.steps`` environment steps on
  ``make_env(env.id, shift=parse_shift(env.shift))``, training episode ``i`` reset with DUAL's
  seed for it (``episode_seeds(seed, 1, stream=TRAINING, start=i)``), one update per
  ``online.update_every`` steps (``online.updates_per_step`` each) from step
  ``online.start_updates`` on, exploring with the algorithm's own stochastic policy.  Replay:
  IQL's buffer starts with the offline episodes (d3rlpy's reproductions/finetuning/iql_finetune.py);
  Cal-QL's minibatches are half offline data, half online (a MixedReplayBuffer, as in d3rlpy's
  reproductions/finetuning/cal_ql_finetune.py);
* evaluation: the deterministic policy (``predict``) at step 0, every ``online.eval_every`` steps
  and at the end, on DUAL's evaluation seeds
  (``episode_seeds(online.eval_seed_offset + seed, online.eval_episodes, stream=EVALUATION)``),
  returns normalised by the dataset's ``normalise_return``.

Hyperparameters: d3rlpy 2.8.1's defaults for ``IQLConfig`` and ``CalQLConfig`` (MLP 256-256,
batch 256, gamma 0.99, tau 0.005; IQL expectile 0.7, weight_temp 3, max_weight 100; Cal-QL = CQL
with conservative_weight 5, alpha_threshold 10, 10 action samples, its Monte-Carlo returns
computed by d3rlpy from the episodes' rewards), nothing tuned; the one addition is a
``MinMaxActionScaler`` with the env's action bounds (d3rlpy's policies act in [-1, 1]).
Episodes cut by a time limit keep their last transition (its next observation is appended
with a zero action and reward, which d3rlpy never trains on as a transition).

Output: ``<out>/seed<k>/online/<algo>[-shift].json`` in DUAL's record format (``variant``
``iql`` / ``calql``, plus ``-shift`` when ``env.shift`` is set; ``detector: {"shifted_at":
null}``; ``minutes`` is the online phase with its evaluations, ``offline_minutes`` the offline
fit), plus a ``baseline`` section (library, version, hyperparameters, online settings).  A run
whose file exists with the same digest (the config's env, data, seed and online budget, the
algorithm, offline steps and d3rlpy version) is skipped; the offline model is cached in
``<out>/seed<k>/baselines/<algo>/`` (with d3rlpy's logs), so an interrupted run redoes only its
online phase, which is reseeded so that the result is the same either way.  Progress: one
line per evaluation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import d3rlpy
    import structlog
except ImportError:  # pragma: no cover - the extra is opt-in
    sys.exit("rl_baselines.py needs d3rlpy: run `make baselines`, then use .venv-baselines/bin/python")

import gymnasium

from genunc._io import atomic_write
from genunc.rl.config import load_rl_config, parse_shift
from genunc.rl.data import OfflineDataset
from genunc.rl.envs import episode_seeds, evaluate_policy, make_env
from genunc.rl.online import EVALUATION, TRAINING
from genunc.rl.run import load_dataset

ALGOS = ("iql", "calql")
#: the online keys a baseline run depends on (the rest of ``online`` configures DUAL only)
ONLINE_KEYS = ("steps", "eval_every", "eval_episodes", "eval_seed_offset", "start_updates",
               "update_every", "updates_per_step")
#: added to the seed for the online phase's torch/numpy streams (same whether offline was
#: trained now or loaded from the cache)
ONLINE_SEED = 1_000
#: Cal-QL's share of offline data in each online minibatch (d3rlpy's Cal-QL example)
CALQL_OFFLINE_SHARE = 0.5

# d3rlpy logs every epoch's metrics to the console through structlog: warnings and up only
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def digest_of(part: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


def offline_digest(config: dict[str, Any], algo: str, offline_steps: int) -> str:
    return digest_of({"env": {"id": config["env"]["id"]}, "data": config["data"],
                      "seed": config["seed"], "algo": algo, "offline_steps": offline_steps,
                      "d3rlpy": d3rlpy.__version__})


def run_digest(config: dict[str, Any], algo: str, offline_steps: int) -> str:
    return digest_of({"env": config["env"], "data": config["data"], "seed": config["seed"],
                      "online": {k: config["online"][k] for k in ONLINE_KEYS}, "algo": algo,
                      "offline_steps": offline_steps, "d3rlpy": d3rlpy.__version__})


def variant(config: dict[str, Any], algo: str) -> str:
    return algo + ("-shift" if config["env"]["shift"] else "")


def to_episodes(dataset: OfflineDataset) -> list[d3rlpy.dataset.Episode]:
    """The dataset's episodes as d3rlpy Episodes.  d3rlpy reads an episode's transitions from
    consecutive observations, so one cut by a time limit gets its final next observation
    appended (with a zero action and reward): its last real transition is kept."""
    episodes = []
    for rows in dataset.episode_slices():
        obs, actions = dataset.observations[rows], dataset.actions[rows]
        rewards = dataset.rewards[rows].reshape(-1, 1)
        terminated = bool(dataset.terminals[rows.stop - 1])
        if not terminated:
            obs = np.concatenate([obs, dataset.next_observations[rows.stop - 1][None]])
            actions = np.concatenate([actions, np.zeros_like(actions[:1])])
            rewards = np.concatenate([rewards, np.zeros_like(rewards[:1])])
        episodes.append(d3rlpy.dataset.Episode(observations=obs.astype(np.float32),
                                               actions=actions.astype(np.float32),
                                               rewards=rewards.astype(np.float32),
                                               terminated=terminated))
    return episodes


def make_algo(algo: str, env: gymnasium.Env, device: str) -> Any:
    """d3rlpy's default IQL / Cal-QL, with the env's action bounds as its action scaler."""
    scaler = d3rlpy.preprocessing.MinMaxActionScaler(
        minimum=np.asarray(env.action_space.low, np.float32),
        maximum=np.asarray(env.action_space.high, np.float32))
    config_cls = {"iql": d3rlpy.algos.IQLConfig, "calql": d3rlpy.algos.CalQLConfig}[algo]
    return config_cls(action_scaler=scaler).create(device=device)


class SeededEpisodes(gymnasium.Wrapper):
    """Resets training episode ``i`` with DUAL's seed for it, and records each episode's return
    (fit_online resets without a seed)."""

    def __init__(self, env: gymnasium.Env, seed: int, normalise: Any) -> None:
        super().__init__(env)
        self.run_seed, self.normalise = seed, normalise
        self.episode, self.steps, self.ep_return = 0, 0, 0.0
        self.log: list[dict[str, float]] = []

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        if seed is None:
            seed = episode_seeds(self.run_seed, 1, stream=TRAINING, start=self.episode)[0]
        self.episode += 1
        self.ep_return = 0.0
        return self.env.reset(seed=seed, options=options)

    def step(self, action: Any) -> Any:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        self.ep_return += float(reward)
        if terminated or truncated:
            self.log.append({"step": self.steps, "return": self.ep_return,
                             "normalised": float(self.normalise(self.ep_return))})
        return obs, reward, terminated, truncated, info


def offline_phase(config: dict[str, Any], algo: str, offline_steps: int, train: OfflineDataset,
                  env: gymnasium.Env, device: str, work: Path, force: bool) -> tuple[Any, dict[str, Any]]:
    """Fit `algo` offline on `train` (or load the cached fit with the same digest)."""
    digest = offline_digest(config, algo, offline_steps)
    model_path, report_path = work / "offline.d3", work / "offline.json"
    if not force and report_path.exists() and model_path.exists():
        report = json.loads(report_path.read_text())
        if report.get("digest") == digest:
            return d3rlpy.load_learnable(str(model_path), device=device), report
    d3rlpy.seed(config["seed"])
    model = make_algo(algo, env, device)
    buffer = d3rlpy.dataset.ReplayBuffer(d3rlpy.dataset.InfiniteBuffer(), episodes=to_episodes(train))
    t0, c0 = time.perf_counter(), time.process_time()
    metrics: list[Any] = []
    if offline_steps:
        metrics = model.fit(buffer, n_steps=offline_steps, n_steps_per_epoch=offline_steps,
                            experiment_name="offline", with_timestamp=False,
                            logger_adapter=d3rlpy.logging.FileAdapterFactory(root_dir=str(work / "d3rlpy")),
                            show_progress=False, save_interval=10**9)
    else:
        model.build_with_dataset(buffer)
    minutes, cpu_minutes = (time.perf_counter() - t0) / 60, (time.process_time() - c0) / 60
    atomic_write(model_path, lambda tmp: model.save(str(tmp)))
    report = {"digest": digest, "algo": algo, "offline_steps": offline_steps, "minutes": minutes,
              "cpu_minutes": cpu_minutes, "transitions": len(train),
              "metrics": metrics[-1][1] if metrics else {}}
    atomic_write(report_path, json.dumps(report, indent=1, default=float))
    return model, report


def run(config: dict[str, Any], algo: str, offline_steps: int, device: str = "cpu",
        force: bool = False) -> Path:
    """One seed's offline + online baseline run; returns its result file."""
    seed, on = config["seed"], config["online"]
    name = variant(config, algo)
    path = Path(config["out"]) / f"seed{seed}" / "online" / f"{name}.json"
    digest = run_digest(config, algo, offline_steps)
    if not force and path.exists() and json.loads(path.read_text()).get("digest") == digest:
        print(f"[{name} seed {seed}] done already: {path}", flush=True)
        return path
    dataset = load_dataset(config)
    train, _ = dataset.split(config["data"]["held_out"], seed)
    env_id, shift = config["env"]["id"], parse_shift(config["env"]["shift"])
    normalise = lambda r: float(dataset.normalise_return(r))  # noqa: E731
    work = Path(config["out"]) / f"seed{seed}" / "baselines" / algo

    env = SeededEpisodes(make_env(env_id, shift=shift), seed, normalise)
    model, offline_report = offline_phase(config, algo, offline_steps, train, env, device, work, force)
    print(f"[{name} seed {seed}] offline: {offline_steps} steps on {len(train)} transitions, "
          f"{offline_report['minutes']:.2f} min", flush=True)

    d3rlpy.seed(seed + ONLINE_SEED)
    eval_seeds = episode_seeds(on["eval_seed_offset"] + seed, on["eval_episodes"], stream=EVALUATION)
    curve: list[dict[str, Any]] = []
    timings = {"offline_s": offline_report["minutes"] * 60, "eval_s": 0.0, "online_s": 0.0}
    if "cpu_minutes" in offline_report:
        timings["offline_cpu_s"] = offline_report["cpu_minutes"] * 60
    t_online, c_online = time.perf_counter(), time.process_time()

    def evaluate(step: int) -> None:
        t0 = time.perf_counter()
        returns = evaluate_policy(lambda obs: model.predict(obs), env_id, eval_seeds, shift=shift)
        timings["eval_s"] += time.perf_counter() - t0
        curve.append({"step": step, "return": float(np.mean(returns)),
                      "normalised": float(np.mean([normalise(r) for r in returns])),
                      "returns": [float(r) for r in returns]})
        print(f"[{name} seed {seed}] step {step:6d}: return {curve[-1]['return']:8.1f}  normalised "
              f"{curve[-1]['normalised']:6.1f}  ({(time.perf_counter() - t_online) / 60:.2f} min online)",
              flush=True)

    def callback(_algo: Any, _epoch: int, total_step: int) -> None:
        if total_step % on["eval_every"] == 0 or total_step == on["steps"]:
            evaluate(total_step)

    evaluate(0)
    if algo == "calql":
        online_buffer = d3rlpy.dataset.create_fifo_replay_buffer(limit=max(on["steps"], 1), env=env)
        offline_buffer = d3rlpy.dataset.ReplayBuffer(d3rlpy.dataset.InfiniteBuffer(),
                                                     episodes=to_episodes(train))
        buffer: Any = d3rlpy.dataset.MixedReplayBuffer(online_buffer, offline_buffer,
                                                       secondary_mix_ratio=CALQL_OFFLINE_SHARE)
        replay = f"MixedReplayBuffer: {CALQL_OFFLINE_SHARE:g} offline (all kept episodes) + online FIFO"
    else:
        buffer = d3rlpy.dataset.create_fifo_replay_buffer(limit=len(train) + on["steps"] + 1,
                                                          episodes=to_episodes(train))
        replay = "FIFO buffer initialised with the kept offline episodes, online transitions appended"
    # a MixedReplayBuffer samples its online part from the first update on: never before 1 step
    start = max(on["start_updates"], 1) if algo == "calql" else on["start_updates"]
    online_settings = {"n_steps": on["steps"], "update_interval": on["update_every"],
                       "n_updates": on["updates_per_step"], "update_start_step": start,
                       "random_steps": 0, "explorer": None, "replay": replay}
    if on["steps"]:
        model.fit_online(env, buffer=buffer, n_steps=on["steps"], n_steps_per_epoch=on["eval_every"],
                         update_interval=on["update_every"], n_updates=on["updates_per_step"],
                         update_start_step=start, random_steps=0, save_interval=10**9,
                         experiment_name=f"online{'-shift' if shift else ''}", with_timestamp=False,
                         logger_adapter=d3rlpy.logging.FileAdapterFactory(root_dir=str(work / "d3rlpy")),
                         show_progress=False, callback=callback)
    env.close()
    timings["online_s"] = time.perf_counter() - t_online
    timings["online_cpu_s"] = time.process_time() - c_online  # the machine may be shared
    record = {"digest": digest, "variant": name, "config": config, "minutes": timings["online_s"] / 60,
              "offline_minutes": offline_report["minutes"],
              "dataset": {k: dataset.metadata.get(k) for k in ("env_id", "kind", "random_return",
                                                                "best_return", "command")},
              "curve": curve, "episodes": env.log, "detector": {"shifted_at": None},
              "bonus_stats": [], "timings": timings,
              "baseline": {"library": "d3rlpy", "version": d3rlpy.__version__, "algo": algo,
                           "offline_steps": offline_steps, "device": device,
                           "hyperparameters": json.loads(model.config.serialize()),
                           "online": online_settings, "offline_metrics": offline_report["metrics"]}}
    atomic_write(path, json.dumps(record, indent=1, default=float))
    print(f"[{name} seed {seed}] wrote {path}: online {record['minutes']:.2f} min, "
          f"offline {record['offline_minutes']:.2f} min", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", required=True, help="a genunc rl config (configs/<task>.yaml)")
    parser.add_argument("--algo", required=True, choices=ALGOS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, as genunc rl --set")
    parser.add_argument("--offline-steps", type=int, default=None,
                        help="offline gradient steps (default: the config's offline.actor_updates)")
    parser.add_argument("--device", default="cpu", help="d3rlpy device: cpu or cuda:0")
    parser.add_argument("--force", action="store_true", help="redo runs that are done already")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = load_rl_config(args.config, args.overrides)
    steps = base["offline"]["actor_updates"] if args.offline_steps is None else args.offline_steps
    for seed in args.seeds:
        run({**base, "seed": seed}, args.algo, steps, args.device, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
