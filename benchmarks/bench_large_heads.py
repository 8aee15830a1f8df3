"""Fit time and peak memory of the head posterior for real-size heads, on CPU.

* Stable Diffusion 1.5's ``conv_out``: Conv2d(320 -> 4, 3x3) on 64x64 latents (one row per
  sample: a (320, 64, 64) input, a 16,384-dim output);
* DiT-XL/2's ``proj_out_2``: Linear(1152 -> 2*2*8) on 256 patch tokens per 256px image (one row
  per token).

The head shapes are read off the real configs (models built on the meta device: no weights, no
memory); the head inputs are random with the right shapes and the targets the head's output plus
noise, which is all the fit sees.  Each (head, structure) runs in its own process, so that its
peak resident memory (``getrusage``) is its own; the table gives the rise over the process's
memory before the fit, and the inputs' own size.

Usage:  OMP_NUM_THREADS=1 python benchmarks/bench_large_heads.py [--samples 64] [--timeout 600]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
DIT_XL2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
               sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


def real_head(name: str) -> tuple[nn.Module, str, tuple[int, ...]]:
    """A head with the real model's shape (randomly initialised), its name, and one row's input shape."""
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel

    with torch.device("meta"):
        if name == "sd15_conv_out":
            model = UNet2DConditionModel(**SD15)
            conv = model.conv_out
            head = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
            shape = (conv.in_channels, SD15["sample_size"], SD15["sample_size"])
        else:
            model = DiTTransformer2DModel(**DIT_XL2)
            lin = model.proj_out_2
            head = nn.Linear(lin.in_features, lin.out_features)
            shape = (lin.in_features,)
    label = "SD 1.5 UNet2DConditionModel" if name == "sd15_conv_out" else "DiT-XL/2 DiTTransformer2DModel"
    return head.to_empty(device="cpu").requires_grad_(True), label, shape


def one(name: str, structure: str, samples: int, batch_size: int) -> dict:
    from genunc.posterior import HeadPosterior

    torch.manual_seed(0)
    head, model, shape = real_head(name)
    nn.init.normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    rows = samples if name == "sd15_conv_out" else samples * (DIT_XL2["sample_size"] // 2) ** 2
    features = torch.randn(rows, *shape)
    with torch.no_grad():
        targets = head(features)
        targets = (targets + 0.1 * torch.randn_like(targets)).flatten(1)  # one row per sample/token
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    post = HeadPosterior.fit_features(head, (features, targets), structure=structure,
                                      batch_size=batch_size)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = post.summary()
    return {"model": model, "head": str(head), "params": sum(p.numel() for p in head.parameters()),
            "rows": rows, "inputs_mb": (features.numel() + targets.numel()) * 4 / 2**20,
            "seconds": seconds, "rise_mb": peak - before, "peak_mb": peak,
            "prior_precision": float(summary["prior_precision"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--samples", type=int, default=64, help="images whose head inputs are fitted")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per curvature batch")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per (head, structure)")
    parser.add_argument("--one", nargs=2, metavar=("HEAD", "STRUCTURE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.samples, args.batch_size)))
        return
    print(f"head posterior fits on CPU ({torch.get_num_threads()} threads), {args.samples} images, "
          f"curvature batches of {args.batch_size} rows, prior precision by marginal likelihood")
    print("| model | head | params | rows | inputs MB | structure | fit s | peak RSS rise MB | peak RSS MB |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|")
    for name in ("sd15_conv_out", "dit_xl2_proj_out_2"):
        for structure in ("diag", "kron"):
            cmd = [sys.executable, __file__, "--one", name, structure, "--samples", str(args.samples),
                   "--batch-size", str(args.batch_size)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"| {name} | | | | | {structure} | > {args.timeout} (stopped) | | |")
                continue
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["?"])[-1]
                print(f"| {name} | | | | | {structure} | failed: {last} | | |")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {r['model']} | `{r['head']}` | {r['params']:,} | {r['rows']:,} | {r['inputs_mb']:.0f} "
                  f"| {structure} | {r['seconds']:.1f} | {r['rise_mb']:.0f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
