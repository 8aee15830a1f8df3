"""Head posterior vs block posterior on a text task: the same prompts and candidates, paired.

For the task's shipped model: N candidates per held-out prompt (low-confidence unmasking at token
temperature 1, the best-of-N setting of ``bestofn_text.py`` / ``unmasking_orders.py``), scored
once with the head posterior and once with a posterior over the last ``--tail`` transformer
blocks + final norm + head (both fitted on the train split, prior precision by marginal
likelihood).  The MAP candidates do not depend on the posterior (same streams), which is checked,
so each score's AUROC(wrong), within-prompt AUROC and best-of-N accuracy are compared on the
same candidates, with paired bootstrap intervals over prompts of the difference block - head.
Cost: plain sampling, and sampling with each posterior's mutual information, on the same
prompts (median of ``--repeats`` timed calls after a warm-up; CPU).

Usage:  python benchmarks/compare_scopes_text.py --task sudoku4 [--prompts 200] [--n 8]
            [--draws 8] [--tail 1] [--structure diag|lowrank --rank 32]
            [--predictive sample|linearised] [--boot 1000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from bestofn_text import (  # benchmarks/bestofn_text.py
    MODELS,
    _ci,
    auroc_wrong,
    best_of_n,
    load,
    mixed_prompts,
    within_prompt_auroc,
)
from protocol import TEST_SEED, timed  # benchmarks/protocol.py

from genunc import streams
from genunc.metrics.stats import bootstrap_interval
from genunc.pipelines import TextUncertaintyPipeline
from genunc.sampling.masked import UnmaskingConfig
from genunc.tasks import task_from_spec

SCORES = ("mutual_information", "mutual_information_max", "low_posterior_confidence")
BASELINES = ("low_confidence", "random")


def _signed(interval: tuple[float, float, float], pct: bool = False) -> str:
    est, low, high = interval
    if pct:
        return f"{est:+.1%} [{low:+.1%}, {high:+.1%}]"
    return f"{est:+.3f} [{low:+.3f}, {high:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--task", choices=sorted(MODELS), default="sudoku4")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--n", type=int, default=8, help="candidates per prompt")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--tail", type=int, default=1, help="blocks in the block posterior")
    parser.add_argument("--structure", default="diag", choices=["diag", "lowrank"],
                        help="the block posterior's structure")
    parser.add_argument("--rank", type=int, default=32, help="eigenpairs of a lowrank posterior")
    parser.add_argument("--predictive", default="sample", choices=["sample", "linearised"],
                        help="how block draws act (re-run at the drawn weights, or linearised)")
    parser.add_argument("--n-fit", type=int, default=2000, help="training problems for both fits")
    parser.add_argument("--seed", type=int, default=TEST_SEED, help="the test seed")
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per cost row")
    parser.add_argument("--out", help="posterior caches (default outputs/compare_scopes_<task>)")
    args = parser.parse_args()
    out = Path(args.out or f"outputs/compare_scopes_{args.task}")
    torch.manual_seed(args.seed)

    probe = TextUncertaintyPipeline.from_pretrained(MODELS[args.task], posterior=None)
    task = task_from_spec(probe.metadata["task"])
    pipes, fit_seconds = {}, {}
    for scope, tail in (("head", None), ("block", args.tail)):
        tic = time.perf_counter()
        options = {} if tail is None else {"structure": args.structure, "rank": args.rank}
        pipes[scope] = load(MODELS[args.task], out, task, args.n_fit, tail=tail, **options)
        fit_seconds[scope] = time.perf_counter() - tic
        if tail is not None:
            pipes[scope].posterior.predictive = args.predictive
        s = pipes[scope].posterior.summary()
        print(f"{scope} posterior: {s.get('tail') or s.get('head')} ({s['structure']}, "
              f"{s.get('predictive', 'sample')} draws), {s['n_params']} weights, prior "
              f"precision {s['prior_precision']:.4g}, relative perturbation "
              f"{s['relative_perturbation']:.1%}, log marglik {s['log_marglik']:.1f} "
              f"(fit or load {fit_seconds[scope]:.0f} s)")

    test = task.split()["test"]
    problems = test[streams.numpy_generator(args.seed, "prompt_order").permutation(len(test))
                    [: args.prompts]]
    p, n = len(problems), args.n
    prompts = task.prompts(problems).repeat_interleave(n, 0)  # prompt-major: (p * n, L)
    config = UnmaskingConfig("low_confidence", temperature=args.temperature)
    runs = {}
    for scope, pipe in pipes.items():
        tic = time.perf_counter()
        runs[scope] = pipe(prompts, config, num_draws=args.draws, scores=SCORES + BASELINES,
                           seed=args.seed, progress=False)
        print(f"{scope}: {p} x {n} candidates scored in {time.perf_counter() - tic:.0f} s")
    if not torch.equal(runs["head"].tokens, runs["block"].tokens):
        raise SystemExit("the two runs' MAP candidates differ: not the same candidates")
    correct = task.check(runs["head"].tokens).reshape(p, n)
    ids, mixed = np.arange(p), mixed_prompts(correct)
    print(f"\n{args.task}: {p} held-out prompts x {n} candidates (test seed {args.seed}, "
          f"low_confidence, token temperature {args.temperature}), M = {args.draws}; the same "
          f"candidates under both posteriors (checked); single-sample accuracy {correct.mean():.1%}; "
          f"{len(mixed)} prompts with right and wrong candidates; {args.boot} paired resamples "
          "of prompts")

    metrics = (("AUROC(wrong)", auroc_wrong, ids, False),
               ("within-prompt AUROC", within_prompt_auroc, mixed, False),
               (f"best-of-{n} accuracy", best_of_n, ids, True))
    for label, metric, rows, pct in metrics:
        print(f"\n{label}")
        print("| score | head posterior | block posterior | block - head |")
        print("|---|---|---|---|")
        for name in SCORES:
            h = runs["head"].scores[name].reshape(p, n)
            b = runs["block"].scores[name].reshape(p, n)
            # one resampling stream: the three intervals use the same resamples (paired)
            head = bootstrap_interval(lambda i, f=metric, h=h: f(h, correct, i), rows,
                                      n_boot=args.boot)
            block = bootstrap_interval(lambda i, f=metric, b=b: f(b, correct, i), rows,
                                       n_boot=args.boot)
            diff = bootstrap_interval(lambda i, f=metric, h=h, b=b: f(b, correct, i) - f(h, correct, i),
                                      rows, n_boot=args.boot)
            print(f"| {name} | {_ci(head, pct)} | {_ci(block, pct)} | {_signed(diff, pct)} |")
        for name in BASELINES:  # posterior-free: identical in both runs
            v = runs["head"].scores[name].reshape(p, n)
            cell = _ci(bootstrap_interval(lambda i, v=v, metric=metric: metric(v, correct, i), rows,
                                          n_boot=args.boot), pct)
            print(f"| {name} (no posterior) | {cell} | {cell} | |")
    print("\nSpearman(head, block) of each score over all candidates: " + ", ".join(
        f"{name} {np.corrcoef(*(np.argsort(np.argsort(runs[s].scores[name])) for s in runs))[0, 1]:.3f}"
        for name in SCORES))

    cost_prompts = prompts[: min(len(prompts), 256)]

    def call(pipe, scores):
        return lambda: pipe(cost_prompts, config, num_draws=args.draws, scores=scores,
                            seed=args.seed + 1, progress=False)

    plain = timed(call(pipes["head"], ("random",)), args.repeats)
    print(f"\ncost on {len(cost_prompts)} sequences (median of {args.repeats} after a warm-up, "
          f"CPU, {torch.get_num_threads()} thread(s))")
    print("| method | seconds | x plain |")
    print("|---|---:|---:|")
    print(f"| plain sampling | {plain:.2f} | 1.00 |")
    for scope in pipes:
        seconds = timed(call(pipes[scope], ("mutual_information", "low_posterior_confidence")),
                        args.repeats)
        print(f"| + MI and posterior confidence, {scope} posterior (M = {args.draws}) | "
              f"{seconds:.2f} | {seconds / plain:.2f} |")


if __name__ == "__main__":
    main()
