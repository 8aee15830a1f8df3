"""Feature-space image metrics: Fréchet distance, and k-NN precision / recall.

They follow FID (Heusel et al. 2017) and improved precision/recall (Kynkäänniemi et al. 2019) but
run on any feature extractor; with the digits classifier's 64-d features they measure what FID
measures, on a scale where a few thousand samples suffice.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

from genunc.errors import GenuncError


def _as2d(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise GenuncError(f"features must be (N >= 2, D), got {x.shape}")
    return x


def frechet_distance(real, fake) -> float:
    """||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^{1/2}) between Gaussian fits."""
    real, fake = _as2d(real), _as2d(fake)
    mu_r, mu_f = real.mean(0), fake.mean(0)
    s_r, s_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = linalg.sqrtm(s_r @ s_f)
    if not np.isfinite(covmean).all():  # near-singular product: regularise, as FID codes do
        eps = np.eye(s_r.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s_r + eps) @ (s_f + eps))
    covmean = covmean.real
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(s_r) + np.trace(s_f) - 2 * np.trace(covmean))


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def _coverage(points: np.ndarray, support: np.ndarray, radii: np.ndarray, chunk: int = 1024) -> float:
    inside = 0
    for i in range(0, len(points), chunk):
        d = np.sqrt(((points[i : i + chunk, None] - support[None]) ** 2).sum(-1))
        inside += int((d <= radii[None]).any(axis=1).sum())
    return inside / len(points)


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Precision: share of fakes inside the real manifold; recall: share of reals inside the fake one."""
    real, fake = _as2d(real), _as2d(fake)
    if min(len(real), len(fake)) <= k:
        raise GenuncError(f"need more than k={k} samples on each side")
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return precision, recall
