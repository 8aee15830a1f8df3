"""Recipe for the text reference model (``genunc zoo train arith-mdlm``).

A tiny masked-diffusion transformer learns to fill in the answer of ``a * b =`` problems
(:class:`~genunc.tasks.ArithmeticTask`) from the training operand pairs; the held-out pairs are
never seen.  The training itself is :func:`genunc.research.recipes.mdlm.train_mdlm` (MDLM's objective on the
answer positions); the recipe deliberately stops while the model is still wrong on a sizeable
share of held-out problems, so that selecting among candidates matters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from genunc.research.recipes.mdlm import MDLMRecipe, train_mdlm
from genunc.tasks import ArithmeticTask


@dataclass
class ArithRecipe(MDLMRecipe):
    op: str = "*"
    digits: int = 2


def train_arith(recipe: ArithRecipe, out_dir: str | Path, device: str | None = None,
                progress: bool = True) -> dict:
    return train_mdlm(ArithmeticTask(recipe.op, recipe.digits), recipe, out_dir,
                      desc="arith MDLM", device=device, progress=progress,
                      command=f"genunc zoo train arith-mdlm --steps {recipe.steps} "
                              f"--batch-size {recipe.batch_size} --seed {recipe.seed}")
