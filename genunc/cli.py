"""The ``genunc`` command line.

Subcommands grow with the project; each one explains itself with ``--help``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from genunc._version import __version__


def _demo(args: argparse.Namespace) -> int:
    """Core smoke run: fit a head posterior on a toy denoiser, draw, apply, save and reload."""
    import torch

    from genunc.adapters import NoisePredictionAdapter
    from genunc.posterior import HeadPosterior, capture_head
    from genunc.zoo.toy import ToyImageDenoiser

    torch.manual_seed(args.seed)
    model = ToyImageDenoiser(channels=1, width=32).eval()
    adapter = NoisePredictionAdapter(model, "conv_out")
    data = [torch.randn(32, 1, 16, 16) for _ in range(4)]
    print(f"genunc {__version__}: core demo on an untrained toy denoiser "
          "(the digits reference model arrives with the image pipeline)")
    post = HeadPosterior.fit(adapter, data, repeats=2, structure=args.structure, seed=args.seed)
    for key, value in post.summary().items():
        print(f"  {key:>22}: {value}")

    x = torch.randn(16, 1, 16, 16)
    t = torch.full((16,), 500)
    with torch.no_grad(), capture_head(adapter.head) as record:
        start = time.perf_counter()
        adapter.denoise(x=x, t=t)
        backbone = time.perf_counter() - start
        draws = post.sample(args.draws, seed=args.seed)
        start = time.perf_counter()
        outs = post.apply(record.features, draws)
        heads = time.perf_counter() - start
    spread = outs.var(0).mean().item()
    print(f"  {args.draws} head draws applied in one op: {heads * 1e3:.2f} ms "
          f"(one full forward: {backbone * 1e3:.2f} ms); mean predicted-noise variance {spread:.3g}")
    with tempfile.TemporaryDirectory() as tmp:
        post.save(tmp)
        same = HeadPosterior.load(tmp, model).sample(args.draws, seed=args.seed).flat
        print(f"  save/load round trip reproduces the draws: {bool(torch.equal(same, draws.flat))}")
    return 0


def _zoo_train(args: argparse.Namespace) -> int:
    """Train a reference model and write it where genunc loads it from (or to --out)."""
    import json

    from genunc.zoo import digits

    if args.model == "digits-classifier":
        recipe = digits.ClassifierRecipe(seed=args.seed, **({"epochs": args.epochs} if args.epochs else {}))
        report = digits.train_classifier(recipe, args.out or digits.CLASSIFIER_DIR)
    else:
        overrides = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size}.items() if v}
        recipe = digits.DDPMRecipe(seed=args.seed, **overrides)
        report = digits.train_ddpm(recipe, args.out or digits.DDPM_DIR, device=args.device)
    print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genunc",
        description="Post-hoc Laplace uncertainty for pretrained diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"genunc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="run the demo job",
        description="Fit a head posterior, draw M weight sets and apply them in one op.",
        epilog="example: genunc demo --draws 8 --structure kron",
    )
    demo.add_argument("--draws", type=int, default=8, help="posterior draws M (default 8)")
    demo.add_argument("--structure", choices=["diag", "kron", "full"], default="diag")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    zoo = sub.add_parser("zoo", help="reference models: train them", description="Reference models.")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    train = zoo_sub.add_parser(
        "train",
        help="train a reference model",
        description="Train a shipped reference model with its recorded recipe.",
        epilog="example: genunc zoo train digits-ddpm --steps 4000 --batch-size 48",
    )
    train.add_argument("model", choices=["digits-ddpm", "digits-classifier"])
    train.add_argument("--out", help="output directory (default: the package's weights folder)")
    train.add_argument("--steps", type=int, help="DDPM optimiser steps")
    train.add_argument("--batch-size", type=int, help="DDPM batch size")
    train.add_argument("--epochs", type=int, help="classifier epochs")
    train.add_argument("--device", help="torch device (default: cuda if available)")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=_zoo_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
