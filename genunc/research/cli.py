"""``genunc zoo train <model>``: retrain a shipped reference model with its recorded recipe.

The lab's one command.  The ``genunc`` parser never imports this module: it adds the command
through the ``genunc.commands`` entry point ``zoo`` (:func:`genunc.plugins.command_plugins`),
which calls :func:`add_parser`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from genunc.errors import GenuncError


def _zoo_train(args: argparse.Namespace) -> int:
    """Train a reference model into --out (default outputs/zoo/<model>); the shipped weights are
    overwritten only with --overwrite."""
    import json

    from genunc.research import judges
    from genunc.research.recipes import arith, digits, digits_latent, order_tasks, qm9
    from genunc.zoo import shipped

    if args.model == "unmask-policy":
        return _train_policy(args)
    if args.model == "rl-dataset":
        return _train_rl_dataset(args)
    rl_only = [flag for flag, value in (("--env", args.env), ("--eval-every", args.eval_every),
                                        ("--eval-episodes", args.eval_episodes),
                                        ("--transitions", args.transitions),
                                        ("--learning-starts", args.learning_starts),
                                        ("--ship", args.ship or None))
               if value is not None]
    if rl_only:
        raise GenuncError(f"{', '.join(rl_only)} apply to rl-dataset only")
    policy_only = [flag for flag, value in (("--task", args.task), ("--inputs", args.inputs),
                                            ("--block-length", args.block_length),
                                            ("--prompts-per-batch", args.prompts_per_batch),
                                            ("--group", args.group), ("--alpha", args.alpha),
                                            ("--warm-start", args.warm_start),
                                            ("--advantage", args.advantage))
                   if value is not None]
    if policy_only:
        raise GenuncError(f"{', '.join(policy_only)} apply to unmask-policy only")
    folders = {"digits-ddpm": shipped.DDPM_DIR, "digits-classifier": shipped.CLASSIFIER_DIR,
               "digits-judge": shipped.JUDGE_DIR, "qm9-edm": shipped.QM9_DIR,
               "arith-mdlm": shipped.ARITH_DIR, "digits-latent": shipped.LATENT_DIR,
               "sudoku4-mdlm": shipped.SUDOKU4_DIR, "sort-mdlm": shipped.SORT_DIR,
               "addition-mdlm": shipped.ADDITION_DIR}
    out = Path(args.out or Path("outputs") / "zoo" / args.model)
    if out.resolve() == folders[args.model].resolve() and not args.overwrite:
        raise GenuncError(f"{out} holds the shipped {args.model} weights; pass --overwrite to "
                          "replace them, or train into another --out")
    if args.vae_steps and args.model != "digits-latent":
        raise GenuncError("--vae-steps applies to digits-latent only")
    if args.max_minutes and args.model != "qm9-edm":
        raise GenuncError("--max-minutes applies to qm9-edm only (the others finish in minutes)")
    given = {"steps": args.steps, "batch_size": args.batch_size, "max_minutes": args.max_minutes}
    seed = {} if args.seed is None else {"seed": args.seed}  # absent: the recipe's own seed
    epochs = {"epochs": args.epochs} if args.epochs else {}
    if args.model == "arith-mdlm":
        overrides = {k: v for k, v in given.items() if v and k != "max_minutes"}
        report = arith.train_arith(arith.ArithRecipe(**seed, **overrides), out,
                                   device=args.device)
    elif args.model in ("sudoku4-mdlm", "sort-mdlm", "addition-mdlm"):
        overrides = {k: v for k, v in given.items() if v and k != "max_minutes"}
        recipe, train = {"sudoku4-mdlm": (order_tasks.Sudoku4Recipe, order_tasks.train_sudoku4),
                         "sort-mdlm": (order_tasks.SortRecipe, order_tasks.train_sort),
                         "addition-mdlm": (order_tasks.AdditionRecipe, order_tasks.train_addition),
                         }[args.model]
        report = train(recipe(**seed, **overrides), out, device=args.device)
    elif args.model == "qm9-edm":
        overrides = {k: v for k, v in given.items() if v}
        report = qm9.train_qm9(qm9.QM9Recipe(**seed, **overrides), out, device=args.device)
    elif args.model == "digits-classifier":
        report = digits.train_classifier(digits.ClassifierRecipe(**seed, **epochs), out)
    elif args.model == "digits-judge":
        report = judges.train_judge(judges.JudgeRecipe(**seed, **epochs), out)
    elif args.model == "digits-latent":
        overrides = {k: v for k, v in given.items() if v and k != "max_minutes"}
        vae_steps = {"vae_steps": args.vae_steps} if args.vae_steps else {}
        report = digits_latent.train_latent(digits_latent.LatentRecipe(**seed, **overrides, **vae_steps),
                                            out, device=args.device)
    else:
        overrides = {k: v for k, v in given.items() if v and k != "max_minutes"}
        report = digits.train_ddpm(digits.DDPMRecipe(**seed, **overrides), out,
                                   device=args.device)
    print(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


def _train_rl_dataset(args: argparse.Namespace) -> int:
    """``genunc zoo train rl-dataset``: SAC behaviour policy, then medium and medium-replay
    offline datasets (:mod:`genunc.research.recipes.rl_dataset`)."""
    import json

    from genunc.research.recipes import rl_dataset
    from genunc.rl.data import shipped_dir

    if args.batch_size or args.epochs or args.vae_steps or args.max_minutes:
        raise GenuncError("rl-dataset takes --env, --steps, --eval-every, --eval-episodes, "
                          "--transitions, --learning-starts, --sac-width, --sac-lr, --seed, --out, "
                          "--ship and --device")
    given = {"env": args.env, "steps": args.steps, "eval_every": args.eval_every,
             "eval_episodes": args.eval_episodes, "transitions": args.transitions,
             "learning_starts": args.learning_starts, "seed": args.seed,
             "width": args.sac_width, "learning_rate": args.sac_lr}
    recipe = rl_dataset.RLDatasetRecipe(**{k: v for k, v in given.items() if v is not None})
    out = Path(args.out or Path("outputs") / "zoo" / f"rl-dataset-{recipe.env}")
    if out.resolve() == shipped_dir(recipe.env).resolve():
        raise GenuncError(f"{out} is the shipped datasets' folder; train into another --out "
                          "and pass --ship to copy the datasets there")
    report = rl_dataset.train_rl_dataset(recipe, out, device=args.device, ship=args.ship)
    print(json.dumps({k: report[k] for k in ("random_return", "best_return", "medium",
                                             "datasets")}, indent=2))
    print(f"wrote {out}")
    return 0


def _train_policy(args: argparse.Namespace) -> int:
    """``genunc zoo train unmask-policy``: GRPO on a shipped frozen model
    (:mod:`genunc.research.recipes.policy`)."""
    import json

    from genunc.research.recipes import policy
    from genunc.zoo.shipped import policy_dir

    if args.batch_size or args.epochs or args.vae_steps or args.max_minutes:
        raise GenuncError("unmask-policy takes --steps, --prompts-per-batch, --group, --alpha, "
                          "--warm-start, --warm-steps, --task, --inputs, --block-length and "
                          "--seed")
    given = {"task": args.task, "inputs": args.inputs, "block_length": args.block_length,
             "steps": args.steps, "prompts_per_batch": args.prompts_per_batch,
             "group": args.group, "alpha": args.alpha, "seed": args.seed,
             "warm_start": args.warm_start, "advantage": args.advantage,
             "warm_steps": args.warm_steps if args.warm_start is not None else None}
    recipe = policy.PolicyRecipe(**{k: v for k, v in given.items() if v is not None})
    shipped = policy_dir(recipe.task, recipe.inputs, recipe.block_length)
    out = Path(args.out or Path("outputs") / "zoo" / shipped.name)
    if out.resolve() == shipped.resolve() and not args.overwrite:
        raise GenuncError(f"{out} holds the shipped policy; pass --overwrite to replace it, or "
                          "train into another --out")
    report = policy.train_policy(recipe, out)
    print(json.dumps(report["training"]["validation"], indent=2))
    print(f"wrote {out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``genunc zoo`` (with ``zoo train``) to the ``genunc`` parser's subparsers."""
    zoo = sub.add_parser("zoo", help="reference models: train them", description="Reference models.")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    train = zoo_sub.add_parser(
        "train",
        help="train a reference model",
        description="Train a shipped reference model with its recorded recipe.",
        epilog="example: genunc zoo train digits-ddpm --steps 4000 --batch-size 48",
    )
    train.add_argument("model", choices=["digits-ddpm", "digits-classifier", "digits-judge", "qm9-edm",
                                         "arith-mdlm", "digits-latent", "sudoku4-mdlm", "sort-mdlm",
                                         "addition-mdlm", "unmask-policy", "rl-dataset"])
    train.add_argument("--out", help="output directory (default: outputs/zoo/<model>)")
    train.add_argument("--overwrite", action="store_true",
                       help="allow --out to be the shipped weights folder (replaces them)")
    train.add_argument("--steps", type=int, help="optimiser steps (diffusion models)")
    train.add_argument("--batch-size", type=int, help="batch size (diffusion models)")
    train.add_argument("--vae-steps", type=int, help="autoencoder optimiser steps (digits-latent)")
    train.add_argument("--epochs", type=int, help="epochs (digits classifier and judge)")
    train.add_argument("--max-minutes", type=float,
                       help="stop after this many minutes, checkpointed; rerun to continue (qm9-edm)")
    train.add_argument("--device", help="torch device (default: cuda if available)")
    train.add_argument("--seed", type=int,
                       help="random seed (default: the recipe's: 1 for the judge, 0 for the others)")
    policy = train.add_argument_group("unmask-policy (GRPO on a shipped frozen model)")
    policy.add_argument("--task", choices=["sudoku4", "sort"], help="the task and its model")
    policy.add_argument("--inputs", choices=["confidence", "confidence+mi"],
                        help="the policy's per-position inputs (default confidence)")
    policy.add_argument("--block-length", type=int, help="semi-autoregressive blocks (default: one)")
    policy.add_argument("--prompts-per-batch", type=int, help="prompts per optimiser step")
    policy.add_argument("--group", type=int, help="rollouts per prompt (GRPO group, default 8)")
    policy.add_argument("--alpha", type=float, help="reward exponent of the speed term")
    policy.add_argument("--warm-start", type=float, metavar="TAU",
                        help="first imitate the threshold heuristic at confidence TAU")
    policy.add_argument("--advantage", choices=["normalised", "centred"],
                        help="GRPO's group-normalised advantages (default) or centred only")
    policy.add_argument("--warm-steps", type=int, default=100,
                        help="imitation steps before GRPO (with --warm-start; default 100)")
    rl = train.add_argument_group("rl-dataset (SAC behaviour policy -> medium, medium-replay data)")
    rl.add_argument("--env", help="gymnasium env id (default Hopper-v5)")
    rl.add_argument("--eval-every", type=int, help="SAC steps between checkpoints (default 10000)")
    rl.add_argument("--eval-episodes", type=int,
                    help="evaluation episodes per checkpoint, fixed seeds (default 5)")
    rl.add_argument("--transitions", type=int, help="medium dataset size (default 100000)")
    rl.add_argument("--learning-starts", type=int,
                    help="uniform-random steps before SAC updates (default 10000)")
    rl.add_argument("--sac-width", type=int, help="SAC's hidden width, two layers (default 256)")
    rl.add_argument("--sac-lr", type=float, help="SAC's learning rate (default 3e-4)")
    rl.add_argument("--ship", action="store_true",
                    help="copy the finished datasets into genunc/zoo/weights/rl_<env>")
    train.set_defaults(func=_zoo_train)
    return zoo
