"""``genunc rl offline|online|evaluate``: DUAL from a config (see configs/hopper.yaml)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from genunc.rl.config import load_rl_config


def _configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(args.threads)  # small MLPs: more threads only add contention
    base = list(args.set or [])
    seeds = args.seeds or [None]
    return [load_rl_config(args.config, base + ([f"seed={s}"] if s is not None else []))
            for s in seeds]


def _offline(args: argparse.Namespace) -> int:
    from genunc.rl import run

    for config in _configs(args):
        where = run.offline(config, progress=not args.quiet, force=args.force)
        report = json.loads((where / run.OFFLINE_FILE).read_text())
        post = report["posterior"]
        print(f"seed {config['seed']}: agent in {where} ({report['minutes']:.1f} min); posterior "
              f"over '{post['head']}', prior precision {post['prior_precision']:.4g}; detector "
              f"threshold {report['detector']['threshold']:.3f} at level {report['detector']['level']}")
    return 0


def _online(args: argparse.Namespace) -> int:
    from genunc.rl import run

    for config in _configs(args):
        path = run.online(config, progress=not args.quiet, force=args.force)
        record = json.loads(path.read_text())
        curve = ", ".join(f"{c['step']}: {c['normalised']:.1f}" for c in record["curve"])
        shifted = record["detector"].get("shifted_at")
        print(f"seed {config['seed']} {record['variant']}: normalised return by step {curve}; "
              f"shift detected at {shifted if shifted is not None else 'never'}; "
              f"{record['minutes']:.1f} min -> {path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from genunc.rl import run

    config = load_rl_config(args.config, args.set or [])
    out = args.out or config["out"]
    print(run.format_table(run.summarise(out)))
    differences = run.paired_differences(out, run.QUESTIONS)
    if differences:
        print("\n" + run.format_differences(differences))
    return 0


def add_parser(sub: Any) -> None:
    rl = sub.add_parser(
        "rl", help="DUAL: offline-to-online RL with a diffusion actor and Laplace uncertainty",
        description="Train DUAL offline on a dataset, run it online, summarise the runs.")
    steps = rl.add_subparsers(dest="rl_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", help="YAML RL config (see configs/hopper.yaml)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config entry, e.g. --set online.bonus=none (repeatable)")

    for name, func, text, example in (
        ("offline", _offline, "train the offline agent (behaviour, transition, actor, critics, "
         "posterior, detector)", "genunc rl offline -c configs/hopper.yaml --seeds 0 1 2 3 4"),
        ("online", _online, "run the online phase from the offline agent (trained first if "
         "missing)", "genunc rl online -c configs/hopper.yaml --set online.bonus=none"),
    ):
        p = steps.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                             epilog=f"example: {example}")
        common(p)
        p.add_argument("--seeds", type=int, nargs="+", help="run these seeds in turn (default: "
                       "the config's seed)")
        p.add_argument("--force", action="store_true", help="redo a run that already finished")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the "
                       "networks are small, and parallel seeds use the other cores better)")
        p.set_defaults(func=func)
    ev = steps.add_parser(
        "evaluate", help="table of the online runs under the config's out directory",
        description="Normalised return at each evaluation step, area under the online curve and "
        "initial dip per variant, with bootstrap 95%% intervals over seeds.",
        epilog="example: genunc rl evaluate -c configs/hopper.yaml")
    common(ev)
    ev.add_argument("--out", help="the runs' directory (default: the config's out)")
    ev.set_defaults(func=_evaluate)
