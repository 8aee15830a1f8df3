"""The shipped latent digits model: a stock diffusers DiTPipeline folder that from_pipe wraps, and
the recipe that trains it (run here for a few steps on a tiny config)."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DiTPipeline

from genunc.cli import build_parser
from genunc.features import DigitsFeatures
from genunc.pipelines import ImageUncertaintyPipeline
from genunc.research.recipes.digits_latent import NULL_CLASS, LatentRecipe, train_latent
from genunc.zoo.digits import split_digits
from genunc.zoo.shipped import LATENT_DIR


@pytest.fixture(scope="module")
def shipped():
    pipe = DiffusionPipeline.from_pretrained(LATENT_DIR)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_shipped_folder_is_a_stock_dit_pipeline(shipped):
    assert type(shipped) is DiTPipeline
    assert shipped.get_label_ids(["3", "seven"]) == [3, 7]
    assert shipped.transformer.config.num_embeds_ada_norm == NULL_CLASS  # DiTPipeline's null class
    assert shipped.vae.config.scaling_factor != pytest.approx(0.18215)  # measured, not SD's
    assert not shipped.scheduler.config.clip_sample  # unit-variance latents are not in [-1, 1]
    report = json.loads((LATENT_DIR / "training.json").read_text())
    assert report["command"].startswith("genunc zoo train digits-latent")
    assert report["vae_test_mse"] < 0.05


def test_from_pipe_returns_the_plain_pipelines_images_and_finite_scores(shipped):
    x, y = split_digits()["train"]
    upipe = ImageUncertaintyPipeline.from_pipe(shipped, feature_extractor=DigitsFeatures())
    upipe.fit_posterior(x[:32], class_labels=y[:32], repeats=1, progress=False)
    upipe.fit_feature_scale(x[:200])
    call = dict(class_labels=[1, 4, 7], num_inference_steps=3, guidance_scale=4.0, output_type="np")
    plain = shipped(generator=torch.Generator().manual_seed(5), **call).images
    out = upipe(generator=torch.Generator().manual_seed(5), num_draws=2,
                scores=("semantic", "variability", "pixel_variance"), progress=False, **call)
    np.testing.assert_array_equal(out.images, plain)
    assert out.images.shape == (3, 16, 16, 1)
    for name, values in out.scores.items():
        assert values.shape == (3,) and np.isfinite(values).all(), name


def test_the_recipe_trains_a_loadable_pipeline(tmp_path):
    recipe = LatentRecipe(vae_steps=3, steps=3, batch_size=8, vae_channels=(8, 8), width=32, layers=1,
                          check_samples=10, check_steps=2, check_guidance=(1.0,))
    report = train_latent(recipe, tmp_path, device="cpu", progress=False)
    pipe = DiTPipeline.from_pretrained(tmp_path)
    assert pipe.vae.config.scaling_factor == pytest.approx(report["scaling_factor"])
    assert pipe.transformer.config.sample_size == 8  # one down-sampling: 16 -> 8
    assert json.loads((tmp_path / "training.json").read_text())["command"] == (
        "genunc zoo train digits-latent --vae-steps 3 --steps 3 --batch-size 8 --seed 0")
    assert 0 <= report["judge_agreement"]["guidance 1"] <= 1
    args = build_parser().parse_args(["zoo", "train", "digits-latent", "--vae-steps", "3"])
    assert args.vae_steps == 3
