"""Where the shipped reference models live: one folder under ``genunc/zoo/weights`` each.

Each folder is complete on its own (weights, config and ``training.json`` with the command that
made it, ``genunc zoo train <model>``); loading one takes only this path.  The recipes that
train them are the lab's (:mod:`genunc.research.recipes`), never needed to use the models.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
DDPM_DIR = WEIGHTS_DIR / "digits_ddpm"
CLASSIFIER_DIR = WEIGHTS_DIR / "digits_classifier"
JUDGE_DIR = WEIGHTS_DIR / "digits_judge"
LATENT_DIR = WEIGHTS_DIR / "digits_latent"
QM9_DIR = WEIGHTS_DIR / "qm9_edm"
ARITH_DIR = WEIGHTS_DIR / "arith_mdlm"
SUDOKU4_DIR = WEIGHTS_DIR / "sudoku4_mdlm"
SORT_DIR = WEIGHTS_DIR / "sort_mdlm"
ADDITION_DIR = WEIGHTS_DIR / "addition_mdlm"  # not shipped


def policy_dir(task: str, inputs: str, block_length: int | None) -> Path:
    """Where the shipped policy for this setting lives (``weights/policy_<task>_<conf|mi>[_b<K>]``)."""
    tag = {"confidence": "conf", "confidence+mi": "mi"}[inputs]
    return WEIGHTS_DIR / (f"policy_{task}_{tag}" + (f"_b{block_length}" if block_length else ""))
