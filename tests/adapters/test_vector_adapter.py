"""The vector adapter: a denoiser over vectors given a context, its training pairs, its head
posterior and the closed-form variance of its noise prediction."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from genunc.adapters import NoisePredictionAdapter, VectorDenoiserAdapter
from genunc.errors import GenuncError, ShapeMismatchError
from genunc.posterior import HeadPosterior, capture_head, collect_head_data
from genunc.zoo.toy import ToyVectorDenoiser

D, C = 3, 5


def _scheduler(steps=5):
    betas = np.linspace(0.05, 0.6, steps).tolist()
    return DDPMScheduler(num_train_timesteps=steps, trained_betas=betas, clip_sample=True)


@pytest.fixture
def adapter():
    torch.manual_seed(0)
    return VectorDenoiserAdapter(ToyVectorDenoiser(D, C, width=16).eval(), scheduler=_scheduler())


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(n, C, generator=g)
    return cond[:, :D].tanh() + 0.1 * torch.randn(n, D, generator=g), cond


def test_it_is_a_noise_prediction_adapter_with_the_schedulers_timesteps(adapter):
    assert isinstance(adapter, NoisePredictionAdapter)
    assert adapter.dim == D and adapter.cond_dim == C
    torch.testing.assert_close(adapter.alphas_cumprod, _scheduler().alphas_cumprod.double())
    x0, cond = _data(256)
    pairs = adapter.training_pairs((x0, cond), torch.Generator().manual_seed(0))
    assert set(pairs.inputs) == {"x", "t", "cond"} and pairs.mask is None
    assert pairs.inputs["x"].shape == (256, D) and pairs.target.shape == (256, D)
    assert pairs.inputs["t"].min() >= 0 and pairs.inputs["t"].max() == 4  # 5 train timesteps
    torch.testing.assert_close(pairs.inputs["cond"], cond)
    abar = adapter.alphas_cumprod[pairs.inputs["t"]].float()[:, None]
    torch.testing.assert_close(pairs.inputs["x"], abar.sqrt() * x0 + (1 - abar).sqrt() * pairs.target)


def test_tuples_and_dicts_are_the_same_batch(adapter):
    x0, cond = _data()
    a = adapter.training_pairs((x0, cond), torch.Generator().manual_seed(3))
    b = adapter.training_pairs({"x": x0, "cond": cond}, torch.Generator().manual_seed(3))
    for key in ("x", "t", "cond"):
        torch.testing.assert_close(a.inputs[key], b.inputs[key], rtol=0, atol=0)
    torch.testing.assert_close(a.target, b.target, rtol=0, atol=0)


def test_the_context_conditions_the_prediction(adapter):
    x, t = torch.randn(1, D).repeat(4, 1), torch.full((4,), 2)
    cond = torch.randn(2, C)[[0, 0, 1, 1]]  # rows 0, 1 share a context; 2, 3 share another
    with torch.no_grad():
        eps = adapter.denoise(x=x, t=t, cond=cond)
    assert eps.shape == (4, D)
    torch.testing.assert_close(eps[0], eps[1], rtol=0, atol=0)
    torch.testing.assert_close(eps[2], eps[3], rtol=0, atol=0)
    assert not torch.allclose(eps[0], eps[2])


def test_fit_and_the_map_draw_reproduces_the_model(adapter):
    x0, cond = _data(128)
    batches = [(x0[i:i + 32], cond[i:i + 32]) for i in range(0, 128, 32)]
    post = HeadPosterior.fit(adapter, batches, progress=False)
    assert post.head_name == "head" and post.n_data == 128 and post.prior_precision > 0
    pairs = adapter.training_pairs(batches[0], torch.Generator().manual_seed(0))
    with capture_head(adapter.head) as record, torch.no_grad():
        out = adapter.denoise(**pairs.inputs)
    mapped = post.sample(2, with_map=True).apply(record.features)[0]
    torch.testing.assert_close(mapped, out, rtol=1e-5, atol=1e-6)


def test_closed_form_variance_equals_the_variance_of_4000_draws_within_its_error(adapter):
    x0, cond = _data(128)
    post = HeadPosterior.fit(adapter, [(x0, cond)], progress=False, prior_precision=1.0)
    pairs = adapter.training_pairs((x0[:16], cond[:16]), torch.Generator().manual_seed(1))
    with capture_head(adapter.head) as record, torch.no_grad():
        adapter.denoise(**pairs.inputs)
    exact = adapter.head_output_variance(post, record.features, pairs.inputs).double()
    n = 4000
    mc = post.sample(n, seed=0).apply(record.features).double().var(0)
    assert exact.shape == (16, D)
    tolerance = 4 * exact * (2 / (n - 1)) ** 0.5  # four standard errors of a sample variance
    assert ((exact - mc).abs() <= tolerance).float().mean() > 0.99
    # the same closed form the generic route gives, and the score is its sum over dimensions
    torch.testing.assert_close(exact, post.output_variance(record.features, lambda o: o).double())
    torch.testing.assert_close(adapter.reduce_variance(exact, pairs.inputs)["variability"],
                               exact.sum(-1))


def test_collected_rows_are_one_per_vector(adapter):
    x0, cond = _data(40)
    data = collect_head_data(adapter, [(x0, cond)], repeats=2, progress=False)
    assert data.features.shape == (80, 16) and data.targets.shape == (80, D)


def test_a_schedule_is_given_once_and_the_head_is_linear():
    model = ToyVectorDenoiser(D, C, width=8)
    with pytest.raises(GenuncError, match="once"):
        VectorDenoiserAdapter(model, alphas_cumprod=torch.ones(5), scheduler=_scheduler())
    with pytest.raises(GenuncError, match="must be an nn.Linear"):
        VectorDenoiserAdapter(model, head_name="body")
    assert len(VectorDenoiserAdapter(model).alphas_cumprod) == 1000  # DDPM's default schedule


@pytest.mark.parametrize("batch, message", [
    ((torch.randn(8, D), torch.randn(8, C + 1)), r"cond must have shape \(B, 5\), got \(8, 6\)"),
    ((torch.randn(8, D), torch.randn(8)), r"cond must have shape \(B, 5\), got \(8,\)"),
    ((torch.randn(8, D), torch.randn(7, C)), "cond has 7 rows for 8 vectors"),
    ((torch.randn(8, D + 1), torch.randn(8, C)), r"x must have shape \(B, 3\), got \(8, 4\)"),
    ({"x": torch.randn(8, D)}, "lacks \\['cond'\\]"),
    (torch.randn(8, D), "an \\(x0, cond\\) pair or a dict"),
])
def test_bad_batches_are_one_line_errors(adapter, batch, message):
    with pytest.raises(ShapeMismatchError, match=message) as info:
        adapter.training_pairs(batch, torch.Generator().manual_seed(0))
    assert "\n" not in str(info.value)
