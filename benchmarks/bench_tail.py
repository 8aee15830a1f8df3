"""What do M posterior draws of a tail cost, against full forwards?

On the shipped digits UNet and the shipped QM9 e3nn denoiser (CPU, one batch), times:

  full forward     one forward of the whole denoiser
  M full forwards  M forwards, one per draw (what re-running the model per draw costs)
  head / last block / last two blocks
                   the tail alone re-run under M draws in one batched call
                   (vmap over functional_call) on inputs recorded by one forward; for the head
                   also genunc's specialised head op (grouped conv / e3nn vmap)

The draws are the pretrained weights plus small Gaussian noise: timing does not depend on the
posterior.  Variability scoring with a tail costs one full forward + the tail row per step.

Usage:  python benchmarks/bench_tail.py [--draws 8] [--batch 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from protocol import timed  # benchmarks/protocol.py

from genunc.posterior import Tail, default_tail, head_ops_for


def perturbed(tail: Tail, draws: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: v.detach()[None] + 1e-3 * torch.randn(draws, *v.shape, generator=g)
            for k, v in tail.parameters().items()}


def bench(name: str, model: torch.nn.Module, forward, head_name: str, draws: int,
          repeats: int) -> list[tuple[str, str, int, float]]:
    rows = []
    with torch.no_grad():
        full = timed(forward, repeats)
        rows.append((name, "full forward", 0, full))
        rows.append((name, f"{draws} full forwards", 0,
                     timed(lambda: [forward() for _ in range(draws)], 1)))
        tails = [("head", [head_name])] + [
            (f"last {'block' if k == 1 else f'{k} blocks'}", default_tail(model, k))
            for k in (1, 2)]
        for label, names in tails:
            tail = Tail(model, names)
            with tail.capture() as rec:
                forward()
            inputs = tail.inputs_of(rec, 0)
            params = perturbed(tail, draws)
            rows.append((name, f"{draws} draws: {label} (vmap)", tail.n_params,
                         timed(lambda t=tail, p=params, i=inputs: t.apply(p, i), repeats)))
            if label == "head":
                ops = head_ops_for(tail.modules[0])
                phi = inputs.calls[0][0][0][0]  # first call, its args, the first one
                head_params = {k.removeprefix(f"{head_name}."): v for k, v in params.items()}
                rows.append((name, f"{draws} draws: head (genunc head op)", tail.n_params,
                             timed(lambda o=ops, f=phi, p=head_params: o.apply(f, p), repeats)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []

    from diffusers import UNet2DModel

    from genunc.zoo.shipped import DDPM_DIR
    unet = UNet2DModel.from_pretrained(DDPM_DIR, low_cpu_mem_usage=False).eval()
    x = torch.randn(args.batch, 1, unet.config.sample_size, unet.config.sample_size)
    t = torch.randint(0, 1000, (args.batch,))
    y = torch.arange(args.batch) % 10
    rows += bench("digits UNet", unet, lambda: unet(x, t, class_labels=y).sample, "conv_out",
                  args.draws, args.repeats)

    from genunc.zoo.molecule_model import EquivariantDenoiser
    from genunc.zoo.shipped import QM9_DIR
    mol = EquivariantDenoiser.from_pretrained(QM9_DIR).eval()
    hist = json.loads((QM9_DIR / "atom_histogram.json").read_text())
    sizes, counts = np.array([int(k) for k in hist]), np.array(list(hist.values()), float)
    n_atoms = np.random.default_rng(0).choice(sizes, args.batch, p=counts / counts.sum())
    width = int(sizes.max())
    mask = torch.arange(width)[None] < torch.as_tensor(n_atoms)[:, None]
    xm = torch.randn(args.batch, width, 3 + mol.n_features) * mask[..., None]
    tm = torch.rand(args.batch)
    rows += bench("QM9 e3nn", mol, lambda: mol(xm, tm, mask), "head", args.draws, args.repeats)

    print(f"\nCPU, batch {args.batch}, M = {args.draws} draws, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} (M full forwards: once)")
    print(f"{'model':<12} {'what':<34} {'params':>8} {'ms':>10} {'x full fwd':>10}")
    full = {}
    for model, what, n, seconds in rows:
        full.setdefault(model, seconds)
        print(f"{model:<12} {what:<34} {n or '':>8} {seconds * 1e3:>10.1f} "
              f"{seconds / full[model]:>10.3f}")


if __name__ == "__main__":
    main()
