"""Recipes for the digits reference models (``genunc zoo train digits-ddpm`` /
``genunc zoo train digits-classifier``): the class-conditional DDPM and the feature/quality
classifier of :mod:`genunc.zoo.digits`, and the cross-entropy loop every digits reader trains with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genunc.research.training import TrainingResult, default_device, train_steps, write_report
from genunc.zoo.digits import IMAGE_SIZE, N_CLASSES, DigitsClassifier, split_digits


# ---------------------------------------------------------------------------------------- data
def augment(images: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Random integer translations by up to `max_shift` pixels (digits stay recognisable)."""
    b = images.shape[0]
    shifts = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=generator)
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    size = images.shape[-1]
    out = torch.empty_like(images)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        y0, x0 = max_shift + dy, max_shift + dx
        out[i] = padded[i, :, y0 : y0 + size, x0 : x0 + size]
    return out


# ---------------------------------------------------------------------------------------- classifier
@dataclass
class ClassifierRecipe:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0


def train_classifier(recipe: ClassifierRecipe, out_dir: str | Path) -> dict:
    """Train the feature/quality classifier; returns test accuracy and the recipe."""
    torch.manual_seed(recipe.seed)
    model = DigitsClassifier()
    acc, _ = fit_on_digits(model, epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr,
                           seed=recipe.seed, desc="digits classifier")
    model.save_pretrained(out_dir)
    return write_report(out_dir, {
        "test_accuracy": acc, "recipe": asdict(recipe),
        "command": f"genunc zoo train digits-classifier --epochs {recipe.epochs} --seed {recipe.seed}"})


def fit_on_digits(model: nn.Module, *, epochs: int, batch_size: int, lr: float, seed: int,
                  weight_decay: float = 1e-4, desc: str = "digits") -> tuple[float, TrainingResult]:
    """Cross-entropy training on the shifted train split, one permutation per epoch; returns the
    test accuracy (model left in eval mode) and the run.  Shared by every model that reads digits
    (the classifier and the judge), so that they differ only in what they are meant to differ in."""
    data = split_digits()
    x, y = data["train"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    per_epoch = -(-len(x) // batch_size)
    order: list[Tensor] = []

    def batch_loss(step: int) -> Tensor:
        if step % per_epoch == 0:  # a new epoch: a new permutation
            order[:] = [torch.randperm(len(x), generator=g)]
        i = (step % per_epoch) * batch_size
        idx = order[0][i : i + batch_size]
        return F.cross_entropy(model(augment(x[idx], g)), y[idx])

    model.train()
    result = train_steps(model, opt, batch_loss, steps=epochs * per_epoch, clip_norm=None, desc=desc,
                         log_every=per_epoch)
    model.eval()
    with torch.no_grad():
        xt, yt = data["test"]
        acc = float((model(xt).argmax(1) == yt).float().mean())
    return acc, result


# ---------------------------------------------------------------------------------------- DDPM
@dataclass
class DDPMRecipe:
    steps: int = 6000
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    num_train_timesteps: int = 1000
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    label_dropout: float = 0.0


def build_unet(recipe: DDPMRecipe):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=tuple(recipe.block_out_channels), norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        num_class_embeds=N_CLASSES,
    )


def build_scheduler(recipe: DDPMRecipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=recipe.num_train_timesteps,
                         beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


def train_ddpm(recipe: DDPMRecipe, out_dir: str | Path, device: str | None = None) -> dict:
    """Train the class-conditional digits DDPM (EMA weights are saved)."""
    device = default_device(device)
    torch.manual_seed(recipe.seed)
    x, y = split_digits()["train"]
    unet = build_unet(recipe).to(device)
    ema = build_unet(recipe).to(device)
    ema.load_state_dict(unet.state_dict())
    scheduler = build_scheduler(recipe)
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps,
                                                   pct_start=0.05)
    g = torch.Generator().manual_seed(recipe.seed)

    def batch_loss(step: int) -> Tensor:
        idx = torch.randint(0, len(x), (recipe.batch_size,), generator=g)
        x0 = augment(x[idx], g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, recipe.num_train_timesteps, (x0.shape[0],), generator=g).to(device)
        predicted = unet(scheduler.add_noise(x0, noise, t), t, class_labels=y[idx].to(device)).sample
        return F.mse_loss(predicted, noise)

    result = train_steps(unet, opt, batch_loss, steps=recipe.steps, lr_scheduler=lr_sched,
                         ema=ema, ema_decay=lambda step: min(0.999, (1 + step) / (10 + step)),
                         desc="digits DDPM")
    ema.to("cpu").save_pretrained(out_dir)
    scheduler.save_pretrained(out_dir)
    return write_report(out_dir, {
        "final_loss_100": float(np.mean(result.losses[-100:])), "seconds": result.seconds,
        "device": device, "recipe": asdict(recipe),
        "command": f"genunc zoo train digits-ddpm --steps {recipe.steps} "
                   f"--batch-size {recipe.batch_size} --seed {recipe.seed}"})
