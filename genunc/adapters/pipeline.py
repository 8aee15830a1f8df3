"""Adapter for a user's own diffusers pipeline: which module is the head, and what its outputs mean.

genunc never re-implements a pipeline's loop here; this adapter only answers what running the
pipeline with hooks cannot:

* which module of the denoiser (``pipe.unet`` or ``pipe.transformer``) is the head, and how its
  output is laid out: a ``Conv2d`` head outputs the model's ``(B, C, H, W)`` directly, a
  ``Linear`` head on patch tokens outputs ``(B, T, p*p*C)``, which the model un-patchifies;
* which of the head's output channels are the prediction the sampler uses (models with a
  learned variance, DiT and PixArt, output twice the latent channels and the pipelines keep the
  first half);
* how classifier-free guidance batches a step (``[uncond; cond]``, or ``[cond; uncond]`` in
  DiT) and with which scale, so the guided prediction's variance can be computed in closed form;
* how to turn clean images into training pairs for fitting: encode with the pipeline's VAE,
  embed captions with its own text encoders, noise with its scheduler's training convention.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from genunc.adapters.base import DenoiserAdapter, TrainingPairs
from genunc.errors import GenuncError, HeadNotFoundError, ShapeMismatchError

#: denoiser class -> its head (the last module that carries weights)
HEADS: dict[str, str] = {
    "UNet2DModel": "conv_out",
    "UNet2DConditionModel": "conv_out",
    "DiTTransformer2DModel": "proj_out_2",
    "PixArtTransformer2DModel": "proj_out",
    "SD3Transformer2DModel": "proj_out",
}

#: pipelines whose guided batch puts the conditional half first
_COND_FIRST = ("DiTPipeline",)

Prediction = Literal["epsilon", "v_prediction", "sample", "flow"]


class DiffusersPipelineAdapter(DenoiserAdapter):
    """The denoiser and head of a diffusers ``DiffusionPipeline`` (see the module docstring).

    Args:
        pipe: the user's pipeline; it is read, never modified.
        head_name: the head module inside the denoiser; default from :data:`HEADS`.
    """

    likelihood = "regression"

    def __init__(self, pipe: Any, head_name: str | None = None) -> None:
        self.pipe = pipe
        self.denoiser_name = next((n for n in ("unet", "transformer")
                                   if isinstance(getattr(pipe, n, None), nn.Module)), None)
        if self.denoiser_name is None:
            raise HeadNotFoundError(f"{type(pipe).__name__} has neither a `unet` nor a `transformer` "
                                    "module: genunc cannot find its denoiser")
        denoiser = getattr(pipe, self.denoiser_name)
        cls = type(denoiser).__name__
        if head_name is None:
            if cls not in HEADS:
                raise HeadNotFoundError(f"genunc does not know the head of {cls}; name it with "
                                        f"head_name= (known denoisers: {sorted(HEADS)})")
            head_name = HEADS[cls]
        super().__init__(denoiser, head_name)
        config = denoiser.config
        self.latent_channels = int(config.in_channels)
        self.out_channels = int(config.get("out_channels") or config.in_channels)
        #: the first `prediction_channels` output channels are what the sampler steps with
        self.learned_sigma = self.out_channels == 2 * self.latent_channels
        self.prediction_channels = self.latent_channels if self.learned_sigma else self.out_channels
        self.patch_size = config.get("patch_size") if isinstance(self.head, nn.Linear) else None
        self.fourier = config.get("time_embedding_type") == "fourier"
        self.cond_first = type(pipe).__name__ in _COND_FIRST
        self.prediction_type: Prediction = _prediction_type(pipe.scheduler)

    # ------------------------------------------------------------------ layout
    def to_head_layout(self, output: Tensor) -> Tensor:
        """The model's ``(B, C, H, W)`` output in the head's layout (patch tokens for Linear
        heads: the inverse of the transformer's un-patchify)."""
        if self.patch_size is None:
            return output
        b, c, h, w = output.shape
        p = int(self.patch_size)
        tokens = output.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return tokens.reshape(b, (h // p) * (w // p), p * p * c)

    def from_head_layout(self, values: Tensor, height: int, width: int) -> Tensor:
        """Head-layout values ``(..., T, p*p*C)`` -> ``(..., C, height, width)`` (the
        transformer's un-patchify, the inverse of :meth:`to_head_layout`); a Conv2d head's
        ``(..., C, H, W)`` as it is.  Leading axes (draws, samples) are kept."""
        if self.patch_size is None:
            return values
        p = int(self.patch_size)
        lead, n = values.shape[:-2], values.dim() - 2
        c = values.shape[-1] // (p * p)
        grid = values.reshape(*lead, height // p, width // p, p, p, c)
        return grid.permute(*range(n), n + 4, n, n + 2, n + 1, n + 3).reshape(*lead, c, height,
                                                                              width)

    def prediction_part(self, head_values: Tensor) -> Tensor:
        """The entries of a head-layout tensor that feed the sampler, flattened per sample:
        with a learned variance, the predicted-variance channels are left out."""
        if not self.learned_sigma:
            return head_values.flatten(1)
        if self.patch_size is None:
            return head_values[:, : self.prediction_channels].flatten(1)
        channel = torch.arange(head_values.shape[-1], device=head_values.device) % self.out_channels
        return head_values[..., channel < self.prediction_channels].flatten(1)

    def reduce_variance(self, variance: Tensor, inputs: Mapping[str, Any]) -> dict[str, Tensor]:
        """Head-output variances -> the mean over the prediction's entries, per sample (the
        mean is blind to the patch layout, so no un-patchify is needed)."""
        return {"variability": self.prediction_part(variance).double().mean(1)}

    # ------------------------------------------------------------------ guidance
    def guidance(self, call_kwargs: Mapping[str, Any]) -> float | None:
        """The guidance scale of the running call, or None when the batch is not guided.

        Read during the call: pipelines that expose ``do_classifier_free_guidance`` decide it
        there (Stable Diffusion also turns it off for guidance-distilled UNets); the others
        guide whenever ``guidance_scale > 1``.
        """
        pipe = self.pipe
        if isinstance(getattr(type(pipe), "do_classifier_free_guidance", None), property):
            return float(pipe.guidance_scale) if pipe.do_classifier_free_guidance else None
        scale = call_kwargs.get("guidance_scale", _default(pipe, "guidance_scale"))
        return float(scale) if scale is not None and scale > 1 else None

    def guided_features(self, phi: Tensor, scale: float | None) -> Tensor:
        """``phi_u + s (phi_c - phi_u)``: a head affine in its input maps it to the guided
        prediction ``u + s (c - u)`` exactly, so its variance is the head's closed form at it."""
        if scale is None:
            return phi
        if phi.shape[0] % 2:
            raise ShapeMismatchError(f"a guided batch has two halves, got {phi.shape[0]} rows")
        first, second = phi.chunk(2)
        cond, uncond = (first, second) if self.cond_first else (second, first)
        return uncond + scale * (cond - uncond)

    def guided_prediction(self, outputs: Tensor, scale: float | None,
                          rescale: float = 0.0) -> Tensor:
        """Head outputs ``(K, rows, ...)`` on the pipeline's whole batch -> each of the K
        weight sets' guided prediction ``(K, B, ...)``: ``u + s (c - u)`` over the batch's
        halves (rescaled as diffusers' ``rescale_noise_cfg`` where ``rescale`` > 0); unguided
        batches (``scale`` None) as they are."""
        if scale is None:
            return outputs
        if rescale:
            return self.rescaled_guidance(outputs, scale, rescale)
        if outputs.shape[1] % 2:
            raise ShapeMismatchError(f"a guided batch has two halves, got {outputs.shape[1]} rows")
        first, second = outputs.chunk(2, dim=1)
        cond, uncond = (first, second) if self.cond_first else (second, first)
        return uncond + scale * (cond - uncond)

    def clean_factors(self, timesteps: Tensor) -> Tensor:
        """Per denoiser evaluation at `timesteps` (what the denoiser was given), the factor that
        turns the prediction's variance into that of the clean sample it implies, under the
        scheduler the pipeline holds now (a swapped one included):

        * epsilon: ``x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)``, factor ``(1 - abar) / abar``;
        * v-prediction: ``x0 = sqrt(abar) x_t - sqrt(1 - abar) v``, factor ``1 - abar``;
        * flow matching: ``x0 = x_t - sigma v`` with ``sigma = t / num_train_timesteps`` (the
          timestep flow pipelines pass), factor ``sigma ** 2``;
        * sample prediction: 1.

        ``abar`` is the training schedule's, linearly interpolated at fractional timesteps
        (Karras-sigma samplers).
        """
        t = torch.as_tensor(timesteps, dtype=torch.float64).cpu()
        scheduler = self.pipe.scheduler
        kind = _prediction_type(scheduler)
        if kind == "flow":
            return (t / float(scheduler.config.num_train_timesteps)) ** 2
        if kind == "sample":
            return torch.ones_like(t)
        abar_table = getattr(scheduler, "alphas_cumprod", None)
        if abar_table is None:
            raise GenuncError(f"{type(scheduler).__name__} has no alphas_cumprod: genunc cannot "
                              "express the clean sample's variance; use variability_target='noise'")
        table = torch.as_tensor(abar_table, dtype=torch.float64).cpu()
        position = t.clamp(0, len(table) - 1)
        low = position.floor().long()
        high = (low + 1).clamp(max=len(table) - 1)
        abar = torch.lerp(table[low], table[high], position - low)
        return (1 - abar) / abar if kind == "epsilon" else 1 - abar

    def guidance_rescale(self, call_kwargs: Mapping[str, Any]) -> float:
        """The running call's ``guidance_rescale`` (0: none), read like :meth:`guidance`."""
        pipe = self.pipe
        if isinstance(getattr(type(pipe), "guidance_rescale", None), property):
            return float(pipe.guidance_rescale or 0.0)
        return float(call_kwargs.get("guidance_rescale") or 0.0)

    def rescaled_guidance(self, outputs: Tensor, scale: float, rescale: float) -> Tensor:
        """Head outputs ``(M, 2B, ...)`` of a guided batch -> the rescaled guided prediction
        ``(M, B, ...)`` of each draw: ``g = u + s (c - u)``, then ``r g std(c) / std(g) +
        (1 - r) g`` with the standard deviations over each sample's entries (diffusers'
        ``rescale_noise_cfg``).  Not affine in the head's output, so only a Monte-Carlo variance
        covers it."""
        if self.learned_sigma:
            raise GenuncError("guidance_rescale with a learned-variance output is not covered")
        first, second = outputs.chunk(2, dim=1)
        cond, uncond = (first, second) if self.cond_first else (second, first)
        guided = uncond + scale * (cond - uncond)
        ratio = cond.flatten(2).std(-1) / guided.flatten(2).std(-1)
        ratio = ratio.reshape(*ratio.shape, *([1] * (guided.dim() - 2)))
        return rescale * guided * ratio + (1 - rescale) * guided

    # ------------------------------------------------------------------ fitting
    def denoise(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return self.model(x, timestep=t, return_dict=False, **cond)[0]

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Clean images in [-1, 1] -> what the denoiser diffuses (VAE latents where there is a VAE)."""
        if images.dim() != 4:
            raise ShapeMismatchError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
        low, high = float(images.min()), float(images.max())
        if low < -1.001 or high > 1.001:
            raise GenuncError(f"images must lie in [-1, 1]; got values in [{low:.3g}, {high:.3g}]")
        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            return images.to(self.device, self.dtype)
        param = next(vae.parameters())
        dist = vae.encode(images.to(param.device, param.dtype)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32)
        latents = dist.mean + dist.std * noise.to(dist.mean)
        shift = vae.config.get("shift_factor") or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(self.device, self.dtype)

    @torch.no_grad()
    def conditioning(self, n: int, prompts: Sequence[str] | None = None,
                     class_labels: Tensor | Sequence[int] | None = None) -> dict[str, Any]:
        """The denoiser's conditioning keywords for `n` clean examples, from the pipeline's own
        text encoders (``encode_prompt``) or class labels."""
        cls = type(self.model).__name__
        device = self.device
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
            if labels.shape[0] != n:
                raise ShapeMismatchError(f"{n} images but {labels.shape[0]} class labels")
            return {"class_labels": labels}
        if prompts is None:
            class_conditional = cls == "DiTTransformer2DModel" or (
                cls == "UNet2DModel" and self.model.config.get("num_class_embeds"))
            if class_conditional:
                raise GenuncError(f"{cls} is class-conditional: pass class_labels=")
            if cls != "UNet2DModel":
                raise GenuncError(f"{cls} is text-conditional: pass prompts= (one per image)")
            return {}
        prompts = list(prompts)
        if len(prompts) != n:
            raise ShapeMismatchError(f"{n} images but {len(prompts)} prompts")
        pipe = self.pipe
        if cls == "SD3Transformer2DModel":
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                      device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if cls == "PixArtTransformer2DModel":
            embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                                    device=device)
            return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask,
                    "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        if cls == "UNet2DConditionModel":
            embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
            return {"encoder_hidden_states": embeds}
        raise GenuncError(f"genunc cannot embed prompts for {cls}; pass conditioning= with the "
                          "denoiser's own keyword arguments instead")

    def training_pairs(self, batch: Any, generator: torch.Generator) -> TrainingPairs:
        """``{"x": clean latents, **conditioning}`` -> noisy inputs and the prediction target
        (``(B, prediction_channels, H, W)``), following the scheduler's training convention:
        ``x_t = (1 - sigma) x0 + sigma eps`` with target ``eps - x0`` for flow matching
        (diffusers' SD3 training recipe), DDPM's ``add_noise`` otherwise."""
        if not isinstance(batch, Mapping) or "x" not in batch:
            raise ShapeMismatchError("pipeline training batches are dicts with 'x'")
        x0 = batch["x"].to(self.device, torch.float32)
        cond = {k: v for k, v in batch.items() if k != "x"}
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0)
        config = self.pipe.scheduler.config
        n_train = int(config.num_train_timesteps)
        index = torch.randint(0, n_train, (x0.shape[0],), generator=generator)
        if self.prediction_type == "flow":
            from diffusers import FlowMatchEulerDiscreteScheduler

            train = FlowMatchEulerDiscreteScheduler.from_config(config)
            sigma = train.sigmas[index].to(x0).reshape(-1, 1, 1, 1)
            t = train.timesteps[index].to(self.device)
            x_t, target = (1 - sigma) * x0 + sigma * noise, noise - x0
        else:
            from diffusers import DDPMScheduler

            train = DDPMScheduler.from_config(config)
            t = index.to(self.device)
            x_t = train.add_noise(x0, noise, t)
            target = {"epsilon": noise, "sample": x0}.get(self.prediction_type)
            if target is None:
                target = train.get_velocity(x0, noise, t)
        return TrainingPairs(inputs={"x": x_t.to(self.dtype), "t": t, **cond}, target=target)

    def head_targets(self, target: Tensor, output: Tensor) -> Tensor:
        """Targets in the head's layout.  A learned-variance model's variance channels have no
        regression target: they get the model's own output (zero residual), so they shape the
        posterior's curvature only; the noise scale is measured on the prediction alone."""
        if self.learned_sigma:
            target = torch.cat([target.to(output), output[:, self.prediction_channels:]], dim=1)
        return self.to_head_layout(target.to(output))


def _prediction_type(scheduler: Any) -> Prediction:
    if "FlowMatch" in type(scheduler).__name__:
        return "flow"
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction", "sample"):
        raise GenuncError(f"unsupported prediction_type {kind!r}")
    return kind


def _default(pipe: Any, name: str) -> Any:
    """The default of one of the pipeline's call arguments (None where it has none)."""
    parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else \
        parameter.default
