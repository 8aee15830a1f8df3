"""Recipes for the reference models of the tasks where unmasking order matters
(``genunc zoo train sudoku4-mdlm`` / ``sort-mdlm`` / ``addition-mdlm``): 4x4 sudoku
(:class:`~genunc.tasks.SudokuTask`, 16-token answers), sorting 8 digits
(:class:`~genunc.tasks.SortTask`, 8-token answers) and 6-digit addition
(:class:`~genunc.tasks.AdditionTask`, 7-token answers with carries).

They train with :func:`genunc.research.recipes.mdlm.train_mdlm` on a CPU in minutes; the sudoku and sorting
models are shipped, stopped at mid-range held-out accuracy under greedy low-confidence
unmasking so that the unmasking policy and the selection among candidates have room to matter.
Accuracy jumps with the step count (same recipe, seed 0): sudoku 4..8 givens, 600 / 800 / 1000
steps: 0% / 71% / 77%; with 4..6 givens, 800 steps: 0.4%; sorting, 150 / 200 / 300 / 1000
steps: 43% / 76% / 89% / 99.9%.
Addition ships no weights: at this size and budget (1,500 steps) the model gets only the
leading answer digits right (0% exact).  9x9 sudoku has a generator and a checker but no
reference model: it does not train to a useful accuracy on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genunc.research.recipes.mdlm import MDLMRecipe, answers, train_mdlm
from genunc.tasks import AdditionTask, SortTask, SudokuTask


@dataclass
class Sudoku4Recipe(MDLMRecipe):
    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    d_model: int = 64
    n_layers: int = 3
    n_heads: int = 4
    min_givens: int = 4
    max_givens: int = 8


@dataclass
class SortRecipe(MDLMRecipe):
    steps: int = 150
    batch_size: int = 128
    lr: float = 2e-3
    d_model: int = 64
    n_layers: int = 3
    n_heads: int = 4
    size: int = 8


@dataclass
class AdditionRecipe(MDLMRecipe):
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    d_model: int = 64
    n_layers: int = 3
    n_heads: int = 4
    digits: int = 6


def _command(name: str, recipe: MDLMRecipe) -> str:
    return (f"genunc zoo train {name} --steps {recipe.steps} --batch-size {recipe.batch_size} "
            f"--seed {recipe.seed}")


def train_sudoku4(recipe: Sudoku4Recipe, out_dir: str | Path, device: str | None = None,
                  progress: bool = True) -> dict:
    task = SudokuTask(2, recipe.min_givens, recipe.max_givens)

    def by_givens(model, split) -> dict:
        ok = answers(model, task, split["test"])
        givens = task.givens(split["test"])
        return {"test_accuracy_by_givens": {int(k): float(ok[givens == k].mean())
                                            for k in np.unique(givens)}}

    return train_mdlm(task, recipe, out_dir, desc="sudoku4 MDLM", device=device,
                      progress=progress, extra_report=by_givens,
                      command=_command("sudoku4-mdlm", recipe))


def train_sort(recipe: SortRecipe, out_dir: str | Path, device: str | None = None,
               progress: bool = True) -> dict:
    return train_mdlm(SortTask(recipe.size), recipe, out_dir, desc="sort MDLM", device=device,
                      progress=progress, command=_command("sort-mdlm", recipe))


def train_addition(recipe: AdditionRecipe, out_dir: str | Path, device: str | None = None,
                   progress: bool = True) -> dict:
    return train_mdlm(AdditionTask(digits=recipe.digits), recipe, out_dir, desc="addition MDLM",
                      device=device, progress=progress,
                      command=_command("addition-mdlm", recipe))
