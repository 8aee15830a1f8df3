"""A latent diffusion reference model on the digits: a stock diffusers ``DiTPipeline``.

A small ``AutoencoderKL`` (1 -> 4 channels, 16x16 digits -> 4x4 latents) and a class-conditional
``DiTTransformer2DModel`` (patch 1, so 16 latent tokens) with a ``DDPMScheduler``, saved as one
diffusers pipeline folder:

    pipe = DiTPipeline.from_pretrained(LATENT_DIR)        # or DiffusionPipeline.from_pretrained
    images = pipe(class_labels=[3, 7], generator=g, num_inference_steps=50, output_type="np").images

This is what users of latent models run (a VAE, latents scaled to unit variance by
``vae.config.scaling_factor`` as in Stable Diffusion, a transformer denoiser whose head is a
``Linear`` on patch tokens, classifier-free guidance), small enough to train on a CPU.

Two choices follow from the stock pipeline: ``DiTPipeline`` guides with the null class 1000
(ImageNet's), so the transformer keeps ``num_embeds_ada_norm=1000`` and learns the null class
by label dropout; only labels 0..9 and 1000 are ever used.  ``id2label`` names the digits, so
``pipe.get_label_ids(["3", "seven"])`` works.

The shipped folder is :data:`genunc.zoo.shipped.LATENT_DIR`; this module is its recipe: train it
with ``genunc zoo train digits-latent`` (autoencoder first, then the denoiser).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from genunc.research.recipes.digits import augment
from genunc.research.training import default_device, train_steps, write_report
from genunc.zoo.digits import IMAGE_SIZE, N_CLASSES, split_digits

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: the class index DiTPipeline uses for the unconditional half under guidance
NULL_CLASS = 1000


@dataclass
class LatentRecipe:
    # autoencoder
    vae_steps: int = 2000
    vae_lr: float = 2e-3
    vae_channels: tuple[int, ...] = (16, 32, 32)
    latent_channels: int = 4
    kl_weight: float = 1e-3
    # denoiser
    steps: int = 5000
    batch_size: int = 64
    lr: float = 1e-3
    width: int = 64  # DiT hidden size (heads of 32)
    layers: int = 6
    label_dropout: float = 0.1
    num_train_timesteps: int = 1000
    seed: int = 0
    # quality check after training: judge agreement of DDIM samples at these guidance scales
    check_samples: int = 200
    check_steps: int = 50
    check_guidance: tuple[float, ...] = (1.0, 2.0, 4.0)


def _warmup(steps: int) -> float:
    """The one-cycle schedule's warm-up share: 5%, at least two steps (short test runs)."""
    return min(0.5, max(0.05, 2.0 / steps))


def build_vae(recipe: LatentRecipe):
    from diffusers import AutoencoderKL

    levels = len(recipe.vae_channels)
    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=recipe.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(recipe.vae_channels), layers_per_block=1, norm_num_groups=8,
        sample_size=IMAGE_SIZE)


def build_transformer(recipe: LatentRecipe):
    from diffusers import DiTTransformer2DModel

    factor = 2 ** (len(recipe.vae_channels) - 1)
    return DiTTransformer2DModel(
        num_attention_heads=recipe.width // 32, attention_head_dim=32,
        in_channels=recipe.latent_channels, out_channels=recipe.latent_channels,
        num_layers=recipe.layers, sample_size=IMAGE_SIZE // factor, patch_size=1,
        num_embeds_ada_norm=NULL_CLASS, norm_num_groups=recipe.latent_channels)


def build_scheduler(recipe: LatentRecipe):
    from diffusers import DDPMScheduler

    # latents have unit variance, not the [-1, 1] range of pixels: no clipping of the predicted
    # clean sample (diffusers' default clip_sample=True ruins latent samples, as SD's config knows)
    return DDPMScheduler(num_train_timesteps=recipe.num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                         prediction_type="epsilon", clip_sample=False)


def build_pipeline(transformer, vae, scheduler):
    """The stock ``DiTPipeline`` with the digits' names (saved in ``model_index.json``)."""
    from diffusers import DiTPipeline

    id2label = {str(i): f"{i}, {name}" for i, name in enumerate(NAMES)}
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
    pipe.register_to_config(id2label=id2label)
    return pipe


def train_vae(recipe: LatentRecipe, device: str, progress: bool = True) -> tuple:
    """Train the autoencoder (MSE + a small KL); returns it (eval mode) and its report."""
    x, _ = split_digits()["train"]
    x_test, _ = split_digits()["test"]
    g = torch.Generator().manual_seed(recipe.seed)
    vae = build_vae(recipe).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.vae_lr, total_steps=recipe.vae_steps,
                                                pct_start=_warmup(recipe.vae_steps))

    def batch_loss(step: int) -> Tensor:
        idx = torch.randint(0, len(x), (recipe.batch_size,), generator=g)
        x0 = augment(x[idx], g).to(device)
        dist = vae.encode(x0).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(device)
        recon = vae.decode(z).sample
        return F.mse_loss(recon, x0) + recipe.kl_weight * dist.kl().mean() / z[0].numel()

    vae.train()
    result = train_steps(vae, opt, batch_loss, steps=recipe.vae_steps, lr_scheduler=sched,
                         desc="digits VAE", progress=progress)
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(x.to(device)).latent_dist.sample(generator=None)
        std = float(latents.std())
        mean = float(latents.mean())
        test_latents = vae.encode(x_test.to(device)).latent_dist.mean
        recon = vae.decode(test_latents).sample.clamp(-1, 1)
        mse = float(F.mse_loss(recon, x_test.to(device)))
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae, {"vae_seconds": result.seconds, "vae_final_loss_100": float(np.mean(result.losses[-100:])),
                 "vae_test_mse": mse, "vae_test_psnr_db": float(10 * np.log10(4.0 / mse)),
                 "latent_mean": mean, "latent_std": std, "scaling_factor": 1.0 / std}


def train_latent(recipe: LatentRecipe, out_dir: str | Path, device: str | None = None,
                 progress: bool = True) -> dict:
    """Train the autoencoder, then the latent DiT (EMA weights saved) on VAE latents scaled to
    unit variance; save the ``DiTPipeline`` folder and ``training.json``."""
    device = default_device(device)
    torch.manual_seed(recipe.seed)
    vae, report = train_vae(recipe, device, progress)
    vae.requires_grad_(False)
    x, y = split_digits()["train"]
    transformer = build_transformer(recipe).to(device)
    ema = build_transformer(recipe).to(device)
    ema.load_state_dict(transformer.state_dict())
    ema.eval()
    scheduler = build_scheduler(recipe)
    opt = torch.optim.AdamW(transformer.parameters(), lr=recipe.lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps,
                                                   pct_start=_warmup(recipe.steps))
    g = torch.Generator().manual_seed(recipe.seed + 1)
    scale = vae.config.scaling_factor

    def batch_loss(step: int) -> Tensor:
        idx = torch.randint(0, len(x), (recipe.batch_size,), generator=g)
        with torch.no_grad():
            dist = vae.encode(augment(x[idx], g).to(device)).latent_dist
            z0 = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(device)) * scale
        labels = y[idx].clone()
        labels[torch.rand(len(idx), generator=g) < recipe.label_dropout] = NULL_CLASS
        noise = torch.randn(z0.shape, generator=g).to(device)
        t = torch.randint(0, recipe.num_train_timesteps, (len(idx),), generator=g).to(device)
        predicted = transformer(scheduler.add_noise(z0, noise, t), timestep=t,
                                class_labels=labels.to(device)).sample
        return F.mse_loss(predicted, noise)

    # label dropout is ours (explicit, seeded), not the embedding's own: keep that off
    for module in transformer.modules():
        if hasattr(module, "dropout_prob") and hasattr(module, "embedding_table"):
            module.dropout_prob = 0.0
    transformer.train()
    result = train_steps(transformer, opt, batch_loss, steps=recipe.steps, lr_scheduler=lr_sched,
                         ema=ema, ema_decay=lambda step: min(0.999, (1 + step) / (10 + step)),
                         desc="digits latent DiT", progress=progress)
    pipe = build_pipeline(ema.to("cpu"), vae.to("cpu"), scheduler)
    pipe.save_pretrained(out_dir)
    report.update({
        "dit_seconds": result.seconds, "dit_final_loss_100": float(np.mean(result.losses[-100:])),
        "judge_agreement": check_quality(pipe, recipe), "device": device,
        "recipe": asdict(recipe),
        "command": f"genunc zoo train digits-latent --vae-steps {recipe.vae_steps} --steps {recipe.steps} "
                   f"--batch-size {recipe.batch_size} --seed {recipe.seed}"})
    return write_report(out_dir, report)


def check_quality(pipe, recipe: LatentRecipe, seed: int = 123) -> dict[str, float]:
    """Share of DDIM samples (classes balanced) in which the independent judge sees the
    requested digit, per guidance scale."""
    from diffusers import DDIMScheduler

    from genunc.research.judges import DigitsJudgeEvaluator

    if recipe.check_samples <= 0:
        return {}
    judge = DigitsJudgeEvaluator()
    pipe = type(pipe)(**pipe.components, id2label=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    labels = [i % N_CLASSES for i in range(recipe.check_samples)]
    agreement = {}
    for scale in recipe.check_guidance:
        start = time.perf_counter()
        images = sample_images(pipe, labels, seed=seed, steps=recipe.check_steps, guidance_scale=scale)
        agreement[f"guidance {scale:g}"] = float(judge.agrees(images, labels).mean())
        agreement[f"guidance {scale:g} seconds"] = time.perf_counter() - start
    return agreement


@torch.no_grad()
def sample_images(pipe, labels: list[int], *, seed: int, steps: int, guidance_scale: float,
                  batch_size: int = 100) -> Tensor:
    """``(N, 1, 16, 16)`` images in [-1, 1] from a ``DiTPipeline`` (one generator per batch)."""
    out = []
    for start in range(0, len(labels), batch_size):
        generator = torch.Generator().manual_seed(seed + start)
        images = pipe(class_labels=labels[start : start + batch_size], generator=generator,
                      num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt").images
        out.append(images * 2 - 1)
    return torch.cat(out)
