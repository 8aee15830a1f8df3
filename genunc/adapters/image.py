"""Adapter for diffusers image denoisers (``UNet2DModel``, ``UNet2DConditionModel``).

Both end in ``conv_norm_out -> conv_act -> conv_out``; ``conv_out`` is the head.  ``UNet2DModel``
may then divide by the timestep (Fourier time embedding, score-SDE style models), which
:meth:`DiffusersImageAdapter.post_head` reproduces; its "skip" up-blocks add a skip branch after
the head that genunc cannot recompute from the head's input, so those are refused up front.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from genunc.adapters.base import DenoiserAdapter, TrainingPairs
from genunc.errors import GenuncError, NonFiniteError, ShapeMismatchError

_CONDITIONING_KEYS = ("class_labels", "encoder_hidden_states", "added_cond_kwargs")


class DiffusersImageAdapter(DenoiserAdapter):
    """A diffusers UNet plus its training scheduler (for ``add_noise`` and the prediction type).

    Batches are image tensors ``(B, C, H, W)`` in the model's range, or dicts with ``x`` plus any
    of ``class_labels`` / ``encoder_hidden_states`` / ``added_cond_kwargs``.
    """

    likelihood = "regression"

    def __init__(self, unet: nn.Module, scheduler: Any, head_name: str = "conv_out") -> None:
        super().__init__(unet, head_name)
        self.scheduler = scheduler
        config = getattr(unet, "config", {})
        up_blocks = list(config.get("up_block_types", ()) or ())
        if any("Skip" in name for name in up_blocks):
            raise GenuncError(
                f"UNet up-blocks {up_blocks} add a skip branch after '{head_name}', which genunc "
                "cannot reproduce from the head's input; use a model without Skip up-blocks"
            )
        self.fourier = config.get("time_embedding_type") == "fourier"
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise GenuncError(f"unsupported prediction_type {self.prediction_type!r}")

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        config = self.model.config
        size = config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (config.in_channels, *size)

    @property
    def alphas_cumprod(self) -> Tensor:
        """The noise schedule (what the variability score's clean-sample scale reads)."""
        return self.scheduler.alphas_cumprod

    @property
    def num_classes(self) -> int | None:
        return self.model.config.get("num_class_embeds")

    def denoise(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        cond = {k: v for k, v in cond.items() if v is not None}
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return self.model(x, t, **cond).sample

    def training_pairs(self, batch: Any, generator: torch.Generator) -> TrainingPairs:
        if isinstance(batch, Tensor):
            data: dict[str, Any] = {"x": batch}
        elif isinstance(batch, (tuple, list)):  # (images, labels) as from a TensorDataset
            data = {"x": batch[0], "class_labels": batch[1]} if len(batch) > 1 else {"x": batch[0]}
        elif isinstance(batch, Mapping) and "x" in batch:
            data = dict(batch)
        else:
            raise ShapeMismatchError("image batches are tensors, (images, labels), or dicts with 'x'")
        x0 = data["x"].to(self.device, self.dtype)
        self.check_images(x0)
        labels = data.get("class_labels")
        if labels is not None and self.num_classes is not None:
            labels = torch.as_tensor(labels)
            if labels.is_floating_point() or labels.is_complex():
                raise GenuncError(f"class labels must be integers, got {labels.dtype}")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise GenuncError(f"class labels must lie in [0, {self.num_classes}); got "
                                  f"[{int(labels.min())}, {int(labels.max())}]")
        n_train = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, n_train, (x0.shape[0],), generator=generator).to(self.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0)
        x_t = self.scheduler.add_noise(x0, noise, t)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, t)
        else:
            target = x0
        cond = {k: _to(data[k], self.device) for k in _CONDITIONING_KEYS if k in data}
        if self.fourier:  # the head's output is divided by t afterwards: undo it on the target
            target = target * _per_sample(t.to(target))
        return TrainingPairs(inputs={"x": x_t, "t": t, **cond}, target=target)

    def check_images(self, x: Tensor) -> None:
        """Clean images must have the model's shape and lie in [-1, 1], the range diffusers
        models are trained in (images in [0, 1] fit a posterior several times too wide)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.sample_shape:
            raise ShapeMismatchError(f"images must be (B, {', '.join(map(str, self.sample_shape))}) "
                                     f"for this model, got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise NonFiniteError("images hold NaN or infinite values")
        low, high = float(x.min()), float(x.max())
        if low < -1.001 or high > 1.001:
            raise GenuncError(f"images must lie in [-1, 1]; got values in [{low:.3g}, {high:.3g}]")
        if low >= 0 and x.numel() >= 1024:
            raise GenuncError(f"no image pixel is below 0 (values in [{low:.3g}, {high:.3g}]): "
                              "these look like [0, 1] images; rescale them with x * 2 - 1")

    def head_output_variance(self, posterior: Any, phi: Tensor,
                             inputs: Mapping[str, Any]) -> Tensor:
        """The head's closed form on its fast path; a Fourier head's division by t scales it."""
        variance = posterior.output_variance(phi)
        return variance / _per_sample(inputs["t"].to(variance)).square() if self.fourier else variance

    def post_head(self, head_output: Tensor, inputs: Mapping[str, Any]) -> Tensor:
        if not self.fourier:
            return head_output
        t = inputs["t"].to(head_output)
        return head_output / _per_sample(t)


def _per_sample(t: Tensor) -> Tensor:
    """Reshape ``(B,)`` timesteps to broadcast against ``(B, C, H, W)`` or ``(M, B, C, H, W)``."""
    return t.reshape(*t.shape, *([1] * 3))


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    return value
