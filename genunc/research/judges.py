"""An independent judge of digit images, used for evaluation only.

The semantic score reads the shipped digits classifier's features; if the same network also gave
the FID features and the "right digit" label, a score could look good merely by agreeing with
itself.  The judge breaks that circle: another architecture (an MLP on the raw pixels, no
convolutions), another seed, and nothing in genunc scores with it.  It only says what a sample
shows (:meth:`DigitsJudgeEvaluator.agrees`) and where it sits in feature space
(:meth:`DigitsJudgeEvaluator.features`, for FID / precision / recall).

Its shipped weights are :data:`genunc.zoo.shipped.JUDGE_DIR`; train it with
``genunc zoo train digits-judge``.  The library reaches the evaluator only by its registration
(the ``genunc.judges`` entry point ``digits_judge``, :func:`genunc.plugins.judge`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genunc.errors import ShapeMismatchError
from genunc.research.recipes.digits import fit_on_digits
from genunc.research.training import write_report
from genunc.zoo.digits import IMAGE_SIZE, N_CLASSES
from genunc.zoo.pretrained import Pretrained
from genunc.zoo.shipped import JUDGE_DIR


class DigitsJudge(Pretrained, nn.Module):
    """MLP on the 256 pixels of a 16x16 digit: two SiLU hidden layers with dropout, then a linear
    head; ``features(x)`` is the second hidden layer (``hidden[-1]`` wide)."""

    CONFIG_KEY = None  # config.json holds the constructor arguments themselves

    def __init__(self, hidden: tuple[int, ...] | list[int] = (256, 128), dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = IMAGE_SIZE * IMAGE_SIZE
        for h in hidden:
            layers += [nn.Linear(width, h), nn.SiLU(), nn.Dropout(dropout)]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, N_CLASSES)
        self.config = {"hidden": list(hidden), "dropout": dropout}

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@dataclass
class JudgeRecipe:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 1  # not the classifier's 0


def train_judge(recipe: JudgeRecipe, out_dir: str | Path) -> dict:
    """Train the judge on the classifier's train split (same shifts); returns test accuracy."""
    torch.manual_seed(recipe.seed)
    model = DigitsJudge()
    acc, result = fit_on_digits(model, epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr,
                                seed=recipe.seed, weight_decay=recipe.weight_decay, desc="digits judge")
    model.save_pretrained(out_dir)
    return write_report(out_dir, {
        "test_accuracy": acc, "seconds": result.seconds, "recipe": asdict(recipe),
        "command": f"genunc zoo train digits-judge --epochs {recipe.epochs} --seed {recipe.seed}"})


class DigitsJudgeEvaluator:
    """The shipped judge behind numpy answers: features, predicted class, agreement with labels.

    Images are ``(N, 1, H, W)`` in [-1, 1] (tensor or array) of any size; they are resized to
    16x16 as :class:`genunc.features.DigitsFeatures` does and run in batches of `batch_size`.
    """

    def __init__(self, directory: str | Path | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 512) -> None:
        self.model = DigitsJudge.from_pretrained(directory or JUDGE_DIR, device=device)
        self.batch_size = batch_size

    def features(self, images) -> np.ndarray:
        """``(N, D)`` float64 penultimate features (for FID / precision / recall)."""
        return self._run(images, self.model.features)

    def probabilities(self, images) -> np.ndarray:
        """``(N, 10)`` class probabilities."""
        return self._run(images, lambda x: torch.softmax(self.model(x), dim=-1))

    def predicted_class(self, images) -> np.ndarray:
        return self.probabilities(images).argmax(1)

    def agrees(self, images, labels) -> np.ndarray:
        """Whether the judge sees the digit each image was asked to show (bool per image)."""
        labels = np.asarray(labels).reshape(-1)
        predicted = self.predicted_class(images)
        if labels.shape != predicted.shape:
            raise ShapeMismatchError(f"{len(predicted)} images but {len(labels)} labels")
        return predicted == labels

    @torch.no_grad()
    def _run(self, images, fn) -> np.ndarray:
        x = self._prepare(images)
        return torch.cat([fn(chunk).double().cpu() for chunk in x.split(self.batch_size)]).numpy()

    def _prepare(self, images) -> Tensor:
        device = next(self.model.parameters()).device
        x = torch.as_tensor(images).to(device, torch.float32)
        if x.ndim != 4 or x.shape[1] != 1:
            raise ShapeMismatchError(f"the judge reads (N, 1, H, W) grey images, got {tuple(x.shape)}")
        x = x.clamp(-1, 1)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        return x
