"""Unmasking orders on tasks where order matters (4x4 sudoku, sorting 8 digits).

For each task's shipped model (``genunc zoo train sudoku4-mdlm`` / ``sort-mdlm``) prints:

1. accuracy vs NFE of the unmasking samplers, greedy tokens, in full-diffusion mode (one block)
   and semi-autoregressive mode (blocks): random, low-confidence (1 token per step and fewer
   steps), threshold (several tau), remask, and the tempered variants (``position_temperature``:
   Gumbel-top-k over confidence / tau, soft thresholds).  Stochastic samplers (random, tempered)
   draw ``--samples`` answers per prompt: accuracy is over all of them, with pass@1, pass@k and
   the number of distinct answers per prompt; AUROC of the commit-time mutual information for
   "this answer is wrong" over all answers;
2. best-of-N with genunc's scores (MI, posterior confidence) and baselines (low_confidence,
   random): accuracy of the selected candidate vs N and within-prompt AUROC
   (``benchmarks/bestofn_text.py``'s tables).

Nothing is tuned: every figure is on the test seed (the prompts drawn and the sampling noise);
accuracies carry percentile bootstrap 95% intervals over prompts.

Usage:  python benchmarks/unmasking_orders.py [--tasks sudoku4 sort] [--prompts 200]
            [--samples 8] [--n 8] [--draws 8] [--boot 500]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bestofn_text import MODELS, _ci, load, report_selection  # benchmarks/bestofn_text.py
from protocol import TEST_SEED  # benchmarks/protocol.py

from genunc import filtering, streams
from genunc.metrics.stats import bootstrap_interval
from genunc.metrics.text import distinct_answers, pass_at_ks
from genunc.pipelines import TextUncertaintyPipeline
from genunc.sampling.masked import UnmaskingConfig
from genunc.tasks import task_from_spec

SELECTION_SCORES = ("mutual_information", "mutual_information_max", "low_posterior_confidence",
                    "low_confidence", "random")


def samplers(answer_length: int) -> list[tuple[str, UnmaskingConfig, bool]]:
    """(name, config, stochastic) for one block mode; ``steps`` are totals over the answer."""
    half, quarter = max(1, answer_length // 2), max(1, answer_length // 4)
    return [
        ("random, 1 token/step", UnmaskingConfig("random"), True),
        (f"random, {half} steps", UnmaskingConfig("random", steps=half), True),
        ("low_confidence, 1 token/step", UnmaskingConfig("low_confidence"), False),
        (f"low_confidence, {half} steps", UnmaskingConfig("low_confidence", steps=half), False),
        (f"low_confidence, {quarter} steps", UnmaskingConfig("low_confidence", steps=quarter), False),
        ("threshold 0.9", UnmaskingConfig("threshold", threshold=0.9), False),
        ("threshold 0.7", UnmaskingConfig("threshold", threshold=0.7), False),
        ("threshold 0.5", UnmaskingConfig("threshold", threshold=0.5), False),
        ("remask 0.9 / 0.5", UnmaskingConfig("remask", threshold=0.9, remask_threshold=0.5), False),
        ("tempered low_conf tau 0.3",
         UnmaskingConfig("low_confidence", position_temperature=0.3), True),
        ("tempered low_conf tau 1",
         UnmaskingConfig("low_confidence", position_temperature=1.0), True),
        ("tempered threshold 0.7 tau 0.1",
         UnmaskingConfig("threshold", threshold=0.7, position_temperature=0.1), True),
        ("tempered remask 0.9/0.5 tau 0.1",
         UnmaskingConfig("remask", threshold=0.9, remask_threshold=0.5, position_temperature=0.1),
         True),
    ]


Samplers = Callable[[int | None], list[tuple[str, UnmaskingConfig, bool]]]


def order_table(pipe: TextUncertaintyPipeline, task, problems: np.ndarray, args,
                samplers_for: Samplers | None = None) -> dict[tuple[str, str], np.ndarray]:
    """Print the accuracy-vs-NFE table of each block mode; ``samplers_for(block_length)`` gives
    the rows (default: :func:`samplers`).  Returns each (block_length, sampler)'s ``(prompts, answers)``
    correctness and ``(prompts, answers)`` NFE, stacked as ``(2, p, reps)``."""
    p, k = len(problems), args.samples
    block = args.block_length or max(1, int(np.ceil(task.answer_length / 4)))
    results = {}
    for mode, block_length in (("one block (full diffusion)", None),
                               (f"blocks of {block} (semi-autoregressive)", block)):
        print(f"\n### {mode}: greedy tokens, {p} prompts ({task.answer_length} answer tokens); "
              f"stochastic samplers x{k} answers per prompt")
        print(f"| sampler | accuracy | NFE/seq | pass@1 | pass@{k} | distinct/prompt | AUROC MI |")
        print("|---|---|---:|---:|---:|---:|---:|")
        rows = samplers(task.answer_length) if samplers_for is None else samplers_for(block_length)
        for name, cfg, stochastic in rows:
            cfg.block_length = block_length
            reps = k if stochastic else 1
            prompts = task.prompts(problems).repeat_interleave(reps, 0)
            res = pipe(prompts, cfg, num_draws=args.draws, scores=("mutual_information",),
                       seed=args.seed, progress=False)
            ok = task.check(res.tokens).reshape(p, reps)
            acc = bootstrap_interval(lambda i, ok=ok: ok[i].mean(), np.arange(p), n_boot=args.boot)
            mi = res.scores["mutual_information"]
            auc = filtering.auroc(mi, ~ok.ravel()) if 0 < ok.mean() < 1 else float("nan")
            if stochastic:
                answers = np.array([task.decode(t[task.prompt_length :])
                                    for t in res.tokens]).reshape(p, reps)
                passes = pass_at_ks(ok, [1, k])
                extra = (f"{passes[1]:.1%} | {passes[k]:.1%} | "
                         f"{distinct_answers(answers).mean():.2f}")
            else:
                extra = f"{ok.mean():.1%} | {ok.mean():.1%} | 1.00"
            print(f"| {name} | {_ci(acc, pct=True)} | {res.nfe:.2f} | {extra} | {auc:.3f} |")
            results[(block_length, name)] = np.stack([ok, res.row_nfe.reshape(p, reps)])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["sudoku4", "sort"], choices=sorted(MODELS))
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--samples", type=int, default=8, help="answers per prompt, stochastic samplers")
    parser.add_argument("--n", type=int, default=8, help="best-of-N candidates per prompt")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0, help="token temperature, best-of-N")
    parser.add_argument("--block-length", type=int, help="block mode (default: a quarter of the answer)")
    parser.add_argument("--n-fit", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=TEST_SEED, help="the test seed")
    parser.add_argument("--boot", type=int, default=500)
    parser.add_argument("--tail", type=int, default=None,
                        help="a posterior over the last TAIL blocks, the final norm and the head")
    parser.add_argument("--out", default="outputs/unmasking_orders")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    for name in args.tasks:
        tic = time.perf_counter()
        probe = TextUncertaintyPipeline.from_pretrained(MODELS[name], posterior=None)
        task = task_from_spec(probe.metadata["task"])
        print(f"\n## {name}: {task.spec()}")
        print(f"model: {MODELS[name]} (training: test accuracy "
              f"{probe.metadata['training']['test_accuracy_greedy_low_confidence']:.1%})")
        pipe = load(MODELS[name], Path(args.out) / name, task, args.n_fit, tail=args.tail)
        test = task.split()["test"]
        order = streams.numpy_generator(args.seed, "prompt_order").permutation(len(test))
        problems = test[order[: args.prompts]]
        order_table(pipe, task, problems, args)

        p, n = len(problems), args.n
        config = UnmaskingConfig("low_confidence", temperature=args.temperature)
        out = pipe(task.prompts(problems).repeat_interleave(n, 0), config, num_draws=args.draws,
                   scores=SELECTION_SCORES, seed=args.seed, progress=False)
        correct = task.check(out.tokens).reshape(p, n)
        answers = np.array([task.decode(t[task.prompt_length :]) for t in out.tokens]).reshape(p, n)
        print(f"\n### best-of-{n}: low_confidence, token temperature {args.temperature}, "
              f"M = {args.draws}; single-sample accuracy {correct.mean():.1%}, distinct answers "
              f"per prompt {distinct_answers(answers).mean():.2f}")
        report_selection(correct, {k: out.scores[k].reshape(p, n) for k in SELECTION_SCORES},
                         answers, args.boot)
        print(f"\n{name}: {time.perf_counter() - tic:.0f} s")
    print(f"\nwall time {time.perf_counter() - start:.0f} s (CPU, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
