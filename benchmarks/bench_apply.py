"""How much cheaper is applying M head draws in one op than M full denoiser forwards?

Builds a small diffusers UNet2DModel (untrained; timing does not depend on the weights), fits a
diagonal head posterior on random data, and times, for M draws on one batch:

  loop      M full-model forwards, draw m swapped into conv_out (what naive code does)
  batched   one full forward of a batch M times larger (the naive batched alternative)
  genunc    one full forward + all M heads in one grouped conv (features shared)
  heads     the grouped conv alone

Usage:  python benchmarks/bench_apply.py [--draws 8] [--batch 16] [--size 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import UNet2DModel
from torch.func import functional_call

from genunc.adapters import NoisePredictionAdapter
from genunc.posterior import HeadPosterior, capture_head


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = UNet2DModel(
        sample_size=args.size, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ).to(device).eval()
    adapter = NoisePredictionAdapter(unet, "conv_out", call=lambda m, x, t: m(x, t).sample)
    data = [torch.randn(16, 1, args.size, args.size) for _ in range(2)]
    post = HeadPosterior.fit(adapter, data, progress=False)
    draws = post.sample(args.draws, seed=0)
    x = torch.randn(args.batch, 1, args.size, args.size, device=device)
    t = torch.full((args.batch,), 500, device=device)
    n_params = sum(p.numel() for p in unet.parameters())

    @torch.no_grad()
    def loop():
        for m in range(args.draws):
            params = {f"conv_out.{k}": v[m] for k, v in draws.params.items()}
            functional_call(unet, params, (x, t))

    @torch.no_grad()
    def batched():
        unet(x.repeat(args.draws, 1, 1, 1), t.repeat(args.draws))

    features = {}

    @torch.no_grad()
    def genunc_path():
        with capture_head(unet.conv_out) as record:
            unet(x, t)
        features["phi"] = record.features
        draws.apply(record.features)

    genunc_path()

    @torch.no_grad()
    def heads_only():
        draws.apply(features["phi"])

    # correctness first: the batched heads equal the per-draw full forwards
    with torch.no_grad():
        full = torch.stack([
            functional_call(unet, {f"conv_out.{k}": v[m] for k, v in draws.params.items()},
                            (x, t)).sample for m in range(args.draws)])
        fast = draws.apply(features["phi"])
    err = (full - fast).abs().max().item()

    t_loop, t_batched = timed(loop, args.repeats), timed(batched, args.repeats)
    t_genunc, t_heads = timed(genunc_path, args.repeats), timed(heads_only, args.repeats)
    t_one = timed(lambda: unet(x, t), args.repeats)
    print(f"device {device} ({torch.get_num_threads()} threads), UNet2DModel {n_params / 1e6:.2f}M "
          f"params, batch {args.batch} x 1x{args.size}x{args.size}, M = {args.draws} draws")
    print(f"max |batched heads - full forwards| = {err:.2e}")
    print(f"{'path':<34}{'ms':>10}{'x one forward':>16}")
    rows = [("one plain forward", t_one), ("loop: M full forwards", t_loop),
            ("batched: one forward of M*B", t_batched), ("genunc: forward + M heads", t_genunc),
            ("genunc: M heads alone", t_heads)]
    for name, value in rows:
        print(f"{name:<34}{value * 1e3:>10.2f}{value / t_one:>16.2f}")
    print(f"speed-up of genunc over the loop of M full forwards: {t_loop / t_genunc:.1f}x "
          f"(heads alone: {t_loop / t_heads:.0f}x)")


if __name__ == "__main__":
    main()
