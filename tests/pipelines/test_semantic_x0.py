"""The one-trajectory semantic score ``semantic_x0``: the scheduler's own clean-sample rule, the
floor of a collapsed posterior, own loop = wrapped pipeline, and no extra generation."""

import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)

from genunc import streams
from genunc.features import flatten_pixels
from genunc.pipelines import ImageUncertaintyPipeline
from genunc.pipelines.image_scores import ImageScoring, default_x0_steps
from genunc.sampling.clean import predicted_clean
from genunc.scores.semantic import mean_step_entropy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_from_pipe import build  # noqa: E402  (the tiny pipelines of the from_pipe tests)

FLOOR = 1e-3  # gaussian_entropy's variance floor


def _unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.fixture(scope="module")
def pair():
    """genunc's own loop and the wrapped DDIMPipeline on one UNet and one posterior."""
    unet, ddpm = _unet(), DDPMScheduler(num_train_timesteps=100)
    own = ImageUncertaintyPipeline(unet, ddpm, feature_extractor=flatten_pixels)
    own.fit_posterior(torch.rand(12, 1, 8, 8) * 2 - 1, progress=False)
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(ddpm.config))
    pipe.set_progress_bar_config(disable=True)
    wrapped = ImageUncertaintyPipeline.from_pipe(pipe, posterior=own.posterior,
                                                 feature_extractor=flatten_pixels)
    return own, wrapped


def _calls(own, wrapped, **common):
    a = own(num_samples=3, num_inference_steps=6, first_sample=4, progress=False, **common)
    b = wrapped(batch_size=3, num_inference_steps=6, output_type="np", first_sample=4,
                generator=streams.sample_generators(common.get("seed", 0), "initial_noise",
                                                    range(4, 7)), **common)
    return a, b


# ----------------------------------------------------------------------------- the x0 rule
@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DDPMScheduler])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip", ["none", "clip", "threshold"])
def test_x0_is_the_schedulers_pred_original_sample(scheduler_cls, prediction_type, clip):
    scheduler = scheduler_cls(num_train_timesteps=100, prediction_type=prediction_type,
                              clip_sample=clip == "clip", clip_sample_range=0.7,
                              thresholding=clip == "threshold", sample_max_value=0.9)
    scheduler.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(3, 2, 4, 4, generator=g) * 2
    outputs = torch.randn(4, 3, 2, 4, 4, generator=g)  # 4 predictions at one sample
    for t in scheduler.timesteps:
        ours = predicted_clean(scheduler, outputs, sample, t)
        for k in range(4):
            theirs = scheduler.step(outputs[k], t, sample,
                                    generator=torch.Generator().manual_seed(1)).pred_original_sample
            torch.testing.assert_close(ours[k], theirs, rtol=0, atol=1e-6)


def test_x0_is_the_flow_matching_steps_clean_sample():
    """FlowMatchEulerDiscreteScheduler returns no pred_original_sample; its Euler step is
    ``x + (sigma_next - sigma) v`` and its stochastic step's x0 is ``x - sigma v``: the clean
    sample that step implies is what genunc predicts, at the timestep the pipeline passes."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 4, 4, generator=g)
    outputs = torch.randn(3, 2, 4, 4, 4, generator=g)
    for i, t in enumerate(scheduler.timesteps):
        sigma, sigma_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
        ours = predicted_clean(scheduler, outputs, sample, t)
        for k in range(3):
            stepper = FlowMatchEulerDiscreteScheduler(shift=3.0)
            stepper.set_timesteps(4)
            stepper._step_index = i
            prev = stepper.step(outputs[k], t, sample).prev_sample
            implied = sample - sigma * (prev - sample) / (sigma_next - sigma)
            torch.testing.assert_close(ours[k], implied, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["ddim", "sd", "dit", "sd3"])
def test_the_maps_x0_in_a_wrapped_call_is_what_the_scheduler_predicts(kind, tmp_path, monkeypatch):
    """Through the head hook, under guidance, patch layouts (DiT, SD3), a learned variance
    (DiT) and flow matching (SD3): the MAP's recorded x0 at every step is the scheduler's own
    clean sample of that step of the plain call (recorded by spying on ``scheduler.step``)."""
    pipe, call, fit = build(kind, folder=tmp_path)
    upipe = ImageUncertaintyPipeline.from_pipe(pipe, feature_extractor=flatten_pixels)
    upipe.fit_posterior(fit.pop("images"), progress=False, **fit)
    scheduler, seen = pipe.scheduler, []
    original_step = type(scheduler).step

    def spy(self, model_output, timestep, sample, *args, **kwargs):
        index = getattr(self, "step_index", None) or 0
        out = original_step(self, model_output, timestep, sample, *args, **kwargs)
        if "FlowMatch" in type(self).__name__:  # x0 = x - sigma v
            seen.append(sample - self.sigmas[index] * model_output)
        else:  # (prev_sample, pred_original_sample) with return_dict=False
            seen.append(out[1] if isinstance(out, tuple) else out.pred_original_sample)
        return out

    captured = []
    original_add = ImageScoring.add_clean_scores
    monkeypatch.setattr(type(scheduler), "step", spy)
    monkeypatch.setattr(ImageScoring, "add_clean_scores",
                        lambda self, c, clean, decode=None: (captured.append(clean),
                                                             original_add(self, c, clean, decode)))
    out = upipe(generator=torch.Generator().manual_seed(0), output_type="pt", num_draws=3,
                scores=("semantic_x0",), x0_steps=[0, 1, 2], **call)
    clean = captured[0]
    assert clean.shape[:3] == (3, 4, 2) and np.isfinite(out.scores["semantic_x0"]).all()
    for step in range(3):
        expected = seen[step][: clean.shape[2]].float()
        torch.testing.assert_close(clean[step, 0], expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the score
def _collapse(posterior, monkeypatch):
    """Every draw is the posterior mean: the features of the M+1 predictions coincide."""
    sample = posterior.sample

    def at_the_mean(n, seed=None, with_map=False):
        draws = sample(n, seed=seed, with_map=with_map)
        return replace(draws, params={k: v[:1].expand_as(v).clone()
                                      for k, v in draws.params.items()})

    monkeypatch.setattr(posterior, "sample", at_the_mean)


def test_a_collapsed_posterior_gives_the_floor(pair, monkeypatch):
    own, wrapped = pair
    floor = 0.5 * 64 * math.log(2 * math.pi * math.e * FLOOR)  # 64 pixel features, zero variance
    shrunk = own.posterior.with_prior_precision(1e12)
    near = ImageUncertaintyPipeline(own.unet, own.adapter.scheduler, posterior=shrunk,
                                    feature_extractor=flatten_pixels)(
        4, num_draws=4, num_inference_steps=6, scores=("semantic_x0",), progress=False)
    np.testing.assert_allclose(near.scores["semantic_x0"], floor, rtol=1e-6)
    _collapse(own.posterior, monkeypatch)
    for out in _calls(own, wrapped, num_draws=4, scores=("semantic_x0", "semantic")):
        np.testing.assert_allclose(out.scores["semantic_x0"], floor, rtol=1e-14)  # rounding
        np.testing.assert_array_equal(out.scores["semantic_x0_se"], np.zeros(3))
        np.testing.assert_allclose(out.scores["semantic"], floor, rtol=1e-12)  # the same floor
    # and the fitted posterior is above it
    monkeypatch.undo()
    assert (_calls(own, wrapped, num_draws=4, scores=("semantic_x0",))[0]
            .scores["semantic_x0"] > floor + 1).all()


def test_own_loop_and_wrapped_pipeline_give_the_same_score(pair):
    own, wrapped = pair
    for steps in (None, [1, 4]):
        a, b = _calls(own, wrapped, num_draws=5, seed=3, scores=("semantic_x0",), x0_steps=steps)
        for name in ("semantic_x0", "semantic_x0_se"):
            np.testing.assert_allclose(b.scores[name], a.scores[name], rtol=1e-5, err_msg=name)
    assert not np.allclose(a.scores["semantic_x0"], _calls(own, wrapped, num_draws=5, seed=3,
                                                           scores=("semantic_x0",))[0]
                           .scores["semantic_x0"])  # the steps matter


def test_the_score_is_the_mean_entropy_of_the_steps_predictions(pair, monkeypatch):
    """By hand: the recorded (S, M+1, B, ...) predictions, clamped, featurised, the pipeline's
    entropy per step, their mean; the jackknife error from leaving out one draw at a time."""
    own, _ = pair
    captured = []
    original_add = ImageScoring.add_clean_scores
    monkeypatch.setattr(ImageScoring, "add_clean_scores",
                        lambda self, c, clean, decode=None: (captured.append(clean),
                                                             original_add(self, c, clean, decode)))
    out = own(3, num_draws=4, num_inference_steps=6, scores=("semantic_x0",), x0_steps=[2, 5],
              progress=False)
    feats = captured[0].clamp(-1, 1).flatten(3).double().numpy()  # (2, 5, 3, 64)
    per_step = [own.semantic_entropy(f) for f in feats]
    np.testing.assert_allclose(out.scores["semantic_x0"], np.mean(per_step, 0), rtol=1e-12)
    loo = np.stack([np.mean([own.semantic_entropy(np.delete(f, j, 0)) for f in feats], 0)
                    for j in range(1, 5)])
    np.testing.assert_allclose(out.scores["semantic_x0_se"],
                               np.sqrt(3 / 4 * ((loo - loo.mean(0)) ** 2).sum(0)), rtol=1e-12)
    assert mean_step_entropy(feats[:, :2], own.semantic_entropy)[1] is None  # M = 1: no error


def _counting(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def test_own_loop_images_and_backbone_calls_are_a_plain_calls(pair):
    own, _ = pair
    kwargs = dict(num_inference_steps=6, seed=2, progress=False)
    calls, handle = _counting(own.unet)
    try:
        plain = own(4, num_draws=0, scores=("random",), **kwargs)
        n_plain = len(calls)
        scored = own(4, num_draws=16, scores=("semantic_x0",), **kwargs)
    finally:
        handle.remove()
    torch.testing.assert_close(scored.images, plain.images, rtol=0, atol=0)
    assert len(calls) - n_plain == n_plain == 6 and scored.backbone_rows == plain.backbone_rows


@pytest.mark.parametrize("kind", ["ddpm", "sd", "dit"])
def test_wrapped_images_and_denoiser_calls_are_a_plain_calls(kind, tmp_path):
    pipe, call, fit = build(kind, folder=tmp_path)
    upipe = ImageUncertaintyPipeline.from_pipe(pipe, feature_extractor=flatten_pixels)
    upipe.fit_posterior(fit.pop("images"), progress=False, **fit)
    denoiser = upipe.adapter.model
    calls, handle = _counting(denoiser)
    try:
        plain = pipe(generator=torch.Generator().manual_seed(7), output_type="np", **call).images
        n_plain = len(calls)
        out = upipe(generator=torch.Generator().manual_seed(7), output_type="np", num_draws=16,
                    scores=("semantic_x0",), **call)
    finally:
        handle.remove()
    np.testing.assert_array_equal(out.images, plain)
    assert len(calls) - n_plain == n_plain
    assert out.scores["semantic_x0"].shape == (2,) and (out.scores["semantic_x0_se"] > 0).all()


def test_the_vae_decodes_no_more_latents_at_once_than_the_pipelines_own_call(tmp_path):
    """The M+1 clean predictions are decoded a batch at a time: SD's VAE decoder takes 0.96 GB
    for one 512 px image, 1.62 GB for two, so all (M+1) B latents at once take ~11 GB at M = 16."""
    pipe, call, fit = build("dit", folder=tmp_path)
    upipe = ImageUncertaintyPipeline.from_pipe(pipe, feature_extractor=flatten_pixels)
    upipe.fit_posterior(fit.pop("images"), progress=False, **fit)
    sizes = []
    handle = pipe.vae.decoder.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    try:
        pipe(generator=torch.Generator().manual_seed(7), output_type="np", **call)
        plain = list(sizes)
        upipe(generator=torch.Generator().manual_seed(7), output_type="np", num_draws=16,
              scores=("semantic_x0",), x0_steps=[1], **call)
    finally:
        handle.remove()
    assert plain == [2] and max(sizes) == 2 and sum(sizes) == 2 + 2 + 17 * 2  # plain, MAP, x0


def test_default_steps_and_bad_steps(pair):
    own, wrapped = pair
    assert default_x0_steps(50) == sorted(set(default_x0_steps(50)))
    assert all(0 <= i < 50 for i in default_x0_steps(50)) and default_x0_steps(1) == [0]
    with pytest.raises(Exception, match="x0_steps"):
        own(2, num_draws=2, num_inference_steps=6, scores=("semantic_x0",), x0_steps=[6],
            progress=False)
    with pytest.raises(Exception, match="x0_steps"):
        wrapped(batch_size=2, num_inference_steps=6, num_draws=2, scores=("semantic_x0",),
                x0_steps=[9])
    with pytest.raises(Exception, match="feature_extractor"):
        ImageUncertaintyPipeline(own.unet, own.adapter.scheduler, posterior=own.posterior)(
            2, num_draws=2, scores=("semantic_x0",), progress=False)


def test_per_step_entropies_come_back_and_average_to_the_score(pair):
    own, wrapped = pair
    for out in _calls(own, wrapped, num_draws=3, scores=("semantic_x0", "random"),
                      x0_steps=[0, 3, 5]):
        assert set(out.scores) == {"semantic_x0", "semantic_x0_se", "random"}
        assert out.semantic_x0_per_step.shape == (3, 3)
        np.testing.assert_allclose(out.semantic_x0_per_step.mean(0), out.scores["semantic_x0"],
                                   rtol=1e-12)
    assert own(2, num_draws=0, num_inference_steps=3, scores=("random",),
               progress=False).semantic_x0_per_step is None


def test_a_tail_posterior_gives_the_same_score_in_both_loops(pair):
    """A posterior over the last up-block and the head: the draws re-run that block on the MAP's
    recorded inputs (no extra backbone pass), in the own loop and through the wrapped pipeline."""
    own, wrapped = pair
    tail_own = ImageUncertaintyPipeline(own.unet, own.adapter.scheduler,
                                        feature_extractor=flatten_pixels)
    tail_own.fit_posterior(torch.rand(12, 1, 8, 8) * 2 - 1, progress=False, tail=1)
    tail_wrapped = ImageUncertaintyPipeline.from_pipe(wrapped.pipe, posterior=tail_own.posterior,
                                                      feature_extractor=flatten_pixels)
    a, b = _calls(tail_own, tail_wrapped, num_draws=3, seed=1, scores=("semantic_x0",))
    assert (a.scores["semantic_x0_se"] > 0).all()
    for name in ("semantic_x0", "semantic_x0_se"):
        np.testing.assert_allclose(b.scores[name], a.scores[name], rtol=1e-5, err_msg=name)


def test_a_scheduler_without_a_clean_sample_rule_is_refused():
    from genunc.errors import GenuncError

    class Bare:
        pass

    with pytest.raises(GenuncError, match="not a diffusers scheduler"):
        predicted_clean(Bare(), torch.zeros(1, 2), torch.zeros(1, 2), 10)
