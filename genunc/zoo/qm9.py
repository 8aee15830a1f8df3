"""Recipe for the QM9 reference denoiser (``genunc zoo train qm9-edm``).

Trains :class:`~genunc.zoo.molecule_model.EquivariantDenoiser` with EDM's noise-prediction loss
(MSE on centre-of-mass-free position noise and feature noise, over real atoms) on EDM's 100k
training split, keeping an EMA of the weights.  Writes ``model.safetensors``, ``config.json``,
``atom_histogram.json`` and ``training.json`` (recipe, command, time, device).

Training is checkpointed to ``checkpoint.pt`` every ``checkpoint_every`` steps and resumes from it,
so an interrupted run (or one stopped by ``max_minutes``, the CPU recipe) loses at most a few
hundred steps and can be continued with the same command.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from genunc.adapters.molecule import MoleculeAdapter
from genunc.data.qm9 import edm_split, load_qm9
from genunc.pipelines.molecule import encode
from genunc.zoo.molecule_model import EquivariantDenoiser

QM9_DIR = Path(__file__).parent / "weights" / "qm9_edm"


@dataclass
class QM9Recipe:
    steps: int = 20_000
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    timesteps: int = 1000
    scalars: int = 64
    vectors: int = 16
    n_layers: int = 4
    lmax: int = 1
    ema: float = 0.999
    max_minutes: float | None = None  # stop early (checkpointed) after this much wall time
    checkpoint_every: int = 250


def _resumable(recipe: dict) -> dict:
    """The recipe fields that must agree for a checkpoint to be continued."""
    return {k: v for k, v in recipe.items() if k not in ("steps", "max_minutes")}


def train_qm9(recipe: QM9Recipe, out_dir: str | Path = QM9_DIR, device: str | None = None,
              progress: bool = True) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(recipe.seed)
    data = load_qm9(progress=progress)
    train_ids = edm_split(len(data))["train"]
    train = data.subset(train_ids)
    model_config = dict(n_features=6, scalars=recipe.scalars, vectors=recipe.vectors,
                        n_layers=recipe.n_layers, lmax=recipe.lmax)
    model = EquivariantDenoiser(**model_config).to(device)
    ema = EquivariantDenoiser(**model_config).to(device)
    ema.load_state_dict(model.state_dict())
    adapter = MoleculeAdapter(model, "head", recipe.timesteps)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-12, amsgrad=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / "checkpoint.pt"
    rng = np.random.default_rng(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    losses: list[float] = []
    first_step, seconds_before = 0, 0.0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if _resumable(state["recipe"]) != _resumable(asdict(recipe)):
            raise RuntimeError(f"{checkpoint} was written by a different recipe; remove it to "
                               f"start afresh")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        g.set_state(state["generator"])
        first_step, losses, seconds_before = state["step"], state["losses"], state["seconds"]

    def save_checkpoint(step: int) -> None:
        tmp = checkpoint.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "rng": rng.bit_generator.state, "generator": g.get_state(), "step": step,
                    "losses": losses, "seconds": seconds_before + time.time() - start,
                    "recipe": asdict(recipe)}, tmp)
        tmp.replace(checkpoint)

    start = time.time()
    deadline = None if recipe.max_minutes is None else start + 60 * recipe.max_minutes
    bar = tqdm(range(first_step, recipe.steps), desc="QM9 denoiser", disable=not progress,
               initial=first_step, total=recipe.steps)
    step = first_step
    for step in bar:
        ids = rng.choice(len(train), size=recipe.batch_size, replace=False)
        batch = {k: v.to(device) for k, v in encode(train, ids).items()}
        pairs = adapter.training_pairs(batch, g)
        out = adapter.denoise(**pairs.inputs)
        per_atom = ((out - pairs.target) ** 2).sum(-1)
        loss = (per_atom * pairs.mask).sum() / pairs.mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - recipe.ema)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.3f}")
        if (step + 1) % recipe.checkpoint_every == 0:
            save_checkpoint(step + 1)
        if deadline is not None and time.time() > deadline:
            step += 1
            break
    else:
        step = recipe.steps
    save_checkpoint(step)

    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
              str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(
        {"model": model.config, "timesteps": recipe.timesteps}, indent=2) + "\n")
    (out_dir / "atom_histogram.json").write_text(json.dumps(train.atom_count_histogram()) + "\n")
    # the learning rate is constant and resumption is exact, so these weights are reproduced by
    # training for the steps actually done, however many runs or minutes that took
    command = (f"genunc zoo train qm9-edm --steps {step} --batch-size {recipe.batch_size} "
               f"--seed {recipe.seed}")
    report = {"final_loss_100": float(np.mean(losses[-100:])), "steps_done": step,
              "loss_curve_every_100": [float(np.mean(losses[i:i + 100]))
                                       for i in range(0, len(losses), 100)],
              "seconds": seconds_before + time.time() - start, "device": device,
              "threads": torch.get_num_threads(), "recipe": asdict(recipe), "command": command}
    (out_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
