"""Best-of-N selection on a text task: does head-posterior uncertainty pick right answers?

Prints:

1. accuracy vs N: for each held-out prompt, N candidates (temperature sampling); pick the one
   with the lowest score; compared with confidence baselines, random, majority vote over the N
   answers, and the oracle (any candidate right);
2. AUROC of each score for "this candidate is wrong" and accuracy of the kept 50% / 80%;
3. accuracy vs NFE across samplers (greedy tokens), with the AUROC of MI under each;
4. cost of scoring relative to plain sampling (same run).

Nothing here is tuned, so every figure is on the test seed (2000: the prompts drawn and the
sampling noise); AUROCs and best-of-16 accuracies carry percentile bootstrap 95% intervals over
prompts (1,000 resamples).

Usage:  python benchmarks/bestofn_text.py [--task arith|sudoku4|sort] [--prompts 400] [--n 16]
            [--draws 8]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from protocol import TEST_SEED  # benchmarks/protocol.py

from genunc import filtering, streams
from genunc.metrics.stats import bootstrap_interval
from genunc.pipelines import TextUncertaintyPipeline
from genunc.sampling.masked import UnmaskingConfig
from genunc.tasks import Task, task_from_spec
from genunc.zoo.shipped import ARITH_DIR, SORT_DIR, SUDOKU4_DIR

#: --task: the shipped model of each task
MODELS = {"arith": ARITH_DIR, "sudoku4": SUDOKU4_DIR, "sort": SORT_DIR}

SCORES = ("mutual_information", "mutual_information_max", "low_posterior_confidence", "semantic",
          "low_confidence", "low_margin", "low_self_certainty", "random")


def load(model: Path, out: Path, task: Task, n_fit: int, tail: int | None = None,
         structure: str = "diag", rank: int = 32) -> TextUncertaintyPipeline:
    """The model with the posterior cached in `out` (fitted there on training problems;
    ``tail``: over the last `tail` transformer blocks, the final norm and the head, cached in
    ``posterior_tail<tail>``, or ``posterior_tail<tail>_lowrank<rank>`` for that structure)."""
    pipe = TextUncertaintyPipeline.from_pretrained(model, posterior=None)
    pairs = task.split()["train"][:n_fit]
    batches = [{"x": task.sequences(pairs[i : i + 256]),
                "prompt_mask": task.prompt_mask(len(pairs[i : i + 256]))}
               for i in range(0, len(pairs), 256)]
    folder = out / ("posterior" if tail is None else f"posterior_tail{tail}")
    options = {"structure": structure} if structure != "diag" else {}
    if structure == "lowrank":
        folder, options["rank"] = folder.with_name(f"{folder.name}_lowrank{rank}"), rank
    pipe.load_or_fit_posterior(folder, batches, stale="refit", repeats=2, tail=tail,
                               progress=False, **options)
    return pipe


def _ci(interval: tuple[float, float, float], pct: bool = False) -> str:
    est, low, high = interval
    if pct:
        return f"{est:.1%} [{low:.1%}, {high:.1%}]"
    return f"{est:.3f} [{low:.3f}, {high:.3f}]"


def accuracy_vs_n(correct: np.ndarray, scores: dict[str, np.ndarray], answers: np.ndarray) -> None:
    """Accuracy of the candidate each score selects among the first N, with majority vote and
    the oracle, for ``(p, n)`` candidates."""
    p, n = correct.shape
    ns = [k for k in (1, 2, 4, 8, 16, 32) if k <= n]
    print("\naccuracy of the selected candidate vs N")
    print(f"{'selector':<26}" + "".join(f"{'N=' + str(k):>8}" for k in ns))
    for name in scores:
        accs = [correct[np.arange(p), scores[name][:, :k].argmin(1)].mean() for k in ns]
        print(f"{name:<26}" + "".join(f"{a:>8.1%}" for a in accs))
    vote = []
    for k in ns:
        hits = []
        for i in range(p):
            top = Counter(answers[i, :k]).most_common(1)[0][0]
            hits.append(correct[i, list(answers[i, :k]).index(top)])
        vote.append(np.mean(hits))
    print(f"{'majority vote':<26}" + "".join(f"{a:>8.1%}" for a in vote))
    print(f"{'oracle (any right)':<26}" + "".join(f"{correct[:, :k].any(1).mean():>8.1%}" for k in ns))


def mixed_prompts(correct: np.ndarray) -> np.ndarray:
    """Prompts with both right and wrong candidates: the ones best-of-N can help."""
    return np.flatnonzero(correct.any(1) & ~correct.all(1))


def auroc_wrong(values: np.ndarray, correct: np.ndarray, prompts: np.ndarray) -> float:
    """AUROC of ``(p, n)`` scores for "candidate wrong", over every candidate of `prompts`."""
    return filtering.auroc(values[prompts].ravel(), ~correct[prompts].ravel())


def within_prompt_auroc(values: np.ndarray, correct: np.ndarray, prompts: np.ndarray) -> float:
    """Mean over `prompts` (each with right and wrong candidates) of the AUROC among its own
    candidates: what best-of-N needs."""
    return float(np.mean([filtering.auroc(values[j], ~correct[j]) for j in prompts]))


def best_of_n(values: np.ndarray, correct: np.ndarray, prompts: np.ndarray) -> float:
    """Accuracy of the lowest-score candidate of each of `prompts`."""
    return float(correct[prompts][np.arange(len(prompts)), values[prompts].argmin(1)].mean())


def selection_cells(correct: np.ndarray, values: np.ndarray, boot: int) -> list[str]:
    """AUROC(wrong) over all candidates, within a prompt, best-of-n accuracy (intervals over
    prompts, resampled with their candidates, which are not independent), accuracy of the kept
    50% and 80%: one score's ``(p, n)`` values as table cells."""
    p, _ = correct.shape
    flat_correct, prompt_ids, mixed = correct.ravel(), np.arange(p), mixed_prompts(correct)
    kept50 = flat_correct[filtering.keep_fraction(values.ravel(), 0.5)].mean()
    kept80 = flat_correct[filtering.keep_fraction(values.ravel(), 0.8)].mean()
    overall = bootstrap_interval(lambda i: auroc_wrong(values, correct, i), prompt_ids, n_boot=boot)
    within = bootstrap_interval(lambda i: within_prompt_auroc(values, correct, i), mixed,
                                n_boot=boot) if len(mixed) >= 2 else (float("nan"),) * 3
    best = bootstrap_interval(lambda i: best_of_n(values, correct, i), prompt_ids, n_boot=boot)
    return [_ci(overall), _ci(within), _ci(best, pct=True), f"{kept50:.1%}", f"{kept80:.1%}"]


def report_selection(correct: np.ndarray, scores: dict[str, np.ndarray], answers: np.ndarray,
                     boot: int) -> None:
    """Accuracy of the selected candidate vs N, and AUROC tables, for ``(p, n)`` candidates."""
    n = correct.shape[1]
    accuracy_vs_n(correct, scores, answers)
    print(f"\nAUROC(wrong) over all candidates, and within a prompt (mean over the "
          f"{len(mixed_prompts(correct))} prompts with right and wrong candidates: what best-of-N "
          "needs)")
    print(f"| score | AUROC(wrong) | within prompt | best of {n} | acc kept 50% | acc kept 80% |")
    print("|---|---|---|---|---:|---:|")
    for name in scores:
        print(f"| {name} | " + " | ".join(selection_cells(correct, scores[name], boot)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--task", choices=sorted(MODELS), default="arith",
                        help="the shipped model of this task (or give --model)")
    parser.add_argument("--model", help="a model folder (default: the --task's shipped model)")
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--n", type=int, default=16, help="candidates per prompt")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--n-fit", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=TEST_SEED, help="the test seed")
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument("--tail", type=int, default=None,
                        help="a posterior over the last TAIL blocks, the final norm and the head")
    parser.add_argument("--out", help="posterior cache (default outputs/bestofn_text[_<task>])")
    parser.add_argument("--sections", nargs="+", default=["selection", "samplers", "cost"],
                        choices=["selection", "samplers", "cost"], help="what to run (default all)")
    args = parser.parse_args()
    args.model = args.model or str(MODELS[args.task])
    args.out = args.out or ("outputs/bestofn_text" if args.task == "arith" else
                            f"outputs/bestofn_text_{args.task}")
    torch.manual_seed(args.seed)

    probe = TextUncertaintyPipeline.from_pretrained(args.model, posterior=None)
    task = task_from_spec(probe.metadata["task"])
    sampler = load(Path(args.model), Path(args.out), task, args.n_fit, tail=args.tail)
    print(f"posterior: {sampler.posterior.summary()}")
    pairs = task.split()["test"]
    pairs = pairs[streams.numpy_generator(args.seed, "prompt_order").permutation(len(pairs))[: args.prompts]]
    p, n = len(pairs), args.n

    # ------------------------------------------------------------ N candidates per prompt
    prompts = task.prompts(pairs).repeat_interleave(n, 0)  # prompt-major: (p * n, L)
    config = UnmaskingConfig("low_confidence", temperature=args.temperature)
    if "selection" in args.sections:
        selection(sampler, task, prompts, config, p, n, args)
    if "samplers" in args.sections:
        samplers_table(sampler, task, pairs, args)
    if "cost" in args.sections:
        cost(sampler, task, prompts, config, args)


def selection(sampler, task, prompts, config, p: int, n: int, args) -> None:
    tic = time.perf_counter()
    out = sampler(prompts, config, num_draws=args.draws, scores=SCORES, seed=args.seed)
    seconds = time.perf_counter() - tic
    correct = task.check(out.tokens).reshape(p, n)
    answers = np.array([task.decode(t[task.prompt_length :]) for t in out.tokens]).reshape(p, n)
    scores = {k: v.reshape(p, n) for k, v in out.scores.items()}
    print(f"\n{p} held-out prompts x {n} candidates ({config.strategy}, temperature "
          f"{args.temperature}); M = {args.draws}; {seconds:.0f} s")
    print(f"single-sample accuracy: {correct.mean():.1%}")

    report_selection(correct, {k: scores[k] for k in SCORES}, answers, args.boot)

    if "mutual_information_mc_error" in out.scores:
        mi, err = out.scores["mutual_information"], out.scores["mutual_information_mc_error"]
        rel = err[mi > 0] / mi[mi > 0]
        print(f"\nMonte-Carlo error of mutual_information (M = {args.draws}, jackknife): median "
              f"standard error {np.median(err):.3g} nats, {np.median(rel):.1%} of the score "
              f"(90th percentile {np.quantile(rel, 0.9):.1%})")


def samplers_table(sampler, task, pairs, args) -> None:
    """Accuracy vs NFE across samplers (greedy tokens), with the AUROC of MI under each."""
    p = len(pairs)
    base = task.prompts(pairs)
    samplers = [
        ("random, 1 token/step", UnmaskingConfig("random")),
        ("low_confidence, 1 token/step", UnmaskingConfig("low_confidence")),
        (f"low_confidence, {max(1, task.answer_length // 2)} steps",
         UnmaskingConfig("low_confidence", steps=max(1, task.answer_length // 2))),
        ("threshold 0.9", UnmaskingConfig("threshold", threshold=0.9)),
        ("threshold 0.7", UnmaskingConfig("threshold", threshold=0.7)),
        ("threshold 0.5", UnmaskingConfig("threshold", threshold=0.5)),
        ("threshold 0.3", UnmaskingConfig("threshold", threshold=0.3)),
        ("remask 0.9 / 0.5", UnmaskingConfig("remask", threshold=0.9, remask_threshold=0.5)),
    ]
    print(f"\nsamplers, greedy tokens, {p} prompts ({task.answer_length} answer tokens)")
    print(f"{'sampler':<32}{'accuracy':>10}{'NFE/seq':>9}{'rows/seq':>10}{'AUROC MI':>10}")
    for name, cfg in samplers:
        res = sampler(base, cfg, num_draws=args.draws, scores=("mutual_information",), seed=args.seed)
        ok = task.check(res.tokens)
        auc = filtering.auroc(res.scores["mutual_information"], ~ok) if 0 < ok.mean() < 1 else float("nan")
        print(f"{name:<32}{ok.mean():>10.1%}{res.nfe:>9.2f}{res.backbone_rows / p:>10.1f}{auc:>10.3f}")


def cost(sampler, task, prompts, config, args) -> None:
    def timed(scores_):
        tic = time.perf_counter()
        res = sampler(prompts, config, num_draws=args.draws, scores=scores_, seed=args.seed + 1)
        return time.perf_counter() - tic, res

    t_plain, _ = timed(("random",))
    t_mi, _ = timed(("mutual_information",))
    t_sem, sem = timed(("semantic",))
    print(f"\ncost on {len(prompts)} sequences (same run, CPU, {torch.get_num_threads()} threads)")
    print(f"{'method':<36}{'seconds':>9}{'x plain':>9}")
    for name, t in [("plain sampling", t_plain), (f"+ mutual information (M = {args.draws})", t_mi),
                    (f"semantic (M + 1 = {args.draws + 1} generations)", t_sem)]:
        print(f"{name:<36}{t:>9.2f}{t / t_plain:>9.2f}")
    draw_acc = [task.check(d).mean() for d in sem.draw_tokens]
    print(f"\nperturbed heads keep MAP quality? accuracy of the MAP generations "
          f"{task.check(sem.tokens).mean():.1%}; of the {len(draw_acc)} posterior-draw generations "
          f"{np.mean(draw_acc):.1%} (min {np.min(draw_acc):.1%})")


if __name__ == "__main__":
    main()
