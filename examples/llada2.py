"""Score the generations of your own diffusers LLaDA2Pipeline with a Laplace head posterior.

    python examples/llada2.py                        # the shipped arithmetic model, no download
    python examples/llada2.py --model /path/to/LLaDA2.x-mini --prompt "What is 17 * 23?" \
        --fit-data pairs.jsonl                        # a local checkpoint (trust_remote_code)

``pairs.jsonl`` holds ``{"prompt": ..., "answer": ...}`` lines to fit the posterior on (a few
hundred in-domain pairs).  The pipeline's own arguments pass through unchanged; the wrapper
returns exactly its sequences and texts, plus one score per sequence (lower = more certain) and
one mutual information per generated token.
"""

import argparse
import json

import torch

from genunc.pipelines.text import TextUncertaintyPipeline


def arithmetic():
    from genunc.tasks import ArithmeticTask
    from genunc.zoo.arith_llada2 import arith_llada2_pipeline

    task = ArithmeticTask("*", 2)
    split = task.split(seed=0)
    fit = [(task.problem_text(a, b), task.answer_text(task.solve(a, b))) for a, b in split["train"][:500]]
    prompts = [task.problem_text(a, b) for a, b in split["test"][:8]]
    call = dict(gen_length=4, block_length=10, num_inference_steps=4, threshold=1.01,
                editing_threshold=None)
    return arith_llada2_pipeline(), fit, prompts, call, task


def local_checkpoint(path, fit_data, prompt, gen_length):
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                 dtype=torch.bfloat16, device_map="auto")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    pipe = LLaDA2Pipeline(model=model, scheduler=BlockRefinementScheduler(), tokenizer=tokenizer)
    with open(fit_data) as f:
        fit = [(row["prompt"], row["answer"]) for row in map(json.loads, f)]
    return pipe, fit, prompt, dict(gen_length=gen_length), None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a local LLaDA 2.x checkpoint folder")
    parser.add_argument("--fit-data", help="JSONL of {prompt, answer} (with --model)")
    parser.add_argument("--prompt", default="What is 17 * 23?")
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--num-draws", type=int, default=8)
    args = parser.parse_args()
    if args.model:
        if not args.fit_data:
            parser.error("--model needs --fit-data")
        pipe, fit, prompts, call, task = local_checkpoint(args.model, args.fit_data, args.prompt,
                                                          args.gen_length)
    else:
        pipe, fit, prompts, call, task = arithmetic()
        call["use_chat_template"] = False
    upipe = TextUncertaintyPipeline.from_pipe(pipe)
    upipe.fit_posterior(fit, repeats=2)
    print(upipe.posterior)
    out = upipe(prompt=prompts, num_draws=args.num_draws, generator=torch.Generator().manual_seed(0),
                scores=("mutual_information", "mutual_information_max", "low_confidence"), **call)
    prompts = [prompts] if isinstance(prompts, str) else prompts
    for i, (prompt, text) in enumerate(zip(prompts, out.texts)):
        verdict = ""
        if task is not None:
            verdict = "correct" if task.check(torch.tensor([task.encode(prompt + text)]))[0] else "wrong"
        print(f"{prompt!r} -> {text!r} {verdict}  MI {out.scores['mutual_information'][i]:.4f}  "
              f"max {out.scores['mutual_information_max'][i]:.4f}  "
              f"1-conf {out.scores['low_confidence'][i]:.4f}")


if __name__ == "__main__":
    main()
