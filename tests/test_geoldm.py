"""GeoLDM checkpoints: conformance with GeoLDM's reference code, the safe args reader, the pipeline.

``fixtures/geoldm_reference.pt`` holds numbers recorded by running GeoLDM's own code
(github.com/MinkaiXu/GeoLDM at commit 03ae2031c712a1a6c1678e747bdcdc7a7560e00b:
``qm9.models.get_latent_diffusion``, egnn/, equivariant_diffusion/) outside this repository
(fixtures/make_geoldm_reference.py):

* ``small``: ``EnLatentDiffusion`` with n_layers 2, nf 16, latent_nf 2 (GeoLDM's QM9 options
  otherwise: attention, tanh, inv_sublayers 1, polynomial_2 / 1000 steps / 1e-5, charges),
  built with ``torch.manual_seed(0)``, every weight then shifted by 0.02 N(0, 1).  Its state
  dict; a molecule batch (B=3, N=7, 7/5/3 atoms) in GeoLDM's raw encoding, a latent batch and
  per-sample t; the encoder's ``_forward`` (means and standard deviations), the VAE's
  ``encode``, the decoder's ``_forward``, ``decode`` (one-hot types, rounded charges) and the
  latent ``dynamics._forward``, in float32 and float64.
* ``step``: ``sample_p_zs_given_zt`` at t = 1000, 500, 1 from one latent z_t with the step's
  noise fixed, the network's eps at each, and ``sample_p_xh_given_z0`` + ``decode`` of it.
* ``gamma`` and ``full_keys``: the 304 state-dict keys and shapes of the full-size QM9 model of
  GeoLDM's releases (n_layers 9, nf 256, latent_nf 2).
"""

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from genunc.adapters.geoldm import GeoLDMAdapter
from genunc.errors import ConfigError, GenuncError, MissingFileError
from genunc.zoo.edm_args import UnsafePickleError
from genunc.zoo.geoldm import GeoLDMConfig, GeoLDMModel, load_geoldm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from molecule_folders import (  # noqa: E402  (the EDM / GeoLDM folder helpers)
    Exploit,
    geoldm_args,
    geoldm_folder,
    molecule_batch,
    random_state,
    reference_fixture,
    run_filter_example,
    run_molecule_job,
    small_model,
    write_folder,
)

FIXTURE = Path(__file__).parent / "fixtures" / "geoldm_reference.pt"
SMALL = dict(n_layers=2, nf=16, latent_nf=2)

ref = reference_fixture(FIXTURE)


def _small(ref, dtype=torch.float32):
    return small_model(GeoLDMModel(GeoLDMConfig(**SMALL)), ref, dtype)


def _cast(s, dtype):
    return [s[k].to(dtype) for k in ("node_mask", "edge_mask")]


# ------------------------------------------------------------------ conformance
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_encoder_decoder_and_latent_dynamics_equal_geoldm_reference(ref, dtype, tol):
    s = ref["small"]
    want = s["out32" if dtype == torch.float32 else "out64"]
    model = _small(ref, dtype)
    node_mask, edge_mask = _cast(s, dtype)
    xh, z, t = s["xh_mol"].to(dtype), s["z"].to(dtype), s["t"].to(dtype)
    with torch.no_grad():
        encoder = model.vae.encoder(xh, node_mask, edge_mask)
        mean = model.vae.encode(xh, node_mask, edge_mask)
        decoder = model.vae.decoder(z, node_mask, edge_mask)
        dynamics = model(t, z, node_mask, edge_mask)
    for ours, theirs in zip(encoder, want["encoder"]):
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= tol
    z_x_mu, _, z_h_mu, _ = want["encode"]
    assert (mean - torch.cat([z_x_mu, z_h_mu], -1)).abs().max() <= tol
    for ours, theirs in zip(decoder, want["decoder"]):
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= tol
    assert dynamics.shape == want["dynamics"].shape == (3, 7, 5)
    assert (dynamics - want["dynamics"]).abs().max() <= tol
    # the coordinate paths are exercised, not ~0
    assert want["dynamics"][..., :3].abs().max() > 1 and want["decoder"][0].abs().max() > 1
    if dtype == torch.float32:
        with torch.no_grad():
            scalar_t = model(torch.tensor([0.5]), z, node_mask, edge_mask)
        assert (scalar_t - s["dynamics_scalar_t"]).abs().max() <= tol


def test_decoded_molecules_equal_geoldm_decode(ref):
    s = ref["small"]
    adapter = _adapter(ref)
    mask = s["node_mask"].squeeze(-1).bool()
    for z, want in ((s["z"], s["decode"]), (ref["step"]["z0"], ref["step"]["decoded"])):
        decoded = adapter.layout.decode_tensor(z, mask)
        assert (decoded[..., :3] - want["x"]).abs().max() <= 1e-5
        molecules = adapter.decode(z, mask)
        for i, (positions, types) in enumerate(molecules):
            n = int(mask[i].sum())
            np.testing.assert_allclose(positions, want["x"][i, :n].double().numpy(), atol=1e-5)
            np.testing.assert_array_equal(types, want["one_hot"][i, :n].argmax(-1).numpy())
        charges = torch.round(decoded[..., -1:]).long() * mask.unsqueeze(-1)
        assert torch.equal(charges, want["charges"].long())


def _adapter(ref, dtype=torch.float32):
    from genunc.adapters.geoldm import LatentLayout
    from genunc.adapters.molecule import PointCloudLayout

    model = _small(ref, dtype)
    layout = LatentLayout(model.vae, 2, PointCloudLayout(5, scales=(1.0, 1.0, 1.0)))
    return GeoLDMAdapter(model, layout)


def test_one_latent_reverse_step_equals_geoldm_p_zs_given_zt(ref):
    s, st = ref["small"], ref["step"]
    assert torch.equal(_small(ref).gamma.gamma.detach(), ref["gamma"])
    adapter = _adapter(ref)
    mask = s["node_mask"].squeeze(-1).bool()
    edm = adapter.make_scheduler("edm")
    edm.set_timesteps(1000)
    for level in (1000, 500, 1):
        index = torch.tensor(level - 1)
        with torch.no_grad():
            eps = adapter.denoise(st["zt"], index.expand(3), mask)
        assert (eps - st["zs"][f"eps_{level}"]).abs().max() <= 1e-5
        zs = adapter.project(edm.step(eps, index, st["zt"], noise=st["eps"]).prev_sample,
                             {"node_mask": mask})
        assert (zs - st["zs"][level]).abs().max() <= 1e-5


def test_full_size_state_dict_has_geoldm_keys_and_shapes(ref, tmp_path):
    model = GeoLDMModel(GeoLDMConfig(latent_nf=2))
    state = model.state_dict()
    assert len(state) == 304
    assert sorted((k, tuple(v.shape)) for k, v in state.items()) == sorted(ref["full_keys"])
    random = random_state(state, keep=("gamma.gamma", "buffer", "vae.buffer"))
    folder = write_folder(tmp_path / "geoldm_qm9", geoldm_args(n_layers=9, nf=256, latent_nf=2), random)
    loaded = load_geoldm(folder)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in random.items())
    # another configuration's state dict is refused with what does not fit
    torch.save(GeoLDMModel(GeoLDMConfig(**SMALL)).state_dict(), folder / "generative_model_ema.npy")
    with pytest.raises(ConfigError, match="does not fit the GeoLDM configuration"):
        load_geoldm(folder)


def test_decoder_and_latent_dynamics_are_e3_equivariant(ref):
    adapter = _adapter(ref, torch.float64)
    s = ref["small"]
    mask = s["node_mask"].squeeze(-1).bool()
    z = s["z"].double()
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    moved = torch.cat([z[..., :3] @ q.T, z[..., 3:]], -1)
    a, b = adapter.layout.decode_tensor(z, mask), adapter.layout.decode_tensor(moved, mask)
    torch.testing.assert_close(b[..., :3], a[..., :3] @ q.T, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(b[..., 3:], a[..., 3:], atol=1e-9, rtol=1e-9)
    t = torch.tensor([10, 400, 900])
    with torch.no_grad():
        e, f = adapter.denoise(z, t, mask), adapter.denoise(moved, t, mask)
    torch.testing.assert_close(f[..., :3], e[..., :3] @ q.T, atol=1e-9, rtol=1e-9)


# ------------------------------------------------------------------ the args reader
def test_executable_geoldm_args_are_refused_unexecuted(tmp_path):
    from genunc.pipelines import MoleculeUncertaintyPipeline

    marker = tmp_path / "executed"
    folder = geoldm_folder(tmp_path / "geoldm")
    (folder / "args.pickle").write_bytes(pickle.dumps(geoldm_args(latent_nf=Exploit(marker))))
    with pytest.raises(UnsafePickleError, match="refusing to load .*system"):
        MoleculeUncertaintyPipeline.from_pretrained(folder)
    with pytest.raises(UnsafePickleError):
        load_geoldm(folder)
    (folder / "args.pickle").write_bytes(pickle.dumps(geoldm_args(ae_path=Exploit(marker)), protocol=0))
    with pytest.raises(UnsafePickleError):
        load_geoldm(folder)
    assert not marker.exists()


def test_a_run_on_a_separate_autoencoder_takes_its_architecture_from_beside(tmp_path):
    """``--ae_path``: the VAE's options are the autoencoder run's (GeoLDM's get_latent_diffusion),
    read from its args.pickle (safely) at the recorded path or beside the folder."""
    ae_args = geoldm_args(train_diffusion=False, nf=12, n_layers=2, latent_nf=1)
    (tmp_path / "qm9_ae").mkdir()
    (tmp_path / "qm9_ae" / "args.pickle").write_bytes(pickle.dumps(ae_args))
    args = geoldm_args(ae_path="outputs/qm9_ae", nf=8, n_layers=1, latent_nf=1)
    vae_config = GeoLDMConfig.from_namespace(argparse.Namespace(**{**vars(ae_args), "train_diffusion": True}))
    torch.manual_seed(0)
    state = GeoLDMModel(GeoLDMConfig.from_namespace(args), vae_config).state_dict()
    folder = write_folder(tmp_path / "ldm", args, state)
    model = load_geoldm(folder)
    assert model.vae.config.nf == 12 and model.config.nf == 8 and model.vae.decoder.egnn.n_layers == 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    marker = tmp_path / "executed"
    (tmp_path / "qm9_ae" / "args.pickle").write_bytes(pickle.dumps(geoldm_args(nf=Exploit(marker))))
    with pytest.raises(UnsafePickleError):
        load_geoldm(folder)
    assert not marker.exists()


# ------------------------------------------------------------------ pipeline
def test_pipeline_loads_a_geoldm_folder_samples_and_scores(tmp_path):
    from genunc.pipelines import MoleculeUncertaintyPipeline
    from genunc.posterior import TailPosterior

    pipe = MoleculeUncertaintyPipeline.from_pretrained(geoldm_folder(tmp_path / "geoldm"))
    assert isinstance(pipe.adapter, GeoLDMAdapter)
    assert pipe.adapter.head_name == "dynamics.egnn.embedding_out"
    assert pipe.adapter.layout.width == 4  # positions + latent_nf 1
    batch = molecule_batch(pipe)
    assert batch["x"].shape == (4, 9, 9)  # molecules in GeoLDM's raw encoding
    pipe.fit_posterior([batch], progress=False)
    out = pipe(3, num_draws=2, num_inference_steps=4, progress=False,
               scores=("variability", "semantic", "denoising_loss"))
    assert len(out.molecules) == 3 and all(np.isfinite(v).all() for v in out.scores.values())
    # semantic_x0 decodes the draws' clean latents (with diffusers' DDPM: it refuses EDM's step)
    x0 = pipe(2, num_draws=2, num_inference_steps=4, progress=False, sampler="ddpm",
              scores=("semantic_x0",))
    assert np.isfinite(x0.scores["semantic_x0"]).all()
    assert all(len(p) == len(t) and p.shape[1] == 3 for p, t in out.molecules)
    assert (out.scores["variability_pos"] == 0).all() and (out.scores["variability_type"] > 0).all()
    assert len(out.draw_molecules) == 2
    # a block posterior over the last latent EGNN block covers the latent positions too
    pipe.fit_posterior([batch], tail=1, progress=False)
    assert isinstance(pipe.posterior, TailPosterior)
    out = pipe(2, num_draws=3, num_inference_steps=3, progress=False, scores=("variability",),
               variance="monte_carlo")
    assert (out.scores["variability_pos"] > 0).all() and np.isfinite(out.scores["variability"]).all()


def test_posterior_pairs_are_geoldm_latents_of_the_molecules(tmp_path):
    """Fits see GeoLDM's training latents: encoder means + sigma_0 noise (centre-of-mass-free
    positions), then EDM's noising, with the whole noise as the block's target."""
    from genunc.pipelines import MoleculeUncertaintyPipeline

    pipe = MoleculeUncertaintyPipeline.from_pretrained(geoldm_folder(tmp_path / "geoldm"))
    adapter, batch = pipe.adapter, molecule_batch(pipe)
    mask = batch["node_mask"]
    sigma_0 = torch.sqrt(torch.sigmoid(adapter.model.gamma.gamma[0].double())).item()
    assert adapter.sigma_0 == pytest.approx(sigma_0, rel=1e-6) and 1e-3 < sigma_0 < 1e-2
    latent = adapter.to_latent(batch, torch.Generator().manual_seed(0))["x"]
    mean = adapter.layout.latent_mean(batch["x"], mask)
    noise = adapter.sample_noise(mean.shape, mask, torch.Generator().manual_seed(0))
    torch.testing.assert_close(latent, mean + adapter.sigma_0 * noise)
    assert latent[..., :3].masked_fill(~mask[..., None], 0).sum(1).abs().max() < 1e-4
    pairs = adapter.tail_training_pairs(batch, torch.Generator().manual_seed(0))
    assert pairs.inputs["x"].shape == pairs.target.shape == (4, 9, 4)
    assert adapter.training_pairs(batch, torch.Generator().manual_seed(0)).target.shape == (4, 9, 1)
    with pytest.raises(GenuncError, match="molecules"):
        adapter.training_pairs({"x": latent, "node_mask": mask}, torch.Generator())


def test_folders_that_are_neither_edm_nor_geoldm_fail_in_one_line(tmp_path):
    from genunc.pipelines import MoleculeUncertaintyPipeline

    other = tmp_path / "other"
    other.mkdir()
    (other / "args.pickle").write_bytes(pickle.dumps(argparse.Namespace(lr=1e-4, batch_size=64)))
    with pytest.raises(GenuncError, match="neither an EDM nor a GeoLDM") as err:
        MoleculeUncertaintyPipeline.from_pretrained(other)
    assert "\n" not in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingFileError, match="nor an EDM or GeoLDM output folder") as err:
        MoleculeUncertaintyPipeline.from_pretrained(empty)
    assert "\n" not in str(err.value)
    # a GeoLDM autoencoder run, and a conditional model, are refused with the reason
    with pytest.raises(ConfigError, match="autoencoder run"):
        MoleculeUncertaintyPipeline.from_pretrained(geoldm_folder(tmp_path / "ae", train_diffusion=False))
    conditional = geoldm_folder(tmp_path / "cond", context_node_nf=1, conditioning=["alpha"])
    with pytest.raises(GenuncError, match="conditional"):
        MoleculeUncertaintyPipeline.from_pretrained(conditional)
    missing_ae = geoldm_folder(tmp_path / "on_ae", ae_path="outputs/qm9_ae")
    with pytest.raises(MissingFileError, match="autoencoder at outputs/qm9_ae"):
        MoleculeUncertaintyPipeline.from_pretrained(missing_ae)


@pytest.mark.slow
def test_filter_molecules_example_runs_on_a_geoldm_folder(qm9_slice, tmp_path, repo, python_run):
    run = run_filter_example(python_run, repo, "--geoldm", geoldm_folder(tmp_path / "geoldm"), qm9_slice,
                             tmp_path)
    assert run.returncode == 0, run.stderr
    assert "(2 of 4 records)" in run.stdout
    neither = tmp_path / "neither"
    neither.mkdir()
    run = python_run([repo / "examples" / "filter_molecules.py", "--geoldm", neither,
                      "--n", "2", "--out", tmp_path / "out2"])
    assert run.returncode != 0 and run.stderr.strip().count("\n") == 0
    assert "neither" in run.stderr


def test_the_molecule_job_runs_on_a_geoldm_folder(qm9_slice, tmp_path):
    """``genunc fit`` / ``genunc generate`` with a GeoLDM folder as the model (block posterior)."""
    export = run_molecule_job(geoldm_folder(tmp_path / "geoldm"), qm9_slice, tmp_path)
    assert len(export) == 3
    assert (np.asarray(export.column("variability_pos")) > 0).all()
    assert np.isfinite(np.asarray(export.column("semantic"))).all()
