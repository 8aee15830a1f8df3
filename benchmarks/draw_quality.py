"""Do a text model's posterior draws keep its quality?  MAP vs draw accuracy by fit size.

A Laplace head posterior whose draws generate much worse answers than the MAP makes every
posterior score (mutual information, semantic) a measure of damage rather than of doubt.  For
each training-set size the posterior is fitted on the first ``n`` training problems (prior
precision by marginal likelihood, as everywhere), then ``--prompts`` test prompts are completed
by the MAP and by each of ``--draws`` head draws from the same sampler randomness (the semantic
score's trajectories, greedy low-confidence unmasking).  Prints the prior, how far a draw moves
the head, MAP accuracy and the draws' mean / min / max accuracy.

Usage:  OMP_NUM_THREADS=1 python benchmarks/draw_quality.py [--task sort] [--fits 200 2000]
            [--prompts 200] [--draws 8] [--tail 1 [--structure lowrank --rank 32]
            [--predictive linearised]]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from bestofn_text import MODELS, load  # benchmarks/bestofn_text.py
from protocol import TEST_SEED  # benchmarks/protocol.py

from genunc import streams
from genunc.pipelines import TextUncertaintyPipeline
from genunc.sampling.masked import UnmaskingConfig
from genunc.tasks import task_from_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--task", default="sort", choices=sorted(MODELS))
    parser.add_argument("--fits", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--tail", type=int, help="a posterior over the last TAIL blocks (default: head)")
    parser.add_argument("--structure", default="diag", choices=["diag", "lowrank"],
                        help="the block posterior's structure")
    parser.add_argument("--rank", type=int, default=32, help="eigenpairs of a lowrank posterior")
    parser.add_argument("--predictive", default="sample", choices=["sample", "linearised"],
                        help="how block draws act (re-run at the drawn weights, or linearised)")
    parser.add_argument("--out", default="outputs/draw_quality")
    args = parser.parse_args()
    model = MODELS[args.task]
    task = task_from_spec(TextUncertaintyPipeline.from_pretrained(model, posterior=None)
                          .metadata["task"])
    test = task.split()["test"]
    rng = streams.numpy_generator(TEST_SEED, "prompt_order", 0)
    problems = test[rng.choice(len(test), min(args.prompts, len(test)), replace=False)]
    scope = "the head" if args.tail is None else f"the last {args.tail} block(s), {args.structure}" + (
        f" rank {args.rank}" if args.structure == "lowrank" else "") + (
        f", {args.predictive} draws" if args.tail is not None else "")
    print(f"{args.task}: {len(problems)} test prompts, {args.draws} draws, test seed {TEST_SEED}, "
          f"posterior over {scope}")
    print("| fitted on | prior precision | a draw moves the weights | MAP accuracy | draws: mean "
          "| min | max |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n_fit in args.fits:
        pipe = load(model, Path(args.out) / f"{args.task}_n{n_fit}", task, n_fit, tail=args.tail,
                    structure=args.structure, rank=args.rank)
        if args.tail is not None:
            pipe.posterior.predictive = args.predictive
        out = pipe(task.prompts(problems), UnmaskingConfig("low_confidence"), num_draws=args.draws,
                   scores=("semantic",), seed=TEST_SEED, progress=False)
        draws = np.array([task.check(d).mean() for d in out.draw_tokens])
        summary = pipe.posterior.summary()
        print(f"| {n_fit} | {summary['prior_precision']:.1f} | {summary['relative_perturbation']:.0%} "
              f"| {task.check(out.tokens).mean():.1%} | {draws.mean():.1%} | {draws.min():.1%} "
              f"| {draws.max():.1%} |")


if __name__ == "__main__":
    main()
