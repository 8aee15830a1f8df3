"""The three ``genunc rl`` commands: train offline, run online, summarise runs.

Layout under ``out`` (every file written atomically; a finished run is never redone):

* ``seed<k>/agent/``: the offline agent (``dual_agent.*``), the actor's posterior
  (``posterior/``) and ``offline.json`` (config, timings, losses, detector calibration);
* ``seed<k>/online/<variant>.json``: one online run (variant: the bonus, plus ``-shift`` when
  the environment's dynamics were shifted): its learning curve, detector log and config.

``summarise`` turns those into the table of normalised returns at each evaluation step, the
area under the online curve and the initial dip, with bootstrap intervals over seeds.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from genunc._io import atomic_write
from genunc.config import dump_config
from genunc.rl.agent import DUALAgent
from genunc.rl.data import OfflineDataset, shipped_path
from genunc.rl.detector import DetectorState
from genunc.rl.offline import actor_pipeline, make_detector, offline_buffer, train_offline
from genunc.rl.online import run_online

OFFLINE_FILE = "offline.json"


def load_dataset(config: dict[str, Any]) -> OfflineDataset:
    spec = config["data"]["path"]
    return OfflineDataset.load(shipped_path(spec) if spec.startswith("zoo:") else Path(spec))


def run_dir(config: dict[str, Any]) -> Path:
    return Path(config["out"]) / f"seed{config['seed']}"


def variant(config: dict[str, Any]) -> str:
    """The run's name: the bonus (``none`` when beta is 0), ``-x0`` when u is the one-chain
    ``action_variance_x0``, ``-shift`` in the dynamics-shifted world."""
    on = config["online"]
    name = "none" if on["bonus"] == "none" or on["beta"] == 0 else on["bonus"]
    if name != "none" and on["score"] == "action_variance_x0":
        name += "-x0"
    return name + ("-shift" if config["env"]["shift"] else "")


def config_digest(config: dict[str, Any], sections: Iterable[str]) -> str:
    part = {k: config[k] for k in sections}
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


OFFLINE_SECTIONS = ("env", "data", "seed", "agent", "offline", "posterior", "detector")


def offline(config: dict[str, Any], *, progress: bool = True, force: bool = False) -> Path:
    """Train the offline agent (skipped when one with the same offline config exists)."""
    where = run_dir(config) / "agent"
    digest = config_digest({**config, "env": {"id": config["env"]["id"]}}, OFFLINE_SECTIONS)
    if not force and (where / OFFLINE_FILE).exists():
        if json.loads((where / OFFLINE_FILE).read_text()).get("digest") == digest:
            return where
    dataset = load_dataset(config)
    t0 = time.perf_counter()
    result, pipe, _ = train_offline(dataset, config, progress=progress)
    result.agent.save(where)
    pipe.posterior.save(where / "posterior")
    report = {"digest": digest, "config": config, "dataset": dataset.metadata,
              "detector": result.detector.state.to_dict(), "timings": result.timings,
              "minutes": (time.perf_counter() - t0) / 60, "losses": result.losses,
              "posterior": pipe.posterior.summary()}
    atomic_write(where / OFFLINE_FILE, json.dumps(report, indent=1, default=float))
    atomic_write(where / "config.yaml", dump_config(config))
    return where


def load_agent(config: dict[str, Any]) -> tuple[DUALAgent, Any, DetectorState, dict[str, Any]]:
    from genunc.posterior import HeadPosterior

    where = run_dir(config) / "agent"
    agent, _ = DUALAgent.load(where)
    report = json.loads((where / OFFLINE_FILE).read_text())
    pipe = actor_pipeline(agent)
    pipe.posterior = HeadPosterior.load(where / "posterior", agent.actor)
    return agent, pipe, DetectorState(**report["detector"]), report


def online(config: dict[str, Any], *, progress: bool = True, force: bool = False) -> Path:
    """Run the online phase from the seed's offline agent (trained first if missing)."""
    path = run_dir(config) / "online" / f"{variant(config)}.json"
    digest = config_digest(config, (*OFFLINE_SECTIONS, "online"))
    if not force and path.exists() and json.loads(path.read_text()).get("digest") == digest:
        return path
    offline(config, progress=progress)
    agent, pipe, detector_state, report = load_agent(config)
    dataset = load_dataset(config)
    train, _ = dataset.split(config["data"]["held_out"], config["seed"])
    buffer = offline_buffer(agent, train, config)
    detector = make_detector(buffer, config, detector_state)
    t0 = time.perf_counter()
    result = run_online(agent, pipe, detector if config["detector"]["enabled"] else None, buffer,
                        config, normalise=lambda r: float(dataset.normalise_return(r)),
                        progress=progress)
    record = {"digest": digest, "variant": variant(config), "config": config,
              "minutes": (time.perf_counter() - t0) / 60, "offline_minutes": report["minutes"],
              "dataset": {k: dataset.metadata.get(k) for k in ("env_id", "kind", "random_return",
                                                                "best_return", "command")},
              **asdict(result)}
    atomic_write(path, json.dumps(record, indent=1, default=float))
    return path


def bootstrap_interval(values: np.ndarray, n_boot: int = 10_000) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean over `values` (one per seed; genunc's
    :func:`~genunc.metrics.stats.bootstrap_interval`); NaN for a single seed."""
    from genunc.metrics.stats import bootstrap_interval as interval

    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float("nan"), float("nan")
    return interval(np.mean, values, n_boot=n_boot)[1:]


def curve_summary(curve: list[dict[str, float]]) -> dict[str, float]:
    """Area under the normalised online curve (mean height, trapezoid over steps) and the
    initial dip (how far below its step-0 value the curve falls, 0 if it never does)."""
    steps = np.array([c["step"] for c in curve], float)
    values = np.array([c["normalised"] for c in curve], float)
    area = float(np.trapezoid(values, steps) / steps[-1]) if steps[-1] > 0 else float(values[0])
    return {"auc": area, "dip": float(max(0.0, values[0] - values.min()))}


def summarise(out: str | Path) -> list[dict[str, Any]]:
    """One row per variant found under `out`: mean normalised return at each evaluation step,
    AUC and dip, each with a bootstrap 95% interval over seeds."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(Path(out).glob("seed*/online/*.json")):
        record = json.loads(path.read_text())
        runs.setdefault(record["variant"], []).append(record)
    rows = []
    for name, records in sorted(runs.items()):
        steps = [c["step"] for c in records[0]["curve"]]
        complete = [r for r in records if [c["step"] for c in r["curve"]] == steps]
        values = np.array([[c["normalised"] for c in r["curve"]] for r in complete])
        extra = [curve_summary(r["curve"]) for r in complete]
        row: dict[str, Any] = {"variant": name, "seeds": len(complete),
                               "minutes_per_run": float(np.mean([r["minutes"] for r in complete]))}
        for j, step in enumerate(steps):
            row[f"step_{step}"] = (float(values[:, j].mean()), *bootstrap_interval(values[:, j]))
        for key in ("auc", "dip"):
            v = np.array([e[key] for e in extra])
            row[key] = (float(v.mean()), *bootstrap_interval(v))
        row["shift_detected"] = sum(r["detector"].get("shifted_at") is not None for r in complete)
        rows.append(row)
    return rows


def paired_differences(out: str | Path, pairs: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
    """For each ``(a, b)`` pair of variants, ``a - b`` per seed (the same offline agent, the same
    evaluation episodes) of the area under the curve and the final normalised return, with
    bootstrap 95% intervals over the seeds both ran."""
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for path in Path(out).glob("seed*/online/*.json"):
        record = json.loads(path.read_text())
        runs[(record["variant"], int(record["config"]["seed"]))] = record
    rows = []
    for a, b in pairs:
        seeds = sorted(s for (v, s) in runs if v == a and (b, s) in runs)
        if not seeds:
            continue
        row: dict[str, Any] = {"pair": f"{a} - {b}", "seeds": len(seeds)}
        for key, value in (("auc", lambda r: curve_summary(r["curve"])["auc"]),
                           ("final", lambda r: r["curve"][-1]["normalised"])):
            d = np.array([value(runs[(a, s)]) - value(runs[(b, s)]) for s in seeds])
            row[key] = (float(d.mean()), *bootstrap_interval(d))
        rows.append(row)
    return rows


def _cell(value: tuple[float, float, float], sign: str = "") -> str:
    """``mean [lo, hi]``; the mean alone where one seed gives no interval."""
    mean, low, high = value
    if np.isnan(low):
        return f"{mean:{sign}.1f} (1 seed)"
    return f"{mean:{sign}.1f} [{low:{sign}.1f}, {high:{sign}.1f}]"


def format_differences(rows: list[dict[str, Any]]) -> str:
    lines = ["| paired difference | seeds | AUC | final normalised return |", "|---|---|---|---|"]
    for r in rows:
        cells = [_cell(r[k], "+") for k in ("auc", "final")]
        lines.append(f"| {r['pair']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: the comparisons DUAL's question asks for, on each environment
QUESTIONS = [(f"uncertainty{s}", f"{b}{s}") for s in ("", "-shift")
             for b in ("none", "noise", "iql", "calql")] + \
    [(f"noise{s}", f"none{s}") for s in ("", "-shift")] + \
    [(f"uncertainty-x0{s}", b) for s in ("", "-shift")  # the one-chain u against both
     for b in (f"uncertainty{s}", f"none{s}")]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`summarise`'s rows: ``mean [lo, hi]`` per cell."""
    if not rows:
        return "(no online runs found)"
    keys = [k for k in rows[0] if k.startswith("step_")] + ["auc", "dip"]
    head = ["variant", "seeds", *[k.replace("step_", "step ") for k in keys], "shift detected",
            "min/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_cell(r[k]) if k in r else "–" for k in keys]
        lines.append(f"| {r['variant']} | {r['seeds']} | " + " | ".join(cells)
                     + f" | {r['shift_detected']}/{r['seeds']} | {r['minutes_per_run']:.1f} |")
    return "\n".join(lines)
