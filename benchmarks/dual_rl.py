"""DUAL's online benchmark: every seed x variant of one config, resumable, then the table.

    python benchmarks/dual_rl.py -c configs/pendulum.yaml --seeds 0 1 2 3 4 \
        --variants uncertainty none noise --shift attributes.m=1.5 --jobs 2

For each seed the offline agent is trained once (``genunc rl offline``); each variant is one
online run from it (``genunc rl online``): ``uncertainty`` (DUAL), ``none`` (beta = 0, the same
agent without the epistemic term), ``noise`` (a random bonus of the uncertainty's scale), each
on the standard environment and, with ``--shift``, on the dynamics-shifted one.  Finished runs
are cached under the config's ``out`` and never redone, so an interrupted benchmark resumes;
d3rlpy baselines (``benchmarks/rl_baselines.py``) write into the same folder and appear in the
same table.  Tune on seeds you do not report (e.g. ``--seeds 100``), report on 0-4.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor


def _run_seed(config_path: str, overrides: list[str], seed: int, variants: list[str],
              shift: str | None) -> str:
    import torch

    from genunc.rl import run
    from genunc.rl.config import load_rl_config

    torch.set_num_threads(1)
    lines = []
    for shifted in ([None, shift] if shift else [None]):
        for name in variants:
            sets = [*overrides, f"seed={seed}", f"online.bonus={name}"]
            sets += [f"env.shift={shifted}"] if shifted else []
            config = load_rl_config(config_path, sets)
            t0 = time.perf_counter()
            path = run.online(config, progress=False)
            lines.append(f"seed {seed} {run.variant(config)}: {time.perf_counter() - t0:.0f} s -> {path}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=["uncertainty", "none", "noise"],
                        choices=["uncertainty", "none", "noise"])
    parser.add_argument("--shift", help="also run on this shifted environment, e.g. "
                        "body_mass.torso=1.5")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes")
    args = parser.parse_args()

    from genunc.rl import run
    from genunc.rl.config import load_rl_config

    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(_run_seed, args.config, args.set, s, args.variants, args.shift)
                   for s in args.seeds]
        for future in futures:
            print(future.result(), flush=True)
    config = load_rl_config(args.config, args.set)
    print(f"\n{len(args.seeds)} seeds in {(time.perf_counter() - t0) / 60:.1f} min; "
          f"normalised return (100 = best behaviour checkpoint, 0 = random policy), mean over seeds "
          f"[bootstrap 95% interval]:\n")
    print(run.format_table(run.summarise(config["out"])))


if __name__ == "__main__":
    main()
