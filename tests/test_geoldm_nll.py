"""The ``nll`` score for GeoLDM checkpoints: GeoLDM's own likelihood, against its reference code.

``fixtures/geoldm_nll_reference.pt`` (recorded by ``fixtures/make_geoldm_nll_reference.py`` from
github.com/MinkaiXu/GeoLDM at commit 03ae2031c712a1a6c1678e747bdcdc7a7560e00b) holds GeoLDM's
evaluation-mode ``EnLatentDiffusion.forward`` (``trainable_ae``) of 4 fixed molecules (7 / 5 /
3 / 6 atoms, padded to 7) on a random-weight small model (n_layers 2, nf 16, latent_nf 2), with
the randomness it drew (the encoder's latent noise, one uniform level per molecule, the level's
and level 0's noise) and its parts, in float32 and (replayed) float64.

Tolerances: float64 1e-8 relative on every term (the total agrees to 1e-14); float32 1e-5
relative against the reference's float64 numbers; the prior KL (~1e-4 nats left by
cancellation, see test_edm_nll.py) to 1e-10 nats in float64, 1e-6 in float32.  GeoLDM's
reconstruction error also counts ``log 5`` for each padding row of its batch (the
cross-entropy of a zero logit row); genunc's per-molecule score leaves it out, and the
comparison adds it back.
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from genunc.adapters.geoldm import GeoLDMAdapter, LatentLayout
from genunc.adapters.molecule import PointCloudLayout
from genunc.zoo.geoldm import GeoLDMConfig, GeoLDMModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from molecule_folders import geoldm_folder, molecule_batch, reference_fixture  # noqa: E402

ref = reference_fixture(Path(__file__).parent / "fixtures" / "geoldm_nll_reference.pt")
#: genunc's term -> the reference's (sums name several of genunc's terms)
TERMS = {"position_constants": ("position_constants",), "prior_kl": ("prior_kl",),
         "feature_constants": ("feature_constants",), "loss_recon": ("decoder_error",),
         "loss_latent": ("position_constants", "prior_kl", "diffusion", "reconstruction"),
         "nll_xh": ("nll_xh",)}
REFERENCE = {"prior_kl": "kl_prior"}


def _adapter(ref, dtype, trainable_ae=True) -> GeoLDMAdapter:
    model = GeoLDMModel(GeoLDMConfig(**ref["config"]))
    model.load_state_dict(ref["state_dict"])
    model = model.to(dtype).eval()
    layout = LatentLayout(model.vae, ref["config"]["latent_nf"], PointCloudLayout(5, scales=(1.0, 1.0, 1.0)))
    return GeoLDMAdapter(model, layout, trainable_ae=trainable_ae)


def _inputs(ref, dtype):
    """The reference's molecules (raw encoding), mask, level and noise (level's, level 0's,
    the encoder's)."""
    r = ref["float32"]
    x0 = torch.cat([ref["x"], ref["one_hot"], ref["charges"]], -1).to(dtype)
    noise = torch.stack([r["noise"][0], r["noise"][1], r["latent_noise"]], 1).to(dtype)
    return x0, ref["node_mask"].squeeze(-1).bool(), r["t"].long().view(-1, 1), noise


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_term_and_the_total_equal_geoldm_reference(ref, dtype):
    x0, mask, levels, noise = _inputs(ref, dtype)
    terms = _adapter(ref, dtype).likelihood_terms(x0, mask, levels, noise)
    padding = (~mask).sum(1).double() * math.log(5)
    want = ref["float64"]
    for name, parts in TERMS.items():
        ours = sum(terms[p] for p in parts) + (padding if name in ("loss_recon", "nll_xh") else 0)
        theirs = want[REFERENCE.get(name, name)].double()
        if name == "prior_kl":  # ~1e-4 nats left by cancellation: absolute
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10 if dtype == torch.float64 else 1e-6)
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-8 if dtype == torch.float64 else 1e-5,
                                       atol=0, msg=name)
    # the parts are not negligible: the decoder's error and the constants move the total
    assert (terms["decoder_error"] > 10).all() and (terms["feature_constants"] < -10).all()
    assert torch.equal(ref["float32"]["t"], want["t"])


def test_without_a_trained_autoencoder_the_decoder_term_is_zero(ref):
    """GeoLDM adds the VAE's reconstruction error only for runs with ``trainable_ae``."""
    x0, mask, levels, noise = _inputs(ref, torch.float64)
    trained = _adapter(ref, torch.float64).likelihood_terms(x0, mask, levels, noise)
    frozen = _adapter(ref, torch.float64, trainable_ae=False).likelihood_terms(x0, mask, levels, noise)
    assert torch.equal(frozen["decoder_error"], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(frozen["nll_xh"], trained["nll_xh"] - trained["decoder_error"],
                               rtol=1e-12, atol=0)


def test_geoldm_nll_is_invariant_to_rigid_motions_and_atom_order(ref):
    """The noise moved with the molecule (rotated, permuted), the estimate is unchanged: the
    encoder, the latent dynamics and the decoder are E(3)-equivariant and permutation
    equivariant, and every term is a sum over atoms."""
    adapter = _adapter(ref, torch.float64)
    x0, mask, _, noise = _inputs(ref, torch.float64)
    levels = torch.tensor([[5, 500]]).expand(4, -1)
    noise = torch.cat([noise[:, :1], noise], 1)  # two levels: (B, 4, N, F)
    noise = adapter._centre(noise, mask.unsqueeze(1).expand(-1, 4, -1))
    base = adapter.likelihood_terms(x0, mask, levels, noise)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    moved = x0.clone()
    moved[..., :3] = (x0[..., :3] @ q.T + torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)) \
        * mask.unsqueeze(-1)
    turned = noise.clone()
    turned[..., :3] = noise[..., :3] @ q.T
    perm = torch.stack([torch.cat([torch.randperm(int(n), generator=torch.Generator().manual_seed(4)),
                                   torch.arange(int(n), mask.shape[1])]) for n in mask.sum(1)])
    permuted = adapter.likelihood_terms(torch.stack([x[p] for x, p in zip(x0, perm)]), mask, levels,
                                        torch.stack([e[:, p] for e, p in zip(noise, perm)]))
    for other in (adapter.likelihood_terms(moved, mask, levels, turned), permuted):
        for name, value in base.items():
            torch.testing.assert_close(other[name], value, rtol=1e-9, atol=1e-9, msg=name)


def test_geoldm_folders_nll_terms_include_the_decoders(tmp_path):
    """A GeoLDM folder's ``nll_terms`` give every term, the decoder's included (the folder's args
    say ``trainable_ae``); the pipeline's ``nll`` is checked with EDM's in test_edm_nll.py."""
    from genunc import streams
    from genunc.pipelines import MoleculeUncertaintyPipeline

    pipe = MoleculeUncertaintyPipeline.from_pretrained(geoldm_folder(tmp_path / "geoldm"))
    assert pipe.adapter.trainable_ae
    batch = molecule_batch(pipe)
    generators = streams.sample_generators(0, "likelihood_noise", range(len(batch["x"])))
    terms = pipe.nll_terms(batch["x"], batch["node_mask"], levels=3, generators=generators)
    assert set(terms) >= {"feature_constants", "decoder_error", "atom_count", "nll"}
    np.testing.assert_allclose(terms["nll"], terms["nll_xh"] + terms["atom_count"], rtol=1e-12)
    assert (terms["decoder_error"] > 0).all()
