"""The paper's protocol at small scale, on the shipped digits DDPM.

Jazbec et al. (UAI 2025) generate N samples, keep the least uncertain share and compare FID /
precision / recall of the kept set against a random subset of the same size.  Here:

1. generate N digits (MAP + M head-draw generations from the same x_T, DDIM eta = 0), scoring
   each with semantic entropy, noise-prediction variability, pixel variance and random;
2. for each score keep the 80% least uncertain; report feature-space FID, precision, recall
   (digits-classifier features, against all 1,797 real digits) and the share of samples whose
   class the classifier confirms; random keeps are averaged over 10 seeds;
3. cost, in one run on a subset: wall time of plain generation, variability, full semantic,
   branched semantic (draws fork at 50% / 80% of the steps) and fewer draw steps, with the
   Spearman correlation of each cheap semantic variant against the full-cost score.

Usage:  python benchmarks/eval_image.py [--n 2000] [--draws 5] [--steps 50] [--cost-n 128]
        [--variants]  (also filter by the cheap semantic variants; --cost-n 0 skips the cost table)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from genunc import filtering
from genunc.demos.digits import class_agreement, load_reference_pipeline
from genunc.features import extract_in_batches
from genunc.metrics.image import frechet_distance, precision_recall
from genunc.zoo.digits import load_digits_tensor


def quality_row(name, feats, real, correct, idx):
    fid = frechet_distance(real, feats[idx])
    precision, recall = precision_recall(real, feats[idx])
    return name, fid, precision, recall, float(correct[idx].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--cost-n", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/eval_image")
    parser.add_argument("--cost-only", action="store_true", help="skip the filtering table")
    parser.add_argument("--variants", action="store_true",
                        help="also filter by the cheap semantic variants (branch at 50%%, draws "
                             "with a fifth of the steps): what their kept sets are worth")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    pipe = load_reference_pipeline(args.out, progress=False)
    extractor = pipe.feature_extractor
    if not args.cost_only:
        filtering_table(pipe, extractor, args)
    if args.cost_n > 0:
        cost_table(pipe, args)


def cheap_variants(steps: int) -> list[tuple[str, dict[str, int]]]:
    """The cost reductions beyond the paper, as pipeline keyword arguments."""
    return [("semantic, branch at 50%", dict(branch_at=steps // 2)),
            ("semantic, branch at 80%", dict(branch_at=int(steps * 0.8))),
            (f"semantic, scored with {steps // 5} steps", dict(score_steps=steps // 5))]


def filtering_table(pipe, extractor, args) -> None:
    real = extract_in_batches(extractor, load_digits_tensor()[0]).numpy()
    out = pipe(args.n, num_draws=args.draws, num_inference_steps=args.steps, seed=args.seed,
               scores=("semantic", "variability", "pixel_variance", "random"))
    feats = extract_in_batches(extractor, out.images).numpy()
    _, correct = class_agreement(extractor, out.images, out.class_labels)
    rows = [quality_row("all samples (100%)", feats, real, correct, np.arange(args.n))]
    for name in ("semantic", "variability", "pixel_variance"):
        rows.append(quality_row(f"keep {args.keep:.0%} by {name}", feats, real, correct,
                                filtering.keep_fraction(out.scores[name], args.keep)))
    if args.variants:  # each variant's own run: same seed, so the same MAP digits
        for name, kwargs in cheap_variants(args.steps)[::2]:
            res = pipe(args.n, num_draws=args.draws, num_inference_steps=args.steps,
                       seed=args.seed, scores=("semantic",), **kwargs)
            v_feats = extract_in_batches(extractor, res.images).numpy()
            _, v_correct = class_agreement(extractor, res.images, res.class_labels)
            rows.append(quality_row(f"keep {args.keep:.0%} by {name}", v_feats, real,
                                    v_correct, filtering.keep_fraction(res.scores["semantic"],
                                                                       args.keep)))
    rand = [quality_row("", feats, real, correct,
                        filtering.keep_fraction(np.random.default_rng(s).random(args.n), args.keep))
            for s in range(10)]
    rows.append((f"keep {args.keep:.0%} at random (10 seeds)", *np.mean([r[1:] for r in rand], 0)))
    rand_fid = np.array([r[1] for r in rand])

    print(f"\n{args.n} digits, M = {args.draws}, {args.steps} DDIM steps, seed {args.seed}; "
          f"features: digits classifier (64-d); reference: 1,797 real digits")
    print(f"{'selection':<44}{'FID':>9}{'precision':>11}{'recall':>9}{'class ok':>10}")
    for name, fid, p, r, ok in rows:
        print(f"{name:<44}{fid:>9.3f}{p:>11.3f}{r:>9.3f}{ok:>10.1%}")
    print(f"random-keep FID spread over 10 seeds: {rand_fid.mean():.3f} +- {rand_fid.std():.3f}")
    print(f"\n{'score':<16}{'AUROC(class wrong)':>20}")
    for name in ("semantic", "variability", "pixel_variance", "random"):
        print(f"{name:<16}{filtering.auroc(out.scores[name], ~correct):>20.3f}")



def cost_table(pipe, args) -> None:
    n = args.cost_n
    common = dict(num_draws=args.draws, num_inference_steps=args.steps, seed=args.seed + 1,
                  progress=False)

    def timed(**kwargs):
        start = time.perf_counter()
        result = pipe(n, **common, **kwargs)
        return time.perf_counter() - start, result

    t_plain, _ = timed(scores=("random",))
    t_var, var_out = timed(scores=("variability",))
    t_full, full = timed(scores=("semantic",))
    variants = cheap_variants(args.steps)
    print(f"\ncost on {n} samples (same run, CPU, {torch.get_num_threads()} threads):")
    print(f"{'method':<34}{'seconds':>9}{'x plain':>9}{'Spearman vs full':>18}")
    print(f"{'plain generation':<34}{t_plain:>9.1f}{1.0:>9.2f}{'':>18}")
    print(f"{'variability (M heads per step)':<34}{t_var:>9.1f}{t_var / t_plain:>9.2f}"
          f"{filtering.spearman(var_out.scores['variability'], full.scores['semantic']):>18.3f}")
    print(f"{'semantic, full (paper)':<34}{t_full:>9.1f}{t_full / t_plain:>9.2f}{1.0:>18.3f}")
    for name, kwargs in variants:
        t, res = timed(scores=("semantic",), **kwargs)
        rho = filtering.spearman(res.scores["semantic"], full.scores["semantic"])
        print(f"{name:<34}{t:>9.1f}{t / t_plain:>9.2f}{rho:>18.3f}")


if __name__ == "__main__":
    main()
