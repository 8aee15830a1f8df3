"""GeoLDM (Xu et al., ICML 2023): EDM's latent counterpart, loadable from GeoLDM's own checkpoints.

A GeoLDM output folder (github.com/MinkaiXu/GeoLDM, ``main_qm9.py --train_diffusion``) holds
``args.pickle`` (read by :mod:`genunc.zoo.edm_args`'s safe unpickler: only
``argparse.Namespace`` and plain values) and ``generative_model_ema.npy``, a ``torch.save``'d state
dict of GeoLDM's ``EnLatentDiffusion``: an E(n) VAE (``vae.encoder``, ``vae.decoder``) and a
latent EDM (``dynamics``, ``gamma``, ``buffer``).  :func:`load_geoldm` rebuilds that tree under
the same key names and returns a :class:`GeoLDMModel`.

* The latent of a molecule with N atoms is a point cloud ``(N, 3 + latent_nf)``: an equivariant
  position part (centre-of-mass free) and ``latent_nf`` invariant features per atom.
* The **encoder** is a one-block EGNN on the molecule in GeoLDM's raw encoding (positions in
  Angstrom, one-hot types, nuclear charges: GeoLDM does not apply ``normalize_factors``) whose
  last node states pass an MLP; its means are the latent (GeoLDM's ``encode`` fixes the
  standard deviations at 0.0032 and the latent diffusion adds ``sigma_0`` noise).
* The **decoder** is an ``n_layers``-block EGNN from the latent back to positions (the final
  positions, centre-of-mass free) and per-atom type logits and charge (argmax / rounded).
* The **latent dynamics** is EDM's network (:class:`genunc.zoo.edm.EGNNDynamics`) with
  ``latent_nf`` features: its head ``dynamics.egnn.embedding_out`` and its tail (the last
  blocks, the head and the parameter-free readout) are EDM's, so the head and block posteriors
  of :mod:`genunc.adapters.edm` apply unchanged, in latent space.

All three are written, as for EDM, from GeoLDM's equations on dense ``(B, N, N)`` edge tensors,
reusing EDM's blocks (GeoLDM's ``egnn_new.py`` is EDM's).
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from genunc.errors import ConfigError, MissingFileError
from genunc.zoo.edm import EDMConfig, EDMModel, EquivariantBlock, load_state, read_weights
from genunc.zoo.edm_args import ARGS_FILE, read_args

#: GeoLDM's ``encode`` replaces the encoder's standard deviations by this constant
ENCODER_SIGMA = 0.0032


def is_geoldm_args(args: argparse.Namespace) -> bool:
    """Whether a run's options are GeoLDM's (it alone has ``latent_nf`` and ``train_diffusion``)."""
    return hasattr(args, "latent_nf") and hasattr(args, "train_diffusion")


@dataclass(frozen=True)
class GeoLDMConfig(EDMConfig):
    """A GeoLDM run's options: EDM's, plus the latent width.

    ``n_features`` (what the latent dynamics denoises per atom) is ``latent_nf``;
    ``molecule_features`` (what the VAE encodes and decodes) is EDM's atom features.
    """

    latent_nf: int = 1
    train_diffusion: bool = True
    #: the autoencoder was trained with the diffusion (its likelihood then adds the decoder's
    #: reconstruction error); GeoLDM's default is False, its QM9 command sets it
    trainable_ae: bool = False

    @property
    def n_features(self) -> int:  # type: ignore[override]
        return self.latent_nf

    @property
    def molecule_features(self) -> int:
        return len(self.atom_types) + int(self.include_charges)

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "GeoLDMConfig":
        if not is_geoldm_args(args):
            raise ConfigError("the args lack latent_nf / train_diffusion: not a GeoLDM training run")
        values = dict(vars(args))
        # GeoLDM's own defaults for options older runs lack (qm9/models.py)
        values.setdefault("normalization_factor", 1)
        values.setdefault("aggregation_method", "sum")
        config = super().from_namespace(argparse.Namespace(**values))
        assert isinstance(config, GeoLDMConfig)
        if config.latent_nf < 1:
            raise ConfigError(f"latent_nf must be at least 1, got {config.latent_nf}")
        return config

    def check(self) -> None:
        super().check()
        if self.sin_embedding:
            raise ConfigError("GeoLDM runs with sin_embedding are not supported")


class _EGNN(nn.Module):
    """GeoLDM's (= EDM's) ``EGNN``: embedding, equivariant blocks, ``embedding_out``."""

    def __init__(self, config: EDMConfig, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.embedding = nn.Linear(n_in, config.nf)
        self.embedding_out = nn.Linear(config.nf, n_out)
        for i in range(n_layers):
            self.add_module(f"e_block_{i}", EquivariantBlock(config))

    def forward(self, h: Tensor, x: Tensor, node_mask: Tensor, edge_mask: Tensor) -> tuple[Tensor, Tensor]:
        radial0 = (x.unsqueeze(2) - x.unsqueeze(1)).square().sum(-1, keepdim=True)  # input distances^2
        h = self.embedding(h)
        for i in range(self.n_layers):
            h, x = getattr(self, f"e_block_{i}")(h, x, radial0, node_mask, edge_mask)
        return self.embedding_out(h) * node_mask, x


def _dense_masks(xh: Tensor, node_mask: Tensor, edge_mask: Tensor) -> tuple[Tensor, Tensor]:
    b, n, _ = xh.shape
    return node_mask.reshape(b, n, 1).to(xh.dtype), edge_mask.reshape(b, n, n, 1).to(xh.dtype)


def _centred_positions(x: Tensor, node_mask: Tensor, what: str) -> Tensor:
    """GeoLDM's end of an encoder / decoder pass: masked, NaN -> 0, centre-of-mass free."""
    vel = x * node_mask
    if torch.isnan(vel).any():
        warnings.warn(f"GeoLDM {what} produced NaN positions; returning zeros as GeoLDM does",
                      stacklevel=3)
        vel = torch.zeros_like(vel)
    return vel - vel.sum(1, keepdim=True) / node_mask.sum(1, keepdim=True) * node_mask


def _with_context(h: Tensor, context: Tensor | None, n_context: int) -> Tensor:
    if not n_context:
        return h
    if context is None:
        raise ConfigError(f"this GeoLDM model is conditional: pass context (B, N, {n_context})")
    return torch.cat([h, context.reshape(*h.shape[:2], n_context).to(h.dtype)], -1)


class GeoLDMEncoder(nn.Module):
    """GeoLDM's ``EGNN_encoder_QM9`` (one EGNN block, then ``final_mlp``)."""

    def __init__(self, config: GeoLDMConfig) -> None:
        super().__init__()
        self.config = config
        nf = config.nf
        self.egnn = _EGNN(config, config.molecule_features + config.context_node_nf, nf, n_layers=1)
        self.final_mlp = nn.Sequential(nn.Linear(nf, nf), nn.SiLU(), nn.Linear(nf, 2 * config.latent_nf + 1))

    def forward(self, xh: Tensor, node_mask: Tensor, edge_mask: Tensor,
                context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(x_mean, x_std, h_mean, h_std)`` as GeoLDM's ``_forward`` returns them."""
        node_mask, edge_mask = _dense_masks(xh, node_mask, edge_mask)
        xh = xh * node_mask
        h = _with_context(xh[..., 3:], context, self.config.context_node_nf)
        h_final, x_final = self.egnn(h, xh[..., :3], node_mask, edge_mask)
        x_mean = _centred_positions(x_final, node_mask, "encoder")
        out = self.final_mlp(h_final) * node_mask
        k = self.config.latent_nf
        x_std = torch.exp(0.5 * out[..., :1].sum(1, keepdim=True).expand(-1, xh.shape[1], -1))
        h_std = torch.exp(0.5 * out[..., 1 + k:])
        # GeoLDM's NaN guards on the standard deviations
        x_std = torch.where(torch.isnan(x_std).any(), torch.ones_like(x_std), x_std)
        h_std = torch.where(torch.isnan(h_std).any(), torch.ones_like(h_std), h_std)
        return x_mean, x_std, out[..., 1:1 + k], h_std


class GeoLDMDecoder(nn.Module):
    """GeoLDM's ``EGNN_decoder_QM9``: latent -> (positions, atom-type logits and charge)."""

    def __init__(self, config: GeoLDMConfig) -> None:
        super().__init__()
        self.config = config
        self.egnn = _EGNN(config, config.latent_nf + config.context_node_nf, config.molecule_features,
                          n_layers=config.n_layers)

    def forward(self, z: Tensor, node_mask: Tensor, edge_mask: Tensor,
                context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        node_mask, edge_mask = _dense_masks(z, node_mask, edge_mask)
        z = z * node_mask
        h = _with_context(z[..., 3:], context, self.config.context_node_nf)
        h_final, x_final = self.egnn(h, z[..., :3], node_mask, edge_mask)
        return _centred_positions(x_final, node_mask, "decoder"), h_final * node_mask


class GeoLDMVAE(nn.Module):
    """GeoLDM's ``EnHierarchicalVAE`` parameter tree: ``encoder``, ``decoder``, ``buffer``."""

    def __init__(self, config: GeoLDMConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = GeoLDMEncoder(config)
        self.decoder = GeoLDMDecoder(config)
        self.register_buffer("buffer", torch.zeros(1))

    def encode(self, xh: Tensor, node_mask: Tensor, edge_mask: Tensor,
               context: Tensor | None = None) -> Tensor:
        """The latent means ``(B, N, 3 + latent_nf)`` of molecules in GeoLDM's raw encoding
        (GeoLDM's ``encode``; its standard deviations are the constant :data:`ENCODER_SIGMA`)."""
        x_mean, _, h_mean, _ = self.encoder(xh, node_mask, edge_mask, context)
        return torch.cat([x_mean, h_mean], -1)

    def decode(self, z: Tensor, node_mask: Tensor, edge_mask: Tensor,
               context: Tensor | None = None) -> Tensor:
        """The decoder's molecules ``(B, N, 3 + K)``: positions, type logits (and the charge)."""
        return torch.cat(self.decoder(z, node_mask, edge_mask, context), -1)


class GeoLDMModel(EDMModel):
    """GeoLDM's ``EnLatentDiffusion`` parameter tree: EDM's (``dynamics`` on the latent,
    ``gamma``, ``buffer``) plus ``vae``.  ``forward`` is the latent network (``dynamics``)."""

    KIND = "GeoLDM"

    def __init__(self, config: GeoLDMConfig, vae_config: GeoLDMConfig | None = None) -> None:
        super().__init__(config)
        vae_config = vae_config or config
        if vae_config.latent_nf != config.latent_nf:
            raise ConfigError(f"the autoencoder's latent_nf {vae_config.latent_nf} differs from the "
                              f"diffusion's {config.latent_nf}")
        self.vae = GeoLDMVAE(vae_config)


def read_geoldm_configs(folder: str | Path) -> tuple[GeoLDMConfig, GeoLDMConfig]:
    """The diffusion's and the autoencoder's configurations of a GeoLDM output folder.

    A run trained on a separate autoencoder (``--ae_path``) takes the autoencoder's
    architecture from that folder's ``args.pickle``, as GeoLDM does; it is looked up at the
    recorded path, then beside `folder` under the same name.
    """
    folder = Path(folder)
    args = read_args(folder / ARGS_FILE)
    config = GeoLDMConfig.from_namespace(args)
    if not config.train_diffusion:
        raise ConfigError(f"{folder} is a GeoLDM autoencoder run (train_diffusion is False), not a "
                          "latent diffusion model")
    ae_path = getattr(args, "ae_path", None)
    if not ae_path:
        return config, config
    candidates = [Path(ae_path), folder.parent / Path(ae_path).name]
    found = next((c for c in candidates if (c / ARGS_FILE).is_file()), None)
    if found is None:
        raise MissingFileError(f"{folder} was trained on the autoencoder at {ae_path}, whose "
                               f"args.pickle is needed for its architecture; put that folder "
                               f"beside {folder}")
    ae_args = vars(read_args(found / ARGS_FILE))
    vae_config = GeoLDMConfig.from_namespace(argparse.Namespace(
        **{**ae_args, "train_diffusion": True, "latent_nf": ae_args.get("latent_nf", config.latent_nf)}))
    return config, vae_config


def load_geoldm(folder: str | Path, device: str | torch.device = "cpu") -> GeoLDMModel:
    """The model of a GeoLDM output folder (``args.pickle`` + ``generative_model_ema.npy``), in eval
    mode.  The weights file is read with ``torch.load(weights_only=True)``: tensors only."""
    folder = Path(folder)
    config, vae_config = read_geoldm_configs(folder)
    path, state = read_weights(folder, "GeoLDM")
    model = GeoLDMModel(config, vae_config)
    load_state(model, state, str(path))
    return model.to(device).eval()

