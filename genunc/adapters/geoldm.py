"""Adapter for GeoLDM's latent diffusion (:mod:`genunc.zoo.geoldm`).

GeoLDM diffuses in its VAE's latent space, with EDM's process and network: the sampler state is a
latent point cloud ``(B, N, 3 + latent_nf)`` (centre-of-mass-free positions, invariant features)
and the latent dynamics is EDM's EGNN.  So :class:`GeoLDMAdapter` is
:class:`~genunc.adapters.edm.EDMAdapter` (EDM's ancestral step, the head
``dynamics.egnn.embedding_out``, the block posterior over the last blocks, head and readout) on a
:class:`LatentLayout`, which turns latents into molecules through the VAE's decoder:

* **posterior fits** take clean molecules (batches ``{"x": (B, N, 3 + K), "node_mask"}`` in
  GeoLDM's raw encoding, as :meth:`~genunc.adapters.molecule.MoleculeAdapter.encode` makes them);
  :meth:`GeoLDMAdapter.tail_training_pairs` encodes them as GeoLDM's ``EnLatentDiffusion.forward``
  does (the encoder's means plus ``sigma_0`` noise, positions centre-of-mass free) and noises the
  latents: the posterior lives in the latent dynamics.
* **scores** are computed on decoded molecules (variability is over the latent noise
  prediction: ``variability_pos`` its position part, ``variability_type`` its latent-feature
  part; the semantic scores featurise the decoded molecules).
* the sampler stops at ``z_0`` and decodes it, as for EDM: GeoLDM's final ``p(z | z_0)`` (a
  shift of order ``sigma_0 = 3e-3``) is not taken.
* the ``nll`` score is GeoLDM's own likelihood as its evaluation computes it
  (:meth:`GeoLDMAdapter.likelihood_terms`): EDM's bound on the molecule's encoded latent plus
  the decoder's reconstruction error and GeoLDM's constants.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from genunc.adapters.base import TrainingPairs
from genunc.adapters.edm import EDMAdapter
from genunc.adapters.edm_likelihood import LOG_2PI
from genunc.adapters.molecule import Molecule, PointCloudLayout, remove_mean
from genunc.errors import GenuncError, NonFiniteError, ShapeMismatchError


def pair_mask(node_mask: Tensor) -> Tensor:
    """``(B, N, N)`` pairs of real atoms without self-pairs (EDM's and GeoLDM's edge mask)."""
    m = node_mask.bool()
    eye = torch.eye(m.shape[1], dtype=torch.bool, device=m.device)
    return m.unsqueeze(1) & m.unsqueeze(2) & ~eye


class LatentLayout:
    """GeoLDM's latent point clouds, and the molecules they decode to.

    ``width``, ``positions`` and ``features`` describe the latent (what the sampler moves);
    :meth:`encode` / :meth:`decode` / :meth:`clean` speak molecules, in `molecule`'s layout
    (GeoLDM's raw encoding: scales 1, one-hot types, nuclear charges).
    """

    positions = slice(0, 3)
    features = slice(3, None)

    def __init__(self, vae: torch.nn.Module, latent_nf: int, molecule: PointCloudLayout) -> None:
        self.vae = vae
        self.latent_nf = latent_nf
        self.molecule = molecule

    @property
    def width(self) -> int:
        return 3 + self.latent_nf

    def _call(self, method: str, x: Tensor, node_mask: Tensor) -> Tensor:
        param = next(self.vae.parameters())
        mask = node_mask.to(param.device).bool()
        with torch.no_grad():
            return getattr(self.vae, method)(x.to(param.device, param.dtype), mask.unsqueeze(-1),
                                             pair_mask(mask).unsqueeze(-1))

    def latent_mean(self, molecules: Tensor, node_mask: Tensor) -> Tensor:
        """The encoder's latent means of molecules in the raw encoding."""
        lay = self.molecule
        mask = node_mask.bool().to(molecules.device)
        centred = torch.cat([remove_mean(molecules[..., lay.positions], mask),
                             molecules[..., lay.features]], -1)
        return self._call("encode", centred, node_mask)

    def decode_tensor(self, z: Tensor, node_mask: Tensor) -> Tensor:
        """The decoder's molecules ``(B, N, 3 + K)`` (positions, type logits, charge)."""
        return self._call("decode", z, node_mask)

    def encode(self, positions: np.ndarray, types: np.ndarray, mask: np.ndarray) -> Tensor:
        """Padded molecules in GeoLDM's raw encoding (what the encoder reads)."""
        return self.molecule.encode(positions, types, mask)

    def decode(self, z: Tensor, node_mask: Tensor) -> list[Molecule]:
        """Positions (Angstrom) and argmax atom types of the molecules latents decode to."""
        return self.molecule.decode(self.decode_tensor(z, node_mask), node_mask)

    def clean(self, z: Tensor, node_mask: Tensor) -> Tensor:
        """The latent of the molecule `z` decodes to: decoded, types made one-hot, re-encoded
        (the latent GeoLDM's likelihood would score for that molecule)."""
        molecules = self.molecule.clean(self.decode_tensor(z, node_mask), node_mask.to(z.device))
        return self.latent_mean(molecules, node_mask).to(z.device, z.dtype)


class GeoLDMAdapter(EDMAdapter):
    """GeoLDM's latent dynamics (:class:`genunc.zoo.geoldm.GeoLDMModel`) as a genunc molecule
    denoiser: EDM's adapter on latents, with molecules in and out (see the module docstring)."""

    layout: LatentLayout  # type: ignore[assignment]
    #: the likelihood's noise per molecule: EDM's (each level's, level 0's), then the encoder's
    likelihood_extra_noise = 1

    def likelihood_data(self, x: Tensor, node_mask: Tensor) -> Tensor:
        """The molecules latents `x` decode to (types one-hot, charges theirs): what GeoLDM's
        likelihood scores."""
        return self.layout.molecule.clean(self.layout.decode_tensor(x, node_mask),
                                          node_mask.to(x.device))

    @torch.no_grad()
    def likelihood_terms(self, x0: Tensor, node_mask: Tensor, levels: Tensor, noise: Tensor,
                         weights: Tensor | None = None, context: Tensor | None = None,
                         max_rows: int = 512) -> dict[str, Tensor]:
        """GeoLDM's negative log-likelihood of molecules ``x0`` ``(B, N, 3 + K)`` (its raw
        encoding) as its evaluation computes it (``EnLatentDiffusion.forward``), and its terms,
        per molecule (float64, nats).

        The molecule is encoded to ``z = mu + sigma_0 eps_enc`` (``noise``'s last entry; the
        others as for EDM: each level's, then level 0's, all latent-shaped ``(B, L + 2, N, 3 +
        latent_nf)``); EDM's bound on ``z`` gives ``position_constants``, ``prior_kl``,
        ``diffusion`` and ``reconstruction`` (level 0: half the whole latent's noise error, a
        Gaussian on every latent coordinate); then GeoLDM adds

        * ``feature_constants``: ``N * 3 * (gamma_0 / 2 + log(2 pi) / 2)``, GeoLDM's normaliser of
          the latent features' Gaussian, which counts ``N * 3`` coordinates (``n_dims``), not the
          ``N * latent_nf`` the features have: reproduced as GeoLDM computes it;
        * ``decoder_error`` (runs trained with ``trainable_ae``, as GeoLDM's QM9 command; else 0):
          the VAE's reconstruction error of the decoded ``z``: squared position error, the
          types' cross-entropy, squared charge error, over the real atoms (GeoLDM's code also
          counts ``log(n_types)`` for each padding row of its batch, which depends on the batch,
          not the molecule; genunc leaves it out).

        GeoLDM's reports add ``-log p(N)``, as the pipeline's ``nll`` does.  GeoLDM's estimator
        is one uniform level per molecule (``weights=None`` and ``L = 1``).
        """
        b, n_levels = levels.shape
        if noise.shape[:2] != (b, n_levels + 2):
            raise GenuncError(f"noise must be (B, L + 2, N, F) = ({b}, {n_levels + 2}, ...), "
                              f"got {tuple(noise.shape)}")
        mask = node_mask.bool().to(x0.device)
        mu = self.layout.latent_mean(x0, mask).to(x0.device, x0.dtype)
        eps = self._centre(noise[:, -1].to(x0.device, torch.float64), mask)
        sigma_0 = torch.sigmoid(self.gamma[0].to(torch.float64)).sqrt()  # as the bound's level 0
        z = (mu.to(torch.float64) + sigma_0 * eps).to(x0.dtype)
        terms, level_0 = self.diffusion_bound(z, mask, levels, noise[:, :-1], weights, context,
                                              max_rows)
        fmask = mask.to(torch.float64)
        terms["reconstruction"] = 0.5 * ((level_0.eps - level_0.eps_hat) ** 2
                                         * fmask.unsqueeze(-1)).sum((1, 2))
        terms["feature_constants"] = fmask.sum(1) * 3 * (0.5 * level_0.gamma + 0.5 * LOG_2PI)
        terms["decoder_error"] = self.decoder_error(x0, z, mask) if self.trainable_ae \
            else torch.zeros_like(terms["diffusion"])
        terms["nll_xh"] = sum(terms.values())
        return terms

    def decoder_error(self, molecules: Tensor, z: Tensor, mask: Tensor) -> Tensor:
        """GeoLDM's ``compute_reconstruction_error`` of the decoded latents ``z`` against the
        molecules, over the real atoms (float64)."""
        lay = self.layout.molecule
        fmask = mask.to(torch.float64)
        target = molecules.to(torch.float64)
        positions = remove_mean(target[..., lay.positions], mask)
        decoded = self.layout.decode_tensor(z, mask).to(torch.float64)
        error = ((decoded[..., lay.positions] - positions) ** 2).sum(-1)
        logits, types = decoded[..., lay.types], target[..., lay.types].argmax(-1)
        error = error + torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), types.reshape(-1), reduction="none").view(types.shape)
        if lay.charges:
            error = error + (decoded[..., -1] - target[..., -1]) ** 2
        return (error * fmask).sum(1)

    def __init__(self, model: torch.nn.Module, layout: LatentLayout, *, trainable_ae: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(model, layout, **kwargs)  # type: ignore[arg-type]
        #: whether the run trained its autoencoder with the diffusion (GeoLDM's ``trainable_ae``:
        #: then its likelihood includes the decoder's reconstruction error)
        self.trainable_ae = trainable_ae
        self.sigma_0 = float(torch.sqrt(torch.sigmoid(self.gamma[0])))

    def to_latent(self, batch: Mapping[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """Clean molecules ``{"x", "node_mask"}`` -> their latents ``z = mu + sigma_0 eps`` (GeoLDM's
        ``EnLatentDiffusion.forward``; the noise from `generator`)."""
        if not isinstance(batch, Mapping) or "x" not in batch or "node_mask" not in batch:
            raise ShapeMismatchError("GeoLDM batches are dicts with 'x' (B, N, 3+K) molecules and "
                                     "'node_mask'")
        x = batch["x"].to(self.device, self.dtype)
        mask = batch["node_mask"].to(self.device).bool()
        width = self.layout.molecule.width
        if x.dim() != 3 or mask.shape != x.shape[:2] or x.shape[-1] != width:
            raise ShapeMismatchError(f"x must be (B, N, {width}) molecules (positions, one-hot "
                                     f"types, charge) with node_mask (B, N); got {tuple(x.shape)} "
                                     f"and {tuple(mask.shape)}")
        if not torch.isfinite(x[mask]).all():
            raise NonFiniteError("molecules hold NaN or infinite values")
        mu = self.layout.latent_mean(x, mask).to(x.dtype)
        eps = self.sample_noise(mu.shape, mask, generator).to(mu.dtype)
        return {**batch, "x": mu + self.sigma_0 * eps, "node_mask": mask}

    def tail_training_pairs(self, batch: Any, generator: torch.Generator) -> TrainingPairs:
        """EDM's noisy pairs on the latents of the batch's molecules (whole noise as target)."""
        return super().tail_training_pairs(self.to_latent(batch, generator), generator)

    def decode(self, x: Tensor, node_mask: Tensor) -> list[Molecule]:
        return self.layout.decode(x, node_mask)

    def clean(self, x: Tensor, node_mask: Tensor) -> Tensor:
        return self.layout.clean(x, node_mask)
