"""The diffusers image pipeline: fit, save/reload, score, and check scores against direct loops."""

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch.func import functional_call

from genunc import streams
from genunc.errors import FingerprintMismatchError, GenuncError
from genunc.features import flatten_pixels
from genunc.pipelines import ImageUncertaintyPipeline
from genunc.posterior import POSTERIOR_DIR, HeadPosterior

STEPS = 6


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_ddpm_folder):
    """A tiny class-conditional DDPM saved with save_pretrained, with its posterior beside it."""
    path = tiny_ddpm_folder(tmp_path_factory.mktemp("tiny_ddpm"))
    pipe = ImageUncertaintyPipeline.from_pretrained(path, feature_extractor=flatten_pixels)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(32, 1, 8, 8, generator=g).clamp(-1, 1)
    pipe.fit_posterior((images, torch.randint(0, 3, (32,), generator=g)), progress=False)
    pipe.posterior.save(path / POSTERIOR_DIR)
    return path


@pytest.fixture
def pipe(saved):
    return ImageUncertaintyPipeline.from_pretrained(saved, feature_extractor=flatten_pixels)


def test_reload_from_directory_gets_the_posterior(saved, pipe):
    assert pipe.posterior is not None and pipe.posterior.head_name == "conv_out"
    assert isinstance(pipe.sampling_scheduler, DDIMScheduler)


def test_scores_have_the_right_shape_and_are_seed_deterministic(pipe):
    kwargs = dict(num_draws=3, num_inference_steps=STEPS, chunk_size=4, progress=False,
                  scores=("semantic", "variability", "pixel_variance", "random"))
    a, b = pipe(10, seed=5, **kwargs), pipe(10, seed=5, **kwargs)
    c = pipe(10, seed=6, **kwargs)
    assert a.images.shape == (10, 1, 8, 8)
    assert a.class_labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    for name in kwargs["scores"]:
        assert a.scores[name].shape == (10,) and np.isfinite(a.scores[name]).all()
        np.testing.assert_array_equal(a.scores[name], b.scores[name])
        assert not np.allclose(a.scores[name], c.scores[name])
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)


def test_semantic_score_is_the_entropy_of_the_generations_features(pipe):
    out = pipe(6, num_draws=4, num_inference_steps=STEPS, scores=("semantic",), progress=False,
               keep_draw_images=True)
    feats = torch.cat([out.images[None], out.draw_images]).flatten(2).double().numpy()
    var = feats.var(axis=0, ddof=1) + 1e-3
    expected = 0.5 * np.log(2 * np.pi * np.e * var).sum(axis=1)
    np.testing.assert_allclose(out.scores["semantic"], expected, rtol=1e-10)


def _swap(unet, draws, m):
    return {f"conv_out.{k}": v[m] for k, v in draws.params.items()}


def _reference_generation(pipe, x_T, labels, params=None, variability_draws=None):
    """Slow reference: one full model per head draw, scheduler stepped by hand."""
    scheduler = copy.deepcopy(pipe.sampling_scheduler)
    scheduler.set_timesteps(STEPS)
    x, per_step = x_T.clone(), []
    for t in scheduler.timesteps:
        tt = t.expand(x.shape[0])
        with torch.no_grad():
            def call(p, x=x, tt=tt):
                return functional_call(pipe.unet, p, (x, tt), {"class_labels": labels}).sample

            eps = call(params or {})
            if variability_draws is not None:
                stack = torch.stack([call(_swap(pipe.unet, variability_draws, m))
                                     for m in range(len(variability_draws))])
                per_step.append(stack.double().var(0).flatten(1).mean(1))
        x = scheduler.step(eps, t, x).prev_sample
    return x, (torch.stack(per_step).mean(0) if per_step else None)


def test_batched_draws_equal_a_loop_of_full_models(pipe):
    out = pipe(4, num_draws=3, num_inference_steps=STEPS, scores=("semantic", "variability"),
               variance="monte_carlo", progress=False, keep_draw_images=True, seed=2)
    x_T = streams.randn_rows((1, 8, 8), streams.sample_generators(2, "initial_noise", range(4)))
    draws = pipe.posterior.sample(3, seed=streams.torch_generator(2, "head_draws"))
    images, variability = _reference_generation(pipe, x_T, out.class_labels,
                                                variability_draws=draws)
    torch.testing.assert_close(out.images, images, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.scores["variability"], variability.numpy(), rtol=1e-4)
    for m in range(3):
        perturbed, _ = _reference_generation(pipe, x_T, out.class_labels, _swap(pipe.unet, draws, m))
        torch.testing.assert_close(out.draw_images[m], perturbed, rtol=1e-4, atol=1e-4)


def test_exact_variability_is_the_mean_of_monte_carlo_estimates(pipe):
    """Per step, the closed form equals the variance of many draws (relative standard error
    sqrt(2 / (M - 1)) per element, smaller after averaging over pixels)."""
    kwargs = dict(num_inference_steps=STEPS, scores=("variability",), progress=False, seed=4)
    exact = pipe(3, num_draws=0, **kwargs)
    many = pipe(3, num_draws=3000, variance="monte_carlo", **kwargs)
    assert exact.variability_per_step["variability"].shape == (STEPS, 3)
    np.testing.assert_allclose(many.variability_per_step["variability"],
                               exact.variability_per_step["variability"], rtol=4 * (2 / 2999) ** 0.5)
    clean = pipe(3, num_draws=0, variability_target="clean", **kwargs)
    abar = pipe.adapter.alphas_cumprod.double().numpy()[exact.variability_timesteps]
    np.testing.assert_allclose(clean.scores["variability"],
                               (exact.variability_per_step["variability"]
                                * ((1 - abar) / abar)[:, None]).mean(0), rtol=1e-12)


def test_branching_shares_the_prefix(pipe):
    full = pipe(4, num_draws=2, num_inference_steps=STEPS, scores=("semantic",), progress=False,
                keep_draw_images=True)
    late = pipe(4, num_draws=2, num_inference_steps=STEPS, scores=("semantic",), progress=False,
                keep_draw_images=True, branch_at=STEPS)
    never = late.draw_images - late.images[None]
    assert never.abs().max() == 0  # branching after the last step: the draws never diverge
    assert late.backbone_rows < full.backbone_rows
    mid = pipe(4, num_draws=2, num_inference_steps=STEPS, scores=("semantic",), progress=False,
               branch_at=STEPS // 2)
    assert (mid.scores["semantic"] < full.scores["semantic"]).mean() > 0.5
    assert mid.backbone_rows == 4 * (STEPS // 2) + 3 * 4 * (STEPS - STEPS // 2)


def test_bad_requests_fail_clearly(pipe, saved, tiny_unet):
    with pytest.raises(GenuncError, match=r"need num_draws >= 1, got 0"):
        pipe(2, num_draws=0, num_inference_steps=2, progress=False)
    with pytest.raises(GenuncError, match=r"\['variability'\] need num_draws >= 2, got 1"):
        pipe(2, num_draws=1, num_inference_steps=2, scores=("semantic", "variability"),
             variance="monte_carlo", progress=False)
    assert pipe(2, num_draws=1, num_inference_steps=2, scores=("semantic",),
                progress=False).scores["semantic"].shape == (2,)
    with pytest.raises(GenuncError, match="num_inference_steps must be at least 1, got 0"):
        pipe(2, num_inference_steps=0, progress=False)
    with pytest.raises(GenuncError, match="list of names"):
        pipe(2, scores="semantic", progress=False)
    with pytest.raises(GenuncError, match="branch_at must lie in \\[0, 2\\], got 3"):
        pipe(2, num_inference_steps=2, branch_at=3, progress=False)
    with pytest.raises(GenuncError, match="variability_steps \\[5\\] lie outside the 2 steps"):
        pipe(2, num_inference_steps=2, variability_steps=[0, 5], progress=False)
    with pytest.raises(GenuncError, match="unknown scores"):
        pipe(2, scores=("vibes",), progress=False)
    with pytest.raises(GenuncError, match="class labels must lie"):
        pipe(2, class_labels=[0, 7], progress=False)
    other = ImageUncertaintyPipeline(tiny_unet(seed=1), DDPMScheduler(num_train_timesteps=100))
    with pytest.raises(FingerprintMismatchError):
        other.posterior = pipe.posterior
    with pytest.raises(FingerprintMismatchError):
        HeadPosterior.load(saved / POSTERIOR_DIR, tiny_unet(seed=1))
    bare = ImageUncertaintyPipeline(tiny_unet(), DDPMScheduler(num_train_timesteps=100))
    with pytest.raises(GenuncError, match="no posterior"):
        bare(2, progress=False)


def test_skip_up_blocks_are_refused():
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "SkipDownBlock2D"),
                       up_block_types=("SkipUpBlock2D", "UpBlock2D"))
    with pytest.raises(GenuncError, match="skip branch"):
        ImageUncertaintyPipeline(unet, DDPMScheduler(num_train_timesteps=100))


def test_unet2d_condition_model_with_encoder_states():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=6,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    pipe = ImageUncertaintyPipeline(unet, DDPMScheduler(num_train_timesteps=100),
                                    feature_extractor=flatten_pixels)
    ctx = torch.randn(16, 3, 6)
    pipe.fit_posterior([{"x": torch.randn(16, 1, 8, 8).clamp(-1, 1), "encoder_hidden_states": ctx}],
                       repeats=1, progress=False)
    out = pipe(4, encoder_hidden_states=ctx[:4], num_draws=2, num_inference_steps=3,
               scores=("semantic", "variability"), progress=False)
    assert out.scores["semantic"].shape == (4,) and np.isfinite(out.scores["variability"]).all()
    with pytest.raises(ValueError, match="encoder_hidden_states must have 4 rows"):
        pipe(4, encoder_hidden_states=ctx[:3], num_draws=2, num_inference_steps=3, progress=False)


def test_a_bfloat16_backbone_keeps_draws_and_scores_in_full_precision(pipe):
    """Autocast covers the backbone alone: the images stay close to float32's, and the scores
    are those of the (reduced-precision) features in full precision."""
    kwargs = dict(num_draws=3, num_inference_steps=STEPS, progress=False, seed=2,
                  scores=("semantic", "variability", "pixel_variance"))
    full = pipe(6, **kwargs)
    half = pipe(6, precision="bfloat16", **kwargs)
    assert half.images.dtype == torch.float32
    assert (half.images - full.images).abs().max() < 0.1  # bfloat16 keeps ~3 digits
    for name in kwargs["scores"]:
        assert np.isfinite(half.scores[name]).all()
    np.testing.assert_allclose(half.scores["variability"], full.scores["variability"], rtol=0.05)
    with pytest.raises(GenuncError, match="precision must be one of"):
        pipe(2, precision="float8", **kwargs)


def test_draws_on_half_precision_features_are_computed_in_float32(pipe):
    draws = pipe.posterior.sample(3, seed=0)
    features = torch.randn(2, 8, 8, 8)
    half = features.to(torch.bfloat16)
    out = draws.apply(half)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, draws.apply(half.float()), rtol=0, atol=0)
    variance = pipe.posterior.output_variance(half)
    assert variance.dtype == torch.float32
    torch.testing.assert_close(variance, pipe.posterior.output_variance(half.float()))
