"""The main demo: generative uncertainty on the shipped digits DDPM.

Loads the shipped class-conditional DDPM, fits (or reloads) the head posterior, generates digits
with MAP + M perturbed generations, scores them, and writes

* ``contact_sheet.png``: the samples sorted from most certain (top left) to least certain;
* ``scores.csv``: one row per sample with every score and the judge's verdict;
* ``retention.png``: share of samples showing the digit they were asked for, as the kept
  fraction grows, for each score and for random selection.

Quality label: the independent digits judge (an MLP on pixels, 99.0% test accuracy on real
digits; :mod:`genunc.research.judges`, found by its registration through
:func:`genunc.plugins.judge`) sees the requested class.  The semantic score reads another
network, the digits classifier's features, measured in units of the real digits' feature SD.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genunc import filtering, plugins
from genunc._io import atomic_write
from genunc.features import DigitsFeatures
from genunc.pipelines.image import ImageUncertaintyPipeline
from genunc.zoo import digits
from genunc.zoo.shipped import DDPM_DIR

SCORE_LABELS = {
    "semantic": "semantic entropy (MAP + M generations)",
    "variability": "noise-prediction variability (1 generation)",
    "pixel_variance": "pixel variance (MAP + M generations)",
    "random": "random",
}


def load_reference_pipeline(out_dir: Path | None = None, progress: bool = True,
                            device: str = "cpu", tail: int | None = None) -> ImageUncertaintyPipeline:
    """Shipped DDPM + classifier features; posterior reloaded from `out_dir` or fitted there
    (a cached posterior of other weights is refitted: the demo only caches its own fit).
    ``tail``: a posterior over the last `tail` up-blocks and the head instead of the head."""
    pipe = ImageUncertaintyPipeline.from_pretrained(
        DDPM_DIR, feature_extractor=DigitsFeatures(device=device), posterior=None,
        device=device)
    train = digits.split_digits()["train"]
    pipe.fit_feature_scale(train[0])
    if out_dir is None:
        pipe.fit_posterior(train, progress=progress, tail=tail)
    else:
        pipe.load_or_fit_posterior(Path(out_dir) / "posterior", train, stale="refit",
                                   progress=progress, tail=tail)
    return pipe


def class_agreement(judge: Any, images: torch.Tensor,
                    labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(the judge's probability of the requested class, whether its argmax is that class)."""
    probs = judge.probabilities(images)
    labels = np.asarray(labels)
    return probs[np.arange(len(labels)), labels], probs.argmax(1) == labels


def run(out_dir: str | Path = "outputs/demo", n_samples: int = 256, num_draws: int = 5,
        steps: int = 50, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipe = load_reference_pipeline(out_dir, progress=progress)
    fit_seconds = time.perf_counter() - t0
    out = pipe(n_samples, num_draws=num_draws, num_inference_steps=steps, seed=seed,
               scores=("semantic", "variability", "pixel_variance", "random"), progress=progress)
    p_label, correct = class_agreement(plugins.judge("digits_judge"), out.images, out.class_labels)

    _write_csv(out_dir / "scores.csv", out, p_label, correct)
    order = filtering.keep_order(out.scores["semantic"])
    _contact_sheet(out_dir / "contact_sheet.png", out.images[order], out.class_labels[order],
                   correct[order])
    summary = {
        "n_samples": n_samples, "num_draws": num_draws, "steps": steps, "seed": seed,
        "class_agreement_all": float(correct.mean()),
        "posterior": pipe.posterior.summary(),
        "seconds": {"posterior": fit_seconds, **out.timings},
        "scores": {},
    }
    curves = {}
    for name, values in out.scores.items():
        fractions, acc = filtering.retention_curve(values, correct)
        curves[SCORE_LABELS.get(name, name)] = (fractions, acc)
        kept = filtering.keep_fraction(values, 0.8)
        summary["scores"][name] = {
            "auroc_wrong_class": filtering.auroc(values, ~correct),
            "agreement_kept_80pct": float(correct[kept].mean()),
            "spearman_vs_p_label": filtering.spearman(values, p_label),
        }
    filtering.plot_retention(out_dir / "retention.png", curves,
                             ylabel="judge sees the requested digit",
                             title="digits: filtering by uncertainty")
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def _write_csv(path: Path, out: Any, p_label: np.ndarray, correct: np.ndarray) -> None:
    names = list(out.scores)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["sample_id", "seed", "class_label", "p_class", "judge_agrees", *names])
    for i in range(len(out.images)):
        writer.writerow([i, out.seed, int(out.class_labels[i]), f"{p_label[i]:.6f}",
                         int(correct[i]), *(f"{out.scores[n][i]:.8g}" for n in names)])
    atomic_write(path, buffer.getvalue())


def _contact_sheet(path: Path, images: torch.Tensor, labels: torch.Tensor, correct: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.6, rows * 0.6 + 0.6))
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_title(str(int(labels[i])), fontsize=6, pad=1,
                         color="black" if correct[i] else "red")
    fig.suptitle("digits sorted by semantic uncertainty, most certain top-left\n"
                 "title = requested digit (red: the judge sees another digit)", fontsize=8)
    fig.tight_layout(pad=0.2, rect=(0, 0, 1, 1 - 0.5 / (rows * 0.6 + 0.6)))
    fig.savefig(path, dpi=150)
    plt.close(fig)
