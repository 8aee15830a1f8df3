"""Head posterior vs block posterior on the *same* test digits, paired.

``eval_image.py`` caches each test run under its ``--out``; the MAP generations do not depend on
the posterior (same streams), so the first N digits of a head run and of a ``--tail`` run are
the same digits with the same judge labels.  This prints each score's AUROC (judge disagrees)
under both posteriors and the paired bootstrap interval of the difference.

Usage:  python benchmarks/compare_scopes.py --head outputs/eval_image --tail outputs/eval_tail
        [--n 500] [--seed 2000] [--steps 50]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from protocol import TEST_SEED  # benchmarks/protocol.py
from scipy.stats import spearmanr

from genunc import filtering
from genunc.metrics.stats import bootstrap_interval
from genunc.research.judges import DigitsJudgeEvaluator


def load_run(folder: Path, seed: int, steps: int, n: int) -> dict:
    """The smallest cached test run in `folder` with at least `n` digits."""
    runs = []
    for path in folder.glob(f"run_*_s{seed}_*_t{steps}*.pt"):
        size = int(path.name.split("_n")[1].split("_")[0])
        if size >= n and "branch_at" not in path.name and "score_steps" not in path.name:
            runs.append((size, path))
    if not runs:
        raise SystemExit(f"no cached test run of >= {n} digits (seed {seed}, {steps} steps) in {folder}")
    return torch.load(min(runs)[1], weights_only=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--head", type=Path, required=True, help="eval_image --out of the head run")
    parser.add_argument("--tail", type=Path, required=True, help="eval_image --out of the --tail run")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=TEST_SEED)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--boot", type=int, default=1000)
    args = parser.parse_args()
    head, tail = (load_run(f, args.seed, args.steps, args.n) for f in (args.head, args.tail))
    n = args.n
    gap = float((head["images"][:n] - tail["images"][:n]).abs().max())
    if gap > 1e-3:
        raise SystemExit(f"the two runs' MAP images differ (max {gap:.2g}): not the same digits")
    judge = DigitsJudgeEvaluator()
    wrong = ~judge.agrees(tail["images"][:n], tail["class_labels"][:n])
    print(f"{n} test digits (seed {args.seed}), the same MAP images in both runs (max difference "
          f"{gap:.1g}), judge disagrees with {wrong.mean():.1%}; {args.boot} paired resamples")
    print("| score | AUROC, head posterior | AUROC, block posterior | difference | Spearman(head, block) |")
    print("|---|---|---|---|---:|")
    for name in ("semantic", "pixel_variance", "variability"):
        h = np.asarray(head["scores"][name])[:n]
        t = np.asarray(tail["scores"][name])[:n]
        ah = bootstrap_interval(filtering.auroc, h, wrong, n_boot=args.boot)
        at = bootstrap_interval(filtering.auroc, t, wrong, n_boot=args.boot)
        diff = bootstrap_interval(lambda a, b, w: filtering.auroc(b, w) - filtering.auroc(a, w),
                                  h, t, wrong, n_boot=args.boot)
        print(f"| {name} | {ah[0]:.3f} [{ah[1]:.3f}, {ah[2]:.3f}] | {at[0]:.3f} [{at[1]:.3f}, "
              f"{at[2]:.3f}] | {diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}] | "
              f"{spearmanr(h, t)[0]:.3f} |")


if __name__ == "__main__":
    main()
