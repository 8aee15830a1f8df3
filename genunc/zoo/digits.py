"""Reference image models on scikit-learn's handwritten digits (8x8, upsampled to 16x16).

Two models ship with genunc, small enough to train on a laptop CPU and to store in the package:

* ``digits-ddpm``: a class-conditional diffusers ``UNet2DModel`` + ``DDPMScheduler``, saved with
  ``save_pretrained`` and loaded with ``from_pretrained(local path)`` like any diffusers model
  (:data:`~genunc.zoo.shipped.DDPM_DIR`);
* ``digits-classifier``: a small CNN whose penultimate features are the default extractor for the
  semantic (generative) uncertainty and for feature-space FID / precision / recall, and whose
  class probabilities tell whether a conditional sample shows the digit it was asked for
  (:data:`~genunc.zoo.shipped.CLASSIFIER_DIR`).

This module holds the data and the classifier's architecture; the recipes that train both are
:mod:`genunc.research.recipes.digits` (``genunc zoo train digits-ddpm`` /
``genunc zoo train digits-classifier``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genunc.zoo.pretrained import Pretrained

IMAGE_SIZE = 16
N_CLASSES = 10


# ---------------------------------------------------------------------------------------- data
def load_digits_tensor(size: int = IMAGE_SIZE) -> tuple[Tensor, Tensor]:
    """All 1,797 scikit-learn digits as ``(N, 1, size, size)`` in [-1, 1], with labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, torch.tensor(digits.target, dtype=torch.long)


def split_digits(seed: int = 0, n_test: int = 297) -> dict[str, tuple[Tensor, Tensor]]:
    """A fixed train/test split (seeded permutation): 1,500 train, 297 test."""
    images, labels = load_digits_tensor()
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:n_test], perm[n_test:]
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


# ---------------------------------------------------------------------------------------- classifier
class DigitsClassifier(Pretrained, nn.Module):
    """Small CNN for 16x16 digits; ``features(x)`` gives the penultimate 64-d representation."""

    CONFIG_KEY = None  # config.json holds the constructor arguments themselves

    def __init__(self, width: int = 32, n_features: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(), nn.Linear(2 * width * 16, n_features), nn.SiLU(),
        )
        self.head = nn.Linear(n_features, N_CLASSES)
        self.config = {"width": width, "n_features": n_features}

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))
