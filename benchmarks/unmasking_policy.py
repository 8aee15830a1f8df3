"""The learned unmasking policy against the heuristic unmasking orders (issue 17).

For each task with shipped policies (``genunc/zoo/weights/policy_<task>_*``, trained with
``genunc zoo train unmask-policy`` on the training split) prints, in full-diffusion mode (one
block) and semi-autoregressive mode (blocks), accuracy (percentile bootstrap 95% interval over
prompts) and mean NFE per sequence of: random order, low-confidence (1 token per step and fewer
steps), threshold 0.9 / 0.7 / 0.5, remask, a tempered threshold, and every policy, deterministic
(p > 0.5) and sampled (τ = 1, ``--samples`` answers per prompt).  Then the paired comparison of
the policies with and without the epistemic inputs (same prompts: accuracy difference with a
bootstrap interval over prompts, NFE difference), and each policy's training cost.

The table rows and the posterior come from ``benchmarks/unmasking_orders.py`` /
``bestofn_text.py`` (the posterior is fitted on the first ``--n-fit`` training problems, as in
training).  Nothing is tuned here: every figure is on the test seed (the prompts drawn from the
test split, never seen in training, and the sampling noise).

Usage:  python benchmarks/unmasking_policy.py [--tasks sudoku4 sort] [--prompts 200]
            [--samples 4] [--draws 8] [--boot 500]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from bestofn_text import MODELS, load  # benchmarks/bestofn_text.py
from protocol import TEST_SEED  # benchmarks/protocol.py
from unmasking_orders import order_table, samplers  # benchmarks/unmasking_orders.py

from genunc import streams
from genunc.metrics.stats import bootstrap_interval
from genunc.pipelines import TextUncertaintyPipeline
from genunc.sampling.masked import UnmaskingConfig
from genunc.sampling.policy import UnmaskingPolicy
from genunc.tasks import task_from_spec
from genunc.zoo.shipped import WEIGHTS_DIR

#: heuristic rows kept from unmasking_orders.samplers (the others add little here)
DROPPED = ("tempered low_conf", "tempered remask")


def policies(task_name: str, folders: list[str] | None = None) -> dict[str, UnmaskingPolicy]:
    """The policies of a task by folder name: the shipped ones, or those in `folders` trained
    for it."""
    dirs = [Path(f) for f in folders] if folders else sorted(WEIGHTS_DIR.glob(f"policy_{task_name}_*"))
    found = {d.name: UnmaskingPolicy.from_pretrained(d) for d in dirs if (d / "policy.json").exists()}
    return {k: v for k, v in found.items() if v.metadata.get("task", {}).get("name") ==
            {"sudoku4": "sudoku", "sort": "sort"}[task_name]}


def rows_for(task, shipped: dict[str, UnmaskingPolicy]):
    half = max(1, task.answer_length // 2)

    def rows(block_length: int | None):
        heuristics = [r for r in samplers(task.answer_length)
                      if not r[0].startswith(DROPPED) and r[0] != f"random, {half} steps"]
        learned = []
        for name, policy in shipped.items():
            trained = policy.metadata.get("block_length")
            tag = f"{name} (trained {'full' if trained is None else f'blocks of {trained}'})"
            learned += [(f"{tag}, p > 0.5", UnmaskingConfig("policy", policy=policy), False),
                        (f"{tag}, sampled τ 1",
                         UnmaskingConfig("policy", policy=policy, position_temperature=1.0), True)]
        return heuristics + learned

    return rows


def compare_inputs(results: dict, shipped: dict[str, UnmaskingPolicy], boot: int) -> None:
    """Policies with the epistemic inputs against the same setting without them."""
    print("\n### epistemic inputs: policy with MI minus policy without (paired over prompts)")
    print("| mode | policies | decisions | Δ accuracy (MI - conf) | NFE conf | NFE MI |")
    print("|---|---|---|---|---:|---:|")
    for mi_name in [n for n in shipped if "_mi" in n]:
        conf_name = mi_name.replace("_mi", "_conf")
        if conf_name not in shipped:
            continue
        for (block, row), value in results.items():
            if not row.startswith(mi_name + " "):
                continue
            other = (block, row.replace(mi_name, conf_name, 1))
            if other not in results:
                continue
            ok_mi, nfe_mi = value
            ok_conf, nfe_conf = results[other]
            p = len(ok_mi)
            diff = bootstrap_interval(lambda i, a=ok_mi, b=ok_conf: a[i].mean() - b[i].mean(),
                                      np.arange(p), n_boot=boot)
            mode = "one block" if block is None else f"blocks of {block}"
            decisions = row.rsplit(", ", 1)[-1]
            print(f"| {mode} | {mi_name} vs {conf_name} | {decisions} | "
                  f"{diff[0]:+.1%} [{diff[1]:+.1%}, {diff[2]:+.1%}] | {nfe_conf.mean():.2f} | "
                  f"{nfe_mi.mean():.2f} |")


def training_costs(shipped: dict[str, UnmaskingPolicy]) -> None:
    print("\n### training cost (CPU, one thread; from each policy's policy.json)")
    print("| policy | command | wall time | rollouts | validation accuracy / NFE (p > 0.5) |")
    print("|---|---|---:|---:|---|")
    for name, policy in shipped.items():
        t = policy.metadata.get("training", {})
        val = t.get("validation", {})
        print(f"| {name} | `{policy.metadata.get('command')}` | {t.get('train_seconds', 0) / 60:.1f} min "
              f"| {t.get('rollouts')} | {val.get('accuracy', float('nan')):.1%} / "
              f"{val.get('nfe', float('nan')):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["sudoku4", "sort"], choices=["sudoku4", "sort"])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--samples", type=int, default=4, help="answers per prompt, stochastic samplers")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--block-length", type=int, help="block mode (default: a quarter of the answer)")
    parser.add_argument("--n-fit", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=TEST_SEED, help="the test seed")
    parser.add_argument("--boot", type=int, default=500)
    parser.add_argument("--policies", nargs="+", help="policy folders (default: the shipped ones)")
    parser.add_argument("--out", default="outputs/unmasking_policy")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    for name in args.tasks:
        shipped = policies(name, args.policies)
        if not shipped:
            print(f"\n## {name}: no shipped policy, skipped")
            continue
        tic = time.perf_counter()
        probe = TextUncertaintyPipeline.from_pretrained(MODELS[name], posterior=None)
        task = task_from_spec(probe.metadata["task"])
        print(f"\n## {name}: {task.spec()}; policies: {', '.join(shipped)}")
        pipe = load(MODELS[name], Path(args.out) / name, task, args.n_fit)
        test = task.split()["test"]
        order = streams.numpy_generator(args.seed, "prompt_order").permutation(len(test))
        problems = test[order[: args.prompts]]
        results = order_table(pipe, task, problems, args, rows_for(task, shipped))
        compare_inputs(results, shipped, args.boot)
        training_costs(shipped)
        print(f"\n{name}: {time.perf_counter() - tic:.0f} s")
    print(f"\nwall time {time.perf_counter() - start:.0f} s (CPU, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
