"""What scoring costs on top of the plain diffusers pipeline call, for wrapped pipelines.

Rows: the plain ``pipe(...)``; ``from_pipe`` with exact variability only (one pipeline call,
the closed form per head evaluation); with the semantic score (M + 1 pipeline calls).  Models:
the tiny random Stable Diffusion and DiT of the tests (``tests/test_from_pipe.py``: 8x8
latents, 3 steps, 2 prompts) and the shipped ``digits_latent`` DiT (16 digits, 50 DDIM steps,
unguided).  Median of ``--repeats`` runs after one warm-up, one process, CPU.

Usage:  OMP_NUM_THREADS=1 python benchmarks/bench_wrap_overhead.py [--draws 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from protocol import timed  # benchmarks/protocol.py

from genunc.features import flatten_pixels
from genunc.pipelines import ImageUncertaintyPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def tiny(kind: str, folder: Path):
    from test_from_pipe import build  # the tests' tiny pipelines, built from configs

    pipe, call, fit = build(kind, folder=folder)
    images = fit.pop("images")
    upipe = ImageUncertaintyPipeline.from_pipe(pipe, feature_extractor=flatten_pixels)
    upipe.fit_posterior(images, progress=False, **fit)
    return pipe, upipe, {**call, "output_type": "pt"}


def latent():
    from diffusers import DiTPipeline

    from genunc.zoo.digits import split_digits
    from genunc.zoo.shipped import LATENT_DIR

    pipe = DiTPipeline.from_pretrained(LATENT_DIR)
    pipe.set_progress_bar_config(disable=True)
    images, labels = split_digits()["train"]
    upipe = ImageUncertaintyPipeline.from_pipe(pipe, feature_extractor=flatten_pixels)
    upipe.fit_posterior(images[:256], class_labels=labels[:256], progress=False)
    call = dict(class_labels=list(range(10)) + list(range(6)), guidance_scale=1.0,
                num_inference_steps=50, output_type="pt")
    return pipe, upipe, call


def measure(pipe, upipe, call: dict, args: argparse.Namespace) -> tuple[float, float, float]:
    """Median seconds of the plain call, the variability-scored and the semantic-scored call."""

    def g() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    plain = timed(lambda: pipe(generator=g(), **call), args.repeats)
    var = timed(lambda: upipe(generator=g(), num_draws=args.draws, scores=("variability",),
                              progress=False, **call), args.repeats)
    sem = timed(lambda: upipe(generator=g(), num_draws=args.draws, scores=("semantic",),
                              progress=False, **call), args.repeats)
    return plain, var, sem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import tempfile

    print(f"M = {args.draws}, median of {args.repeats} runs, {torch.get_num_threads()} thread(s)")
    print("| model | plain pipe(...) s | variability | x plain | semantic | x plain |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (("tiny SD (3 steps, 2 prompts, CFG)", lambda: tiny("sd", Path(tmp))),
                           ("tiny DiT (3 steps, 2 labels, CFG)", lambda: tiny("dit", Path(tmp))),
                           ("digits_latent DiT (50 steps, 16 digits)", latent)):
            plain, var, sem = measure(*make(), args)
            print(f"| {name} | {plain:.3f} | {var:.3f} | {var / plain:.2f} | {sem:.3f} | "
                  f"{sem / plain:.2f} |")


if __name__ == "__main__":
    main()
