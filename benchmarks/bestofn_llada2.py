"""Best-of-N on the arithmetic task through diffusers' own ``LLaDA2Pipeline`` (``from_pipe``).

The shipped arithmetic model behind ``LLaDA2Pipeline`` + ``BlockRefinementScheduler``
(:func:`genunc.zoo.arith_llada2.arith_llada2_pipeline`), wrapped with
``TextUncertaintyPipeline.from_pipe``; the head posterior is fitted with ``upipe.fit_posterior``
on training (prompt, answer) pairs.  For each held-out prompt (the first `--prompts` of the
prompt-order stream of the test seed: the prompts ``bestofn_text.py`` uses) the pipeline draws N
candidates in one call (multinomial sampling at `--temperature`; ``threshold`` above 1 and
``editing_threshold=None``, so each step commits the scheduler's quota of most confident sampled
tokens: with ``block_length=5`` and 4 steps, 2, 1, 1 of the 4 answer tokens, then one more model
call that finds no mask left), with the generator of that prompt's own
``sampler`` stream.  The M head draws come from the run's ``head_draws`` stream and are shared by
every call.  Prints:

1. accuracy, model calls per sequence (counted with a hook on the model), wall time of the plain
   pipeline and of the wrapped one (and that their sequences agree token for token);
2. accuracy of the selected candidate vs N, majority vote, oracle;
3. AUROC(wrong) over all candidates and within a prompt, best of N, with percentile bootstrap 95%
   intervals over prompts (1,000 resamples), next to genunc's own sampler's figures
   (``bestofn_text.py``, docs/results.md "Text: best-of-N").

Nothing is tuned: every figure is on the test seed (2000).

Usage:  OMP_NUM_THREADS=1 python benchmarks/bestofn_llada2.py [--prompts 400] [--n 16] [--draws 8]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from bestofn_text import accuracy_vs_n, mixed_prompts, selection_cells  # benchmarks/
from protocol import TEST_SEED  # benchmarks/protocol.py

from genunc import streams
from genunc.pipelines import TextUncertaintyPipeline
from genunc.scores import random_scores
from genunc.tasks import ArithmeticTask
from genunc.zoo.arith_llada2 import arith_llada2_pipeline
from genunc.zoo.pretrained import read_config
from genunc.zoo.shipped import ARITH_DIR

SCORES = ("mutual_information", "mutual_information_max", "low_confidence", "random")
#: genunc's own sampler on the same task (bestofn_text.py --prompts 400 --n 16 --draws 8; docs/results.md)
OWN_SAMPLER = {"mutual_information": ("0.673 [0.628, 0.715]", "0.452 [0.419, 0.483]"),
               "mutual_information_max": ("0.649 [0.600, 0.690]", "0.487 [0.455, 0.518]"),
               "low_confidence": ("0.668 [0.622, 0.709]", "0.489 [0.431, 0.547]"),
               "random": ("0.501 [0.486, 0.516]", "0.523 [0.494, 0.551]")}


def fitted_wrapped_arith(n_fit: int, seed: int) -> tuple[ArithmeticTask, Any, TextUncertaintyPipeline]:
    """The shipped arith model's task, its ``LLaDA2Pipeline`` and the ``from_pipe`` wrapper with
    its head posterior fitted on the first `n_fit` training (prompt, answer) pairs."""
    config = read_config(ARITH_DIR)
    task = ArithmeticTask(config["task"]["op"], config["task"]["digits"])
    pipe = arith_llada2_pipeline()
    upipe = TextUncertaintyPipeline.from_pipe(pipe)
    upipe.fit_posterior([(task.problem_text(a, b), task.answer_text(task.solve(a, b)))
                         for a, b in task.split()["train"][:n_fit]], repeats=2, seed=seed)
    return task, pipe, upipe


def held_out_pairs(task: ArithmeticTask, seed: int, prompts: int) -> np.ndarray:
    """The first `prompts` test problems in the order of the seed's prompt-order stream (the
    prompts ``bestofn_text.py`` uses)."""
    pairs = task.split()["test"]
    return pairs[streams.numpy_generator(seed, "prompt_order").permutation(len(pairs))[:prompts]]


def pipeline_call(task: ArithmeticTask, block_length: int, temperature: float) -> dict[str, Any]:
    """``LLaDA2Pipeline``'s arguments for one answer: every step commits the scheduler's quota of
    sampled tokens (``threshold`` above 1, no editing)."""
    return dict(gen_length=task.answer_digits, block_length=block_length,
                num_inference_steps=task.answer_digits, temperature=temperature,
                threshold=1.01, editing_threshold=None, use_chat_template=False)


def with_prompts(task: ArithmeticTask, pairs: np.ndarray, answers: list[torch.Tensor]) -> torch.Tensor:
    """Full token sequences (prompt, then answer) for ``task.check``: ``answers[i]`` holds the
    generated answers of prompt ``i``'s candidates."""
    return torch.cat([torch.cat([task.prompts(pairs[i : i + 1]).repeat(len(a), 1)
                                 [:, : task.prompt_length], a], 1) for i, a in enumerate(answers)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--n", type=int, default=16, help="candidates per prompt")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--block-length", type=int, default=5,
                        help="5 or 10 (must divide the 10 positions: the model has no padding)")
    parser.add_argument("--n-fit", type=int, default=4000, help="training pairs the posterior sees")
    parser.add_argument("--seed", type=int, default=TEST_SEED, help="the test seed")
    parser.add_argument("--boot", type=int, default=1000)
    args = parser.parse_args()

    tic = time.perf_counter()
    task, pipe, upipe = fitted_wrapped_arith(args.n_fit, args.seed)
    print(f"posterior ({time.perf_counter() - tic:.0f} s): {upipe.posterior.summary()}")
    draws = upipe.posterior.sample(args.draws, seed=streams.torch_generator(args.seed, "head_draws"))

    pairs = held_out_pairs(task, args.seed, args.prompts)
    p, n = len(pairs), args.n
    texts = [task.problem_text(a, b) for a, b in pairs]
    call = pipeline_call(task, args.block_length, args.temperature)

    calls = [0]
    counter = pipe.model.register_forward_pre_hook(lambda module, inputs: calls.__setitem__(0, calls[0] + 1))
    try:
        tic = time.perf_counter()
        plain = [pipe(prompt=[t] * n, generator=streams.torch_generator(args.seed, "sampler_noise", i),
                      **call).sequences for i, t in enumerate(texts)]
        t_plain, nfe_plain = time.perf_counter() - tic, calls[0]
        calls[0] = 0
        tic = time.perf_counter()
        outs = [upipe(prompt=[t] * n, generator=streams.torch_generator(args.seed, "sampler_noise", i),
                      draws=draws, scores=SCORES[:-1], **call) for i, t in enumerate(texts)]
        t_wrapped, nfe_wrapped = time.perf_counter() - tic, calls[0]
    finally:
        counter.remove()
    same = all(torch.equal(a, o.sequences) for a, o in zip(plain, outs))

    full = with_prompts(task, pairs, [o.sequences for o in outs])
    correct = task.check(full).reshape(p, n)
    answers = np.array([task.decode(t[task.prompt_length :]) for t in full]).reshape(p, n)
    scores = {k: np.concatenate([o.scores[k] for o in outs]).reshape(p, n) for k in SCORES[:-1]}
    scores["random"] = random_scores(args.seed, range(p * n)).reshape(p, n)

    print(f"\n{p} held-out prompts x {n} candidates through LLaDA2Pipeline + BlockRefinementScheduler "
          f"(multinomial, temperature {args.temperature}); M = {args.draws}")
    print(f"single-sample accuracy: {correct.mean():.1%} (genunc's own sampler: 28.7%, 400 x 16)")
    schedule = pipe.scheduler.get_num_transfer_tokens(args.block_length, task.answer_digits).tolist()
    print(f"model calls per sequence (NFE; one call serves the {n} rows of a prompt): plain "
          f"{nfe_plain / p:.2f}, wrapped {nfe_wrapped / p:.2f}; block_length {args.block_length}, "
          f"commit quota per step {schedule}")
    print(f"wall time ({torch.get_num_threads()} thread(s)): plain pipeline {t_plain:.1f} s, wrapped "
          f"with MI {t_wrapped:.1f} s ({t_wrapped / t_plain:.2f}x); sequences equal token for token: {same}")

    accuracy_vs_n(correct, {name: scores[name] for name in SCORES}, answers)
    print(f"\nAUROC(wrong) over all candidates and within a prompt ({len(mixed_prompts(correct))} "
          "prompts with right and wrong candidates); genunc's own sampler (400 x 16) alongside")
    print(f"| score | AUROC(wrong) | within prompt | best of {n} | acc kept 50% | own sampler: AUROC | "
          "own: within prompt |")
    print("|---|---|---|---|---:|---|---|")
    for name in SCORES:
        cells = selection_cells(correct, scores[name], args.boot)[:4]
        own = OWN_SAMPLER[name]
        print(f"| {name} | " + " | ".join(cells) + f" | {own[0]} | {own[1]} |")


if __name__ == "__main__":
    main()
