"""Verifiable tasks with exact checkers, for measuring whether uncertainty finds wrong answers.

Every task has the same interface: ``vocab_size``, ``mask_id``, ``prompt_length``,
``answer_length``, ``length``; ``split(seed=)`` -> ``{"train", "test"}`` problem arrays (disjoint);
``sequences`` / ``prompts`` of problems; ``prompt_mask(n)``; ``check(tokens)``; ``encode`` /
``decode``; and ``spec()``, the dict a model folder stores and :func:`task_from_spec` reads.
"""

from __future__ import annotations

from typing import Any

from genunc.errors import ConfigError
from genunc.tasks.addition import AdditionTask
from genunc.tasks.arithmetic import ArithmeticTask
from genunc.tasks.sorting import SortTask
from genunc.tasks.sudoku import SudokuTask

Task = ArithmeticTask | AdditionTask | SortTask | SudokuTask
TASKS: dict[str, type] = {"arithmetic": ArithmeticTask, "addition": AdditionTask, "sort": SortTask,
                          "sudoku": SudokuTask}


def task_from_spec(spec: dict[str, Any] | None) -> Task:
    """The task a model folder's ``task`` entry names (``{"name": ..., **fields}``)."""
    spec = dict(spec or {})
    name = spec.pop("name", None)
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    try:
        return TASKS[name](**spec)
    except TypeError as err:
        raise ConfigError(f"task {name!r}: {err}") from None


__all__ = ["AdditionTask", "ArithmeticTask", "SortTask", "SudokuTask", "TASKS", "Task", "task_from_spec"]
