"""Image scores on the shipped digits DDPM, judged by a network no score reads.

Protocol (docs/results.md, "How the numbers are made"):

* scores: semantic entropy over the digits *classifier*'s features (in units of the real digits'
  feature SD), exact noise-prediction variability, pixel variance, random;
* judge: the digits *judge*, an MLP on pixels (another architecture and seed, trained on real
  digits, used by no score) gives the quality label ("shows the requested digit") and the
  features of FID / precision / recall against all 1,797 real digits;
* validation seed: the variability step window and target are chosen there (by AUROC for
  "judge disagrees"); the test seed, disjoint streams, reports every figure, with bootstrap 95%
  intervals over the test samples (percentile, 1,000 resamples); kept sets also as the paired
  difference to the random score's kept set on the same resamples (FID: 200 resamples; a
  resample's FID is biased upwards, the difference much less);
* kept sets: the 80% least uncertain globally, and 80% within each class (the class mix fixed);
* cost (``--cost-n``): exact vs Monte-Carlo variability on the same samples, and the Monte-Carlo
  score's rank agreement with the exact one;
* the one-trajectory semantic score ``semantic_x0`` (``--x0-draws``, default 16; 0 skips it):
  its steps (a contiguous window of a grid of every 5th step, mean of the per-step entropies)
  chosen by AUROC on the validation seed, then a test-seed run at those steps: its row in the
  table, the paired difference to ``semantic`` (AUROC, judge agrees among the kept 80%) with
  bootstrap intervals, Spearman with it, its jackknife Monte-Carlo error, and its wall time vs
  plain generation (and vs the full semantic score) on ``--x0-cost-n`` digits, one run each.

Usage:  OMP_NUM_THREADS=1 python benchmarks/eval_image.py [--n-val 300] [--n-test 900]
        [--draws 5] [--steps 50] [--cost-n 64] [--tail 1 [--predictive linearised]]
        [--x0-draws 16] [--x0-cost-n 64]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from protocol import (  # benchmarks/protocol.py
    TEST_SEED,
    VAL_SEED,
    cached,
    choose_x0_steps,
    compare_x0,
    fmt,
    image_selection_table,
    windowed_variability,
    windows,
    x0_grid,
)

from genunc import filtering
from genunc.demos.digits import load_reference_pipeline
from genunc.metrics.stats import bootstrap_interval, spearman
from genunc.research.judges import DigitsJudgeEvaluator
from genunc.zoo.digits import load_digits_tensor

SCORES = ("semantic", "variability", "pixel_variance", "random")


def cheap_variants(steps: int) -> dict[str, dict[str, int]]:
    """The semantic score's cost reductions, as pipeline arguments."""
    return {"branch": {"branch_at": steps // 2}, "score_steps": {"score_steps": steps // 5}}


def cached_run(pipe, out_dir: Path, n: int, seed: int, args, scores=SCORES, **extra):
    """Generate and score (or reload what an identical earlier run saved): images, labels,
    scores and per-step variability, keyed by everything that decides them."""
    key = f"{pipe.posterior.digest()[:12]}_n{n}_s{seed}_m{args.draws}_t{args.steps}"
    key += "".join(f"_{k}{v}" for k, v in sorted(extra.items()))

    def make() -> dict:
        out = pipe(n, num_draws=args.draws, num_inference_steps=args.steps, seed=seed,
                   scores=scores, progress=False, **extra)
        return {k: getattr(out, k) for k in ("images", "class_labels", "scores",
                                             "variability_per_step", "variability_timesteps",
                                             "draw_images")}

    return cached(out_dir, key, make)


def choose_variability(pipe, val, wrong: np.ndarray, steps: int) -> tuple[str, str, dict]:
    table = {}
    for wname, rows in windows(steps).items():
        for target in ("noise", "clean"):
            values = windowed_variability(val, pipe.adapter.alphas_cumprod, rows, target)
            table[(wname, target)] = filtering.auroc(values, wrong)
    best = max(table, key=table.get)
    return best[0], best[1], table



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n-val", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=900)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument("--cost-n", type=int, default=64)
    parser.add_argument("--out", default="outputs/eval_image")
    parser.add_argument("--tail", type=int, default=None,
                        help="a posterior over the last TAIL up-blocks and the head (Monte-Carlo "
                        "variability over the draws); use another --out")
    parser.add_argument("--predictive", default="sample", choices=["sample", "linearised"],
                        help="with --tail: how block draws act (re-run at the drawn weights, or "
                        "the block's linearisation); use another --out")
    parser.add_argument("--variant", action="append", choices=["branch", "score_steps"], default=[],
                        help="also score the test digits with a cheap semantic variant (repeatable)")
    parser.add_argument("--x0-draws", type=int, default=16,
                        help="head draws of the one-trajectory semantic score (0: skip it)")
    parser.add_argument("--x0-cost-n", type=int, default=64,
                        help="digits of its cost table (plain vs semantic_x0 vs semantic; 0: none)")
    args = parser.parse_args()

    pipe = load_reference_pipeline(args.out, progress=False, tail=args.tail)
    if args.tail:
        pipe.posterior.predictive = args.predictive
    # a block posterior has no closed-form variance: variability over the M draws
    tail_extra = {"variance": "monte_carlo", "keep_draw_images": True} if args.tail else {}
    judge = DigitsJudgeEvaluator()
    real = judge.features(load_digits_tensor()[0])
    post = pipe.posterior.summary()
    print(f"posterior: prior precision {post['prior_precision']:.4g}, relative perturbation "
          f"{post['relative_perturbation']:.3%}")

    runs = {}
    for name, seed, n in (("validation", VAL_SEED, args.n_val), ("test", TEST_SEED, args.n_test)):
        start = time.perf_counter()
        out = cached_run(pipe, Path(args.out), n, seed, args, **tail_extra)
        wrong = ~judge.agrees(out.images, out.class_labels)
        runs[name] = (out, wrong)
        print(f"{name}: seed {seed}, {n} digits, judge disagrees with {wrong.mean():.1%} "
              f"({time.perf_counter() - start:.0f} s)")

    val, val_wrong = runs["validation"]
    window, target, table = choose_variability(pipe, val, val_wrong, args.steps)
    print("\nvariability on the validation seed, AUROC(judge disagrees) per step window / target:")
    for (wname, tname), value in table.items():
        print(f"  {wname:14s} {tname:5s} {value:.3f}")
    print(f"chosen: {window}, target {target}")

    test, wrong = runs["test"]
    if getattr(test, "draw_images", None) is not None:  # do perturbed models keep MAP quality?
        draws_agree = [judge.agrees(d, test.class_labels).mean() for d in test.draw_images]
        print(f"\njudge agrees with the MAP generations {1 - wrong.mean():.1%}, with the "
              f"{len(draws_agree)} posterior draws' generations {np.mean(draws_agree):.1%} "
              f"(worst draw {min(draws_agree):.1%})")
    scores = {k: v for k, v in test.scores.items() if not k.endswith("_se")}  # not scores
    scores["variability (paper: all steps, noise)"] = scores.pop("variability")
    scores[f"variability ({window}, {target}; val.)"] = windowed_variability(
        test, pipe.adapter.alphas_cumprod, windows(args.steps)[window], target)
    feats = judge.features(test.images)
    labels = test.class_labels.numpy()
    good = ~wrong
    print(f"\nTEST seed {TEST_SEED}: {len(wrong)} digits, 95% bootstrap intervals ({args.boot} resamples)")
    print("Delta: kept set by the score minus kept set by the random score, paired on the same "
          "bootstrap resamples (a FID of a resample is biased upwards; the difference much less). "
          "FID intervals are basic bootstrap intervals (reflected about the estimate), "
          f"{args.boot // 5} resamples.")
    if args.x0_draws:
        x0_name, x0 = semantic_x0_rows(pipe, args, runs, judge, tail_extra)
        scores = {**{k: v for k, v in scores.items() if k != "random"}, x0_name: x0.scores[
            "semantic_x0"], "random": scores["random"]}
    image_selection_table(scores, wrong, feats, real, labels, args.keep, args.boot)
    if args.x0_draws:
        compare_x0(args, x0, scores["semantic"], wrong)
        if args.x0_cost_n > 0:
            x0_cost(pipe, args, x0.steps, tail_extra)
    if args.tail and (args.variant or args.cost_n > 0):
        print("(variants and the cost table are for head posteriors: skipped with --tail)")
        return
    if args.variant:
        variants_table(pipe, args, test, good, scores["random"])
    if args.cost_n > 0:
        cost_table(pipe, args)


def x0_run(pipe, out_dir: Path, n: int, seed: int, args, x0_steps: list[int], tail_extra):
    """semantic_x0 alone (no perturbed generations) with ``--x0-draws`` draws at `x0_steps`,
    cached like :func:`cached_run`; the per-step entropies come back too."""
    key = (f"x0_{pipe.posterior.digest()[:12]}_n{n}_s{seed}_m{args.x0_draws}_t{args.steps}_"
           + "-".join(map(str, x0_steps)))

    def make() -> dict:
        out = pipe(n, num_draws=args.x0_draws, num_inference_steps=args.steps, seed=seed,
                   scores=("semantic_x0",), x0_steps=x0_steps, progress=False,
                   **{k: v for k, v in tail_extra.items() if k == "variance"})
        return {"images": out.images, "scores": out.scores, "per_step": out.semantic_x0_per_step,
                "steps": list(x0_steps)}

    return cached(out_dir, key, make)


def semantic_x0_rows(pipe, args, runs, judge, tail_extra):
    """Choose semantic_x0's steps on the validation seed (a contiguous window of the grid, mean
    of the per-step entropies, by AUROC for "judge disagrees"), then score the test digits at
    those steps.  Returns the test row's name and run."""
    grid = x0_grid(args.steps)
    val_out, val_wrong = runs["validation"]
    val = x0_run(pipe, Path(args.out), len(val_wrong), VAL_SEED, args, grid, tail_extra)
    if not torch.allclose(val.images, val_out.images, atol=1e-4):
        raise SystemExit("semantic_x0's run changed the validation images")
    chosen = choose_x0_steps(val.per_step, val_wrong, grid, args.x0_draws)
    test_out, _ = runs["test"]
    test = x0_run(pipe, Path(args.out), len(runs["test"][1]), TEST_SEED, args, chosen, tail_extra)
    if not torch.allclose(test.images, test_out.images, atol=1e-4):
        raise SystemExit("semantic_x0's run changed the test images")
    return f"semantic_x0 (M = {args.x0_draws}, steps {chosen}; val.)", test


def x0_cost(pipe, args, x0_steps: list[int], tail_extra) -> None:
    """Wall time of semantic_x0 vs plain generation (and the full semantic score), one run."""
    n = args.x0_cost_n
    kwargs = dict(num_inference_steps=args.steps, seed=TEST_SEED + 1, progress=False)
    rows = []
    for label, call in (
        ("plain generation", dict(scores=("random",), num_draws=0)),
        (f"semantic_x0, M = {args.x0_draws}, steps {x0_steps}",
         dict(scores=("semantic_x0",), num_draws=args.x0_draws, x0_steps=x0_steps)),
        (f"semantic (full), M = {args.draws}", dict(scores=("semantic",), num_draws=args.draws)),
    ):
        start = time.perf_counter()
        pipe(n, **call, **kwargs)
        rows.append((label, time.perf_counter() - start))
    print(f"\ncost on {n} digits, {args.steps} DDIM steps, one run each, 1 thread:")
    print("| method | seconds | x plain |")
    print("|---|---:|---:|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.1f} | {seconds / rows[0][1]:.2f} |")


def variants_table(pipe, args, test, good, rand) -> None:
    """The cheap semantic variants on the same test digits: what their kept sets are worth."""
    steps = args.steps
    labels = {"branch": f"semantic, draws branch off at step {steps // 2} of {steps}",
              "score_steps": f"semantic, scored on {steps // 5}-step generations (score_steps)"}
    print(f"\ncheap semantic variants, test seed {TEST_SEED}, the same digits (rows: Spearman with "
          f"the full semantic score, AUROC, judge agrees among kept 80%, Delta vs random)")
    keep_g = lambda s: filtering.keep_fraction(s, args.keep)  # noqa: E731
    for name in args.variant:
        start = time.perf_counter()
        out = cached_run(pipe, Path(args.out), len(good), TEST_SEED, args, scores=("semantic",),
                         **cheap_variants(steps)[name])
        values = out.scores["semantic"]
        auroc = bootstrap_interval(filtering.auroc, values, ~good, n_boot=args.boot)
        d_agree = bootstrap_interval(lambda s, q, g: g[keep_g(s)].mean() - g[keep_g(q)].mean(),
                                     values, rand, good, n_boot=args.boot)
        print(f"| {labels[name]} | {spearman(values, test.scores['semantic']):.3f} | {fmt(*auroc)} "
              f"| {good[keep_g(values)].mean():.3f} | {fmt(*d_agree)} | "
              f"({time.perf_counter() - start:.0f} s) |")


def cost_table(pipe, args) -> None:
    n, steps = args.cost_n, args.steps
    kwargs = dict(num_inference_steps=steps, seed=TEST_SEED + 1, progress=False)
    rows = []
    for label, call in (
        ("plain generation", dict(scores=("random",), num_draws=0)),
        ("variability, exact", dict(scores=("variability",), num_draws=0)),
        (f"variability, Monte Carlo M = {args.draws}",
         dict(scores=("variability",), num_draws=args.draws, variance="monte_carlo")),
    ):
        start = time.perf_counter()
        out = pipe(n, **call, **kwargs)
        rows.append((label, time.perf_counter() - start, out))
    base = rows[0][1]
    exact = rows[1][2].scores["variability"]
    print(f"\ncost on {n} digits, {steps} DDIM steps, one run:")
    print("| method | seconds | x plain | Spearman vs exact |")
    print("|---|---:|---:|---:|")
    for label, seconds, out in rows:
        rho = "" if label == "plain generation" else f"{spearman(out.scores['variability'], exact):.3f}"
        print(f"| {label} | {seconds:.1f} | {seconds / base:.2f} | {rho} |")
    # Monte-Carlo noise: independent 5-draw sets (other seeds give other head draws)
    rhos = []
    for s in range(3):
        mc = pipe(n, scores=("variability",), num_draws=args.draws, variance="monte_carlo",
                  num_inference_steps=steps, seed=TEST_SEED + 10 + s, progress=False)
        ex = pipe(n, scores=("variability",), num_draws=0, num_inference_steps=steps,
                  seed=TEST_SEED + 10 + s, progress=False)
        rhos.append(spearman(mc.scores["variability"], ex.scores["variability"]))
    print(f"Spearman(Monte Carlo M = {args.draws}, exact) over 3 further seeds: "
          f"{', '.join(f'{r:.3f}' for r in rhos)}")


if __name__ == "__main__":
    main()
