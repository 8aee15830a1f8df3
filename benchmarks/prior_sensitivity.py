"""How much do the scores depend on the prior precision?  One fit, the prior moved over three
decades around the marginal-likelihood value (and DIFF-UQ's fixed prior precision 1).

The curvature is fitted once; :meth:`HeadPosterior.with_prior_precision` moves the prior
without refitting.  Every row generates on the *validation* seed (1000): this is what one would
look at before choosing a prior, not a test-set result.

* ``image``: semantic and exact variability on the digits DDPM; AUROC for "the independent judge
  disagrees" and the judge's agreement among the kept 80%;
* ``molecule``: exact variability on the QM9 model; within-atom-count Spearman with the
  atom-stable fraction and AUROC(invalid);
* ``text``: mutual information on held-out arithmetic prompts; AUROC(wrong) over all candidates
  and within prompt.

Usage:  OMP_NUM_THREADS=1 python benchmarks/prior_sensitivity.py image [--n 200]
        OMP_NUM_THREADS=1 python benchmarks/prior_sensitivity.py molecule [--n 200 --steps 250]
        OMP_NUM_THREADS=1 python benchmarks/prior_sensitivity.py text [--n 400]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from protocol import VAL_SEED  # benchmarks/protocol.py

from genunc import filtering
from genunc.metrics.stats import binned_spearman


def priors(marglik: float) -> list[tuple[float, str]]:
    grid = [(marglik * 10.0**k, "marglik" if k == 0 else f"marglik x 1e{k:+d}") for k in (-2, -1, 0, 1)]
    return sorted(grid + [(1.0, "DIFF-UQ's fixed 1")])


def image_rows(args) -> None:
    from genunc.demos.digits import load_reference_pipeline
    from genunc.research.judges import DigitsJudgeEvaluator

    pipe = load_reference_pipeline(Path(args.out) / "image", progress=False)
    judge = DigitsJudgeEvaluator()
    fitted = pipe.posterior
    print(f"{args.n} digits, seed {VAL_SEED}, M = {args.draws}, {args.steps} DDIM steps")
    print("| prior precision | | log marglik | relative perturbation | AUROC semantic | "
          "AUROC variability | judge agrees, kept 80% by semantic | by variability |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for prior, label in priors(fitted.prior_precision):
        pipe.posterior = fitted.with_prior_precision(prior)
        out = pipe(args.n, num_draws=args.draws, num_inference_steps=args.steps, seed=VAL_SEED,
                   scores=("semantic", "variability"), progress=False)
        good = judge.agrees(out.images, out.class_labels)
        s = pipe.posterior.summary()
        kept = {k: good[filtering.keep_fraction(v, 0.8)].mean() for k, v in out.scores.items()}
        print(f"| {prior:.4g} | {label} | {s['log_marglik']:.1f} | {s['relative_perturbation']:.2%} "
              f"| {filtering.auroc(out.scores['semantic'], ~good):.3f} "
              f"| {filtering.auroc(out.scores['variability'], ~good):.3f} "
              f"| {kept['semantic']:.3f} | {kept['variability']:.3f} |")
    print(f"(all {args.n} digits: judge agrees {good.mean():.3f})")


def molecule_rows(args) -> None:
    from eval_molecules import load_sampler  # benchmarks/eval_molecules.py

    from genunc.data.qm9 import edm_split, load_qm9
    from genunc.metrics.molecule import evaluate_molecules
    from genunc.zoo.shipped import QM9_DIR

    data = load_qm9()
    train = data.subset(edm_split(len(data))["train"])
    pipe = load_sampler(QM9_DIR, Path(args.out) / "molecule", train, 2000)
    fitted = pipe.posterior
    print(f"{args.n} molecules, seed {VAL_SEED}, {args.steps} DDPM steps, exact variability")
    print("| prior precision | | log marglik | relative perturbation | within-size rho(atom st) | "
          "AUROC(invalid) |")
    print("|---:|---|---:|---:|---:|---:|")
    for prior, label in priors(fitted.prior_precision):
        pipe.posterior = fitted.with_prior_precision(prior)
        out = pipe(args.n, num_inference_steps=args.steps, seed=VAL_SEED, scores=("variability",),
                   progress=False)
        report = evaluate_molecules(out.molecules)
        s = pipe.posterior.summary()
        rho, _ = binned_spearman(out.scores["variability"], report.atom_stable_fraction, out.n_atoms,
                                 min_size=20)
        print(f"| {prior:.4g} | {label} | {s['log_marglik']:.1f} | {s['relative_perturbation']:.2%} "
              f"| {rho:+.3f} | {filtering.auroc(out.scores['variability'], ~report.valid):.3f} |")


def text_rows(args) -> None:
    from bestofn_text import load  # benchmarks/bestofn_text.py

    from genunc import streams
    from genunc.pipelines import TextUncertaintyPipeline
    from genunc.sampling.masked import UnmaskingConfig
    from genunc.tasks import ArithmeticTask
    from genunc.zoo.shipped import ARITH_DIR

    spec = TextUncertaintyPipeline.from_pretrained(ARITH_DIR, posterior=None).metadata["task"]
    task = ArithmeticTask(spec["op"], spec["digits"])
    pipe = load(ARITH_DIR, Path(args.out) / "text", task, 4000)
    fitted = pipe.posterior
    test = task.split()["test"]
    test = test[streams.numpy_generator(VAL_SEED, "prompt_order").permutation(len(test))[: args.n]]
    k = 4
    prompts = task.prompts(test).repeat_interleave(k, 0)
    config = UnmaskingConfig("low_confidence", temperature=1.0)
    print(f"{args.n} held-out prompts x {k} candidates, seed {VAL_SEED}, M = {args.draws}")
    print("| prior precision | | log marglik | relative perturbation | AUROC(wrong) MI | "
          "within prompt |")
    print("|---:|---|---:|---:|---:|---:|")
    for prior, label in priors(fitted.prior_precision):
        pipe.posterior = fitted.with_prior_precision(prior)
        out = pipe(prompts, config, num_draws=args.draws, scores=("mutual_information",),
                   seed=VAL_SEED, progress=False)
        wrong = ~task.check(out.tokens)
        mi = out.scores["mutual_information"]
        within = [filtering.auroc(mi[i : i + k], wrong[i : i + k])
                  for i in range(0, len(mi), k) if 0 < wrong[i : i + k].sum() < k]
        s = pipe.posterior.summary()
        print(f"| {prior:.4g} | {label} | {s['log_marglik']:.1f} | {s['relative_perturbation']:.2%} "
              f"| {filtering.auroc(mi, wrong):.3f} | {np.mean(within):.3f} ({len(within)} prompts) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("modality", choices=["image", "molecule", "text"])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="default: 50 (image), 250 (molecule)")
    parser.add_argument("--out", default="outputs/prior_sensitivity")
    args = parser.parse_args()
    args.steps = args.steps or (250 if args.modality == "molecule" else 50)
    tic = time.perf_counter()
    {"image": image_rows, "molecule": molecule_rows, "text": text_rows}[args.modality](args)
    print(f"({time.perf_counter() - tic:.0f} s)")


if __name__ == "__main__":
    main()
