"""EDM's E(n) equivariant denoiser (Hoogeboom et al., 2022), loadable from EDM's own checkpoints.

An EDM output folder holds ``args.pickle`` (the run's options, read by
:mod:`genunc.zoo.edm_args` without executing anything) and ``generative_model_ema.npy``, a
``torch.save``'d state dict of EDM's ``EnVariationalDiffusion``.  :func:`load_edm` rebuilds that
module's parameter tree under the same key names (``dynamics.egnn...``, ``gamma.gamma``,
``buffer``) and returns an :class:`EDMModel` whose ``forward(t, xh, node_mask, edge_mask)``
computes what EDM's ``EGNN_dynamics_QM9._forward`` computes for the same weights and inputs.

The computation follows EDM's equations (EGNN layers with attention, tanh-bounded coordinate
updates of range 15, distances to the input positions as a second edge feature, sum
aggregation divided by ``normalization_factor``), written for dense ``(B, N, N)`` edge tensors:
the first layer of each edge MLP is split into its source, target and edge-feature blocks, so it
runs per node rather than per edge.

The head.  genunc's posterior lives on the output head, a module whose output the model then
only transforms linearly.  Here that is ``dynamics.egnn.embedding_out``: the ``nn.Linear`` from
the last hidden node states (invariant scalars) to the atom-feature noise.  EDM's layer also has
rows for the time input (and the context), whose outputs EDM slices off; they are kept aside in
buffers (and put back in :meth:`~torch.nn.Module.state_dict`), so the head is a plain
``nn.Linear`` over exactly the outputs that matter.  Any weights of this head leave the model
E(3)-equivariant: it maps invariants to invariants and never touches positions.  The position
noise is not covered by the head: it leaves the last block's coordinate MLP through a ``tanh``
and a sum over edges, which is neither linear in those weights nor one row per atom (see
:class:`genunc.adapters.edm.EDMAdapter`).

The block.  A posterior over the last EGNN block(s) and the head (a genunc *tail*,
:mod:`genunc.posterior.tail`) covers the position noise too: ``dynamics.readout``
(:class:`EDMReadout`, no parameters) turns the head's output and the last block's positions
into the model output (EDM's NaN guard, the centre-of-mass-free velocity, the masked features),
so that the tail ``e_block_<L-1>`` -> ``embedding_out`` -> ``readout``
(:meth:`EDMModel.tail_modules`) ends at the model's output.  Any weights of a block keep the
model E(3)-equivariant: EDM's layers are equivariant for every value of their weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genunc.adapters.molecule import polynomial_alphas2
from genunc.errors import ConfigError, MissingFileError
from genunc.zoo.edm_args import EDMConfig, read_config, weights_file

#: EDM's coordinate updates are tanh(.) times this range, in every block
COORDS_RANGE = 15.0


def _pair_diff(x: Tensor, norm_constant: float) -> tuple[Tensor, Tensor]:
    """Squared distances ``(B, N, N, 1)`` and normalised differences ``x_i - x_j``."""
    diff = x.unsqueeze(2) - x.unsqueeze(1)
    radial = diff.square().sum(-1, keepdim=True)
    return radial, diff / (torch.sqrt(radial + 1e-8) + norm_constant)


class _EdgeInput(nn.Module):
    """The first layer of an edge MLP on ``[h_i, h_j, e_ij]``, evaluated per node.

    Holds EDM's ``Linear(2F + E, H)`` weights unchanged; ``W [h_i; h_j; e] + b`` is computed as
    ``(W_i h_i + b) + W_j h_j + W_e e`` broadcast over the pairs.
    """

    def __init__(self, node_nf: int, edge_nf: int, out_nf: int) -> None:
        super().__init__()
        self.node_nf = node_nf
        self.weight = nn.Parameter(torch.empty(out_nf, 2 * node_nf + edge_nf))
        self.bias = nn.Parameter(torch.empty(out_nf))
        bound = (2 * node_nf + edge_nf) ** -0.5
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, h: Tensor, edge_attr: Tensor) -> Tensor:
        f = self.node_nf
        w_src, w_dst, w_edge = self.weight[:, :f], self.weight[:, f : 2 * f], self.weight[:, 2 * f :]
        src = torch.nn.functional.linear(h, w_src, self.bias).unsqueeze(2)  # (B, N, 1, H)
        dst = torch.nn.functional.linear(h, w_dst).unsqueeze(1)  # (B, 1, N, H)
        return src + dst + torch.nn.functional.linear(edge_attr, w_edge)


class GCL(nn.Module):
    """EDM's invariant graph convolution: attention-weighted edge messages, residual node MLP."""

    def __init__(self, nf: int, edge_nf: int, normalization_factor: float, aggregation: str,
                 attention: bool) -> None:
        super().__init__()
        self.normalization_factor, self.aggregation = normalization_factor, aggregation
        self.edge_mlp = nn.Sequential(_EdgeInput(nf, edge_nf, nf), nn.SiLU(), nn.Linear(nf, nf), nn.SiLU())
        self.node_mlp = nn.Sequential(nn.Linear(2 * nf, nf), nn.SiLU(), nn.Linear(nf, nf))
        self.att_mlp = nn.Sequential(nn.Linear(nf, 1), nn.Sigmoid()) if attention else None

    def forward(self, h: Tensor, edge_attr: Tensor, node_mask: Tensor, edge_mask: Tensor) -> Tensor:
        m = self.edge_mlp[0](h, edge_attr)
        for layer in list(self.edge_mlp)[1:]:
            m = layer(m)
        if self.att_mlp is not None:
            m = m * self.att_mlp(m)
        agg = _aggregate(m * edge_mask, self.normalization_factor, self.aggregation)
        return (h + self.node_mlp(torch.cat([h, agg], -1))) * node_mask


def _aggregate(messages: Tensor, normalization_factor: float, how: str) -> Tensor:
    """Sum over the neighbours j of ``(B, N, N, F)`` messages, EDM's way (incl. masked pairs)."""
    total = messages.sum(2)
    if how == "sum":
        return total / normalization_factor
    # EDM's 'mean' divides by the number of edges in its (all-pairs) edge list: N per node
    return total / messages.shape[2]


class EquivariantUpdate(nn.Module):
    """EDM's coordinate update: ``x_i += sum_j (x_i - x_j)/(|.| + c) * tanh(mlp) * range``."""

    def __init__(self, nf: int, edge_nf: int, normalization_factor: float, aggregation: str,
                 tanh: bool) -> None:
        super().__init__()
        self.normalization_factor, self.aggregation, self.tanh = normalization_factor, aggregation, tanh
        self.coord_mlp = nn.Sequential(_EdgeInput(nf, edge_nf, nf), nn.SiLU(), nn.Linear(nf, nf), nn.SiLU(),
                                       nn.Linear(nf, 1, bias=False))
        nn.init.xavier_uniform_(self.coord_mlp[4].weight, gain=0.001)

    def forward(self, h: Tensor, x: Tensor, coord_diff: Tensor, edge_attr: Tensor, node_mask: Tensor,
                edge_mask: Tensor) -> Tensor:
        w = self.coord_mlp[0](h, edge_attr)
        for layer in list(self.coord_mlp)[1:]:
            w = layer(w)
        w = torch.tanh(w) * COORDS_RANGE if self.tanh else w
        trans = coord_diff * w * edge_mask
        return (x + _aggregate(trans, self.normalization_factor, self.aggregation)) * node_mask


class EquivariantBlock(nn.Module):
    def __init__(self, config: EDMConfig) -> None:
        super().__init__()
        nf, c = config.nf, config
        self.norm_constant = float(config.norm_constant)
        self.n_sublayers = config.inv_sublayers
        for i in range(config.inv_sublayers):
            self.add_module(f"gcl_{i}", GCL(nf, 2, c.normalization_factor, c.aggregation_method, c.attention))
        self.gcl_equiv = EquivariantUpdate(nf, 2, c.normalization_factor, c.aggregation_method, c.tanh)

    def forward(self, h: Tensor, x: Tensor, radial0: Tensor, node_mask: Tensor,
                edge_mask: Tensor) -> tuple[Tensor, Tensor]:
        radial, coord_diff = _pair_diff(x, self.norm_constant)
        edge_attr = torch.cat([radial, radial0], -1)
        for i in range(self.n_sublayers):
            h = getattr(self, f"gcl_{i}")(h, edge_attr, node_mask, edge_mask)
        x = self.gcl_equiv(h, x, coord_diff, edge_attr, node_mask, edge_mask)
        return h * node_mask, x


class EGNN(nn.Module):
    """EDM's ``EGNN`` (egnn_new) with ``embedding_out`` trimmed to the outputs EDM keeps."""

    def __init__(self, config: EDMConfig) -> None:
        super().__init__()
        if config.sin_embedding:
            raise ConfigError("EDM runs with sin_embedding are not supported")
        self.n_layers = config.n_layers
        self.n_features = config.n_features
        n_in = config.n_features + int(config.condition_time) + config.context_node_nf
        self.embedding = nn.Linear(n_in, config.nf)
        #: the head: hidden node states -> atom-feature noise (EDM's rows for time and context,
        #: whose outputs EDM discards, sit in the buffers below)
        self.embedding_out = nn.Linear(config.nf, config.n_features)
        self.register_buffer("embedding_out_unused_weight", torch.zeros(n_in - config.n_features, config.nf),
                             persistent=False)
        self.register_buffer("embedding_out_unused_bias", torch.zeros(n_in - config.n_features),
                             persistent=False)
        for i in range(config.n_layers):
            self.add_module(f"e_block_{i}", EquivariantBlock(config))
        self.register_state_dict_post_hook(_join_embedding_out)
        self.register_load_state_dict_pre_hook(_split_embedding_out)

    def forward(self, h: Tensor, x: Tensor, node_mask: Tensor, edge_mask: Tensor) -> tuple[Tensor, Tensor]:
        features, x = self.unmasked(h, x, node_mask, edge_mask)
        return features * node_mask, x

    def unmasked(self, h: Tensor, x: Tensor, node_mask: Tensor,
                 edge_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The head's output before masking and the last block's positions, the very tensors
        those modules return (a block posterior's re-run feeds the readout from them)."""
        radial0, _ = _pair_diff(x, 1.0)
        h = self.embedding(h)
        for i in range(self.n_layers):
            h, x = getattr(self, f"e_block_{i}")(h, x, radial0, node_mask, edge_mask)
        return self.embedding_out(h), x


def _join_embedding_out(module: EGNN, state: dict[str, Any], prefix: str, metadata: Any) -> None:
    for part in ("weight", "bias"):
        key = f"{prefix}embedding_out.{part}"
        if key in state:
            unused = getattr(module, f"embedding_out_unused_{part}")
            state[key] = torch.cat([state[key], unused.to(state[key])])


def _split_embedding_out(module: EGNN, state: dict[str, Any], prefix: str, *args: Any) -> None:
    k = module.n_features
    for part in ("weight", "bias"):
        key = f"{prefix}embedding_out.{part}"
        full = state.get(key)
        unused = getattr(module, f"embedding_out_unused_{part}")
        if full is not None and full.shape[0] == k + unused.shape[0]:
            state[key] = full[:k]
            with torch.no_grad():
                unused.copy_(full[k:])


class EDMReadout(nn.Module):
    """The end of EDM's ``_forward``, without parameters: head output, final and input positions
    -> ``[velocity, features]``.

    The velocity is ``(x_final - x) * mask``, zeroed where it holds a NaN (EDM's guard, written
    with ``torch.where`` so that batched re-runs under weight draws take it too), then
    centre-of-mass free; the features are the head's output, masked.  Its output is the model
    output: a block posterior's re-run replaces it (:meth:`EDMModel.tail_modules`).
    """

    def forward(self, features: Tensor, x_final: Tensor, x: Tensor, node_mask: Tensor) -> Tensor:
        vel = (x_final - x) * node_mask
        vel = torch.where(torch.isnan(vel).any(), torch.zeros_like(vel), vel)
        n_atoms = node_mask.sum(1, keepdim=True)
        vel = vel - vel.sum(1, keepdim=True) / n_atoms * node_mask
        return torch.cat([vel, features * node_mask], -1)


class EGNNDynamics(nn.Module):
    """EDM's ``EGNN_dynamics_QM9`` in ``egnn_dynamics`` mode: ``_forward``'s computation."""

    def __init__(self, config: EDMConfig) -> None:
        super().__init__()
        self.config = config
        self.egnn = EGNN(config)
        self.readout = EDMReadout()

    def forward(self, t: Tensor, xh: Tensor, node_mask: Tensor, edge_mask: Tensor,
                context: Tensor | None = None) -> Tensor:
        c = self.config
        b, n, dims = xh.shape
        if dims != 3 + c.n_features:
            raise ConfigError(f"xh has {dims} channels; this model takes 3 + {c.n_features}")
        node_mask = node_mask.reshape(b, n, 1).to(xh.dtype)
        edge_mask = edge_mask.reshape(b, n, n, 1).to(xh.dtype)
        xh = xh * node_mask
        x, h = xh[..., :3], xh[..., 3:]
        if c.condition_time:
            t = torch.as_tensor(t, dtype=xh.dtype, device=xh.device)
            t_nodes = t.reshape(-1, 1, 1).expand(b, n, 1) if t.numel() in (1, b) else None
            if t_nodes is None:
                raise ConfigError(f"t must hold 1 or {b} values, got {t.numel()}")
            h = torch.cat([h, t_nodes], -1)
        if c.context_node_nf:
            if context is None:
                raise ConfigError(f"this EDM model is conditioned on {list(c.conditioning)}: pass "
                                  f"context (B, N, {c.context_node_nf})")
            h = torch.cat([h, context.reshape(b, n, c.context_node_nf).to(xh.dtype)], -1)
        features, x_final = self.egnn.unmasked(h, x, node_mask, edge_mask)
        if torch.isnan((x_final - x) * node_mask).any():  # EDM's own guard (the readout's)
            warnings.warn("EDM dynamics produced NaN positions; returning zeros as EDM does",
                          stacklevel=2)
        return self.readout(features, x_final, x, node_mask)


class EDMSchedule(nn.Module):
    """EDM's predefined noise schedule: ``gamma = -log(alpha^2 / sigma^2)`` at t = 0..T."""

    def __init__(self, timesteps: int, power: float, precision: float) -> None:
        super().__init__()
        self.timesteps = timesteps
        alphas2 = polynomial_alphas2(timesteps, power=power, s=precision)
        gamma = -(torch.log(alphas2) - torch.log1p(-alphas2))
        self.gamma = nn.Parameter(gamma.float(), requires_grad=False)

    def forward(self, t: Tensor) -> Tensor:
        """gamma at continuous times ``t`` in [0, 1] (rounded to the grid, as EDM does)."""
        return self.gamma[torch.round(t * self.timesteps).long()]


class EDMModel(nn.Module):
    """EDM's ``EnVariationalDiffusion`` parameter tree: ``dynamics``, ``gamma``, ``buffer``.

    ``forward`` is the network (``dynamics``); the schedule is ``gamma``.
    """

    def __init__(self, config: EDMConfig) -> None:
        super().__init__()
        self.config = config
        self.gamma = EDMSchedule(config.diffusion_steps, config.schedule_power,
                                 config.diffusion_noise_precision)
        self.dynamics = EGNNDynamics(config)
        self.register_buffer("buffer", torch.zeros(1))

    def forward(self, t: Tensor, xh: Tensor, node_mask: Tensor, edge_mask: Tensor,
                context: Tensor | None = None) -> Tensor:
        return self.dynamics(t, xh, node_mask, edge_mask, context)

    def tail_modules(self, blocks: int = 1) -> list[str]:
        """The tail over the last `blocks` EGNN blocks (each: its GCL node / edge / attention
        MLPs and its coordinate MLP) and the head, ending at the readout that makes the model
        output (what :func:`genunc.posterior.default_tail` returns for this model)."""
        n = self.config.n_layers
        if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= n:
            raise ConfigError(f"this EDM model has {n} EGNN blocks; a block posterior covers "
                              f"1 to {n} of them, not {blocks!r}")
        return [*(f"dynamics.egnn.e_block_{i}" for i in range(n - blocks, n)),
                "dynamics.egnn.embedding_out", "dynamics.readout"]


def edge_mask_for(node_mask: Tensor) -> Tensor:
    """EDM's edge mask ``(B*N*N, 1)``: pairs of real atoms, without self-pairs."""
    m = node_mask.reshape(node_mask.shape[0], -1).bool()
    pair = m.unsqueeze(1) & m.unsqueeze(2) & ~torch.eye(m.shape[1], dtype=torch.bool, device=m.device)
    return pair.reshape(-1, 1).float()


def load_edm(folder: str | Path, device: str | torch.device = "cpu") -> EDMModel:
    """The model of an EDM output folder (``args.pickle`` + ``generative_model_ema.npy``), in eval
    mode.  The weights file is read with ``torch.load(weights_only=True)``: tensors only."""
    folder = Path(folder)
    config = read_config(folder)
    path, state = read_weights(folder, "EDM")
    model = EDMModel(config)
    load_state(model, state, str(path))
    return model.to(device).eval()


def read_weights(folder: Path, kind: str) -> tuple[Path, dict[str, Any]]:
    """An EDM-style folder's weights file and its state dict, read tensors-only
    (``torch.load(weights_only=True)``); `kind` names the model in the errors."""
    path = weights_file(folder)
    if path is None:
        raise MissingFileError(f"{folder} holds no generative_model_ema.npy ({kind}'s weights)")
    try:
        return path, torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"{path} is not a torch state dict: {type(err).__name__}: {err}") from None


def load_state(model: EDMModel, state: Any, source: str = "state dict") -> None:
    """Load an EDM state dict strictly, with one clear error listing what does not fit."""
    if not isinstance(state, dict):
        raise ConfigError(f"{source} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: shape {tuple(state[k].shape)}, this configuration has {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if problems:
        shown = "\n  - ".join(problems[:10])
        kind = getattr(model, "KIND", "EDM")
        raise ConfigError(f"{source} does not fit the {kind} configuration in args.pickle "
                          f"({len(problems)} problems):\n  - {shown}")
    model.load_state_dict(state)
    schedule = EDMSchedule(model.config.diffusion_steps, model.config.schedule_power,
                           model.config.diffusion_noise_precision).gamma
    if not torch.allclose(model.gamma.gamma.detach().double().cpu(), schedule.double(), atol=1e-4):
        raise ConfigError(f"{source}: the stored noise schedule (gamma) differs from "
                          f"{model.config.diffusion_noise_schedule} with precision "
                          f"{model.config.diffusion_noise_precision}")
