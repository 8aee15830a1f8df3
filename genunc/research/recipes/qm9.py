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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from genunc._io import atomic_write
from genunc.adapters.molecule import MoleculeAdapter
from genunc.data.qm9 import edm_split, load_qm9
from genunc.research.training import Resumable, default_device, train_steps, write_report
from genunc.zoo.molecule_model import EquivariantDenoiser


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


def train_qm9(recipe: QM9Recipe, out_dir: str | Path, device: str | None = None,
              progress: bool = True) -> dict:
    device = default_device(device)
    torch.manual_seed(recipe.seed)
    train = load_qm9(progress=progress)
    train = train.subset(edm_split(len(train))["train"])
    model_config = dict(n_features=6, scalars=recipe.scalars, vectors=recipe.vectors,
                        n_layers=recipe.n_layers, lmax=recipe.lmax)
    model = EquivariantDenoiser(**model_config).to(device)
    ema = EquivariantDenoiser(**model_config).to(device)
    ema.load_state_dict(model.state_dict())
    adapter = MoleculeAdapter(model, "head", recipe.timesteps)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-12, amsgrad=True)
    out_dir = Path(out_dir)
    rng = np.random.default_rng(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)

    def batch_loss(step: int) -> torch.Tensor:
        ids = rng.choice(len(train), size=recipe.batch_size, replace=False)
        batch = {k: v.to(device) for k, v in adapter.encode(train, ids).items()}
        pairs = adapter.training_pairs(batch, g)
        per_atom = ((adapter.denoise(**pairs.inputs) - pairs.target) ** 2).sum(-1)
        return (per_atom * pairs.mask).sum() / pairs.mask.sum()

    result = train_steps(
        model, opt, batch_loss, steps=recipe.steps, ema=ema, ema_decay=recipe.ema,
        max_minutes=recipe.max_minutes, desc="QM9 denoiser", progress=progress,
        resume=Resumable(out_dir / "checkpoint.pt", asdict(recipe), rng, g, recipe.checkpoint_every))
    ema.save_pretrained(out_dir, timesteps=recipe.timesteps)
    atomic_write(out_dir / "atom_histogram.json", json.dumps(train.atom_count_histogram()) + "\n")
    losses = result.losses
    # the learning rate is constant and resumption is exact, so these weights are reproduced by
    # training for the steps actually done, however many runs or minutes that took
    command = (f"genunc zoo train qm9-edm --steps {result.steps_done} --batch-size "
               f"{recipe.batch_size} --seed {recipe.seed}")
    return write_report(out_dir, {
        "final_loss_100": float(np.mean(losses[-100:])), "steps_done": result.steps_done,
        "loss_curve_every_100": [float(np.mean(losses[i:i + 100]))
                                 for i in range(0, len(losses), 100)],
        "seconds": result.seconds, "device": device, "threads": torch.get_num_threads(),
        "recipe": asdict(recipe), "command": command})
