"""Wrapping the user's own diffusers pipeline: the images are ``pipe(...)``'s, the scores sound.

Every pipeline is a tiny random-config model built here (no hub): DDPM, DDIM, Stable Diffusion
(UNet + VAE + CLIP text encoder), DiT (learned sigma), PixArt-alpha (T5, learned sigma) and
Stable Diffusion 3 (flow matching, two CLIP encoders, with and without the T5 encoder).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from genunc.errors import FingerprintMismatchError, GenuncError, HeadNotFoundError
from genunc.features import flatten_pixels
from genunc.pipelines import ImageUncertaintyPipeline
from genunc.posterior.capture import capture_head

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PROMPTS = ["a cat", "dog"]


# ----------------------------------------------------------------------------- tiny pipelines
def _clip_tokenizer(folder: Path, max_length: int = 8) -> CLIPTokenizer:
    """A CLIPTokenizer over letters (no merges), written to `folder`: no download (also
    benchmarks/bench_real_size.py's, at SD's 77 tokens)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                         model_max_length=max_length)


def _clip_text(projection: bool = False) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=60, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=8, projection_dim=16,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5():
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -1.0) for c in LETTERS]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=8)
    encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=16,
                                      num_layers=1, num_heads=2,
                                      relative_attention_num_buckets=4)).eval()
    return tokenizer, encoder


def _vae(**extra) -> AutoencoderKL:
    """One block, no downsampling: latents are as large as the images."""
    return AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), norm_num_groups=4, sample_size=8,
                         layers_per_block=1, **extra).eval()


def _ddim() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=100, steps_offset=1, clip_sample=False)


def _unet2d() -> UNet2DModel:
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def build(kind: str, seed: int = 0, folder: Path | None = None):
    """A tiny pipeline of `kind`, its call arguments and its posterior-fitting arguments."""
    torch.manual_seed(seed)
    folder = folder or Path("/nonexistent")
    steps = 3
    if kind in ("ddpm", "ddim"):
        cls, sched = ((DDPMPipeline, DDPMScheduler(num_train_timesteps=100)) if kind == "ddpm"
                      else (DDIMPipeline, _ddim()))
        pipe = cls(unet=_unet2d(), scheduler=sched)
        call = dict(batch_size=2, num_inference_steps=steps)
        fit = dict(images=torch.rand(8, 1, 8, 8) * 2 - 1)
    elif kind == "sd":
        unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8,
                                    in_channels=4, out_channels=4, norm_num_groups=4,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=16, attention_head_dim=2).eval()
        pipe = StableDiffusionPipeline(unet=unet, scheduler=_ddim(), vae=_vae(),
                                       text_encoder=_clip_text(), tokenizer=_clip_tokenizer(folder),
                                       safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        call = dict(prompt=PROMPTS, guidance_scale=7.5, num_inference_steps=steps, height=8, width=8)
        fit = dict(images=torch.rand(8, 3, 8, 8) * 2 - 1, prompts=PROMPTS * 4)
    elif kind == "dit":
        transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4,
                                            in_channels=4, out_channels=8, num_layers=1,
                                            sample_size=8, patch_size=2, norm_num_groups=4,
                                            num_embeds_ada_norm=1000).eval()
        pipe = DiTPipeline(transformer=transformer, vae=_vae(), scheduler=_ddim())
        call = dict(class_labels=[1, 2], guidance_scale=3.0, num_inference_steps=steps)
        fit = dict(images=torch.rand(8, 3, 8, 8) * 2 - 1, class_labels=[1, 2, 3, 4] * 2)
    elif kind == "pixart":
        transformer = PixArtTransformer2DModel(
            sample_size=8, num_layers=1, patch_size=2, attention_head_dim=4, num_attention_heads=2,
            caption_channels=32, in_channels=4, cross_attention_dim=8, out_channels=8,
            attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6).eval()
        tokenizer, encoder = _t5()
        pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder,
                                   transformer=transformer, vae=_vae(), scheduler=_ddim())
        call = dict(prompt=PROMPTS, guidance_scale=3.0, num_inference_steps=steps, height=8,
                    width=8, use_resolution_binning=False, clean_caption=False)
        fit = dict(images=torch.rand(8, 3, 8, 8) * 2 - 1, prompts=PROMPTS * 4)
    elif kind in ("sd3", "sd3_t5"):
        transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4,
                                            num_layers=1, attention_head_dim=8,
                                            num_attention_heads=2, joint_attention_dim=32,
                                            caption_projection_dim=16, pooled_projection_dim=32,
                                            out_channels=4).eval()
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=_vae(shift_factor=0.06, scaling_factor=1.5),
            text_encoder=_clip_text(True), tokenizer=_clip_tokenizer(folder / "1"),
            text_encoder_2=_clip_text(True), tokenizer_2=_clip_tokenizer(folder / "2"),
            **(dict(zip(("tokenizer_3", "text_encoder_3"), _t5())) if kind == "sd3_t5" else
               dict(text_encoder_3=None, tokenizer_3=None)))
        call = dict(prompt=PROMPTS, guidance_scale=3.0, num_inference_steps=steps, height=8, width=8)
        fit = dict(images=torch.rand(8, 3, 8, 8) * 2 - 1, prompts=PROMPTS * 4)
    else:
        raise ValueError(kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe, call, fit


KINDS = ["ddpm", "ddim", "sd", "dit", "pixart", "sd3", "sd3_t5"]
ALL_SCORES = ("semantic", "variability", "pixel_variance", "random")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """``fitted(kind)``: (pipe, wrapper with a fitted posterior, call kwargs), built once."""
    cache = {}

    def get(kind):
        if kind not in cache:
            pipe, call, fit = build(kind, folder=tmp_path_factory.mktemp(kind))
            upipe = ImageUncertaintyPipeline.from_pipe(pipe, feature_extractor=flatten_pixels)
            images = fit.pop("images")
            upipe.fit_posterior(images, progress=False, **fit)
            cache[kind] = pipe, upipe, call
        return cache[kind]

    return get


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ----------------------------------------------------------------------------- equality + scores
@pytest.mark.parametrize("kind", KINDS)
def test_images_are_the_pipelines_and_scores_are_reproducible(fitted, kind):
    pipe, upipe, call = fitted(kind)
    assert isinstance(upipe, ImageUncertaintyPipeline)  # from_pipe: a member of its family
    output_type = "np" if kind in ("ddpm", "ddim") else "pt"  # DDPM/DDIM return numpy for "pt"
    reference = pipe(generator=_g(3), output_type=output_type, **call).images
    a = upipe(generator=_g(3), output_type=output_type, num_draws=2, scores=ALL_SCORES, **call)
    b = upipe(generator=_g(3), output_type=output_type, num_draws=2, scores=ALL_SCORES, **call)
    assert type(a.images) is type(reference)
    assert _max_diff(a.images, reference) <= 1e-5
    for name in ALL_SCORES:
        assert a.scores[name].shape == (2,) and np.isfinite(a.scores[name]).all()
        np.testing.assert_array_equal(a.scores[name], b.scores[name])
    assert a.variability_per_step["variability"].shape == (3, 2)  # one row per denoiser call
    assert (a.scores["variability"] > 0).all() and (a.scores["pixel_variance"] > 0).all()
    c = upipe(generator=_g(4), output_type=output_type, num_draws=2, scores=ALL_SCORES, **call)
    assert not np.allclose(a.scores["variability"], c.scores["variability"])


@pytest.mark.parametrize("kind", KINDS)
def test_a_collapsed_posterior_gives_identical_generations(fitted, kind):
    """Same x_T and the same sampler noise for every draw (DDPM is stochastic): with the
    posterior shrunk to its mean, all M+1 generations coincide; with the fitted one they do not."""
    pipe, upipe, call = fitted(kind)
    collapsed = ImageUncertaintyPipeline.from_pipe(
        pipe, posterior=upipe.posterior.with_prior_precision(1e12), feature_extractor=flatten_pixels)
    for wrapper, identical in ((collapsed, True), (upipe, False)):
        out = wrapper(generator=_g(1), output_type="np", num_draws=2, keep_draw_images=True,
                      scores=("pixel_variance",), **call)
        gaps = [_max_diff(d, out.images) for d in out.draw_images]
        assert all(g <= 1e-5 for g in gaps) == identical, gaps


@pytest.mark.parametrize("scheduler", [DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler])
def test_a_swapped_scheduler_keeps_equality_and_shared_noise(fitted, scheduler):
    pipe, upipe, call = fitted("sd")
    original = pipe.scheduler
    try:
        pipe.scheduler = scheduler.from_config(original.config)
        reference = pipe(generator=_g(2), output_type="np", **call).images
        collapsed = ImageUncertaintyPipeline.from_pipe(
            pipe, posterior=upipe.posterior.with_prior_precision(1e12))
        out = collapsed(generator=_g(2), output_type="np", num_draws=2, keep_draw_images=True,
                        scores=("variability", "pixel_variance"), **call)
    finally:
        pipe.scheduler = original
    assert _max_diff(out.images, reference) <= 1e-5
    assert max(_max_diff(d, reference) for d in out.draw_images) <= 1e-5


def test_several_images_per_prompt_and_tuple_outputs(fitted):
    pipe, upipe, call = fitted("sd")
    kwargs = dict(call, num_images_per_prompt=2, output_type="np", return_dict=False)
    reference = pipe(generator=_g(6), **kwargs)
    out = upipe(generator=_g(6), num_draws=2, scores=ALL_SCORES, **kwargs)
    assert isinstance(out.pipeline_output, tuple) and _max_diff(out.images, reference[0]) <= 1e-5
    assert all(values.shape == (4,) for values in out.scores.values())


def test_without_a_generator_the_seed_fixes_the_noise(fitted):
    pipe, upipe, call = fitted("ddpm")
    a, b = (upipe(seed=7, num_draws=1, scores=("pixel_variance",), **call) for _ in range(2))
    c = upipe(seed=8, num_draws=1, scores=("pixel_variance",), **call)
    assert _max_diff(a.images, b.images) == 0 and _max_diff(a.images, c.images) > 1e-3


def test_the_users_generator_advances_as_in_a_plain_call(fitted):
    pipe, upipe, call = fitted("ddpm")
    g_plain, g_wrapped = _g(5), _g(5)
    pipe(generator=g_plain, **call)
    upipe(generator=g_wrapped, num_draws=2, scores=("semantic",), **call)
    assert torch.equal(g_plain.get_state(), g_wrapped.get_state())


def test_pil_output_is_returned_as_is_and_scored(fitted):
    pipe, upipe, call = fitted("sd")
    out = upipe(generator=_g(0), num_draws=2, scores=("semantic", "pixel_variance"), **call)
    reference = pipe(generator=_g(0), **call)
    assert [np.asarray(i).tolist() for i in out.images] == \
        [np.asarray(i).tolist() for i in reference.images]
    assert out.nsfw_content_detected == reference.nsfw_content_detected  # read through
    assert np.isfinite(out.scores["semantic"]).all()


# ----------------------------------------------------------------------------- guided variability
def _one_step_check(pipe, upipe, call, cond_first: bool):
    """The wrapper's exact variability of one guided step vs the Monte-Carlo variance of the
    guided prediction over many head draws, on the head input the pipeline produced."""
    adapter, posterior = upipe.adapter, upipe.posterior
    kwargs = {**call, "num_inference_steps": 1, "output_type": "np"}
    stepped = []
    step = pipe.scheduler.step

    def spy(model_output, *args, **kw):
        stepped.append(model_output)
        return step(model_output, *args, **kw)

    pipe.scheduler.step = spy
    try:
        with capture_head(adapter.head, keep_output=True) as record:
            pipe(generator=_g(0), **kwargs)
    finally:
        del pipe.scheduler.step
    phi, head_out = record.features.float(), record.output.float()
    scale = call["guidance_scale"]

    def guide(out):  # the pipeline's rule, written out: uncond + s (cond - uncond)
        batch_axis = out.dim() - (4 if adapter.patch_size is None else 3)  # (C, H, W) | (T, O)
        first, second = out.chunk(2, dim=batch_axis)
        cond, uncond = (first, second) if cond_first else (second, first)
        return uncond + scale * (cond - uncond)

    # the rule reproduces what the sampler was given (the half the scheduler steps with)
    guided_map = adapter.prediction_part(guide(head_out))
    stepped_map = adapter.prediction_part(adapter.to_head_layout(torch.cat(
        [stepped[0], torch.zeros_like(stepped[0])], 1) if adapter.learned_sigma else stepped[0]))
    torch.testing.assert_close(guided_map, stepped_map[: guided_map.shape[0]], rtol=1e-4,
                               atol=1e-5)

    draws = posterior.sample(4000, seed=0)
    guided = guide(draws.apply(phi))  # (K, N, ...)
    monte_carlo = adapter.prediction_part(guided.flatten(0, 1)).reshape(
        guided.shape[0], guided.shape[1], -1).double().var(0).mean(-1)
    exact = upipe(generator=_g(0), num_draws=1, scores=("variability",), **kwargs).scores
    np.testing.assert_allclose(exact["variability"], monte_carlo.numpy(), rtol=0.05)
    return exact["variability"], monte_carlo


def test_guided_variability_matches_monte_carlo_uncond_first(fitted):
    pipe, upipe, call = fitted("sd")
    _one_step_check(pipe, upipe, call, cond_first=False)


def test_guided_variability_matches_monte_carlo_dit_cond_first(fitted):
    pipe, upipe, call = fitted("dit")
    _one_step_check(pipe, upipe, call, cond_first=True)


def test_the_guided_variance_differs_from_the_unguided_one(fitted):
    pipe, upipe, call = fitted("sd")
    guided = upipe(generator=_g(0), num_draws=1, scores=("variability",), **call)
    plain = upipe(generator=_g(0), num_draws=1, scores=("variability",),
                  **{**call, "guidance_scale": 1.0})
    assert not np.allclose(guided.scores["variability"], plain.scores["variability"], rtol=0.05)


# ----------------------------------------------------------------------------- fitting pairs
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_fitting_targets_are_what_the_sampler_reads_back(tmp_path, prediction_type):
    """A perfect prediction of the target, handed to the scheduler, recovers the clean latents."""
    from genunc.adapters.pipeline import DiffusersPipelineAdapter

    pipe, _, _ = build("sd", folder=tmp_path)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    adapter = DiffusersPipelineAdapter(pipe)
    x0 = torch.randn(4, 4, 8, 8)
    pairs = adapter.training_pairs({"x": x0}, _g(0))
    pipe.scheduler.set_timesteps(10)
    for i in range(4):
        step = pipe.scheduler.step(pairs.target[i : i + 1], int(pairs.inputs["t"][i]),
                                   pairs.inputs["x"][i : i + 1])
        torch.testing.assert_close(step.pred_original_sample, x0[i : i + 1], rtol=1e-4, atol=1e-4)


def test_flow_matching_targets_are_the_velocity_the_euler_step_integrates(tmp_path):
    """SD3 convention: x_t = (1 - s) x0 + s eps, target eps - x0, timestep = 1000 s (shifted
    sigmas); one Euler step from s to 0 with the true velocity lands on x0."""
    from genunc.adapters.pipeline import DiffusersPipelineAdapter

    pipe, _, _ = build("sd3", folder=tmp_path)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    adapter = DiffusersPipelineAdapter(pipe)
    x0 = torch.randn(64, 4, 8, 8)
    pairs = adapter.training_pairs({"x": x0}, _g(0))
    sigma = (pairs.inputs["t"] / 1000).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(pairs.inputs["x"] - sigma * pairs.target, x0, rtol=1e-4, atol=1e-4)
    assert float(sigma.median()) > 0.6  # shift 3 puts most training sigmas at high noise


def test_a_model_that_changes_the_heads_output_cannot_be_fitted():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4, time_embedding_type="fourier",
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    upipe = ImageUncertaintyPipeline.from_pipe(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()))
    with pytest.raises(GenuncError, match="changes the output"):
        upipe.fit_posterior(torch.rand(4, 1, 8, 8) * 2 - 1, progress=False)


# ----------------------------------------------------------------------------- refusals
def test_a_posterior_from_another_pipeline_is_refused(fitted, tmp_path):
    _, sd_upipe, _ = fitted("sd")
    other, _, _ = build("sd", seed=1, folder=tmp_path)
    with pytest.raises(FingerprintMismatchError):
        ImageUncertaintyPipeline.from_pipe(other, posterior=sd_upipe.posterior)
    ddpm, _, _ = fitted("ddpm")
    with pytest.raises(FingerprintMismatchError):
        ImageUncertaintyPipeline.from_pipe(ddpm, posterior=sd_upipe.posterior)


def test_a_failing_call_leaves_no_hook_behind(fitted):
    pipe, upipe, call = fitted("sd")
    with pytest.raises(ValueError):
        upipe(num_draws=2, scores=ALL_SCORES, **{**call, "height": 7})  # the pipeline refuses
    assert not upipe.adapter.head._forward_hooks and not upipe.model._forward_pre_hooks


def test_max_rows_stops_collecting(fitted, tmp_path):
    pipe, _, fit = build("dit", folder=tmp_path)
    upipe = ImageUncertaintyPipeline.from_pipe(pipe)
    calls = []
    handle = upipe.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        posterior = upipe.fit_posterior(fit.pop("images"), batch_size=2, repeats=1, max_rows=40,
                                        progress=False, **fit)
    finally:
        handle.remove()
    assert posterior.n_data == 40
    assert len(calls) == 2  # 32 token rows per batch of two images: the third batch never runs


def test_clear_errors(fitted):
    pipe, upipe, call = fitted("sd")
    with pytest.raises(GenuncError, match="unknown scores"):
        upipe(num_draws=2, scores=("semantc",), **call)
    with pytest.raises(GenuncError, match="num_draws >= 1"):
        upipe(num_draws=0, scores=("semantic",), **call)
    with pytest.raises(GenuncError, match="feature_extractor"):
        ImageUncertaintyPipeline.from_pipe(pipe, posterior=upipe.posterior)(
            num_draws=2, scores=("semantic",), **call)
    with pytest.raises(GenuncError, match="no posterior"):
        ImageUncertaintyPipeline.from_pipe(pipe)(num_draws=2, scores=("variability",), **call)
    with pytest.raises(GenuncError, match="guidance_rescale .* use variance='monte_carlo'"):
        upipe(num_draws=2, scores=("variability",), guidance_rescale=0.7, **call)
    with pytest.raises(HeadNotFoundError, match="conv_outt"):
        ImageUncertaintyPipeline.from_pipe(pipe, head_name="conv_outt")
    with pytest.raises(HeadNotFoundError, match="denoiser"):
        ImageUncertaintyPipeline.from_pipe(object())
    with pytest.raises(GenuncError, match="pass prompts"):
        upipe.fit_posterior(torch.zeros(2, 3, 8, 8), progress=False)


# ----------------------------------------------------------------------------- the example
def test_the_stable_diffusion_example_fits_saves_and_reloads(tmp_path):
    import importlib.util

    from PIL import Image

    pipe, _, _ = build("sd", folder=tmp_path / "tok")
    pipe.save_pretrained(tmp_path / "model")
    fit_dir = tmp_path / "fit"
    fit_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(fit_dir / f"{i}.png")
    (fit_dir / "captions.txt").write_text("a cat\ndog\na dog\ncat\n")
    spec = importlib.util.spec_from_file_location(
        "sd_example", Path(__file__).resolve().parents[1] / "examples" / "stable_diffusion.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = [str(tmp_path / "model"), "--prompts", *PROMPTS, "--num-draws", "2", "--steps", "2",
            "--device", "cpu", "--height", "8", "--width", "8"]
    first = example.main([*argv, "--fit-images", str(fit_dir), "--out", str(tmp_path / "a")])
    assert (tmp_path / "model" / "genunc_posterior").is_dir()
    again = example.main([*argv, "--out", str(tmp_path / "b")])  # loads the saved posterior
    assert first == again and all(len(v) == 2 for v in first.values())
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == \
        ["0000.png", "0001.png", "scores.csv", "scores.json"]


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_both_halves_of_a_guided_batch_share_one_draw(fitted, monkeypatch, kind):
    """Under classifier-free guidance every head call of a draw's generation sees the whole
    [uncond; cond] batch and applies one parameter set to it: the halves cannot differ."""
    from genunc.posterior import HeadDraws

    pipe, upipe, call = fitted(kind)
    seen = []
    apply = HeadDraws.apply

    def spy(self, features, per_draw=False):
        seen.append((len(self), features.shape[0]))
        return apply(self, features, per_draw=per_draw)

    monkeypatch.setattr(HeadDraws, "apply", spy)
    upipe(generator=_g(0), num_draws=2, scores=("semantic",), output_type="np", **call)
    n = len(call.get("prompt", call.get("class_labels")))
    assert seen, "the draws were never applied"
    rows = {r for _, r in seen}
    assert {m for m, _ in seen} == {1}  # one parameter set per head call
    # a UNet head sees one row per image, a token head one row per image's tokens: both halves
    assert all(r % (2 * n) == 0 for r in rows)


# ----------------------------------------------------------------------------- variability options
@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_monte_carlo_variability_agrees_with_the_exact_one_and_reports_its_error(fitted, kind):
    pipe, upipe, call = fitted(kind)
    kwargs = {**call, "output_type": "np"}
    exact = upipe(generator=_g(1), num_draws=1, scores=("variability",), **kwargs)
    mc = upipe(generator=_g(1), num_draws=400, scores=("variability",), variance="monte_carlo",
               **kwargs)
    # the MAP trajectory is the same, only the estimator differs
    np.testing.assert_array_equal(exact.images, mc.images)
    np.testing.assert_allclose(mc.scores["variability"], exact.scores["variability"], rtol=0.25)
    se = mc.scores["variability_se"]
    assert np.all(np.isfinite(se)) and np.all(se > 0)
    few = upipe(generator=_g(1), num_draws=4, scores=("variability",), variance="monte_carlo",
                **kwargs)
    assert np.all(few.scores["variability_se"] > se)  # fewer draws, larger error


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_the_exact_variability_is_the_heads_closed_form_in_one_op(fitted, kind, monkeypatch):
    """Not one head evaluation per weight (the general route through a post-head map): at
    DiT-XL/2's size that route added 83% to the time of a plain call."""
    from genunc.posterior.heads import HeadOps

    pipe, upipe, call = fitted(kind)
    with capture_head(upipe.adapter.head) as record:  # the head's input at the last step
        pipe(generator=_g(1), output_type="np", **call)
    phi = record.features.float()
    general = upipe.posterior.output_variance(phi, post=lambda out: out)  # per weight
    monkeypatch.setattr(HeadOps, "_basis", lambda *a: pytest.fail("one head evaluation per weight"))
    fast = upipe.adapter.head_output_variance(upipe.posterior, phi, {})
    torch.testing.assert_close(fast, general, rtol=1e-5, atol=1e-10)
    out = upipe(generator=_g(1), num_draws=0, scores=("variability",), output_type="np", **call)
    assert (out.scores["variability"] > 0).all()


def test_monte_carlo_variability_covers_a_kron_posterior(fitted):
    pipe, upipe, call = fitted("ddpm")
    wrapped = ImageUncertaintyPipeline.from_pipe(pipe)
    wrapped.fit_posterior(torch.rand(8, 1, 8, 8) * 2 - 1, structure="kron", progress=False)
    with pytest.raises(GenuncError, match="monte_carlo"):
        wrapped(generator=_g(0), num_draws=3, scores=("variability",), **call)
    out = wrapped(generator=_g(0), num_draws=3, scores=("variability",), variance="monte_carlo",
                  **call)
    assert out.scores["variability"].shape == (2,) and np.all(out.scores["variability"] > 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_clean_factors_are_the_schedulers_own_x0_sensitivity(prediction_type):
    """DDIM's own step computes the clean sample it implies: perturbing the model output by d
    moves it by sqrt(factor) * d (the relation is linear), independently of genunc's formula."""
    from genunc.adapters.pipeline import DiffusersPipelineAdapter

    scheduler = DDIMScheduler(num_train_timesteps=100, prediction_type=prediction_type,
                              clip_sample=False)
    scheduler.set_timesteps(5)
    pipe = DDIMPipeline(unet=_unet2d(), scheduler=scheduler)
    adapter = DiffusersPipelineAdapter(pipe)
    x_t, output, delta = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    for t in scheduler.timesteps:
        a = scheduler.step(output, t, x_t).pred_original_sample
        b = scheduler.step(output + delta, t, x_t).pred_original_sample
        ratio = float(((b - a) / delta).abs().mean())
        assert ratio**2 == pytest.approx(float(adapter.clean_factors(t.reshape(1))[0]), rel=1e-4)
    # fractional timesteps interpolate the schedule between its neighbours
    mid = float(adapter.clean_factors(torch.tensor([10.5]))[0])
    low, high = adapter.clean_factors(torch.tensor([10.0, 11.0]))
    assert min(low, high) < mid < max(low, high)


def test_clean_target_rescales_each_evaluation(fitted):
    for kind in ("sd", "sd3"):
        pipe, upipe, call = fitted(kind)
        noise = upipe(generator=_g(2), num_draws=1, scores=("variability",), output_type="np",
                      **call)
        clean = upipe(generator=_g(2), num_draws=1, scores=("variability",), output_type="np",
                      variability_target="clean", **call)
        per_step = noise.variability_per_step["variability"]  # (S, B)
        t = torch.as_tensor(noise.variability_timesteps)
        if kind == "sd3":  # flow matching: x0 = x_t - sigma v, sigma the scheduler's own
            sigmas = pipe.scheduler.sigmas[: len(t)].double()
            factors = sigmas**2
            np.testing.assert_allclose(t.numpy() / 1000.0, sigmas.numpy(), rtol=1e-5)
        else:
            abar = pipe.scheduler.alphas_cumprod.double()[t.long()]
            factors = (1 - abar) / abar
        expected = (per_step * factors.numpy()[:, None]).mean(0)
        np.testing.assert_allclose(clean.scores["variability"], expected, rtol=1e-6)


def test_first_sample_keys_the_random_baseline_and_check_only_runs_nothing(fitted):
    from genunc.scores.semantic import random_scores

    pipe, upipe, call = fitted("dit")
    out = upipe(generator=_g(0), num_draws=1, scores=("random",), first_sample=7, seed=3,
                output_type="np", **call)
    np.testing.assert_array_equal(out.scores["random"], random_scores(3, range(7, 9)))
    calls = []
    original = type(pipe).__call__
    try:
        type(pipe).__call__ = lambda self, *a, **k: calls.append(1)
        assert upipe(num_draws=2, scores=("variability",), check_only=True, **call) is None
        with pytest.raises(GenuncError, match="num_draws"):
            upipe(num_draws=0, scores=("semantic",), check_only=True, **call)
    finally:
        type(pipe).__call__ = original
    assert calls == []


# ----------------------------------------------------------------------------- one mechanism
@pytest.mark.parametrize("target", ["noise", "clean"])
def test_genuncs_own_loop_gives_the_wrapped_ddim_pipelines_images_and_scores(target):
    """For a plain call the own loop (kept for late branching, fewer score steps, step windows,
    block posteriors) and the wrapper around diffusers' DDIMPipeline are the same computation:
    same images, same scores, from the same per-sample streams."""
    from genunc import streams

    unet, ddpm = _unet2d(), DDPMScheduler(num_train_timesteps=100)
    images = torch.rand(12, 1, 8, 8) * 2 - 1
    own = ImageUncertaintyPipeline(unet, ddpm, feature_extractor=flatten_pixels)
    own.fit_posterior(images, progress=False)
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(ddpm.config))
    pipe.set_progress_bar_config(disable=True)
    wrapped = ImageUncertaintyPipeline.from_pipe(pipe, posterior=own.posterior,
                                                 feature_extractor=flatten_pixels)
    common = dict(num_draws=3, scores=ALL_SCORES, seed=5, variability_target=target)
    a = own(num_samples=3, num_inference_steps=6, first_sample=4, progress=False, **common)
    b = wrapped(batch_size=3, num_inference_steps=6, output_type="np", first_sample=4,
                generator=streams.sample_generators(5, "initial_noise", range(4, 7)), **common)
    from genunc.pipelines.wrapped import _image_tensor

    torch.testing.assert_close(_image_tensor(b.images, "np"), ((a.images + 1) / 2).clamp(0, 1) * 2 - 1,
                               rtol=0, atol=1e-5)
    for name in ALL_SCORES:
        np.testing.assert_allclose(b.scores[name], a.scores[name], rtol=1e-4, err_msg=name)


def test_sd3_fits_through_its_t5_encoder_when_it_has_one(fitted):
    """SD3's prompt embedding is [CLIP (padded) ; T5] along the sequence: with a T5 encoder the
    T5 rows carry the prompt, without one they are zeros."""
    for kind, has_t5 in (("sd3_t5", True), ("sd3", False)):
        _, upipe, _ = fitted(kind)
        cond = upipe.adapter.conditioning(2, prompts=PROMPTS)
        clip_rows = upipe.pipe.tokenizer.model_max_length
        t5_rows = cond["encoder_hidden_states"][:, clip_rows:]
        assert t5_rows.shape[1] > 0 and bool(t5_rows.abs().sum() > 0) == has_t5, kind


def test_rescaled_guidance_variability_is_the_variance_of_diffusers_own_rule(fitted):
    """guidance_rescale is not affine in the head's output: the Monte-Carlo variance applies
    diffusers' rescale_noise_cfg to every draw's halves; checked at one step with the same
    draws (the run's head-draw stream) against the rule called directly."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    from genunc import streams

    pipe, upipe, call = fitted("sd")
    kwargs = {**call, "num_inference_steps": 1, "output_type": "np", "guidance_rescale": 0.7}
    with capture_head(upipe.adapter.head) as record:
        pipe(generator=_g(0), **kwargs)
    phi = record.features.float()
    draws = upipe.posterior.sample(5, seed=streams.torch_generator(4, "head_draws"),
                                   with_map=True)[1:]
    outs = draws.apply(phi).double()  # (M, 2B, C, H, W), [uncond; cond]
    uncond, cond = outs.chunk(2, dim=1)
    guided = torch.stack([rescale_noise_cfg(u + 7.5 * (c - u), c, guidance_rescale=0.7)
                          for u, c in zip(uncond, cond)])
    expected = guided.var(0).flatten(1).mean(1)
    out = upipe(generator=_g(0), num_draws=5, scores=("variability",), variance="monte_carlo",
                seed=4, **kwargs)
    np.testing.assert_allclose(out.scores["variability"], expected.numpy(), rtol=1e-5)
    plain = upipe(generator=_g(0), num_draws=5, scores=("variability",), variance="monte_carlo",
                  seed=4, **{**kwargs, "guidance_rescale": 0.0})
    assert not np.allclose(plain.scores["variability"], out.scores["variability"], rtol=1e-3)


# ----------------------------------------------------------------------------- block posteriors
@pytest.fixture(scope="module")
def sd_tail(tmp_path_factory):
    pipe, call, fit = build("sd", folder=tmp_path_factory.mktemp("sd_tail"))
    upipe = ImageUncertaintyPipeline.from_pipe(pipe, feature_extractor=flatten_pixels)
    images = fit.pop("images")
    upipe.fit_posterior(images, progress=False, tail=1, **fit)
    return pipe, upipe, call


def test_a_block_posterior_through_from_pipe_keeps_the_images_and_collapses(sd_tail):
    from genunc.posterior.tail import TailDraws

    pipe, upipe, call = sd_tail
    assert upipe.posterior.names[0] == "up_blocks.1" and upipe.posterior.head_name == "conv_out"
    with pytest.raises(GenuncError, match=r"\['variability'\] need num_draws >= 3, got 2"):
        upipe(generator=_g(3), num_draws=2, scores=("variability",), variance="monte_carlo",
              **call)  # refused before the call: a block's variance comes with its jackknife
    reference = pipe(generator=_g(3), output_type="np", **call).images
    out = upipe(generator=_g(3), output_type="np", num_draws=3, scores=ALL_SCORES,
                variance="monte_carlo", keep_draw_images=True, **call)
    assert np.array_equal(out.images, reference)
    assert all(np.isfinite(v).all() for v in out.scores.values())
    assert not np.allclose(out.draw_images[0], reference)  # the block's draws do move
    # the pipeline's own weights are restored after every draw
    assert np.array_equal(pipe(generator=_g(3), output_type="np", **call).images, reference)
    tail = upipe.posterior.tail
    at_mean = TailDraws.from_flat(upipe.posterior.mean.repeat(3, 1), tail, with_map=True)
    upipe.posterior.sample = lambda n, seed=None, with_map=False: at_mean
    try:
        collapsed = upipe(generator=_g(3), output_type="np", num_draws=2,
                          scores=("pixel_variance",), keep_draw_images=True, **call)
    finally:
        del upipe.posterior.sample
    for draw in collapsed.draw_images:
        np.testing.assert_allclose(draw, reference, atol=1e-6)


def test_block_variability_is_the_variance_of_whole_model_runs_under_each_draw(sd_tail):
    """At one guided step, the Monte-Carlo variability of a block posterior equals the variance
    of the guided prediction of the *whole* denoiser run with each draw's block weights swapped
    in (no recorded-input re-run involved), with the run's own head-draw stream."""
    from genunc import streams

    pipe, upipe, call = sd_tail
    kwargs = {**call, "num_inference_steps": 1, "output_type": "np"}
    seen = {}

    def grab(module, args, kw):
        seen.update(kw, sample=args[0] if args else kw["sample"], timestep=args[1]
                    if len(args) > 1 else kw["timestep"])

    handle = pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipe(generator=_g(0), **kwargs)
    finally:
        handle.remove()
    draws = upipe.posterior.sample(4, seed=streams.torch_generator(2, "head_draws"),
                                   with_map=True)[1:]
    guided = []
    with torch.no_grad():
        for m in range(len(draws)):
            with draws.tail.swapped(draws.draw(m)):
                out = pipe.unet(seen["sample"], seen["timestep"],
                                encoder_hidden_states=seen["encoder_hidden_states"],
                                return_dict=False)[0].double()
            uncond, cond = out.chunk(2)
            guided.append(uncond + 7.5 * (cond - uncond))
    expected = torch.stack(guided).var(0).flatten(1).mean(1)
    out = upipe(generator=_g(0), num_draws=4, scores=("variability",), variance="monte_carlo",
                seed=2, **kwargs)
    np.testing.assert_allclose(out.scores["variability"], expected.numpy(), rtol=1e-4)
    assert np.all(out.scores["variability_se"] > 0)
    with pytest.raises(GenuncError, match="monte_carlo"):
        upipe(generator=_g(0), num_draws=4, scores=("variability",), **kwargs)


def test_block_posteriors_through_from_pipe_are_for_unets(fitted, tmp_path):
    pipe, _, _ = build("dit", folder=tmp_path)
    upipe = ImageUncertaintyPipeline.from_pipe(pipe)
    with pytest.raises(GenuncError, match="covers UNet denoisers"):
        upipe.fit_posterior(torch.rand(2, 3, 8, 8) * 2 - 1, class_labels=[0, 1], tail=1,
                            progress=False)
