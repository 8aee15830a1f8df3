"""Image scores on the shipped latent digits model (a stock ``DiTPipeline``), through ``from_pipe``,
judged by a network no score reads.

The model: ``genunc/zoo/weights/digits_latent`` (AutoencoderKL 16x16 -> 4x4x4 latents, a
class-conditional DiT, DDPM-trained; ``genunc zoo train digits-latent``), loaded with diffusers'
own ``DiTPipeline.from_pretrained``, sampled with DDIM (eta 0) under the pipeline's
classifier-free guidance, and wrapped with ``ImageUncertaintyPipeline.from_pipe``: every image
is the plain pipeline's.  The posterior is fitted on the head (``proj_out_2``) with the train
digits encoded by the pipeline's VAE.

Protocol (as ``benchmarks/eval_image.py``):

* scores: semantic entropy over the digits *classifier*'s features (in units of the real digits'
  feature SD), exact noise-prediction variability of the guided prediction, pixel variance,
  random (``genunc.scores.random_scores`` over the global sample indices);
* judge: the digits *judge* (an MLP on pixels, used by no score) gives the label "shows the
  requested digit" and the features of FID / precision / recall against all 1,797 real digits;
* validation seed: the variability step window and target are chosen there; the test seed,
  disjoint streams (initial noise per sample from ``genunc.streams``), reports every figure with
  bootstrap 95% intervals; kept sets also as the paired difference to the random score's kept set;
* kept sets: the 80% least uncertain globally, and 80% within each class;
* the one-trajectory semantic score ``semantic_x0`` (``--x0-draws``, default 16; 0 skips it):
  through the same wrapped pipeline, no call beyond the MAP's; its steps (a contiguous window of
  every 5th step, mean of the per-step entropies) chosen by AUROC on the validation seed; on the
  test seed its row, the paired difference to ``semantic``, Spearman with it, its jackknife
  Monte-Carlo error, and its wall time vs a plain pipeline call (and the full semantic score)
  on ``--x0-cost-n`` digits, one run each.

Guidance: under DiTPipeline's default guidance (4) and already at 1.5 the judge sees the requested
digit in ~100% of samples (training.json's quality check), so there is nothing to filter; the
evaluation samples unguided (``--guidance 1``, ~92%), which also makes the label "right digit"
a question about the model rather than about the guidance scale.

Usage:  OMP_NUM_THREADS=1 python benchmarks/eval_latent.py [--n-val 400] [--n-test 1000]
        [--draws 5] [--steps 50] [--guidance 1] [--x0-draws 16] [--x0-cost-n 100]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from protocol import (  # benchmarks/protocol.py
    TEST_SEED,
    VAL_SEED,
    cached,
    choose_x0_steps,
    compare_x0,
    image_selection_table,
    windows,
    x0_grid,
)

from genunc import filtering, streams
from genunc.features import DigitsFeatures
from genunc.pipelines import ImageUncertaintyPipeline
from genunc.research.judges import DigitsJudgeEvaluator
from genunc.scores import variability_score
from genunc.scores.semantic import random_scores
from genunc.zoo.digits import N_CLASSES, load_digits_tensor, split_digits
from genunc.zoo.shipped import LATENT_DIR

SCORES = ("semantic", "variability", "pixel_variance")


def load(args) -> tuple:
    from diffusers import DDIMScheduler, DiTPipeline

    pipe = DiTPipeline.from_pretrained(args.model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    upipe = ImageUncertaintyPipeline.from_pipe(pipe, feature_extractor=DigitsFeatures())
    x, y = split_digits()["train"]
    start = time.perf_counter()
    upipe.fit_posterior(x, class_labels=y, seed=0, progress=False)
    upipe.fit_feature_scale(x)
    return pipe, upipe, time.perf_counter() - start


def run(upipe, out_dir: Path, n: int, seed: int, args) -> SimpleNamespace:
    """Generate and score `n` digits (classes 0..9 in turn) in batches; every sample's initial
    noise comes from its own stream, so the batch size changes nothing.  Cached by everything
    that decides the result."""
    key = (f"{upipe.posterior.digest()[:12]}_n{n}_s{seed}_m{args.draws}_t{args.steps}"
           f"_g{args.guidance:g}")
    return cached(out_dir, key, lambda: _run(upipe, n, seed, args))


def _run(upipe, n: int, seed: int, args) -> dict:
    labels = [i % N_CLASSES for i in range(n)]
    images, scores, per_step = [], {s: [] for s in SCORES}, []
    timesteps = None
    for start in range(0, n, args.batch):
        rows = range(start, min(n, start + args.batch))
        out = upipe(class_labels=[labels[i] for i in rows],
                    generator=streams.sample_generators(seed, "initial_noise", rows),
                    num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="pt",
                    num_draws=args.draws, scores=SCORES, seed=seed, progress=False)
        images.append(out.images * 2 - 1)
        for s in SCORES:
            scores[s].append(np.asarray(out.scores[s]))
        per_step.append(np.asarray(out.variability_per_step["variability"]))
        timesteps = np.asarray(out.variability_timesteps)
    result = {"images": torch.cat(images), "class_labels": np.array(labels),
              "scores": {s: np.concatenate(v) for s, v in scores.items()},
              "per_step": np.concatenate(per_step, axis=1), "timesteps": timesteps}
    result["scores"]["random"] = random_scores(seed, range(n))
    return result


def x0_run(upipe, out_dir: Path, n: int, seed: int, args, x0_steps: list[int]) -> SimpleNamespace:
    """semantic_x0 alone (one pipeline call per batch, the MAP's) at `x0_steps`, cached."""
    key = (f"x0_{upipe.posterior.digest()[:12]}_n{n}_s{seed}_m{args.x0_draws}_t{args.steps}"
           f"_g{args.guidance:g}_" + "-".join(map(str, x0_steps)))
    return cached(out_dir, key, lambda: _x0_run(upipe, n, seed, args, x0_steps))


def _x0_run(upipe, n: int, seed: int, args, x0_steps: list[int]) -> dict:
    labels = [i % N_CLASSES for i in range(n)]
    images, scores, per_step = [], {"semantic_x0": [], "semantic_x0_se": []}, []
    for start in range(0, n, args.batch):
        rows = range(start, min(n, start + args.batch))
        out = upipe(class_labels=[labels[i] for i in rows],
                    generator=streams.sample_generators(seed, "initial_noise", rows),
                    num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="pt",
                    num_draws=args.x0_draws, scores=("semantic_x0",), x0_steps=x0_steps,
                    seed=seed, progress=False)
        images.append(out.images * 2 - 1)
        for s in scores:
            scores[s].append(np.asarray(out.scores[s]))
        per_step.append(out.semantic_x0_per_step)
    return {"images": torch.cat(images), "scores": {s: np.concatenate(v) for s, v in scores.items()},
            "per_step": np.concatenate(per_step, axis=1), "steps": list(x0_steps)}


def x0_cost(pipe, upipe, args, x0_steps: list[int]) -> None:
    """Wall time of a plain pipeline call vs semantic_x0 vs the full semantic score, one run."""
    n = args.x0_cost_n
    labels = [i % N_CLASSES for i in range(n)]
    common = dict(class_labels=labels, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  output_type="pt")
    gen = lambda: streams.sample_generators(TEST_SEED + 1, "initial_noise", range(n))  # noqa: E731
    rows = []
    for label, call in (
        ("plain pipeline call", lambda: pipe(generator=gen(), **common)),
        (f"semantic_x0, M = {args.x0_draws}, steps {x0_steps}",
         lambda: upipe(generator=gen(), num_draws=args.x0_draws, scores=("semantic_x0",),
                       x0_steps=x0_steps, progress=False, **common)),
        (f"semantic (full), M = {args.draws}",
         lambda: upipe(generator=gen(), num_draws=args.draws, scores=("semantic",),
                       progress=False, **common)),
    ):
        start = time.perf_counter()
        call()
        rows.append((label, time.perf_counter() - start))
    print(f"\ncost on {n} digits in one batch, {args.steps} DDIM steps, one run each, 1 thread:")
    print("| method | seconds | x plain |")
    print("|---|---:|---:|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.1f} | {seconds / rows[0][1]:.2f} |")


def windowed(out, alphas_cumprod, rows, target: str) -> np.ndarray:
    return variability_score(out.per_step[rows], out.timesteps[rows], alphas_cumprod, target)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n-val", type=int, default=400)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=1.0,
                        help="DiTPipeline's classifier-free guidance scale (its default, 4, leaves "
                             "nothing to filter on this model: see the module docstring)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument("--out", default="outputs/eval_latent")
    parser.add_argument("--model", default=str(LATENT_DIR), help="a DiTPipeline folder")
    parser.add_argument("--x0-draws", type=int, default=16,
                        help="head draws of the one-trajectory semantic score (0: skip it)")
    parser.add_argument("--x0-cost-n", type=int, default=100,
                        help="digits of its cost table (plain vs semantic_x0 vs semantic; 0: none)")
    args = parser.parse_args()
    begin = time.perf_counter()

    pipe, upipe, fit_seconds = load(args)
    judge = DigitsJudgeEvaluator()
    real = judge.features(load_digits_tensor()[0])
    post = upipe.posterior.summary()
    print(f"model: {Path(args.model).name} (DiTPipeline, {type(pipe.scheduler).__name__} {args.steps} steps, "
          f"guidance {args.guidance:g}); posterior on {upipe.adapter.head_name}: prior precision "
          f"{post['prior_precision']:.4g}, relative perturbation {post['relative_perturbation']:.3%} "
          f"(fit + feature scale {fit_seconds:.0f} s)")

    runs = {}
    for name, seed, n in (("validation", VAL_SEED, args.n_val), ("test", TEST_SEED, args.n_test)):
        start = time.perf_counter()
        out = run(upipe, Path(args.out), n, seed, args)
        wrong = ~judge.agrees(out.images, out.class_labels)
        runs[name] = (out, wrong)
        print(f"{name}: seed {seed}, {n} digits, M = {args.draws}, judge disagrees with {wrong.mean():.1%} "
              f"({time.perf_counter() - start:.0f} s)")

    alphas = pipe.scheduler.alphas_cumprod
    val, val_wrong = runs["validation"]
    table = {(w, t): filtering.auroc(windowed(val, alphas, rows, t), val_wrong)
             for w, rows in windows(args.steps).items() for t in ("noise", "clean")}
    window, target = max(table, key=table.get)
    print("\nvariability on the validation seed, AUROC(judge disagrees) per step window / target:")
    for (wname, tname), value in table.items():
        print(f"  {wname:14s} {tname:5s} {value:.3f}")
    print(f"chosen: {window}, target {target}")

    test, wrong = runs["test"]
    scores = dict(test.scores)
    scores["variability (all steps, noise)"] = scores.pop("variability")
    scores[f"variability ({window}, {target}; val.)"] = windowed(test, alphas, windows(args.steps)[window],
                                                                 target)
    if args.x0_draws:
        grid = x0_grid(args.steps)
        val_x0 = x0_run(upipe, Path(args.out), len(val_wrong), VAL_SEED, args, grid)
        if not torch.allclose(val_x0.images, val.images, atol=1e-4):
            raise SystemExit("semantic_x0's run changed the validation images")
        chosen = choose_x0_steps(val_x0.per_step, val_wrong, grid, args.x0_draws)
        x0 = x0_run(upipe, Path(args.out), len(wrong), TEST_SEED, args, chosen)
        if not torch.allclose(x0.images, test.images, atol=1e-4):
            raise SystemExit("semantic_x0's run changed the test images")
        scores[f"semantic_x0 (M = {args.x0_draws}, steps {chosen}; val.)"] = x0.scores["semantic_x0"]
    scores["random"] = scores.pop("random")
    feats = judge.features(test.images)
    labels = test.class_labels
    print(f"\nTEST seed {TEST_SEED}: {len(wrong)} digits, 95% bootstrap intervals ({args.boot} resamples; "
          f"FID: {args.boot // 5}, basic intervals). Delta: kept set by the score minus kept set by "
          "the random score, paired on the same resamples.")
    image_selection_table(scores, wrong, feats, real, labels, args.keep, args.boot)
    if args.x0_draws:
        compare_x0(args, x0, scores["semantic"], wrong)
        if args.x0_cost_n > 0:
            x0_cost(pipe, upipe, args, chosen)
    print(f"\nwall time {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
