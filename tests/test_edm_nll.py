"""The ``nll`` score: EDM's variational bound on -log p(x, h, N), against EDM's reference code.

``fixtures/edm_nll_reference.pt`` (recorded by ``fixtures/make_edm_nll_reference.py`` from
github.com/ehoogeboom/e3_diffusion_for_molecules at commit
fce07d701a2d2340f3522df588832c2c0f7e044a) holds EDM's evaluation-mode NLL of fixed molecules
with its timestep and noise fixed, and every term of it, in float32 and float64:

* ``small``: the ``small`` model of ``edm_reference.pt`` (n_layers 2, nf 16, charges,
  normalize_factors [1, 4, 10]); 3 molecules (7 / 5 / 3 atoms) at t = 1, 500, 1000.
* ``nocharge``: n_layers 1, nf 8, no charges, normalize_factors [2, 8, 1] (its state dict is in
  the fixture); 2 molecules (6 / 4 atoms) at t = 37, 999.
* ``l0``: the level-0 term at a z_0 about half a bin off the data in every atom feature,
  where the discretised likelihoods are neither 0 nor 1.

Tolerances: float64 1e-6 relative; float32 1e-5 relative, against both the reference's float64
numbers and its float32 ones, except the float32 prior KL: EDM computes it in float32 as
``log(1/sigma) + (sigma^2 + mu^2)/2 - 1/2`` with sigma ~ 1, which cancels to ~1e-4 nats and
keeps only 2-3 digits (5e-3 relative off its own float64 value; genunc's is within 1e-8), so
that one term is compared to the float32 reference to 1e-6 nats.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from genunc.adapters import edm_likelihood
from genunc.adapters.edm import EDMAdapter
from genunc.adapters.molecule import PointCloudLayout
from genunc.errors import GenuncError
from genunc.zoo.edm import EDMModel
from genunc.zoo.edm_args import EDMConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from molecule_folders import edm_folder, geoldm_folder, molecule_batch, reference_fixture  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
ref = reference_fixture(FIXTURES / "edm_nll_reference.pt")
#: genunc's term -> the reference's, and the factor between them (the step term is T * loss_t)
TERMS = {"position_constants": ("neg_log_constants", 1), "prior_kl": ("kl_prior", 1),
         "diffusion": ("loss_t", 1000), "reconstruction": ("loss_term_0", 1),
         "log_det": ("delta_log_px", -1), "nll_xh": ("nll_xh", 1)}
CASES = {"small": (dict(n_layers=2, nf=16), PointCloudLayout(5)),
         "nocharge": (dict(n_layers=1, nf=8, include_charges=False, normalize_factors=(2, 8, 1)),
                      PointCloudLayout(5, scales=(2, 8, 1), charges=False))}


def _adapter(ref, key: str, dtype=torch.float32) -> EDMAdapter:
    config, layout = CASES[key]
    model = EDMModel(EDMConfig(**config))
    state = ref[key].get("state_dict") or torch.load(FIXTURES / "edm_reference.pt",
                                                     weights_only=True)["small"]["state_dict"]
    model.load_state_dict(state)
    return EDMAdapter(model.to(dtype).eval(), layout)


def _inputs(c: dict, layout: PointCloudLayout, dtype):
    """The reference's molecule in genunc's normalised layout, its mask, levels and noise."""
    s_pos, s_type, s_charge = layout.scales
    parts = [c["x"] / s_pos, c["one_hot"] / s_type] + ([c["charges"] / s_charge] if layout.charges else [])
    return (torch.cat(parts, -1).to(dtype), c["node_mask"].squeeze(-1).bool(), c["t"].view(-1, 1),
            torch.stack([c["eps"], c["eps_0"]], 1).to(dtype))


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    theirs = theirs.double()
    return float(((ours.double() - theirs).abs() / theirs.abs().clamp_min(1e-300)).max())


@pytest.mark.parametrize("key", list(CASES))
def test_every_term_and_the_total_equal_edm_reference(ref, key):
    c = ref[key]
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-5)):
        adapter = _adapter(ref, key, dtype)
        x0, mask, levels, noise = _inputs(c, adapter.layout, dtype)
        terms = adapter.likelihood_terms(x0, mask, levels, noise)
        assert set(terms) == set(TERMS)
        for ours, (theirs, factor) in TERMS.items():
            expected = factor * c["float64"][theirs].double()
            if theirs == "delta_log_px" and not expected.abs().max():
                assert terms[ours].abs().max() == 0
                continue
            assert _relative(terms[ours], expected) <= tol, (key, dtype, ours)
            if dtype == torch.float32:
                recorded32 = factor * c["float32"][theirs].double()
                if ours == "prior_kl":  # see the module docstring
                    assert (terms[ours] - recorded32).abs().max() <= 1e-6
                elif recorded32.abs().max():
                    assert _relative(terms[ours], recorded32) <= tol, (key, ours)
    # the score is well away from its terms' sizes: the step term dominates a random network's
    assert (c["float64"]["loss_t"] > 0).all() and (terms["nll_xh"] > 0).all()


def test_step_weights_and_the_atom_count_prior_equal_edm(ref, tmp_path):
    from genunc.pipelines import MoleculeUncertaintyPipeline

    adapter = _adapter(ref, "small", torch.float64)
    gamma = adapter.gamma.double()
    for key in CASES:
        c = ref[key]
        t = c["t"]
        assert _relative(edm_likelihood.step_weight(gamma[t - 1], gamma[t]), c["float64"]["weight"]) <= 1e-9
    pipe = MoleculeUncertaintyPipeline.from_pretrained(edm_folder(tmp_path / "edm"))
    pipe_hist = MoleculeUncertaintyPipeline(pipe.model, ref["histogram"], adapter=pipe.adapter)
    for key in CASES:
        n = ref[key]["node_mask"].squeeze(-1).sum(1)
        np.testing.assert_allclose(pipe_hist.log_p_atoms(n), ref[key]["float64"]["log_pN"].numpy(),
                                   rtol=1e-6)
    # a size the histogram never saw: EDM's floor
    assert pipe_hist.log_p_atoms(np.array([2]))[0] == pytest.approx(np.log(1e-30))


def test_level_zero_term_equals_edm_off_the_data(ref):
    """``-log p(x, h | z_0)`` at a z_0 whose atom features are about half a bin off the data:
    the type and charge bins hold neither all nor none of the mass."""
    adapter = _adapter(ref, "small")
    x0, mask, _, noise = _inputs(ref["small"], adapter.layout, torch.float32)
    z_0, net_0 = ref["l0"]["z_0"], ref["l0"]["net_0"]
    gamma_0 = adapter.gamma.double()[torch.zeros(3, dtype=torch.long)]
    _, sigma_0 = edm_likelihood.alpha_sigma(gamma_0)
    features = edm_likelihood.feature_log_likelihood(x0, z_0, sigma_0, mask, adapter.layout)
    positions = -0.5 * ((noise[:, 1, :, :3] - net_0[..., :3]).double() ** 2).sum((1, 2))
    assert _relative(positions + features, ref["l0"]["log_p"]) <= 1e-5
    assert (features < -1e-3).all() and (features > -50).all()  # neither 0 nor the floor


def test_stratified_levels_carry_equal_shares_of_the_step_weights():
    gamma = EDMModel(EDMConfig(n_layers=1, nf=8)).gamma.gamma.detach()
    every = edm_likelihood.step_weight(gamma[:-1].double(), gamma[1:].double())
    # all T levels (or more asked): each level with its own weight, the exact sum
    for n in (1000, 5000):
        levels, weights = edm_likelihood.stratified_weights(n, gamma)
        assert torch.equal(levels, torch.arange(1, 1001)) and torch.equal(weights, every)
    for n in (1, 3, 10, 50):
        levels, weights = edm_likelihood.stratified_weights(n, gamma)
        assert torch.isclose(weights.sum(), every.sum(), rtol=1e-12)
        assert (levels.diff() > 0).all() and levels.min() >= 1 and levels.max() <= 1000
        assert len(levels) <= n
    levels, weights = edm_likelihood.stratified_weights(10, gamma)
    assert len(levels) == 10 and (weights - every.sum() / 10).abs().max() < 0.2 * every.sum() / 10
    # the schedule's weight sits at both ends: so do the levels
    assert levels[0] < 10 and levels[-1] > 990
    with pytest.raises(GenuncError, match="at least one"):
        edm_likelihood.stratified_weights(0, gamma)


def _rotation(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q


def test_nll_is_invariant_to_rigid_motions_and_atom_order(ref, tmp_path):
    """With the noise moved along with the molecule (rotated, permuted) the bound's estimate is
    unchanged; a translation changes nothing at all (positions are centred first)."""
    adapter = _adapter(ref, "small", torch.float64)
    x0, mask, _, noise = _inputs(ref["small"], adapter.layout, torch.float64)
    levels = torch.tensor([[3, 250, 990]]).expand(3, -1)
    noise = torch.cat([noise, torch.randn(3, 2, *x0.shape[1:], generator=torch.Generator().manual_seed(0),
                                          dtype=torch.float64)], 1)
    noise = adapter._centre(noise, mask.unsqueeze(1).expand(-1, 4, -1))
    base = adapter.likelihood_terms(x0, mask, levels, noise)

    rot = _rotation(2)
    moved = x0.clone()
    moved[..., :3] = (x0[..., :3] @ rot.T + torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)) \
        * mask.unsqueeze(-1)
    turned = noise.clone()
    turned[..., :3] = noise[..., :3] @ rot.T
    rigid = adapter.likelihood_terms(moved, mask, levels, turned)

    perm = torch.stack([torch.cat([torch.randperm(int(n), generator=torch.Generator().manual_seed(1)),
                                   torch.arange(int(n), mask.shape[1])]) for n in mask.sum(1)])
    permuted = adapter.likelihood_terms(torch.stack([x[p] for x, p in zip(x0, perm)]), mask, levels,
                                        torch.stack([e[:, p] for e, p in zip(noise, perm)]))
    for other in (rigid, permuted):
        for name, value in base.items():
            torch.testing.assert_close(other[name], value, rtol=1e-9, atol=1e-9)
    # the pipeline's score with its own noise stream: a translation leaves it bit-for-bit equal
    from genunc.pipelines import MoleculeUncertaintyPipeline

    pipe = MoleculeUncertaintyPipeline.from_pretrained(edm_folder(tmp_path / "edm"))
    batch = molecule_batch(pipe)
    shifted = batch["x"].clone()
    shifted[..., :3] = (shifted[..., :3] + torch.tensor([3.0, 1.0, -2.0])) * batch["node_mask"].unsqueeze(-1)
    a = pipe.nll_terms(batch["x"], batch["node_mask"], levels=4)["nll"]
    b = pipe.nll_terms(shifted, batch["node_mask"], levels=4)["nll"]
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_stratified_estimate_agrees_with_every_level(tmp_path):
    """On a tiny model, (at most) 50 stratified levels estimate the sum over all 1000 levels:
    within 8% per molecule and 4% on average over the molecules.  The difference is Monte-Carlo
    noise (each level has its own noise draw): on this random network the noise error per level
    has an SD of ~18% of its mean, which makes the 50-level step term's SD ~2.6%.  The terms
    that do not depend on the levels are equal."""
    from genunc.pipelines import MoleculeUncertaintyPipeline

    pipe = MoleculeUncertaintyPipeline.from_pretrained(edm_folder(tmp_path / "edm"))
    batch = molecule_batch(pipe)
    every = pipe.nll_terms(batch["x"], batch["node_mask"], levels=1000)
    some = pipe.nll_terms(batch["x"], batch["node_mask"], levels=50)
    for name in ("position_constants", "prior_kl", "log_det", "atom_count"):
        np.testing.assert_allclose(some[name], every[name], rtol=1e-12)
    relative = some["diffusion"] / every["diffusion"] - 1
    assert np.abs(relative).max() <= 0.08 and abs(relative.mean()) <= 0.04, relative
    np.testing.assert_allclose(some["nll"], every["nll"], rtol=0.08)
    assert np.isfinite(every["nll"]).all() and every["nll"].shape == (4,)


@pytest.mark.parametrize("folder", [edm_folder, geoldm_folder], ids=["edm", "geoldm"])
def test_pipeline_scores_nll_per_molecule_and_chunk_free(tmp_path, folder):
    """EDM's and GeoLDM's own likelihood of each generated molecule: finite, the same for any
    chunk size, and ``nll_terms`` of the decoded molecules with the call's likelihood stream."""
    from genunc.pipelines import MoleculeUncertaintyPipeline

    pipe = MoleculeUncertaintyPipeline.from_pretrained(folder(tmp_path / "model"))
    kwargs = dict(num_inference_steps=3, scores=("nll", "denoising_loss"), nll_levels=3,
                  progress=False, seed=4)
    a = pipe(5, chunk_size=5, **kwargs)
    b = pipe(5, chunk_size=2, **kwargs)
    assert a.scores["nll"].shape == (5,) and np.isfinite(a.scores["nll"]).all()
    np.testing.assert_allclose(a.scores["nll"], b.scores["nll"], rtol=1e-5)
    assert not np.allclose(a.scores["nll"], a.scores["denoising_loss"])
    # the decoded molecule's score, from the call's own likelihood stream
    from genunc import streams

    mask = torch.arange(a.n_atoms.max())[None] < torch.as_tensor(a.n_atoms)[:, None]
    x = pipe.adapter.layout.encode(np.stack([np.pad(p, ((0, mask.shape[1] - len(p)), (0, 0)))
                                             for p, _ in a.molecules]),
                                   np.stack([np.pad(t, (0, mask.shape[1] - len(t))) for _, t in a.molecules]),
                                   mask.numpy())
    width = int(pipe.atom_counts.max())
    x = torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[1]))
    mask = torch.nn.functional.pad(mask, (0, width - mask.shape[1]))
    direct = pipe.nll_terms(x, mask, 3, streams.sample_generators(4, "likelihood_noise", range(5)))
    np.testing.assert_allclose(direct["nll"], a.scores["nll"], rtol=1e-4)


def test_models_without_edm_parametrisation_refuse_nll(tmp_path, tiny_molecule_folder):
    from genunc.pipelines import MoleculeUncertaintyPipeline

    own = MoleculeUncertaintyPipeline.from_pretrained(tiny_molecule_folder(tmp_path / "own"))
    with pytest.raises(GenuncError, match="needs an EDM or GeoLDM checkpoint") as err:
        own(2, num_inference_steps=2, scores=("nll",), progress=False, check_only=True)
    assert "\n" not in str(err.value)
    with pytest.raises(GenuncError, match="needs an EDM or GeoLDM checkpoint"):
        own.nll_terms(torch.zeros(1, 3, 9), torch.ones(1, 3, dtype=torch.bool))


def test_a_molecule_job_exports_nll(tmp_path, qm9_slice):
    """``generate.scores: [nll, ...]`` in a job config: one finite column per molecule, equal to
    the pipeline's own call with the same seed and levels (chunking does not change it)."""
    import yaml

    from genunc.cli import main
    from genunc.data.qm9 import save_cache
    from genunc.export import Export
    from genunc.pipelines import MoleculeUncertaintyPipeline

    folder = edm_folder(tmp_path / "edm")
    save_cache(qm9_slice.subset(range(12)), tmp_path / "molecules.npz")
    config = {"modality": "molecule", "model": str(folder), "features": "descriptors",
              "posterior": {"data": str(tmp_path / "molecules.npz"), "max_samples": 12,
                            "repeats": 1, "batch_size": 6, "dir": str(tmp_path / "post")},
              "generate": {"n_samples": 3, "num_draws": 2, "steps": 3, "chunk_size": 2,
                           "nll_levels": 4, "seed": 5, "scores": ["variability", "nll"],
                           "out": str(tmp_path / "export")}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "-c", str(path)]) == 0
    assert main(["generate", "-c", str(path)]) == 0
    column = Export(tmp_path / "export").column("nll")
    assert column.shape == (3,) and np.isfinite(column).all()
    pipe = MoleculeUncertaintyPipeline.from_pretrained(folder, posterior=None)
    direct = pipe(3, num_inference_steps=3, scores=("nll",), nll_levels=4, seed=5, progress=False)
    np.testing.assert_allclose(column, direct.scores["nll"], rtol=1e-5)
