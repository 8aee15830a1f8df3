"""Wall time of one `genunc generate` run in 1 process vs 2 (torchrun), and whether the exports
agree.  One run each, the posterior fitted beforehand (so both time generation alone).

Usage:  python benchmarks/scale_out.py [--config configs/digits.yaml] [--n 128] [--threads 1]

Each process gets ``--threads`` CPU threads; on this 2-core machine 2 processes x 1 thread use
the cores a 1-process run with 1 thread leaves idle, so the ratio shows what sharding buys where
one process does not fill the machine.  GPU recipe (one GPU per process):
``torchrun --standalone --nproc_per_node <GPUs> -m genunc generate -c <config> --set device=cuda``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from genunc.export import Export


def run(command: list[str], threads: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--n", type=int, default=128, help="samples")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sets = ["--set", f"generate.n_samples={args.n}", "--set", "quality=null"]
        genunc = [sys.executable, "-m", "genunc"]
        run([*genunc, "fit", "-c", args.config, *sets], args.threads)
        one, two = Path(tmp) / "one", Path(tmp) / "two"
        t1 = run([*genunc, "generate", "-c", args.config, *sets, "--set", f"generate.out={one}"],
                 args.threads)
        t2 = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                  "2", "-m", "genunc", "generate", "-c", args.config, *sets, "--set",
                  f"generate.out={two}"], args.threads)
        a, b = Export(one), Export(two)
        scores = [k for k in a.records[0] if k in ("semantic", "variability", "mutual_information")]
        worst = max(float(np.max(np.abs(a.column(k) - b.column(k)) / (np.abs(a.column(k)) + 1e-12)))
                    for k in scores)
    print(f"{args.config}, {args.n} samples, {args.threads} thread(s) per process, one run each")
    print("| processes | seconds (incl. start-up) | x 1 process |")
    print("|---:|---:|---:|")
    print(f"| 1 | {t1:.1f} | 1.00 |")
    print(f"| 2 | {t2:.1f} | {t2 / t1:.2f} |")
    print(f"merged export vs 1-process export: {len(b)} of {len(a)} samples, largest relative score "
          f"difference {worst:.1e} ({', '.join(scores)})")


if __name__ == "__main__":
    main()
