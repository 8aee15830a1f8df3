"""An E(3)-equivariant noise predictor for 3D molecules, built on e3nn.

Input per atom: position (3) and scaled features ``h`` (EDM: one-hot / 4, charge / 10); output:
the predicted noise on both.  Messages are tensor products of node features with spherical
harmonics of relative positions, weighted by an MLP of the distance, followed by gated
nonlinearities.  The output head is an ``o3.Linear`` onto ``1x1o + Kx0e``: linear in its weights
*and* equivariant for any value of them, so every posterior draw of the head is an equivariant
denoiser too.  The position noise is made centre-of-mass free after the head (see
:meth:`~genunc.adapters.molecule.MoleculeAdapter.post_head`), which keeps the model translation
invariant.
"""

from __future__ import annotations

import math

import torch
from e3nn import o3
from e3nn.math import soft_one_hot_linspace
from e3nn.nn import FullyConnectedNet, Gate
from torch import Tensor, nn

from genunc.zoo.pretrained import Pretrained

_SQRT_HALF = 1.0 / math.sqrt(2.0)


class _Interaction(nn.Module):
    """One message-passing layer in NequIP's form: a channel-wise ("uvu") tensor product of each
    neighbour's features with the spherical harmonics of the bond, weighted per channel and path
    by an MLP of the bond length, mixed by a linear map, then a gated nonlinearity.

    The channel-wise product keeps the per-edge weights to a few hundred numbers; a fully
    connected product needs tens of thousands per edge and is two orders slower on a CPU.
    """

    def __init__(self, irreps_in: o3.Irreps, irreps_sh: o3.Irreps, scalars: int, vectors: int,
                 n_radial: int, avg_neighbors: float) -> None:
        super().__init__()
        self.gate = Gate(f"{scalars}x0e", [torch.nn.functional.silu],
                         f"{vectors}x0e", [torch.sigmoid], f"{vectors}x1o")
        wanted = {ir for _, ir in self.gate.irreps_in}
        mid, instructions = [], []
        for i, (mul, ir_in) in enumerate(irreps_in):
            for j, (_, ir_edge) in enumerate(irreps_sh):
                for ir_out in ir_in * ir_edge:
                    if ir_out in wanted:
                        instructions.append((i, j, len(mid), "uvu", True))
                        mid.append((mul, ir_out))
        irreps_mid = o3.Irreps(mid)
        self.tp = o3.TensorProduct(irreps_in, irreps_sh, irreps_mid, instructions,
                                   shared_weights=False, internal_weights=False)
        self.radial = FullyConnectedNet([n_radial, 64, self.tp.weight_numel], torch.nn.functional.silu)
        self.mix = o3.Linear(irreps_mid, self.gate.irreps_in)
        self.self_connection = o3.Linear(irreps_in, self.gate.irreps_out)
        self.irreps_out = self.gate.irreps_out
        self.norm = 1.0 / avg_neighbors  # neighbour messages are correlated: average, not sqrt

    def forward(self, h: Tensor, src: Tensor, dst: Tensor, sh: Tensor, radial: Tensor) -> Tensor:
        messages = self.tp(h[src], sh, self.radial(radial))
        # out of place, so that torch.func.vmap can batch a posterior's draws of this layer
        agg = torch.zeros(h.shape[0], messages.shape[1], dtype=h.dtype, device=h.device) \
            .index_add(0, dst, messages)
        # the 1/sqrt(2) keeps the residual sum at unit scale, so depth does not blow up activations
        return (self.gate(self.mix(agg * self.norm)) + self.self_connection(h)) * _SQRT_HALF


class EquivariantDenoiser(Pretrained, nn.Module):
    """``(x (B, N, 3+K), t (B,) in [0, 1], node_mask (B, N)) -> eps (B, N, 3+K)``.

    The head is ``self.head`` (an ``o3.Linear``); positions come out *before* centre-of-mass
    removal, which the adapter applies.
    """

    def __init__(self, n_features: int = 6, scalars: int = 64, vectors: int = 16, n_layers: int = 4,
                 lmax: int = 1, n_radial: int = 16, max_radius: float = 8.0,
                 avg_neighbors: float = 15.0) -> None:
        super().__init__()
        self.config = dict(n_features=n_features, scalars=scalars, vectors=vectors,
                           n_layers=n_layers, lmax=lmax, n_radial=n_radial,
                           max_radius=max_radius, avg_neighbors=avg_neighbors)
        self.n_features = n_features
        self.n_radial, self.max_radius = n_radial, max_radius
        self.irreps_sh = o3.Irreps.spherical_harmonics(lmax)
        self.embed = o3.Linear(f"{n_features + 1}x0e", f"{scalars}x0e")
        irreps = o3.Irreps(f"{scalars}x0e")
        layers = []
        for _ in range(n_layers):
            layer = _Interaction(irreps, self.irreps_sh, scalars, vectors, n_radial, avg_neighbors)
            layers.append(layer)
            irreps = layer.irreps_out
        self.layers = nn.ModuleList(layers)
        self.irreps_hidden = irreps
        self.head = o3.Linear(irreps, f"1x1o + {n_features}x0e")

    #: e3nn's generated kernels (``o3.Linear``'s tensordot) do not follow autocast's casts, so
    #: this model runs in its own precision only (genunc refuses ``precision="bfloat16"``)
    supports_autocast = False

    #: On CPU the backbone runs over chunks of at most this many (padded) atoms: the per-edge
    #: tensors of a large batch fall out of the cache and cost grows faster than the batch
    #: (measured: 8 ms/molecule at 16 molecules, 18 ms at 384).  The head still runs once over
    #: the whole batch, so a posterior hook on it sees every row.  ``None`` disables chunking;
    #: GPUs never chunk.
    cpu_chunk_atoms: int | None = 512

    def forward(self, x: Tensor, t: Tensor, node_mask: Tensor) -> Tensor:
        b, n, _ = x.shape
        chunk = b if x.is_cuda or self.cpu_chunk_atoms is None \
            else max(1, self.cpu_chunk_atoms // max(n, 1))
        h = torch.cat([self.features(x[i : i + chunk], t[i : i + chunk], node_mask[i : i + chunk])
                       for i in range(0, b, chunk)])
        out = self.head(h)  # head rows: (B, N) atoms
        return out * node_mask.bool().unsqueeze(-1).to(out.dtype)

    def features(self, x: Tensor, t: Tensor, node_mask: Tensor) -> Tensor:
        """The head's input ``(B, N, C)``: everything but the head."""
        b, n, _ = x.shape
        mask = node_mask.bool()
        pos, feats = x[..., :3], x[..., 3:]
        t_nodes = t.to(x.dtype).reshape(b, 1, 1).expand(b, n, 1)
        h = self.embed(torch.cat([feats, t_nodes], -1).reshape(b * n, -1))
        pair = mask[:, :, None] & mask[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=x.device)
        bi, si, di = pair.nonzero(as_tuple=True)
        src, dst = bi * n + si, bi * n + di
        flat_pos = pos.reshape(b * n, 3)
        rel = flat_pos[src] - flat_pos[dst]
        sh = o3.spherical_harmonics(self.irreps_sh, rel, normalize=True, normalization="component")
        dist = rel.norm(dim=-1)
        radial = soft_one_hot_linspace(dist, 0.0, self.max_radius, self.n_radial, basis="smooth_finite",
                                       cutoff=True) * math.sqrt(self.n_radial)
        for layer in self.layers:
            h = layer(h, src, dst, sh, radial)
        return h.reshape(b, n, -1)
