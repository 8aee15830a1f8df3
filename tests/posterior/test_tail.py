"""Posteriors over a tail (a chain of modules ending at the head): re-run, draws, fit, save/load."""

import pytest
import torch
from diffusers import DDPMScheduler
from e3nn import o3
from laplace import Laplace
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from genunc.adapters.image import DiffusersImageAdapter
from genunc.adapters.molecule import MoleculeAdapter
from genunc.errors import FingerprintMismatchError, GenuncError
from genunc.posterior import Tail, TailData, TailPosterior, default_tail


def _perturbed(tail, m=4, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: v.detach()[None] + scale * torch.randn(m, *v.shape, generator=g)
            for k, v in tail.parameters().items()}


def _record(tail, call, rows):
    with torch.no_grad(), tail.capture() as rec:
        out = call()
        return out, tail.inputs_of(rec, rows)


def _image_call(unet, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, 8, 8, generator=g)
    t = torch.randint(0, 100, (b,), generator=g)
    y = torch.randint(0, 3, (b,), generator=g)
    return lambda: unet(x, t, class_labels=y).sample


def _molecules(b=4, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 4:] = False
    return torch.randn(b, n, 9, generator=g) * 1.5 * mask[..., None], mask


# ------------------------------------------------------------------ re-run equals the forward
@pytest.mark.parametrize("blocks", [1, 2])
def test_unet_tail_rerun_equals_forward(tiny_unet, blocks):
    unet = tiny_unet()
    names = default_tail(unet, blocks)
    assert names[-3:] == ["conv_norm_out", "conv_act", "conv_out"]
    tail = Tail(unet, names)
    full, inputs = _record(tail, _image_call(unet), 3)
    assert inputs.separable
    with torch.no_grad():
        assert (tail.run(None, inputs) - full).abs().max() <= 1e-5


def test_text_tail_rerun_equals_forward(tiny_text_model):
    model = tiny_text_model(14, 10)
    model.blocks = nn.TransformerEncoder(model.blocks.layers[0], 2, enable_nested_tensor=False)
    names = default_tail(model, 1)
    assert names == ["blocks.layers.1", "norm", "head"]
    tail = Tail(model, names)
    ids = torch.randint(0, 14, (3, 10))
    full, inputs = _record(tail, lambda: model(ids).logits, 3)
    with torch.no_grad():
        assert (tail.run(None, inputs) - full).abs().max() <= 1e-5


def test_molecule_tail_rerun_equals_forward_with_chunked_backbone(tiny_molecule_model):
    model = tiny_molecule_model(n_layers=2)
    model.cpu_chunk_atoms = 14  # two molecules per chunk: the last layer is called twice
    adapter = MoleculeAdapter(model)
    tail = Tail(model, default_tail(model, 1))
    assert tail.names == ["layers.1", "head"]
    x, mask = _molecules()
    t = torch.tensor([3, 10, 20, 30])
    full, inputs = _record(tail, lambda: adapter.denoise(x, t, mask), 4)
    assert [len(c) for c in inputs.calls] == [2, 1] and not inputs.separable
    with torch.no_grad():
        rerun = adapter.post_head(tail.run(None, inputs), {"node_mask": mask})
    assert (rerun - full).abs().max() <= 1e-5


# ------------------------------------------------------------------ batched draws
def test_batched_draws_equal_a_loop_over_draws(tiny_unet, tiny_molecule_model):
    unet = tiny_unet()
    tail = Tail(unet, default_tail(unet, 1))
    params = _perturbed(tail)
    _, inputs = _record(tail, _image_call(unet), 3)
    with torch.no_grad():
        batched, loop = tail.apply(params, inputs), tail.loop_apply(params, inputs)
    assert batched.shape == (4, 3, 1, 8, 8)
    assert (batched - loop).abs().max() <= 1e-5
    assert (batched[0] - batched[1]).abs().max() > 1e-3  # the draws differ
    # per-draw inputs: 4 row groups of a batched run, group m under draw m
    call = _image_call(unet, b=12, seed=1)
    _, grouped = _record(tail, call, 12)
    with torch.no_grad():
        assert (tail.apply(params, grouped, per_draw=True)
                - tail.loop_apply(params, grouped, per_draw=True)).abs().max() <= 1e-5

    model = tiny_molecule_model(n_layers=2)
    tail = Tail(model, ["layers.1", "head"])
    x, mask = _molecules()
    _, inputs = _record(tail, lambda: model(x, torch.rand(4), mask), 4)
    params = _perturbed(tail)
    with torch.no_grad():
        assert (tail.apply(params, inputs) - tail.loop_apply(params, inputs)).abs().max() <= 1e-5


# ------------------------------------------------------------------ linearised draws
def _three_tails(tiny_unet, tiny_text_model, tiny_molecule_model):
    """(tail, recorded inputs) on the UNet, the text transformer and the chunked e3nn model."""
    unet = tiny_unet()
    image = Tail(unet, default_tail(unet, 1))
    _, image_inputs = _record(image, _image_call(unet), 3)
    text_model = tiny_text_model(14, 10)
    text = Tail(text_model, default_tail(text_model, 1))
    ids = torch.randint(0, 14, (3, 10), generator=torch.Generator().manual_seed(0))
    _, text_inputs = _record(text, lambda: text_model(ids).logits, 3)
    mol_model = tiny_molecule_model(n_layers=2)
    mol_model.cpu_chunk_atoms = 14
    mol = Tail(mol_model, default_tail(mol_model, 1))
    x, mask = _molecules()
    _, mol_inputs = _record(mol, lambda: MoleculeAdapter(mol_model).denoise(x, torch.rand(4), mask), 4)
    return [(image, image_inputs), (text, text_inputs), (mol, mol_inputs)]


def test_linearised_draws_at_the_fitted_weights_equal_the_forward(tiny_unet, tiny_text_model,
                                                                 tiny_molecule_model):
    for tail, inputs in _three_tails(tiny_unet, tiny_text_model, tiny_molecule_model):
        own = {k: v.detach()[None].expand(2, *v.shape) for k, v in tail.parameters().items()}
        with torch.no_grad():
            reference = tail.run(None, inputs)
        linear = tail.apply_linearised(own, inputs)
        assert linear.shape == (2, *reference.shape)
        assert (linear - reference).abs().max() <= 1e-5, tail.names


def test_linearised_draws_are_the_first_order_expansion(tiny_unet, tiny_text_model,
                                                        tiny_molecule_model):
    """The gap to re-running at the drawn weights shrinks 4x when the step halves (second
    order), and the batched draws equal one call per draw."""
    torch.manual_seed(0)
    for tail, inputs in _three_tails(tiny_unet, tiny_text_model, tiny_molecule_model):
        direction = _perturbed(tail, m=2, scale=1.0, seed=1)
        gaps = []
        for step in (0.02, 0.01):
            params = {k: tail.parameters()[k].detach() + step * (v - tail.parameters()[k].detach())
                      for k, v in direction.items()}
            with torch.no_grad():
                exact = tail.loop_apply(params, inputs)
            linear = tail.apply_linearised(params, inputs)
            gaps.append(float((linear - exact).double().norm()))
            loop = torch.stack([tail.apply_linearised({k: v[m : m + 1] for k, v in params.items()},
                                                      inputs)[0] for m in range(2)])
            assert (linear - loop).abs().max() <= 1e-5
        assert 2.5 < gaps[0] / gaps[1] < 6, (tail.names, gaps)


def test_a_one_layer_tail_is_its_own_linearisation():
    model, x, _ = _toy()
    tail = Tail(model, ["2"])
    _, inputs = _record(tail, lambda: model(x), len(x))
    params = _perturbed(tail, m=3, scale=0.5)
    params = {k: v.double() for k, v in params.items()}
    with torch.no_grad():
        torch.testing.assert_close(tail.apply_linearised(params, inputs), tail.apply(params, inputs))


def test_linearised_predictive_is_kept_by_save_load_and_refused_where_weights_swap(tmp_path):
    model, x, y = _toy()
    tail, inputs, data = _toy_tail(model, x, y)
    post = TailPosterior.fit_data(tail, data, predictive="linearised")
    draws = post.sample(3, seed=0)
    assert draws.linearised and post.summary()["predictive"] == "linearised"
    with torch.no_grad():
        assert not torch.allclose(draws.apply(inputs), tail.apply(draws.params, inputs))
    post.save(tmp_path / "p")
    loaded = TailPosterior.load(tmp_path / "p", model)
    assert loaded.predictive == "linearised" and loaded.digest() == post.digest()
    loaded.predictive = "sample"
    assert not loaded.sample(1).linearised and loaded.digest() != post.digest()
    with pytest.raises(GenuncError, match="predictive='sample'"):
        draws.require_weights("a test")
    with pytest.raises(GenuncError, match="predictive must be"):
        loaded.predictive = "glm"
    with pytest.raises(GenuncError, match="predictive must be"):
        TailPosterior.fit_data(tail, data, predictive="glm")


# ------------------------------------------------------------------ linear-Gaussian toy
def _toy(seed=0, n=40):
    torch.manual_seed(seed)
    body, l1, l2 = nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 2)
    model = nn.Sequential(body, l1, l2).double()
    x = torch.randn(n, 3, dtype=torch.float64)
    with torch.no_grad():
        y = model(x) + 0.3 * torch.randn(n, 2, dtype=torch.float64)
    return model, x, y


def _toy_tail(model, x, y):
    """The toy's last two layers as a tail, their recorded inputs, and the fitting data."""
    tail = Tail(model, ["1", "2"])
    _, inputs = _record(tail, lambda: model(x), len(x))
    data = TailData()
    data.add(inputs, y)
    return tail, inputs, data


@pytest.mark.parametrize("structure", ["diag", "full", "kron"])
def test_two_layer_tail_matches_laplace_on_the_whole_toy(structure):
    model, x, y = _toy()
    tail, inputs, data = _toy_tail(model, x, y)
    post = TailPosterior.fit_data(tail, data, structure=structure, prior_precision=2.0,
                                  sigma_noise=0.3, curvature="exact", batch_size=7)
    # laplace-torch's own Laplace over both layers of the toy fed with the body's outputs
    reference = nn.Sequential(model[1], model[2])
    with torch.no_grad():
        features = model[0](x)
    la = Laplace(reference, "regression", subset_of_weights="all", hessian_structure=structure,
                 sigma_noise=0.3, prior_precision=2.0)
    la.fit(DataLoader(TensorDataset(features, y), batch_size=7))
    torch.testing.assert_close(post.mean, la.mean.detach())
    torch.testing.assert_close(post.posterior_variance,
                               la.posterior_precision.diag(exponent=-1) if structure == "kron"
                               else (la.posterior_variance if structure == "diag"
                                     else torch.diagonal(la.posterior_covariance)))
    assert post.log_marginal_likelihood() == pytest.approx(float(la.log_marginal_likelihood()),
                                                           rel=1e-9)


def test_monte_carlo_ggn_diagonal_is_close_to_the_exact_one():
    model, x, y = _toy(n=60)
    tail, inputs, data = _toy_tail(model, x, y)
    kwargs = dict(prior_precision=1e-6, sigma_noise=1.0)
    exact = TailPosterior.fit_data(tail, data, curvature="exact", **kwargs)
    mc = TailPosterior.fit_data(tail, data, curvature="mc", mc_samples=64, **kwargs)
    h_exact, h_mc = exact.laplace.H, mc.laplace.H
    assert float((h_mc - h_exact).norm() / h_exact.norm()) < 0.1


@pytest.mark.parametrize("case", ["unet", "text"])
def test_row_by_row_exact_diagonal_equals_laplace_torchs_jacobians(case, tiny_unet,
                                                                   tiny_text_model, monkeypatch):
    """genunc's exact GGN diagonal (one row's outputs per batched backward, in chunks) is
    laplace-torch's jacrev diagonal: a regression UNet block (chunked: 16 outputs per pass)
    and a classification transformer block with attention (softmax output Hessian)."""
    from laplace.curvature import CurvlinopsGGN

    import genunc.posterior.laplace_tail as lt

    if case == "unet":
        unet = tiny_unet()
        adapter = DiffusersImageAdapter(unet, DDPMScheduler(num_train_timesteps=100))
        g = torch.Generator().manual_seed(0)
        batches = [{"x": torch.randn(4, 1, 8, 8, generator=g).clamp(-1, 1),
                    "class_labels": torch.randint(0, 3, (4,), generator=g)}]
        names = default_tail(unet, 1)
        monkeypatch.setattr(lt.ExactDiagGGN, "chunk_elements", 16 * 20_000)
    else:
        from genunc.adapters.text import MaskedDiffusionLMAdapter

        model = tiny_text_model(12, 6)
        adapter = MaskedDiffusionLMAdapter(model, "head", 11)
        g = torch.Generator().manual_seed(0)
        batches = [{"x": torch.randint(0, 10, (4, 6), generator=g)}]
        names = default_tail(model, 1)

    def fit(backend):
        monkeypatch.setattr(lt, "_backend", lambda *a, **k: ("exact", backend, {}))
        return TailPosterior.fit(adapter, batches, names, prior_precision=1.0, seed=0)

    ours, reference = fit(lt.ExactDiagGGN), fit(CurvlinopsGGN)
    assert ours.n_params > 1000
    torch.testing.assert_close(ours.laplace.H, reference.laplace.H, rtol=1e-4, atol=1e-6)
    assert float(ours.laplace.loss) == pytest.approx(float(reference.laplace.loss), rel=1e-5)


def test_kron_is_refused_for_norm_parameters(tiny_unet):
    unet = tiny_unet()
    tail = Tail(unet, default_tail(unet, 1))
    with pytest.raises(GenuncError, match="Linear and Conv2d"):
        TailPosterior.fit_data(tail, TailData(), structure="kron")


# ------------------------------------------------------------------ fitting on adapters
def _image_posterior(unet, names, **kwargs):
    adapter = DiffusersImageAdapter(unet, DDPMScheduler(num_train_timesteps=100))
    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(8, 1, 8, 8, generator=g).clamp(-1, 1),
             "class_labels": torch.randint(0, 3, (8,), generator=g)} for _ in range(2)]
    return adapter, TailPosterior.fit(adapter, data, names, **kwargs)


def test_image_tail_fit_by_marginal_likelihood(tiny_unet):
    unet = tiny_unet()
    adapter, post = _image_posterior(unet, default_tail(unet, 1), curvature="mc")
    assert post.n_params == sum(p.numel() for n in post.names
                                for p in unet.get_submodule(n).parameters())
    assert post.info["n_rows"] == 16 and post.info["curvature"] == "mc"
    assert post.info["prior_precision_method"] == "marglik" and post.prior_precision > 0
    draws = post.sample(3, seed=0, with_map=True)
    assert draws.with_map and len(draws) == 4
    for key, value in post.tail.parameters().items():  # draw 0 is the model's own tail
        torch.testing.assert_close(draws.params[key][0], value.detach())


def test_molecule_tail_draws_are_equivariant(tiny_molecule_model):
    model = tiny_molecule_model(n_layers=2)
    adapter = MoleculeAdapter(model, timesteps=50)
    batches = [dict(zip(("x", "node_mask"), _molecules(seed=s))) for s in range(2)]
    post = TailPosterior.fit(adapter, batches, default_tail(model, 1), curvature="mc",
                             mc_samples=2)
    assert set(post.sigma_noise) == {"positions", "features"}
    assert post.info["n_rows"] == 8  # one body pass per molecule (graph inputs do not split)
    draws = post.sample(3, seed=0)
    x, mask = _molecules(seed=5)
    t = torch.tensor([5, 10, 20, 40])
    rotation, shift = o3.rand_matrix(), torch.tensor([0.3, -1.0, 2.0])
    pos = (x[..., :3] @ rotation.T + shift) * mask[..., None]
    x_rot = torch.cat([pos, x[..., 3:]], -1)
    outs = []
    for xi in (x, x_rot):
        _, inputs = _record(post.tail, lambda xi=xi: adapter.denoise(xi, t, mask), 4)
        with torch.no_grad():
            outs.append(adapter.post_head(draws.apply(inputs), {"node_mask": mask}))
    drawn, drawn_rot = outs
    torch.testing.assert_close(drawn_rot[..., :3], drawn[..., :3] @ rotation.T, atol=2e-4,
                               rtol=1e-3)
    torch.testing.assert_close(drawn_rot[..., 3:], drawn[..., 3:], atol=2e-4, rtol=1e-3)
    assert (drawn[0] - drawn[1]).abs().max() > 1e-4


# ------------------------------------------------------------------ tied weights
def test_tied_head_is_untied_for_the_draws_or_refused(tiny_text_model):
    model = tiny_text_model(14, 10, tie_head=True)
    names = default_tail(model, 1)
    with pytest.raises(GenuncError, match="tied"):
        Tail(model, names, tied="error")
    tail = Tail(model, names)
    assert tail.tied == ["head.weight"]
    ids = torch.randint(0, 14, (2, 10))
    embedding = model.embed.weight.detach().clone()
    _, inputs = _record(tail, lambda: model(ids).logits, 2)
    params = _perturbed(tail, m=2, scale=0.1)
    with torch.no_grad():
        drawn = tail.apply(params, inputs)
        with tail.swapped({k: v[1] for k, v in params.items()}):
            # the body (the embedding) keeps its pretrained value while the tail's copy moves
            torch.testing.assert_close(model.embed.weight, embedding)
            swapped = model(ids).logits
    torch.testing.assert_close(model.head.weight, embedding)  # restored, still tied
    assert model.head.weight is model.embed.weight
    assert (swapped - drawn[1]).abs().max() <= 1e-5


# ------------------------------------------------------------------ save / load
def test_save_load_gives_identical_draws_and_refuses_other_tails(tiny_unet, tmp_path):
    unet = tiny_unet()
    _, post = _image_posterior(unet, default_tail(unet, 1), curvature="mc", mc_samples=2)
    post.save(tmp_path / "p")
    loaded = TailPosterior.load(tmp_path / "p", unet)
    a, b = post.sample(4, seed=3), loaded.sample(4, seed=3)
    for key in a.params:
        torch.testing.assert_close(a.params[key], b.params[key], rtol=0, atol=0)
    assert loaded.digest() == post.digest()
    assert loaded.sigma_noise == post.sigma_noise
    # another model's weights, or a posterior for another tail of this model
    with pytest.raises(FingerprintMismatchError, match="differ"):
        TailPosterior.load(tmp_path / "p", tiny_unet(seed=3))
    assert TailPosterior.load(tmp_path / "p", tiny_unet(seed=3), stale="none") is None
    _, other = _image_posterior(unet, default_tail(unet, 2), curvature="mc", mc_samples=2)
    other.save(tmp_path / "q")
    with pytest.raises(FingerprintMismatchError, match="tail"):
        check = TailPosterior.load(tmp_path / "q", unet)
        check.check_matches(unet)
        post.fingerprint, check.fingerprint = check.fingerprint, post.fingerprint
        post.check_matches(unet)
    assert TailPosterior.load(tmp_path / "missing", unet, missing="none") is None


# ------------------------------------------------------------------ Monte-Carlo variability
def test_monte_carlo_tail_variance_and_its_jackknife():
    from genunc.posterior.variance import MonteCarloTailVariance

    model, x, y = _toy()
    model = model.float()
    tail = Tail(model, ["1", "2"])
    _, inputs = _record(tail, lambda: model(x.float()), len(x))

    class Identity:
        def post_head(self, out, inputs):
            return out

    draws_flat = torch.cat([tail.flat_parameters()[None]] * 5) + 0.1 * torch.randn(5, tail.n_params)
    from genunc.posterior import TailDraws

    draws = TailDraws.from_flat(draws_flat, tail)
    with torch.no_grad():
        result = MonteCarloTailVariance(Identity(), draws)(inputs, {})
        outs = draws.apply(inputs).double()
    assert result.shape == (6, len(x), 2)
    torch.testing.assert_close(result[0], outs.var(0))
    torch.testing.assert_close(result[3], outs[[0, 1, 3, 4]].var(0))
    with pytest.raises(GenuncError, match="num_draws >= 3"):
        MonteCarloTailVariance(Identity(), draws[:2])


def test_kron_is_refused_for_a_transformer_block(tiny_text_model):
    model = tiny_text_model(14, 10)
    tail = Tail(model, default_tail(model, 1))
    with pytest.raises(GenuncError, match="MultiheadAttention") as err:
        TailPosterior.fit_data(tail, TailData(), structure="kron")
    assert "LayerNorm" in str(err.value) and "use structure='diag'" in str(err.value)


def test_attention_tails_run_one_call_per_draw_with_the_batched_result(tiny_text_model):
    model = tiny_text_model(14, 10)
    tail = Tail(model, default_tail(model, 1))
    assert tail.loop_draws  # vmap would fall back to its own slow loop for attention
    assert not Tail(model, ["norm", "head"]).loop_draws
    ids = torch.randint(0, 14, (3, 10))
    _, inputs = _record(tail, lambda: model(ids).logits, 3)
    params = _perturbed(tail, m=3)
    with torch.no_grad():
        looped = tail.apply(params, inputs)
        tail.loop_draws = False
        batched = tail.apply(params, inputs)
    torch.testing.assert_close(looped, batched, atol=1e-5, rtol=1e-5)
    assert (looped[0] - looped[1]).abs().max() > 1e-4
