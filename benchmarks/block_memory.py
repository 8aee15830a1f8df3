"""Peak memory of generation with a block posterior, per weight draw.

A random Stable Diffusion built like the tests' tiny one (``tests/test_from_pipe.py``) at
``--size`` latents and ``--width`` channels, 2 prompts, 3 DDIM steps, wrapped by ``from_pipe``
with a posterior over its last up-block (``tail=1``) and scored with every image score at M
draws.  For each M the process's peak resident memory is reset (Linux
``/proc/self/clear_refs``), the call is made, and the rise of the peak over the resident memory
before it is printed; the slope over M is the memory one draw costs.  glibc's allocator would
keep freed tensors' pages and hide the rise, so the script runs itself with a fixed mmap
threshold (freed large blocks go back to the system).  One process, CPU.

Usage:  python benchmarks/block_memory.py [--draws 3 6 9] [--size 32] [--width 32]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from genunc.features import flatten_pixels
from genunc.pipelines import ImageUncertaintyPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _status(field: str) -> float:
    """A /proc/self/status field in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rise(call) -> float:
    """MB by which `call()` raises the peak resident memory above the resident memory before."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # peak := current
    before = _status("VmRSS")
    call()
    return _status("VmHWM") - before


def stable_diffusion(size: int, width: int):
    """The tests' tiny Stable Diffusion with `width`-channel blocks at `size` x `size`."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from test_from_pipe import PROMPTS, _clip_text, _clip_tokenizer, _ddim, _vae

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(width, 2 * width), layers_per_block=1, sample_size=size,
        in_channels=4, out_channels=4, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=2).eval()
    with tempfile.TemporaryDirectory() as folder:
        pipe = StableDiffusionPipeline(
            unet=unet, scheduler=_ddim(), vae=_vae(), text_encoder=_clip_text(),
            tokenizer=_clip_tokenizer(Path(folder)), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=PROMPTS, guidance_scale=7.5, num_inference_steps=3, height=size,
                width=size)
    fit = dict(images=torch.rand(8, 3, size, size) * 2 - 1, prompts=PROMPTS * 4)
    return pipe, call, fit


def main() -> None:
    from test_from_pipe import ALL_SCORES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    args = parser.parse_args()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    torch.set_num_threads(1)
    pipe, call, fit = stable_diffusion(args.size, args.width)
    upipe = ImageUncertaintyPipeline.from_pipe(pipe, feature_extractor=flatten_pixels)
    images = fit.pop("images")
    fit_mb = rise(lambda: upipe.fit_posterior(images, progress=False, tail=1, **fit))
    print(f"block posterior over {upipe.posterior.names} ({upipe.posterior.n_params} weights): "
          f"fit raises the peak by {fit_mb:.0f} MB")
    rises = []
    for m in args.draws:
        def generate(m=m):
            upipe(generator=torch.Generator().manual_seed(0), output_type="np", num_draws=m,
                  scores=ALL_SCORES, variance="monte_carlo", progress=False, **call)
        generate()  # warm-up: first-call allocations are not a draw's
        rises.append(rise(generate))
        print(f"M={m}: generation raises the peak by {rises[-1]:.1f} MB")
    slope = np.polyfit(args.draws, rises, 1)[0]
    print(f"per draw: {slope:.2f} MB (least-squares slope over M={args.draws})")


if __name__ == "__main__":
    main()
