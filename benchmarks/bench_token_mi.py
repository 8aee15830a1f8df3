"""Token mutual information without materialised draws: cost at LLaDA-8B's head size, and
agreement with sampled MI on the shipped text models.  Prints figures; not a test.

Part 1 (``--part cost``): a random ``nn.Linear``-shaped head of ``--vocab`` x ``--hidden``
(default 126,464 x 4,096, LLaDA-8B's), random diagonal posterior variances, random features of
``--batch`` x ``--length`` positions (default 4 x 256), M = ``--draws`` (default 8), one CPU
thread.  Rows: the plain head pass (the MAP logits, which the model computes anyway); the closed
forms (``linearised``, ``bridge``; ``linearised`` also with the variances of the top-K rows only)
and ``pruned`` (top-K rows) over every position, and over the
positions one unmasking step commits (``--commits`` per sequence); sampled MI over M
materialised draws, which does not fit in RAM at full size: it is measured on ``--vocab /
--shrink`` rows and its memory scaled up by ``--shrink`` (said in the row).  Extra memory is the
process's peak resident set above what it held before the row (Linux ``VmHWM`` reset through
``/proc/self/clear_refs``): the weights, the posterior's variances, the features and the MAP
logits are held before every row and not counted.

Part 2 (``--part agreement``): the shipped masked-diffusion models (arith, sudoku4), held-out
prompts of the test seed, ``--n`` candidates each (low-confidence unmasking, token temperature
1); every estimator scores the same candidates (the MAP trajectory does not depend on the
estimator, checked), sampled MI at M = ``--ref-draws`` (64) is the reference; ``pruned`` at
K = V (sampled MI from other random numbers) shows how far two M = 64 estimates agree.  Per estimator:
Spearman with the reference over candidates and AUROC(answer wrong) of the per-sequence mean MI,
with percentile bootstrap intervals over prompts.

Part 3 (``--part agreement-llada2``): part 2's comparison through the wrapped path, diffusers'
``LLaDA2Pipeline`` over the shipped arith model, wrapped by ``TextUncertaintyPipeline.from_pipe``
(block refinement at token temperature 1); the same estimators, reference and intervals.

Memory figures need glibc to return freed memory at once: run with ``MALLOC_MMAP_THRESHOLD_=65536``.

Usage:  python benchmarks/bench_token_mi.py [--part cost|agreement|both] [--vocab 126464]
            [--hidden 4096] [--batch 4] [--length 256] [--draws 8] [--top-k 64 256]
            [--rows closed pruned sampled]
            [--tasks arith sudoku4] [--prompts 100] [--n 4] [--ref-draws 64] [--pruned-k 4]
        python benchmarks/bench_token_mi.py --part agreement-llada2 [--prompts 100] [--n 4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from protocol import TEST_SEED  # benchmarks/protocol.py

from genunc import filtering, streams
from genunc.metrics.stats import bootstrap_interval
from genunc.posterior.heads import head_ops_for
from genunc.posterior.token_mi import ClosedFormMI, PrunedMI
from genunc.scores.tokens import mutual_information


def _hwm_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def _rss_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def measured(fn):
    """``(seconds, extra peak GB)`` of one call of `fn`."""
    before = _rss_gb()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident set starts again from the current one
    tic = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - tic
    extra = _hwm_gb() - before
    del out
    return seconds, extra


def cost(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    v, h, m = args.vocab, args.hidden, args.draws
    n = args.batch * args.length
    head = torch.nn.Linear(h, v, device="meta")  # the shapes the ops check; the weights are ours
    weight = torch.randn(v, h, generator=g) / h ** 0.5
    bias = torch.zeros(v)
    var_w = torch.rand(v, h, generator=g) * 1e-4
    var_b = torch.rand(v, generator=g) * 1e-4
    phi = torch.randn(n, h, generator=g)
    ops = head_ops_for(head)
    commits = torch.arange(args.batch).repeat_interleave(args.commits) * args.length \
        + torch.arange(args.commits).repeat(args.batch)  # the first `commits` of each row
    print(f"head {v} x {h} (float32 {weight.numel() * 4 / 1e9:.2f} GB, its variances as much), "
          f"{args.batch} x {args.length} positions, M = {m}, 1 thread; held before every row: "
          f"{_rss_gb():.2f} GB resident")
    print("| row | positions | wall s | x plain | extra peak GB |")
    print("|---|---|---|---|---|")
    plain_s, plain_gb = measured(lambda: F.linear(phi, weight, bias))
    print(f"| plain head pass (MAP logits) | {n} | {plain_s:.2f} | 1.00 | {plain_gb:.2f} |")
    logits = F.linear(phi, weight, bias)
    variances = {"weight": var_w, "bias": var_b}
    closed = [("linearised (closed form)", "linearised", None),
              ("bridge (closed form)", "bridge", None)]
    closed += [(f"linearised, top-{k} rows' variances", "linearised", k) for k in args.top_k]
    for name, kind, k in closed if "closed" in args.rows else ():
        est = ClosedFormMI(ops, variances, kind, top_k=k)
        for label, rows in ((n, slice(None)), (len(commits), commits)):
            s, gb = measured(lambda est=est, rows=rows, lg=logits: est(phi[rows], lg[rows]))
            print(f"| {name} | {label} | {s:.2f} | {s / plain_s:.2f} | {gb:.2f} |")
    var_w.sqrt_()
    var_b.sqrt_()
    stds = variances  # now standard deviations, in place (no second head-sized tensor)
    for k in args.top_k if "pruned" in args.rows else ():
        est = PrunedMI(ops, stds, m, k, 0)
        for label, rows in ((n, slice(None)), (len(commits), commits)):
            s, gb = measured(lambda est=est, rows=rows, lg=logits: est(phi[rows], lg[rows]))
            print(f"| pruned K = {k} | {label} | {s:.2f} | {s / plain_s:.2f} | {gb:.2f} |")
    del logits
    if "sampled" not in args.rows:
        return
    # materialised sampled MI: M full heads do not fit at full size; 1/shrink of the rows
    small = v // args.shrink
    w_small, s_small = weight[:small], stds["weight"][:small]

    def sampled():
        draws = w_small + s_small * torch.randn(m, small, h, generator=g)  # M materialised heads
        return mutual_information(torch.matmul(phi, draws.transpose(1, 2)))

    s, gb = measured(sampled)
    print(f"| sampled, M = {m} materialised heads, {small} rows (1/{args.shrink}), scaled x"
          f"{args.shrink} | {n} | {s * args.shrink:.2f} (measured {s:.2f}) | "
          f"{s * args.shrink / plain_s:.2f} | {gb * args.shrink:.2f} (measured {gb:.2f}) |")


def agreement(args: argparse.Namespace) -> None:
    from bestofn_text import MODELS, load  # benchmarks/bestofn_text.py

    from genunc.pipelines import TextUncertaintyPipeline
    from genunc.sampling.masked import UnmaskingConfig
    from genunc.tasks import task_from_spec

    torch.set_num_threads(1)
    for name in args.tasks:
        probe = TextUncertaintyPipeline.from_pretrained(MODELS[name], posterior=None)
        task = task_from_spec(probe.metadata["task"])
        pipe = load(MODELS[name], Path(args.out) / name, task, args.n_fit)
        test = task.split()["test"]
        order = streams.numpy_generator(args.seed, "prompt_order").permutation(len(test))
        problems = test[order[: args.prompts]]
        p, n = len(problems), args.n
        prompts = task.prompts(problems).repeat_interleave(n, 0)
        config = UnmaskingConfig("low_confidence", temperature=1.0)
        runs, seconds = {}, {}
        plans = estimator_plans(args, pipe.adapter.vocab_size)
        for label, estimator, draws, top_k in plans:
            tic = time.perf_counter()
            runs[label] = pipe(prompts, config, num_draws=draws, seed=args.seed,
                               scores=("mutual_information",), mi_estimator=estimator,
                               mi_top_k=top_k, progress=False)
            seconds[label] = time.perf_counter() - tic
        ref_label = plans[0][0]
        tokens = runs[ref_label].tokens
        if not all(torch.equal(r.tokens, tokens) for r in runs.values()):
            raise SystemExit("the estimators' runs produced different candidates")
        correct = task.check(tokens).reshape(p, n)
        print(f"\n{name}: {p} held-out prompts x {n} candidates (test seed {args.seed}, "
              f"low_confidence, token temperature 1), vocabulary {pipe.adapter.vocab_size}; "
              f"accuracy {correct.mean():.1%}; {args.boot} resamples of prompts")
        agreement_table({k: r.scores["mutual_information"].reshape(p, n) for k, r in runs.items()},
                        ref_label, correct, seconds, args.boot)


def estimator_plans(args: argparse.Namespace, vocab: int) -> list[tuple[str, str, int, int | None]]:
    """``(label, mi_estimator, num_draws, mi_top_k)`` of every estimator compared, the
    reference (sampled at ``--ref-draws``) first."""
    k = args.pruned_k
    return [(f"sampled M={args.ref_draws}", "sampled", args.ref_draws, None),
            (f"sampled M={args.draws}", "sampled", args.draws, None),
            ("linearised", "linearised", args.draws, None),
            (f"linearised, top-{k} rows", "linearised", args.draws, k),
            ("bridge", "bridge", args.draws, None),
            (f"pruned K={k} M={args.ref_draws}", "pruned", args.ref_draws, k),
            (f"pruned K={k} M={args.draws}", "pruned", args.draws, k),
            # K = V: sampled MI with other random numbers, the Monte-Carlo noise ceiling
            (f"pruned K=V M={args.ref_draws} (= sampled, other draws)", "pruned",
             args.ref_draws, vocab)]


def agreement_table(values: dict[str, np.ndarray], ref_label: str, correct: np.ndarray,
                    seconds: dict[str, float], boot: int) -> None:
    """Per estimator ``(P, N)`` MI: Spearman with the reference and AUROC(wrong), with
    bootstrap intervals over the P prompts."""
    ref = values[ref_label]
    ids = np.arange(len(ref))

    def spearman(a, b):
        ra, rb = (np.argsort(np.argsort(x.ravel())) for x in (a, b))
        return float(np.corrcoef(ra, rb)[0, 1])

    print(f"| estimator | Spearman with {ref_label} | AUROC(wrong) | s for the run |")
    print("|---|---|---|---|")
    for label, v in values.items():
        rho = bootstrap_interval(lambda i, v=v: spearman(v[i], ref[i]), ids, n_boot=boot)
        auc = bootstrap_interval(lambda i, v=v: filtering.auroc(v[i].ravel(), ~correct[i].ravel()),
                                 ids, n_boot=boot)
        rho_cell = "1 (itself)" if label == ref_label else \
            f"{rho[0]:.3f} [{rho[1]:.3f}, {rho[2]:.3f}]"
        print(f"| {label} | {rho_cell} | {auc[0]:.3f} [{auc[1]:.3f}, {auc[2]:.3f}] | "
              f"{seconds[label]:.1f} |")


def agreement_llada2(args: argparse.Namespace) -> None:
    """The same comparison through the wrapped path: diffusers' ``LLaDA2Pipeline`` over the
    shipped arith model (:func:`~genunc.zoo.arith_llada2.arith_llada2_pipeline`), wrapped by
    ``TextUncertaintyPipeline.from_pipe``; its block-refinement scheduler at token temperature
    1 (multinomial), block length 5, one call per prompt for its ``--n`` candidates with the
    prompt's own generator, so every estimator scores the same sequences (checked)."""
    from bestofn_llada2 import (  # benchmarks/bestofn_llada2.py
        fitted_wrapped_arith,
        held_out_pairs,
        pipeline_call,
        with_prompts,
    )

    torch.set_num_threads(1)
    task, _, upipe = fitted_wrapped_arith(args.n_fit, args.seed)
    pairs = held_out_pairs(task, args.seed, args.prompts)
    p, n = len(pairs), args.n
    texts = [task.problem_text(a, b) for a, b in pairs]
    call = pipeline_call(task, block_length=5, temperature=1.0)
    values, seconds, sequences = {}, {}, {}
    plans = estimator_plans(args, upipe.head.weight.shape[0])
    for label, estimator, draws, top_k in plans:
        tic = time.perf_counter()
        outs = [upipe(prompt=[t] * n, num_draws=draws, seed=args.seed,
                      scores=("mutual_information",), mi_estimator=estimator, mi_top_k=top_k,
                      generator=streams.torch_generator(args.seed, "sampler_noise", i), **call)
                for i, t in enumerate(texts)]
        seconds[label] = time.perf_counter() - tic
        values[label] = np.concatenate([o.scores["mutual_information"] for o in outs]).reshape(p, n)
        sequences[label] = [o.sequences for o in outs]
    ref_label = plans[0][0]
    if not all(torch.equal(torch.cat(v), torch.cat(sequences[ref_label]))
               for v in sequences.values()):
        raise SystemExit("the estimators' runs produced different sequences")
    correct = task.check(with_prompts(task, pairs, sequences[ref_label])).reshape(p, n)
    print(f"\narith through LLaDA2Pipeline (from_pipe): {p} held-out prompts x {n} candidates "
          f"(test seed {args.seed}, block refinement, token temperature 1), vocabulary "
          f"{upipe.head.weight.shape[0]}; accuracy {correct.mean():.1%}; {args.boot} "
          "resamples of prompts")
    agreement_table(values, ref_label, correct, seconds, args.boot)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--part", choices=["cost", "agreement", "agreement-llada2", "both"],
                        default="both")
    parser.add_argument("--vocab", type=int, default=126464)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--commits", type=int, default=8, help="positions one step commits per row")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--top-k", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--rows", nargs="+", default=["closed", "pruned", "sampled"],
                        choices=["closed", "pruned", "sampled"], help="cost rows (plain always)")
    parser.add_argument("--shrink", type=int, default=16, help="row fraction for materialised draws")
    parser.add_argument("--tasks", nargs="+", default=["arith", "sudoku4"])
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--n", type=int, default=4, help="candidates per prompt")
    parser.add_argument("--ref-draws", type=int, default=64)
    parser.add_argument("--pruned-k", type=int, default=4)
    parser.add_argument("--n-fit", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=TEST_SEED)
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument("--out", default="/tmp/genunc_bench_token_mi", help="posterior caches")
    args = parser.parse_args()
    if args.part in ("cost", "both"):
        cost(args)
    if args.part in ("agreement", "both"):
        agreement(args)
    if args.part == "agreement-llada2":
        agreement_llada2(args)


if __name__ == "__main__":
    main()
