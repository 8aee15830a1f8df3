"""Feature extractors for the semantic likelihood and for feature-space metrics.

Any callable ``images (B, C, H, W) -> features (B, D)`` works.  Shipped:

* :class:`DigitsFeatures`: penultimate layer of the shipped digits classifier (default for the
  digits reference model);
* :class:`ClipFeatures`: CLIP image embeddings via ``transformers``, from a local checkpoint
  directory (the paper's choice; needs the weights on disk);
* :class:`VisionModelFeatures`: any ``transformers`` vision model from a local folder;
* :func:`flatten_pixels`: raw pixels, a no-model fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from genunc.errors import GenuncError

FeatureExtractor = Callable[[Tensor], Tensor]


def flatten_pixels(images: Tensor) -> Tensor:
    return images.flatten(1)


def _rgb_uint8(images: Tensor) -> list[Tensor]:
    """Images in [-1, 1] as the uint8 RGB images ``transformers`` image processors expect."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if pixels.shape[1] == 1:
        pixels = pixels.repeat(1, 3, 1, 1)
    return list(pixels.cpu())


class DigitsFeatures:
    """64-d features of the shipped digits classifier; also exposes its class probabilities."""

    def __init__(self, directory: str | Path | None = None, device: str | torch.device = "cpu"):
        from genunc.zoo.digits import DigitsClassifier
        from genunc.zoo.shipped import CLASSIFIER_DIR

        self.model = DigitsClassifier.from_pretrained(directory or CLASSIFIER_DIR).to(device)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return self.model.features(self._prepare(images))

    @torch.no_grad()
    def probabilities(self, images: Tensor) -> Tensor:
        return torch.softmax(self.model(self._prepare(images)), dim=-1)

    def _prepare(self, images: Tensor) -> Tensor:
        device = next(self.model.parameters()).device
        images = images.to(device, torch.float32).clamp(-1, 1)
        if images.shape[-1] != 16:
            images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
        return images


class ClipFeatures:
    """CLIP image embeddings (512-d for ViT-B/32) from a local ``transformers`` checkpoint."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        try:
            from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
        except ImportError as err:  # pragma: no cover - optional dependency
            raise GenuncError("ClipFeatures needs transformers: pip install 'genunc[clip]'") from err
        self.model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)
        self.model = self.model.to(device).eval()
        self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        batch = self.processor(images=_rgb_uint8(images), return_tensors="pt")
        device = next(self.model.parameters()).device
        return self.model(pixel_values=batch["pixel_values"].to(device)).image_embeds


class VisionModelFeatures:
    """Features of any ``transformers`` vision model saved in a local folder (ViT, DINOv2,
    ConvNeXt, SigLIP's vision tower, ...), with the image processor saved beside it.

    The feature is the model's pooled output where it has one (``pooler_output`` or
    ``image_embeds``), else the mean of its last hidden states over tokens / positions.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        try:
            from transformers import AutoImageProcessor, AutoModel
        except ImportError as err:  # pragma: no cover - optional dependency
            raise GenuncError("VisionModelFeatures needs transformers: pip install 'genunc[clip]'") \
                from err
        if not Path(path).is_dir():
            raise GenuncError(f"no model folder at {path}")
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        batch = self.processor(images=_rgb_uint8(images), return_tensors="pt")
        device = next(self.model.parameters()).device
        out = self.model(pixel_values=batch["pixel_values"].to(device))
        for name in ("image_embeds", "pooler_output"):
            pooled = getattr(out, name, None)
            if pooled is not None:
                return pooled.flatten(1)
        hidden = out.last_hidden_state
        return hidden.mean(1) if hidden.dim() == 3 else hidden.flatten(2).mean(-1)


def extract_in_batches(extractor: FeatureExtractor, images: Tensor, batch_size: int = 512) -> Tensor:
    """Apply `extractor` over ``(N, ...)`` images in chunks; returns float64 CPU features."""
    outs = [extractor(images[i : i + batch_size]).detach().double().cpu()
            for i in range(0, images.shape[0], batch_size)]
    return torch.cat(outs)
