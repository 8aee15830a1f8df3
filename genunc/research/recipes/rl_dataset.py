"""Recipe for the offline RL datasets (``genunc zoo train rl-dataset``): D4RL-style "medium" and
"medium-replay" data from a stable-baselines3 SAC behaviour policy, made here, reproducibly.

Stages, each written to ``--out`` as it finishes (rerunning continues from the last one done):

1. **SAC** (stable-baselines3, default hyperparameters but ``learning_starts``; seeded; one
   torch thread) for ``steps`` environment steps.  Every ``eval_every`` steps a checkpoint
   (``sac/step_<k>.zip``) is saved with its evaluation return: the deterministic policy on
   ``eval_episodes`` episodes reset with fixed seeds (:func:`genunc.rl.envs.episode_seeds`,
   stream 0).  The replay buffer is saved with the latest checkpoint; an interrupted run
   continues from that checkpoint (its random states re-seeded from the
   ``(seed, "behaviour_policy", step)`` stream, and the episode cut by the interruption recorded
   as a timeout, so a resumed run is reproducible but not the uninterrupted one).
2. **Normalisation returns**: the random policy (uniform actions in the action box, the
   ``(seed, "random_policy")`` stream) on the same evaluation seeds, and the best checkpoint's
   return.
3. **The medium checkpoint** (:func:`select_medium`): with every checkpoint's normalised return
   ``100 (R - R_random) / (R_best - R_random)``, the checkpoint closest to 40 among those in
   ``[100/3, 50]`` (D4RL's medium policy reaches about a third to a half of the best); if none
   falls in that window, the closest to 40 overall, recorded as ``in_window: false``.  Returns are
   normalised (not raw fractions of the best) so that the rule means the same for envs whose
   returns are negative, such as Pendulum.
4. ``medium.npz``: ``transitions`` transitions of that checkpoint's *stochastic* policy
   (episodes reset with seeds of stream 1; the last episode cut and marked a timeout).
5. ``medium-replay.npz``: the SAC replay buffer's transitions up to that checkpoint's step (all
   the agent saw while learning to the medium level, as D4RL's medium-replay), actions mapped
   back from SAC's [-1, 1] to the env's units.

Both datasets (:class:`genunc.rl.data.OfflineDataset`) record the normalisation returns, the
selection rule and its outcome, the behaviour policy, seeds, package versions, dates and the
exact command.  ``--ship`` copies them with ``training.json`` and a README into the shipped
folder (:func:`genunc.rl.data.shipped_dir`) once every stage is done.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from genunc._io import atomic_write
from genunc.errors import GenuncError
from genunc.research.training import write_report
from genunc.rl.data import OfflineDataset, shipped_dir
from genunc.rl.envs import action_bounds, episode_seeds, evaluate_policy, make_env, normalised_return
from genunc.streams import numpy_generator, seed_sequence

#: the medium checkpoint's normalised-return target and window (see :func:`select_medium`)
MEDIUM_TARGET, MEDIUM_WINDOW = 40.0, (100.0 / 3.0, 50.0)
SELECTION_RULE = ("medium checkpoint: among checkpoints whose normalised return "
                  "100*(R-R_random)/(R_best-R_random) lies in [33.3, 50], the one closest to 40 "
                  "(earliest on ties); if none lies in the window, the closest to 40 overall "
                  "(in_window false). R: deterministic policy, mean over the evaluation seeds.")
#: episode-seed streams of :func:`genunc.rl.envs.episode_seeds`, by role
EVAL_STREAM, COLLECT_STREAM = 0, 1


@dataclass
class RLDatasetRecipe:
    env: str = "Hopper-v5"
    steps: int = 200_000
    eval_every: int = 10_000
    eval_episodes: int = 5
    transitions: int = 100_000
    #: uniform-random steps before SAC updates (rl-baselines3-zoo's MuJoCo value; SB3's is 100)
    learning_starts: int = 10_000
    seed: int = 0
    #: SAC's hidden width (two layers, actor and critics) and learning rate: SB3's defaults; a
    #: smaller, faster policy is enough for a small task such as Pendulum
    width: int = 256
    learning_rate: float = 3e-4

    def command(self) -> str:
        sac = "".join(f" --sac-{flag} {value}" for flag, value, default in (
            ("width", self.width, 256), ("lr", self.learning_rate, 3e-4)) if value != default)
        return (f"genunc zoo train rl-dataset --env {self.env} --steps {self.steps} "
                f"--eval-every {self.eval_every} --eval-episodes {self.eval_episodes} "
                f"--transitions {self.transitions} --learning-starts {self.learning_starts} "
                f"--seed {self.seed}{sac}")


#: recipe fields a continuing run may change (the later stages are redone as needed)
_FREE = ("transitions",)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _log(message: str) -> None:
    print(f"[rl-dataset {datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("gymnasium", "mujoco", "stable-baselines3", "torch",
                                             "numpy")}


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, json.dumps(value, indent=2) + "\n")


def _stream_int(seed: int, purpose: str, *index: int) -> int:
    return int(seed_sequence(seed, purpose, *index).generate_state(1, np.uint32)[0] >> 1)


# ------------------------------------------------------------------------------- selection
def select_medium(evaluations: list[dict[str, Any]], random_return: float) -> dict[str, Any]:
    """The medium checkpoint among ``[{"step", "return"}, ...]`` (the module doc's rule):
    ``{"step", "return", "normalised", "in_window", "best_step", "best_return"}``."""
    if not evaluations:
        raise GenuncError("no evaluated checkpoints to choose the medium one from")
    best = max(evaluations, key=lambda e: (e["return"], -e["step"]))
    if best["return"] <= random_return:
        raise GenuncError(f"no checkpoint beats the random policy ({best['return']:.1f} <= "
                          f"{random_return:.1f}): train longer")
    scored = [(normalised_return(e["return"], random_return, best["return"]), e) for e in evaluations]
    low, high = MEDIUM_WINDOW
    inside = [(s, e) for s, e in scored if low <= s <= high]
    score, chosen = min(inside or scored, key=lambda se: (abs(se[0] - MEDIUM_TARGET), se[1]["step"]))
    return {"step": chosen["step"], "return": chosen["return"], "normalised": float(score),
            "in_window": bool(inside), "best_step": best["step"], "best_return": best["return"]}


# ------------------------------------------------------------------------------- training
def _sac(recipe: RLDatasetRecipe, env, device: str):
    from stable_baselines3 import SAC

    # SB3's defaults (MlpPolicy 256x256, lr 3e-4, batch 256, tau 0.005, gamma 0.99, automatic
    # entropy) unless the recipe sets width / learning_rate; the buffer holds every step (as
    # SB3's 1e6 when steps <= 1e6: nothing is evicted, and sampling is the same), grown when a
    # continuing run asks for more steps
    return SAC("MlpPolicy", env, learning_starts=recipe.learning_starts,
               buffer_size=recipe.steps, seed=recipe.seed, device=device, verbose=0,
               learning_rate=recipe.learning_rate,
               policy_kwargs={"net_arch": [recipe.width, recipe.width]})


def _sac_hyperparameters(model) -> dict[str, Any]:
    return {"algorithm": "stable-baselines3 SAC", "policy": "MlpPolicy",
            "net_arch": list(model.policy.net_arch), "learning_rate": model.learning_rate,
            "batch_size": model.batch_size,
            "tau": model.tau, "gamma": model.gamma, "train_freq": 1, "gradient_steps": 1,
            "ent_coef": "auto", "learning_starts": model.learning_starts,
            "buffer_size": model.buffer_size}


def _grow(model, size: int, held: int) -> None:
    """Make room in the replay buffer for `size` transitions, keeping the first `held`."""
    buffer = model.replay_buffer
    for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        old = getattr(buffer, name)
        new = np.zeros((size, *old.shape[1:]), old.dtype)
        new[:held] = old[:held]
        setattr(buffer, name, new)
    buffer.buffer_size, buffer.pos, buffer.full = size, held, False
    model.buffer_size = size


def _save(path: Path, save) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            save(handle)

    atomic_write(path, write)


def _train(recipe: RLDatasetRecipe, out: Path, progress: dict[str, Any], device: str) -> None:
    """Stage 1: SAC with a checkpoint and its evaluation every eval_every steps (resumable)."""
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.utils import set_random_seed

    sac_dir = out / "sac"
    evaluations = progress["evaluations"]
    done = evaluations[-1]["step"] if evaluations else 0
    if done >= recipe.steps:
        return
    env = make_env(recipe.env)
    if done:
        model = SAC.load(sac_dir / f"step_{done:08d}.zip", env=env, device=device)
        model.load_replay_buffer(sac_dir / "replay_buffer.pkl")
        if model.replay_buffer.size() != done:
            raise GenuncError(f"{sac_dir}: the replay buffer holds {model.replay_buffer.size()} "
                              f"transitions, the checkpoint is at step {done}; start a new --out")
        if model.replay_buffer.buffer_size < recipe.steps:  # more steps than first planned
            _grow(model, recipe.steps, done)
        resumed = _stream_int(recipe.seed, "behaviour_policy", done)
        set_random_seed(resumed)
        model.set_random_seed(resumed)
        if done not in progress["resumed_at"]:
            progress["resumed_at"].append(done)
        _log(f"resuming at step {done} (re-seeded {resumed})")
    else:
        model = _sac(recipe, env, device)
    model.set_logger(Logger(None, []))  # SB3's own would make a folder in /tmp per learn()
    progress.setdefault("sac", _sac_hyperparameters(model))
    seeds = episode_seeds(recipe.seed, recipe.eval_episodes, stream=EVAL_STREAM)
    started, at_start = time.time(), done
    clock = started

    class Progress(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % 1000 == 0:
                rate = (self.num_timesteps - at_start) / max(time.time() - started, 1e-9)
                recent = [e["r"] for e in self.model.ep_info_buffer][-10:]
                mean = f"{np.mean(recent):.1f}" if recent else "-"
                _log(f"step {self.num_timesteps}/{recipe.steps}  {rate:.0f} steps/s  "
                     f"train return (last 10 episodes) {mean}")
            return True

    while done < recipe.steps:
        chunk = min(recipe.eval_every, recipe.steps - done)
        model.learn(chunk, reset_num_timesteps=False, callback=Progress(), progress_bar=False)
        done = model.num_timesteps
        returns = evaluate_policy(lambda obs: model.predict(obs, deterministic=True)[0],
                                  recipe.env, seeds)
        _save(sac_dir / f"step_{done:08d}.zip", model.save)
        _save(sac_dir / "replay_buffer.pkl", model.save_replay_buffer)
        evaluations.append({"step": int(done), "return": float(returns.mean()),
                            "returns": returns.tolist(), "seconds": time.time() - started})
        progress["training_seconds"] = progress.get("training_seconds", 0.0) + time.time() - clock
        clock = time.time()
        progress["steps_per_second"] = (done - at_start) / (time.time() - started)
        _write_json(out / "progress.json", progress)
        _log(f"checkpoint {done}: evaluation return {returns.mean():.1f} "
             f"(episodes {', '.join(f'{r:.0f}' for r in returns)})")
    env.close()


def _random_return(recipe: RLDatasetRecipe) -> dict[str, Any]:
    """Stage 2: the uniform-random policy on the evaluation seeds."""
    env = make_env(recipe.env)
    low, high = action_bounds(env)
    env.close()
    rng = numpy_generator(recipe.seed, "random_policy")
    seeds = episode_seeds(recipe.seed, recipe.eval_episodes, stream=EVAL_STREAM)
    returns = evaluate_policy(lambda obs: rng.uniform(low, high, (len(obs), len(low))),
                              recipe.env, seeds)
    return {"return": float(returns.mean()), "returns": returns.tolist(), "seeds": seeds}


# ------------------------------------------------------------------------------- datasets
def _metadata(recipe: RLDatasetRecipe, progress: dict[str, Any], kind: str, **extra) -> dict:
    medium, random = progress["medium"], progress["random"]
    return {
        "env_id": recipe.env, "kind": kind,
        "behaviour_policy": (f"stable-baselines3 SAC checkpoint at step {medium['step']} of "
                             f"{recipe.steps} (deterministic evaluation return "
                             f"{medium['return']:.1f}, normalised {medium['normalised']:.1f})"),
        "random_return": random["return"], "best_return": medium["best_return"],
        "medium_return": medium["return"], "medium": medium, "selection_rule": SELECTION_RULE,
        "evaluation_seeds": random["seeds"], "seed": recipe.seed, "recipe": asdict(recipe),
        "sac": progress["sac"], "command": recipe.command(), "versions": _versions(),
        "training_started": progress["started"], "created": _now(), **extra,
    }


def _collect_medium(recipe: RLDatasetRecipe, out: Path, progress: dict[str, Any],
                    device: str) -> OfflineDataset:
    """Stage 4: `transitions` steps of the medium checkpoint's stochastic policy."""
    import torch
    from stable_baselines3 import SAC

    step = progress["medium"]["step"]
    model = SAC.load(out / "sac" / f"step_{step:08d}.zip", device=device)
    torch.manual_seed(_stream_int(recipe.seed, "behaviour_policy", 0))
    env = make_env(recipe.env)
    low, high = action_bounds(env)
    rows: dict[str, list] = {k: [] for k in ("obs", "act", "rew", "next", "term", "trunc")}
    episode = 0
    obs, _ = env.reset(seed=episode_seeds(recipe.seed, 1, stream=COLLECT_STREAM, start=0)[0])
    for t in range(recipe.transitions):
        action = model.predict(obs, deterministic=False)[0]
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for key, value in zip(rows, (obs, action, reward, next_obs, terminated, truncated)):
            rows[key].append(value)
        if terminated or truncated:
            episode += 1
            obs, _ = env.reset(seed=episode_seeds(recipe.seed, 1, stream=COLLECT_STREAM,
                                                  start=episode)[0])
        else:
            obs = next_obs
        if (t + 1) % 10_000 == 0:
            _log(f"medium: {t + 1}/{recipe.transitions} transitions, {episode} episodes")
    env.close()
    timeouts = np.array(rows["trunc"], bool) & ~np.array(rows["term"], bool)
    timeouts[-1] |= not rows["term"][-1]  # the data ends: the last episode is cut
    data = OfflineDataset(np.array(rows["obs"]), np.array(rows["act"]), np.array(rows["rew"]),
                          np.array(rows["next"]), np.array(rows["term"]), timeouts)
    full = data.episode_returns()[:episode] if episode else data.episode_returns()
    data.metadata = _metadata(
        recipe, progress, "medium", action_low=low.tolist(), action_high=high.tolist(),
        collection=(f"{recipe.transitions} steps of the checkpoint's stochastic policy; episodes "
                    f"reset with episode_seeds(seed, stream={COLLECT_STREAM}); the last episode "
                    "cut and marked a timeout"),
        episodes=len(data.episode_slices()), complete_episodes=episode,
        dataset_return_mean=float(np.mean(full)), dataset_return_std=float(np.std(full)),
        dataset_normalised_return=float(normalised_return(
            np.mean(full), progress["random"]["return"], progress["medium"]["best_return"])))
    return data


def _medium_replay(recipe: RLDatasetRecipe, out: Path, progress: dict[str, Any]) -> OfflineDataset:
    """Stage 5: the replay buffer up to the medium checkpoint's step, in env action units."""
    from stable_baselines3.common.save_util import load_from_pkl

    step = progress["medium"]["step"]
    buffer = load_from_pkl(out / "sac" / "replay_buffer.pkl")
    env = make_env(recipe.env)
    low, high = action_bounds(env)
    env.close()
    dones = buffer.dones[:step, 0].astype(bool)
    cut = buffer.timeouts[:step, 0].astype(bool)
    terminals, timeouts = dones & ~cut, dones & cut
    for boundary in [*[r for r in progress["resumed_at"] if r <= step], step]:
        if not terminals[boundary - 1]:  # an episode cut by a resumption or by the data's end
            timeouts[boundary - 1] = True
    actions = low + 0.5 * (buffer.actions[:step, 0] + 1.0) * (high - low)  # SAC's [-1, 1] -> env
    data = OfflineDataset(buffer.observations[:step, 0], actions, buffer.rewards[:step, 0],
                          buffer.next_observations[:step, 0], terminals, timeouts)
    returns = data.episode_returns()
    data.metadata = _metadata(
        recipe, progress, "medium-replay", action_low=low.tolist(), action_high=high.tolist(),
        collection=(f"the SAC replay buffer's first {step} transitions (every step of training up "
                    f"to the medium checkpoint; the first {recipe.learning_starts} uniform-random), "
                    "actions mapped from [-1, 1] to the env's units; episodes cut by a resumption "
                    f"({progress['resumed_at'] or 'none'}) or by the checkpoint marked timeouts"),
        episodes=len(returns), dataset_return_mean=float(np.mean(returns)),
        resumed_at=progress["resumed_at"])
    return data


# ------------------------------------------------------------------------------- the recipe
def train_rl_dataset(recipe: RLDatasetRecipe, out_dir: str | Path, device: str | None = None,
                     ship: bool = False) -> dict[str, Any]:
    """Run (or continue) every stage into `out_dir`; returns the report (``training.json``)."""
    import torch

    torch.set_num_threads(1)
    device = device or "cpu"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fixed = {k: v for k, v in asdict(recipe).items() if k not in _FREE and k != "steps"}
    progress_path = out / "progress.json"
    if progress_path.is_file():
        progress = json.loads(progress_path.read_text())
        defaults = asdict(RLDatasetRecipe())  # a run from before a field existed had its default
        if {k: progress["fixed"].get(k, defaults[k]) for k in fixed} != fixed:
            raise GenuncError(f"{out} holds a run of another recipe ({progress['fixed']}); "
                              f"this one is {fixed}: use another --out")
        _log(f"continuing {out}: {len(progress['evaluations'])} checkpoints done")
    else:
        progress = {"fixed": fixed, "started": _now(), "evaluations": [], "resumed_at": [],
                    "argv": shlex.join(["genunc", *sys.argv[1:]])}
    _log(f"{recipe.env}: {recipe.steps} SAC steps, checkpoint every {recipe.eval_every}")
    _train(recipe, out, progress, device)
    evaluations = [e for e in progress["evaluations"] if e["step"] <= recipe.steps]
    if "random" not in progress:
        progress["random"] = _random_return(recipe)
    progress["medium"] = select_medium(evaluations, progress["random"]["return"])
    _write_json(progress_path, progress)
    medium = progress["medium"]
    _log(f"random return {progress['random']['return']:.1f}, best {medium['best_return']:.1f} "
         f"(step {medium['best_step']}), medium: step {medium['step']} return "
         f"{medium['return']:.1f} normalised {medium['normalised']:.1f}"
         f"{'' if medium['in_window'] else ' (none in the window: the closest)'}")
    files = {}
    for kind, make in (("medium", lambda: _collect_medium(recipe, out, progress, device)),
                       ("medium-replay", lambda: _medium_replay(recipe, out, progress))):
        path = out / f"{kind}.npz"
        if path.is_file():
            old = OfflineDataset.load(path).metadata
            if old.get("recipe") == asdict(recipe) and old.get("medium") == medium:
                _log(f"{path} is done")
                files[kind] = old
                continue
        data = make()
        data.save(path)
        files[kind] = data.metadata
        _log(f"wrote {path}: {len(data)} transitions, {path.stat().st_size / 1e6:.2f} MB")
    report = {
        "env_id": recipe.env, "random_return": progress["random"]["return"],
        "best_return": medium["best_return"], "medium": medium, "selection_rule": SELECTION_RULE,
        "evaluations": [{k: e[k] for k in ("step", "return")} for e in evaluations],
        "random": progress["random"], "steps_per_second": progress.get("steps_per_second"),
        "training_seconds": progress.get("training_seconds"), "resumed_at": progress["resumed_at"],
        "datasets": {kind: {k: meta[k] for k in ("episodes", "dataset_return_mean", "created")}
                     | {"transitions": _transitions(out / f"{kind}.npz"),
                        "megabytes": round((out / f"{kind}.npz").stat().st_size / 1e6, 3)}
                     for kind, meta in files.items()},
        "recipe": asdict(recipe), "sac": progress["sac"], "versions": _versions(),
        "device": device, "started": progress["started"],
        "finished": max(meta["created"] for meta in files.values()),
        "command": recipe.command(),
    }
    write_report(out, report)
    (out / "README.md").write_text(_readme(report))
    if ship:
        target = ship_datasets(out)
        _log(f"shipped to {target}")
    return report


def _transitions(path: Path) -> int:
    with np.load(path, allow_pickle=False) as npz:
        return int(npz["n"])


def ship_datasets(out_dir: str | Path) -> Path:
    """Copy a finished run's ``medium.npz``, ``medium-replay.npz``, ``training.json`` and
    ``README.md`` into the shipped folder of its env (:func:`genunc.rl.data.shipped_dir`)."""
    out = Path(out_dir)
    report_path = out / "training.json"
    names = ("medium.npz", "medium-replay.npz", "training.json", "README.md")
    missing = [n for n in names if not (out / n).is_file()]
    if missing:
        raise GenuncError(f"{out} is not a finished rl-dataset run (no {', '.join(missing)}): "
                          "rerun genunc zoo train rl-dataset with the same flags to finish it")
    target = shipped_dir(json.loads(report_path.read_text())["env_id"])
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(out / name, target / name)
    return target


def _readme(report: dict[str, Any]) -> str:
    medium = report["medium"]
    sets = "\n".join(f"* `{kind}.npz`: {d['transitions']} transitions, {d['episodes']} episodes, "
                     f"mean episode return {d['dataset_return_mean']:.1f}, {d['megabytes']} MB"
                     for kind, d in report["datasets"].items())
    window = "inside" if medium["in_window"] else "none inside: the closest to 40 outside"
    curve = ", ".join(f"{e['step']}: {e['return']:.0f}" for e in report["evaluations"])
    return f"""# Offline datasets for {report['env_id']}

Made by

    {report['command']}

with a stable-baselines3 SAC behaviour policy (`genunc/research/recipes/rl_dataset.py` describes
every stage). Load with `genunc.rl.data.OfflineDataset.load(path)` or by name
(`zoo:rl/<env>-<kind>`): float32 arrays, and `.metadata` with the exact command, seeds, dates
and versions.

{sets}

Normalisation, `100 * (R - R_random) / (R_best - R_random)` with R the mean return on the \
{len(report['random']['seeds'])} evaluation seeds: random policy {report['random_return']:.1f}, \
best checkpoint {report['best_return']:.1f} (deterministic, step {medium['best_step']}).

Medium checkpoint: step {medium['step']}, return {medium['return']:.1f}, normalised \
{medium['normalised']:.1f} ({window} the [33.3, 50] window). Rule: {report['selection_rule']}

SAC: {report['steps_per_second'] or 0:.0f} steps/s (evaluations included) on {report['device']}, one \
torch thread; started {report['started']}, datasets written {report['finished']}; versions \
{', '.join(f'{k} {v}' for k, v in report['versions'].items())}.

Checkpoint returns (step: return): {curve}.
"""
