"""The e3nn denoiser and every posterior draw of its head are E(3)-equivariant."""

import pytest
import torch
from e3nn import o3

from genunc.adapters.molecule import MoleculeAdapter, polynomial_alphas2
from genunc.posterior import HeadPosterior, capture_head
from genunc.zoo.molecule_model import EquivariantDenoiser


def batch(b=3, n=7, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 6:] = False
    x = torch.randn(b, n, 3 + k, generator=g) * 1.5 * mask[..., None]
    return {"x": x, "node_mask": mask}


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    return MoleculeAdapter(EquivariantDenoiser(n_features=6, scalars=16, vectors=4, n_layers=2))


def rotate(x, rotation, shift, mask):
    pos = (x[..., :3] @ rotation.T + shift) * mask[..., None]
    return torch.cat([pos, x[..., 3:]], -1)


def test_map_and_draws_are_equivariant(adapter):
    data = batch()
    post = HeadPosterior.fit(adapter, [data, batch(seed=1)], repeats=2, progress=False)
    draws = post.sample(3, seed=0)
    rotation, shift = o3.rand_matrix(), torch.tensor([0.3, -1.0, 2.0])
    mask, t = data["node_mask"], torch.tensor([10, 500, 900])
    x_rot = rotate(data["x"], rotation, shift, mask)
    outs = []
    for x in (data["x"], x_rot):
        with torch.no_grad(), capture_head(adapter.head) as record:
            eps = adapter.denoise(x=x, t=t, node_mask=mask)
        inputs = {"x": x, "node_mask": mask}
        drawn = adapter.post_head(draws.apply(record.features), inputs)
        outs.append((eps, drawn))
    (eps, drawn), (eps_rot, drawn_rot) = outs
    # positions rotate (no shift: the noise is a displacement), features are invariant
    torch.testing.assert_close(eps_rot[..., :3], eps[..., :3] @ rotation.T, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(eps_rot[..., 3:], eps[..., 3:], atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(drawn_rot[..., :3], drawn[..., :3] @ rotation.T, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(drawn_rot[..., 3:], drawn[..., 3:], atol=2e-4, rtol=1e-3)
    assert not torch.allclose(drawn[0], drawn[1])  # the draws do differ
    # so the variability score is rotation invariant, both parts
    var = adapter.variability(drawn, {"node_mask": mask})
    var_rot = adapter.variability(drawn_rot, {"node_mask": mask})
    for name in ("variability_pos", "variability_type"):
        torch.testing.assert_close(var_rot[name], var[name], atol=1e-6, rtol=1e-3)
    # centre-of-mass free and zero on padding, for the MAP and every draw
    for out in (eps, drawn):
        pos = out[..., :3] * mask[..., None]
        assert pos.sum(-2).abs().max() < 1e-4
        assert out[..., ~mask, :].abs().max() == 0


def test_training_pairs_are_centred_and_masked(adapter):
    pairs = adapter.training_pairs(batch(), torch.Generator().manual_seed(0))
    mask = pairs.mask
    assert pairs.target[..., :3].sum(-2).abs().max() < 1e-5
    assert pairs.target[~mask].abs().max() == 0 and pairs.inputs["x"][~mask].abs().max() == 0


def test_schedule_is_monotone_and_bounded():
    a2 = polynomial_alphas2(1000)
    assert a2.shape == (1001,) and (a2[1:] <= a2[:-1]).all()
    assert 0.999 < a2[0] <= 1 and 0 < a2[-1] < 1e-3


def test_sampling_with_diffusers_schedulers_stays_centred_and_scores_per_atom(adapter):
    from genunc.posterior.variance import MonteCarloVariance
    from genunc.sampling import run_trajectory

    data = batch()
    post = HeadPosterior.fit(adapter, [data], progress=False)
    mask = data["node_mask"]
    x_T = adapter.sample_noise(data["x"].shape, mask, torch.Generator().manual_seed(0))
    for kind in ("ddpm", "ddim"):
        out = run_trajectory(adapter, adapter.make_scheduler(kind), x_T, {"node_mask": mask},
                             num_inference_steps=4,
                             trajectory_draws=post.sample(2, seed=1, with_map=True),
                             variability=MonteCarloVariance(adapter, post.sample(3, seed=2)),
                             generator=torch.Generator().manual_seed(0))
        for x in (out.samples, *out.draw_samples):
            assert x[..., :3].sum(-2).abs().max() < 1e-4  # centre of mass stays at the origin
            assert x[~mask].abs().max() == 0  # padding stays empty
        parts = out.variability_per_step
        assert set(parts) == {"variability", "variability_pos", "variability_type"}
        assert parts["variability_pos"].shape == (4, 3)
        torch.testing.assert_close(parts["variability"],
                                   parts["variability_pos"] + parts["variability_type"])
        assert (parts["variability_pos"] > 0).all()


def test_exact_variability_is_the_limit_of_many_draws(adapter):
    """The closed form through the e3nn head and the centre-of-mass removal equals the variance
    of 4,000 draws, per atom and channel, within Monte-Carlo error."""
    from genunc.posterior.capture import capture_head
    from genunc.posterior.variance import ExactVariance, MonteCarloVariance

    data = batch()
    post = HeadPosterior.fit(adapter, [data], progress=False)
    mask = data["node_mask"]
    t = torch.full((mask.shape[0],), 300)
    with torch.no_grad(), capture_head(adapter.head) as record:
        adapter.denoise(x=data["x"], t=t, node_mask=mask)
    inputs = {"x": data["x"], "node_mask": mask}
    exact = ExactVariance(adapter, post)(record.features, inputs)
    many = MonteCarloVariance(adapter, post.sample(4000, seed=3))(record.features, inputs)
    real = mask[..., None].expand_as(exact)
    # the sample variance of n normals has relative standard error sqrt(2 / (n - 1))
    rel = (many[real] - exact[real]).abs() / exact[real]
    assert float(rel.max()) < 4 * (2 / 3999) ** 0.5
    assert exact[~real].abs().max() == 0  # padding has no variance
    scores = adapter.reduce_variance(exact, inputs)
    torch.testing.assert_close(scores["variability"],
                               scores["variability_pos"] + scores["variability_type"])


def test_per_atom_variability_does_not_grow_with_padding(adapter):
    """Padding must not dilute or inflate the per-atom score."""
    eps = torch.randn(4, 1, 5, 9)
    small = {"node_mask": torch.ones(1, 5, dtype=torch.bool)}
    padded_eps = torch.cat([eps, torch.zeros(4, 1, 3, 9)], dim=2)
    padded = {"node_mask": torch.cat([small["node_mask"], torch.zeros(1, 3, dtype=torch.bool)], 1)}
    a, b = adapter.variability(eps, small), adapter.variability(padded_eps, padded)
    torch.testing.assert_close(a["variability"], b["variability"])
    expected = eps.double().var(0)[0, :, :3].sum(-1).mean()
    torch.testing.assert_close(a["variability_pos"][0], expected)


def test_cpu_chunked_backbone_matches_one_pass_and_calls_the_head_once(adapter, monkeypatch):
    data = batch(b=5)
    t = torch.tensor([10, 200, 400, 600, 900])
    model = adapter.model
    monkeypatch.setattr(model, "cpu_chunk_atoms", None)
    with torch.no_grad():
        whole = model(data["x"], t / 1000, data["node_mask"])
    monkeypatch.setattr(model, "cpu_chunk_atoms", 2 * data["x"].shape[1])  # chunks of 2, 2, 1
    with torch.no_grad(), capture_head(model.head) as record:
        chunked = model(data["x"], t / 1000, data["node_mask"])
    assert record.calls == 1 and record.features.shape[0] == 5
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_layout_comes_from_the_head_irreps(adapter):
    from genunc.adapters.molecule import PointCloudLayout
    from genunc.errors import GenuncError

    layout = adapter.layout
    assert layout == PointCloudLayout.from_irreps("1x1o + 6x0e")
    assert (layout.positions, layout.types, layout.features) == \
        (slice(0, 3), slice(3, 8), slice(3, None))
    assert layout.width == 9
    with pytest.raises(GenuncError, match="1x1o \\+ Kx0e"):
        PointCloudLayout.from_irreps("6x0e + 1x1o")
    with pytest.raises(GenuncError, match="atom types"):
        PointCloudLayout.from_irreps("1x1o + 4x0e")


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_a_collapsed_posterior_gives_identical_molecules(adapter, kind):
    from genunc.posterior import HeadDraws
    from genunc.sampling import run_trajectory

    data = batch()
    post = HeadPosterior.fit(adapter, [data], progress=False)
    mask = data["node_mask"]
    x_T = adapter.sample_noise(data["x"].shape, mask, torch.Generator().manual_seed(0))
    at_mean = HeadDraws.from_flat(post.mean.repeat(3, 1), post.ops, with_map=True)
    out = run_trajectory(adapter, adapter.make_scheduler(kind), x_T, {"node_mask": mask},
                         num_inference_steps=4, trajectory_draws=at_mean,
                         generator=torch.Generator().manual_seed(0))
    for draw in out.draw_samples:
        torch.testing.assert_close(draw, out.samples, rtol=0, atol=1e-5)
