"""The training skeleton every reference-model recipe runs on.

A recipe says what one batch's loss is; :func:`train_steps` does the rest the same way for every
model: the optimiser step with gradient clipping, the learning-rate schedule, an exponential
moving average of the weights, a progress bar with the running loss, a wall-clock budget, and
checkpoints from which an interrupted run continues exactly where it stopped (the checkpoint
holds every random state, so a resumed run reproduces an uninterrupted one bit for bit).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from genunc._io import atomic_write
from genunc.errors import GenuncError

#: ``step -> decay`` of the weight average (a constant works too)
Decay = float | Callable[[int], float]


@dataclass
class TrainingResult:
    losses: list[float]
    steps_done: int
    seconds: float


@dataclass
class Resumable:
    """What a checkpoint must restore besides model and optimiser: the recipe it belongs to
    (a checkpoint of another recipe is refused) and the random states the batches come from."""

    path: Path
    recipe: dict[str, Any]
    numpy_rng: np.random.Generator | None = None
    generator: torch.Generator | None = None
    every: int = 250
    #: recipe fields that may differ between runs continuing one another
    free: tuple[str, ...] = ("steps", "max_minutes")

    def fixed(self, recipe: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in recipe.items() if k not in self.free}


@dataclass
class _Parts:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any = None
    ema: nn.Module | None = None


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_loss: Callable[[int], Tensor],
    *,
    steps: int,
    lr_scheduler: Any = None,
    ema: nn.Module | None = None,
    ema_decay: Decay = 0.999,
    clip_norm: float | None = 1.0,
    max_minutes: float | None = None,
    resume: Resumable | None = None,
    desc: str = "training",
    log_every: int = 100,
    progress: bool = True,
) -> TrainingResult:
    """Run optimiser steps ``0 .. steps-1`` (from the checkpoint's step when resuming).

    Args:
        batch_loss: ``step -> loss`` of one batch (the recipe draws the batch).
        ema: a copy of `model` that tracks ``ema <- decay * ema + (1 - decay) * model``.
        max_minutes: stop after this much wall time (a checkpoint is written, when resumable).
        resume: where to checkpoint, every ``resume.every`` steps and at the end.
    """
    parts = _Parts(model, optimizer, lr_scheduler, ema)
    losses: list[float] = []
    first, seconds_before = 0, 0.0
    if resume is not None and resume.path.exists():
        first, losses, seconds_before = _restore(resume, parts)
    start = time.time()
    deadline = None if max_minutes is None else start + 60 * max_minutes

    def save(step: int) -> None:
        if resume is not None:
            _checkpoint(resume, parts, step, losses, seconds_before + time.time() - start)

    bar = tqdm(range(first, steps), desc=desc, disable=not progress, initial=first, total=steps)
    step = first
    for step in bar:
        loss = batch_loss(step)
        optimizer.zero_grad()
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
        if ema is not None:
            decay = ema_decay(step) if callable(ema_decay) else ema_decay
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % log_every == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.4f}")
        if resume is not None and (step + 1) % resume.every == 0:
            save(step + 1)
        if deadline is not None and time.time() > deadline:
            step += 1
            break
    else:
        step = steps
    save(step)
    return TrainingResult(losses, step, seconds_before + time.time() - start)


def _checkpoint(resume: Resumable, parts: _Parts, step: int, losses: list[float],
                seconds: float) -> None:
    state = {"model": parts.model.state_dict(), "opt": parts.optimizer.state_dict(),
             "step": step, "losses": losses, "seconds": seconds, "recipe": resume.recipe}
    if parts.ema is not None:
        state["ema"] = parts.ema.state_dict()
    if parts.lr_scheduler is not None:
        state["lr_scheduler"] = parts.lr_scheduler.state_dict()
    if resume.numpy_rng is not None:
        state["rng"] = resume.numpy_rng.bit_generator.state
    if resume.generator is not None:
        state["generator"] = resume.generator.get_state()
    atomic_write(resume.path, lambda p: torch.save(state, p))


def _restore(resume: Resumable, parts: _Parts) -> tuple[int, list[float], float]:
    device = next(parts.model.parameters()).device
    state = torch.load(resume.path, map_location=device, weights_only=False)
    if resume.fixed(state["recipe"]) != resume.fixed(resume.recipe):
        raise GenuncError(f"{resume.path} was written by a different recipe; remove it to start "
                          "afresh")
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["opt"])
    if parts.ema is not None:
        parts.ema.load_state_dict(state["ema"])
    if parts.lr_scheduler is not None:
        parts.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if resume.numpy_rng is not None:
        resume.numpy_rng.bit_generator.state = state["rng"]
    if resume.generator is not None:
        resume.generator.set_state(state["generator"])
    return state["step"], state["losses"], state["seconds"]


def write_report(directory: str | os.PathLike[str], report: dict[str, Any]) -> dict[str, Any]:
    """``training.json``: what a shipped model's folder says about how it was made."""
    atomic_write(Path(directory) / "training.json", json.dumps(report, indent=2) + "\n")
    return report


def default_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")
