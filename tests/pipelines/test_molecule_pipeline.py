"""The molecule pipeline end to end on a tiny untrained model and a QM9 slice."""

import numpy as np
import pytest
import torch

from genunc import streams
from genunc.errors import GenuncError
from genunc.pipelines import MoleculeUncertaintyPipeline


@pytest.fixture
def tiny_pipeline(qm9_slice, tiny_molecule_model):
    def build(timesteps=50):
        return MoleculeUncertaintyPipeline(tiny_molecule_model(), qm9_slice.atom_count_histogram(),
                                           timesteps=timesteps)
    return build


def test_encode_decode_round_trip(qm9_slice, tiny_pipeline):
    adapter = tiny_pipeline().adapter
    batch = adapter.encode(qm9_slice, np.arange(5))
    assert batch["x"].shape[-1] == 9 and batch["node_mask"].sum() == qm9_slice.n_atoms[:5].sum()
    for (pos, types), i in zip(adapter.decode(batch["x"], batch["node_mask"]), range(5)):
        ref_pos, ref_types = qm9_slice.molecule(i)
        np.testing.assert_allclose(pos, ref_pos, atol=1e-6)
        np.testing.assert_array_equal(types, ref_types)


def test_pipeline_scores_molecules_reproducibly(qm9_slice, tiny_pipeline):
    sampler = tiny_pipeline()
    sampler.fit_posterior([sampler.adapter.encode(qm9_slice, np.arange(i, i + 20))
                           for i in range(0, 60, 20)], progress=False)
    kwargs = dict(num_draws=3, num_inference_steps=5, scores=("variability", "random"), chunk_size=3,
                  progress=False)
    a, b = sampler(5, seed=1, **kwargs), sampler(5, seed=1, **kwargs)
    assert len(a.molecules) == 5
    assert [len(t) for _, t in a.molecules] == a.n_atoms.tolist()
    assert set(a.scores) == {"variability", "variability_pos", "variability_type", "random"}
    for name in a.scores:
        np.testing.assert_array_equal(a.scores[name], b.scores[name])
    for (pa, _), (pb, _) in zip(a.molecules, b.molecules):
        np.testing.assert_array_equal(pa, pb)
        np.testing.assert_allclose(pa.mean(0), 0, atol=1e-4)
    with pytest.raises(GenuncError, match="num_draws >= 2"):
        sampler(2, num_draws=1, num_inference_steps=2, variance="monte_carlo", progress=False)


@pytest.mark.parametrize("sampler_kind", ["ddpm", "ddim"])
def test_molecules_and_scores_do_not_depend_on_chunking(qm9_slice, tiny_pipeline, sampler_kind):
    """Molecule i draws its size, noise and baselines from the streams of its global index and
    every chunk shares the head draws: one call, other chunk sizes, or two calls (the second
    with first_sample) give the same molecules and scores."""
    pipe = tiny_pipeline(timesteps=20)
    pipe.fit_posterior([pipe.adapter.encode(qm9_slice, np.arange(0, 30))], progress=False)
    kwargs = dict(num_draws=2, num_inference_steps=4, sampler=sampler_kind, seed=3,
                  scores=("variability", "semantic", "denoising_loss", "random"),
                  nll_levels=2, progress=False)
    whole = pipe(6, chunk_size=6, **kwargs)
    runs = [pipe(6, chunk_size=2, **kwargs), pipe(6, chunk_size=4, **kwargs)]
    head, tail = pipe(4, chunk_size=3, **kwargs), pipe(2, first_sample=4, chunk_size=1, **kwargs)
    joined = {name: np.concatenate([head.scores[name], tail.scores[name]]) for name in head.scores}
    for other, molecules in [(runs[0].scores, runs[0].molecules), (runs[1].scores, runs[1].molecules),
                             (joined, head.molecules + tail.molecules)]:
        for name in whole.scores:
            np.testing.assert_allclose(other[name], whole.scores[name], rtol=1e-4, atol=1e-7)
        for (pa, ta), (pb, tb) in zip(molecules, whole.molecules):
            np.testing.assert_array_equal(ta, tb)
            np.testing.assert_allclose(pa, pb, atol=1e-4)
    other_seed = pipe(6, chunk_size=6, **{**kwargs, "seed": 4})
    assert not np.allclose(other_seed.scores["random"], whole.scores["random"])


def test_from_pretrained_round_trip(qm9_slice, tmp_path, tiny_molecule_model):
    model = tiny_molecule_model(seed=3)
    model.save_pretrained(tmp_path, timesteps=50)
    (tmp_path / "atom_histogram.json").write_text('{"5": 3, "9": 1}')
    loaded = MoleculeUncertaintyPipeline.from_pretrained(tmp_path)
    x = loaded.adapter.encode(qm9_slice, np.arange(2))
    t = torch.tensor([3, 7])
    torch.testing.assert_close(loaded.adapter.model(x["x"], t / 50, x["node_mask"]),
                               model(x["x"], t / 50, x["node_mask"]))
    assert set(loaded.atom_counts.tolist()) == {5, 9}


def test_semantic_and_likelihood_baseline_scores(qm9_slice, tiny_pipeline):
    sampler = tiny_pipeline()
    sampler.fit_posterior([sampler.adapter.encode(qm9_slice, np.arange(0, 30))], progress=False)
    kwargs = dict(num_draws=3, num_inference_steps=4, scores=("semantic", "denoising_loss"), sampler="ddim",
                  chunk_size=4, progress=False)
    a, b = sampler(6, seed=2, **kwargs), sampler(6, seed=2, **kwargs)
    assert set(a.scores) == {"semantic", "denoising_loss"}
    for name in a.scores:
        assert a.scores[name].shape == (6,) and np.isfinite(a.scores[name]).all()
        np.testing.assert_array_equal(a.scores[name], b.scores[name])
    # the MAP plus 3 draws, all through the backbone: 4 trajectories of 6 molecules for 4 steps
    assert a.backbone_rows == 4 * 6 * 4
    assert len(a.draw_molecules) == 3 and all(len(d) == 6 for d in a.draw_molecules)
    assert [len(t) for _, t in a.draw_molecules[0]] == a.n_atoms.tolist()


def test_denoising_loss_matches_direct_computation(qm9_slice, tiny_pipeline):
    sampler = tiny_pipeline()
    batch = sampler.adapter.encode(qm9_slice, np.arange(4))
    x0, mask = batch["x"], batch["node_mask"]
    generators = streams.sample_generators(3, "likelihood_noise", range(4))
    got = sampler.denoising_loss(x0, mask, levels=1, generators=generators)
    adapter = sampler.adapter
    again = streams.sample_generators(3, "likelihood_noise", range(4))
    eps = adapter.project(streams.randn_rows(x0.shape[1:], again), {"node_mask": mask})
    t = torch.zeros(4, dtype=torch.long)
    alpha, sigma = adapter.alpha_sigma(t)
    with torch.no_grad():
        out = adapter.denoise(alpha.float().view(-1, 1, 1) * x0 + sigma.float().view(-1, 1, 1) * eps,
                              t, mask)
    m = mask.float()
    expected = (((out - eps) ** 2).sum(-1) * m).sum(-1) / m.sum(-1)
    np.testing.assert_allclose(got, expected.double().numpy(), rtol=1e-5)


def test_molecule_descriptors_are_invariant(qm9_slice):
    from scipy.spatial.transform import Rotation

    from genunc.features.molecule import molecule_features

    pos, types = qm9_slice.molecule(7)
    rotation = Rotation.random(random_state=0).as_matrix()
    perm = np.random.default_rng(0).permutation(len(types))
    moved = pos @ rotation.T + np.array([1.0, -2.0, 3.0])
    np.testing.assert_allclose(molecule_features(moved[perm], types[perm]),
                               molecule_features(pos, types), atol=1e-9)
    other_pos, other_types = qm9_slice.molecule(8)
    assert not np.allclose(molecule_features(other_pos, other_types), molecule_features(pos, types))


def test_random_baseline_is_independent_of_molecule_size(qm9_slice, tiny_pipeline):
    """Atom counts and the random score come from streams of their own: unrelated."""
    from genunc.filtering import spearman

    sampler = tiny_pipeline(timesteps=10)
    out = sampler(300, num_inference_steps=1, scores=("random",), chunk_size=300, seed=0, progress=False)
    assert abs(spearman(out.scores["random"], out.n_atoms)) < 0.2


def test_the_e3nn_model_refuses_autocast_clearly(qm9_slice, tiny_pipeline):
    """e3nn's generated kernels do not follow autocast's casts: refused before anything runs."""
    sampler = tiny_pipeline()
    with pytest.raises(GenuncError, match="cannot run under autocast"):
        sampler(2, num_inference_steps=2, scores=("random",), num_draws=0, precision="bfloat16",
                progress=False)


def test_semantic_x0_keeps_the_molecules_and_collapses_to_the_floor(qm9_slice, tiny_pipeline,
                                                                    monkeypatch):
    """The one-trajectory score: the molecules the M+1 heads predict along the MAP trajectory,
    by the invariant descriptors: no extra backbone rows, the same molecules as a plain call,
    and with every draw at the posterior mean exactly the floor (zero variance + 1e-3)."""
    import math
    from dataclasses import replace

    sampler = tiny_pipeline()
    sampler.fit_posterior([sampler.adapter.encode(qm9_slice, np.arange(0, 30))], progress=False)
    kwargs = dict(num_inference_steps=4, sampler="ddim", chunk_size=4, progress=False, seed=3)
    plain = sampler(5, num_draws=0, scores=("random",), **kwargs)
    out = sampler(5, num_draws=4, scores=("semantic_x0",), x0_steps=[1, 3], **kwargs)
    assert out.backbone_rows == plain.backbone_rows
    for (pa, ta), (pb, tb) in zip(out.molecules, plain.molecules):
        np.testing.assert_array_equal(pa, pb)
        np.testing.assert_array_equal(ta, tb)
    assert np.isfinite(out.scores["semantic_x0"]).all() and (out.scores["semantic_x0_se"] > 0).all()
    # each step's entropy comes back (for choosing steps without generating again)
    assert out.semantic_x0_per_step.shape == (2, 5) and plain.semantic_x0_per_step is None
    np.testing.assert_allclose(out.semantic_x0_per_step.mean(0), out.scores["semantic_x0"], rtol=1e-12)
    one = sampler(5, num_draws=4, scores=("semantic_x0",), x0_steps=[3], **kwargs)
    np.testing.assert_allclose(one.scores["semantic_x0"], out.semantic_x0_per_step[1], rtol=1e-12)
    sample = sampler.posterior.sample
    monkeypatch.setattr(sampler.posterior, "sample", lambda n, seed=None, with_map=False: replace(
        d := sample(n, seed=seed, with_map=with_map),
        params={k: v[:1].expand_as(v).clone() for k, v in d.params.items()}))
    collapsed = sampler(5, num_draws=4, scores=("semantic_x0", "semantic"), x0_steps=[1, 3],
                        **kwargs)
    from genunc.features.molecule import features_of

    dims = features_of(out.molecules[:1]).shape[1]
    floor = 0.5 * dims * math.log(2 * math.pi * math.e * 1e-3)
    np.testing.assert_allclose(collapsed.scores["semantic_x0"], floor, rtol=1e-14)  # rounding
    np.testing.assert_allclose(collapsed.scores["semantic"], floor, rtol=1e-12)
