"""EDM checkpoints: conformance with EDM's reference code, equivariance, the safe args reader.

``fixtures/edm_reference.pt`` holds numbers recorded by running EDM's own code
(github.com/ehoogeboom/e3_diffusion_for_molecules at commit
fce07d701a2d2340f3522df588832c2c0f7e044a: egnn/, equivariant_diffusion/) outside this repository:

* ``small``: ``EnVariationalDiffusion`` around ``EGNN_dynamics_QM9`` with n_layers 2, nf 16,
  inv_sublayers 1, attention, tanh, norm_constant 1, normalization_factor 1, sum aggregation,
  polynomial_2 / 1000 steps / precision 1e-5, normalize_factors [1, 4, 10], charges; built with
  ``torch.manual_seed(0)``, then every dynamics weight shifted by 0.05 * N(0, 1) (generator seed
  1) so that the coordinate MLPs matter.  Its state dict, inputs (B=3, N=7, 7/5/3 atoms,
  per-sample t), ``dynamics._forward`` outputs in float32 and float64, and at one scalar t.
* ``step``: ``sample_p_zs_given_zt`` at t = 1000, 500, 1 (s = t - 1) from one z_t, with the
  step's noise fixed (``sample_combined_position_feature_noise`` replaced by a recorded tensor),
  and the network's eps at each.
* ``conditional``: n_layers 1, nf 8, context_node_nf 1, no charges, normalize_factors [1, 8, 1].
* ``gamma`` (the schedule) and ``full_keys``: the 141 state-dict keys and shapes of the full QM9
  configuration (n_layers 9, nf 256).
"""

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from genunc.adapters.edm import EDMAdapter
from genunc.adapters.molecule import PointCloudLayout, polynomial_alphas2
from genunc.errors import ConfigError, GenuncError
from genunc.zoo.edm import EDMModel, load_edm
from genunc.zoo.edm_args import EDMConfig, UnsafePickleError, read_args, read_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from molecule_folders import (  # noqa: E402  (the EDM / GeoLDM folder helpers)
    Exploit,
    edm_args,
    edm_folder,
    molecule_batch,
    random_state,
    reference_fixture,
    run_filter_example,
    small_model,
    write_folder,
)

FIXTURE = Path(__file__).parent / "fixtures" / "edm_reference.pt"
SMALL = dict(n_layers=2, nf=16)

ref = reference_fixture(FIXTURE)


def _small(ref, dtype=torch.float32):
    return small_model(EDMModel(EDMConfig(**SMALL)), ref, dtype)


# ------------------------------------------------------------------ conformance
def test_dynamics_output_equals_edm_reference(ref):
    s = ref["small"]
    with torch.no_grad():
        out32 = _small(ref)(s["t"], s["xh"], s["node_mask"], s["edge_mask"])
        out64 = _small(ref, torch.float64)(s["t"].double(), s["xh"].double(), s["node_mask"].double(),
                                           s["edge_mask"].double())
        scalar_t = _small(ref)(torch.tensor([0.5]), s["xh"], s["node_mask"], s["edge_mask"])
    assert out32.shape == s["out"].shape == (3, 7, 9)
    assert (out32 - s["out"]).abs().max() <= 1e-5
    assert (out64 - s["out64"]).abs().max() <= 1e-10
    assert (scalar_t - s["out_scalar_t"]).abs().max() <= 1e-5
    assert s["out"][..., :3].abs().max() > 1  # the coordinate path is exercised, not ~0


def test_conditional_dynamics_equal_edm_reference(ref):
    c = ref["conditional"]
    model = EDMModel(EDMConfig(n_layers=1, nf=8, context_node_nf=1, conditioning=("alpha",),
                               include_charges=False, normalize_factors=(1, 8, 1)))
    model.load_state_dict(c["state_dict"])
    with torch.no_grad():
        out = model.eval()(c["t"], c["xh"], c["node_mask"], c["edge_mask"], c["context"])
    assert (out - c["out"]).abs().max() <= 1e-5
    with pytest.raises(ConfigError, match="context"):
        model(c["t"], c["xh"], c["node_mask"], c["edge_mask"])


def test_noise_schedule_equals_edm_gamma(ref):
    model = EDMModel(EDMConfig(**SMALL))
    assert torch.equal(model.gamma.gamma.detach(), ref["gamma"])
    # the adapter's float64 schedule is the same one
    alphas2 = torch.sigmoid(-ref["gamma"].double())
    assert (polynomial_alphas2(1000, 2.0, 1e-5) - alphas2).abs().max() < 1e-6


def test_one_reverse_step_equals_edm_p_zs_given_zt(ref):
    s, st = ref["small"], ref["step"]
    adapter = EDMAdapter(_small(ref), PointCloudLayout(5))
    mask = s["node_mask"].squeeze(-1).bool()
    edm, ddpm = adapter.make_scheduler("edm"), adapter.make_scheduler("ddpm")
    edm.set_timesteps(1000)
    for level in (1000, 500, 1):
        index = torch.tensor(level - 1)
        with torch.no_grad():
            eps = adapter.denoise(st["zt"], index.expand(3), mask)
        assert (eps - st["zs"][f"eps_{level}"]).abs().max() <= 1e-5
        zs = adapter.project(edm.step(eps, index, st["zt"], noise=st["eps"]).prev_sample,
                             {"node_mask": mask})
        assert (zs - st["zs"][level]).abs().max() <= 1e-5
    # diffusers' DDPM takes the same step up to float32 (its last step ends on the clean
    # prediction instead of sampling z_0, so it is compared at level 500)
    ddpm.set_timesteps(1000)
    ac = ddpm.alphas_cumprod
    generator = torch.Generator().manual_seed(0)
    step = ddpm.step(eps := adapter.denoise(st["zt"], torch.tensor(499).expand(3), mask).detach(), 499,
                     st["zt"], generator=generator).prev_sample
    noise = torch.randn(st["zt"].shape, generator=torch.Generator().manual_seed(0))
    sigma = ((1 - ac[498]) / (1 - ac[499]) * (1 - ac[499] / ac[498])).sqrt()
    ddpm_mean = adapter.project(step - sigma * noise, {"node_mask": mask})
    edm_mean = adapter.project(edm.step(eps, torch.tensor(499), st["zt"],
                                        noise=torch.zeros_like(eps)).prev_sample, {"node_mask": mask})
    assert (ddpm_mean - edm_mean).abs().max() <= 1e-5


def test_full_size_state_dict_has_edm_keys_and_shapes(ref, tmp_path):
    model = EDMModel(EDMConfig())
    state = model.state_dict()
    assert len(state) == 141
    assert sorted((k, tuple(v.shape)) for k, v in state.items()) == sorted(ref["full_keys"])
    # a random full-size state dict under EDM's names loads from an EDM folder
    random = random_state(state, keep=("gamma.gamma", "buffer"))
    folder = write_folder(tmp_path / "edm_qm9", edm_args(n_layers=9, nf=256), random)
    loaded = load_edm(folder)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in random.items())
    # a state dict of another configuration is refused with the keys that do not fit
    torch.save(EDMModel(EDMConfig(n_layers=2, nf=16)).state_dict(), folder / "generative_model_ema.npy")
    with pytest.raises(ConfigError, match="does not fit"):
        load_edm(folder)


# ------------------------------------------------------------------ equivariance
def _rotation(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    return q  # orthogonal, possibly a reflection: E(3)


def _fitted(ref):
    model = _small(ref, torch.float64)
    adapter = EDMAdapter(model, PointCloudLayout(5))
    from genunc.posterior import HeadPosterior

    g = torch.Generator().manual_seed(0)
    mask = torch.arange(7)[None] < torch.tensor([7, 6, 4, 5])[:, None]
    batch = {"x": adapter.layout.encode((torch.randn(4, 7, 3, generator=g) * 1.5).numpy(),
                                        torch.randint(0, 5, (4, 7), generator=g).numpy(),
                                        mask.numpy()).double(), "node_mask": mask}
    return adapter, HeadPosterior.fit(adapter, [batch, batch], repeats=2, progress=False)


def test_map_and_posterior_draws_are_e3_equivariant(ref):
    adapter, posterior = _fitted(ref)
    draws = posterior.sample(3, seed=0, with_map=True)
    s = ref["small"]
    x, mask = s["xh"].double(), s["node_mask"].squeeze(-1).bool()
    rot, shift = _rotation(1), torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    moved = torch.cat([x[..., :3] @ rot.T + shift, x[..., 3:]], -1) * mask[..., None]
    t = torch.tensor([10, 400, 900])
    head = adapter.head
    outputs = []
    for m in range(len(draws)):
        with torch.no_grad():
            for name, p in head.named_parameters():
                p.copy_(draws.params[name][m])
            out, out_moved = adapter.denoise(x, t, mask), adapter.denoise(moved, t, mask)
        torch.testing.assert_close(out_moved[..., :3], out[..., :3] @ rot.T, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(out_moved[..., 3:], out[..., 3:], atol=1e-9, rtol=1e-9)
        outputs.append(out)
    # the draws do change the prediction (the features), and only the features
    assert (outputs[1][..., 3:] - outputs[0][..., 3:]).abs().max() > 1e-4
    assert torch.equal(outputs[1][..., :3], outputs[0][..., :3])
    # the closed-form variance through post_head agrees with the draws' spread in shape and part
    with torch.no_grad():
        from genunc.posterior.capture import capture_head

        with capture_head(head) as record:
            adapter.denoise(x, t, mask)
        var = adapter.head_output_variance(posterior, record.features, {"node_mask": mask})
    assert var.shape == x.shape and var[..., :3].abs().max() == 0 and var[..., 3:].max() > 0


# ------------------------------------------------------------------ the args reader
def test_args_pickle_of_a_namespace_loads_in_every_protocol(tmp_path):
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        (tmp_path / "args.pickle").write_bytes(pickle.dumps(edm_args(n_layers=3), protocol=protocol))
        config = read_config(tmp_path)
        assert config.n_layers == 3 and config.normalize_factors == (1.0, 4.0, 10.0)


def test_foreign_or_malicious_pickles_are_refused_unexecuted(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "args.pickle"
    path.write_bytes(pickle.dumps(edm_args(n_layers=Exploit(marker))))
    with pytest.raises(UnsafePickleError, match="refusing to load .*system"):
        read_args(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps(Exploit(marker), protocol=0))
    with pytest.raises(UnsafePickleError):
        read_args(path)
    # the protocol-0 reconstructor is admitted for Namespaces only
    path.write_bytes(b"ccopy_reg\n_reconstructor\n(cposix\nsystem\nc__builtin__\nobject\nNtR.")
    with pytest.raises(UnsafePickleError):
        read_args(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"n_layers": 9}))  # a plain dict: not EDM's Namespace
    with pytest.raises(ConfigError, match="not EDM's argparse.Namespace"):
        read_args(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="not a readable pickle"):
        read_args(path)


# ------------------------------------------------------------------ pipeline and example
def test_pipeline_loads_an_edm_folder_and_scores(tmp_path):
    from genunc.pipelines import MoleculeUncertaintyPipeline

    pipe = MoleculeUncertaintyPipeline.from_pretrained(edm_folder(tmp_path / "edm"))
    assert isinstance(pipe.adapter, EDMAdapter) and pipe.adapter.head_name == "dynamics.egnn.embedding_out"
    pipe.fit_posterior([molecule_batch(pipe)], progress=False)
    out = pipe(3, num_draws=2, num_inference_steps=4, progress=False,
               scores=("variability", "semantic", "denoising_loss"))
    assert len(out.molecules) == 3 and all(np.isfinite(v).all() for v in out.scores.values())
    assert (out.scores["variability_pos"] == 0).all() and (out.scores["variability_type"] > 0).all()
    conditional = edm_folder(tmp_path / "cond", context_node_nf=1, conditioning=["alpha"])
    with pytest.raises(GenuncError, match="conditional"):
        MoleculeUncertaintyPipeline.from_pretrained(conditional)


@pytest.mark.slow
def test_filter_molecules_example_runs_on_an_edm_folder(qm9_slice, tmp_path, repo, python_run):
    run = run_filter_example(python_run, repo, "--edm", edm_folder(tmp_path / "edm"), qm9_slice, tmp_path)
    assert run.returncode == 0, run.stderr
    assert "(2 of 4 records)" in run.stdout


def test_the_edm_head_has_one_noise_scale(ref):
    """The head outputs atom features only: the molecule adapter's position / feature groups
    would split its columns at the wrong place."""
    _, posterior = _fitted(ref)
    assert isinstance(posterior.sigma_noise, float)
