"""The ``genunc`` command line.

Subcommands grow with the project; each one explains itself with ``--help``.
"""

from __future__ import annotations

import argparse
import sys

from genunc._version import __version__


def _demo(args: argparse.Namespace) -> int:
    """Generative uncertainty on the shipped digits DDPM: contact sheet, CSV, retention plot."""
    from genunc.demos import digits as demo

    print(f"genunc {__version__}: digits demo -> {args.out}")
    summary = demo.run(args.out, n_samples=args.samples, num_draws=args.draws, steps=args.steps,
                       seed=args.seed)
    post = summary["posterior"]
    print(f"posterior: {post['structure']} over '{post['head']}' ({post['n_params']} weights, "
          f"{post['n_data_rows']} rows), prior precision {post['prior_precision']:.4g}, "
          f"sigma {post['sigma_noise']:.4g}, relative perturbation {post['relative_perturbation']:.3g}")
    print(f"{summary['n_samples']} digits, M = {summary['num_draws']} draws, {summary['steps']} "
          f"DDIM steps; classifier agrees with the requested digit for "
          f"{summary['class_agreement_all']:.1%}")
    print(f"{'score':<16}{'AUROC(wrong)':>14}{'agree@80%':>12}{'Spearman(p)':>13}")
    for name, row in summary["scores"].items():
        print(f"{name:<16}{row['auroc_wrong_class']:>14.3f}{row['agreement_kept_80pct']:>12.1%}"
              f"{row['spearman_vs_p_label']:>13.3f}")
    secs = summary["seconds"]
    print(f"time: posterior {secs['posterior']:.1f}s, generation {secs['generation']:.1f}s, "
          f"features {secs['features']:.1f}s")
    print(f"wrote {args.out}/contact_sheet.png, scores.csv, retention.png, summary.json")
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
        description="Generate digits with the shipped DDPM, score their uncertainty, and write a "
        "contact sheet sorted by uncertainty, a CSV of scores and a retention plot.",
        epilog="example: genunc demo --samples 256 --draws 5 --out outputs/demo",
    )
    demo.add_argument("--samples", type=int, default=256, help="digits to generate (default 256)")
    demo.add_argument("--draws", type=int, default=5, help="posterior draws M (default 5)")
    demo.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="outputs/demo", help="output directory")
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
