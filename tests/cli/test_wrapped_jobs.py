"""Config-driven jobs on diffusers pipeline folders other than a pixel DDPM: the folder is loaded
with diffusers' own ``DiffusionPipeline.from_pretrained`` and run as the user's pipeline with hooks."""

import importlib.util
import io

import numpy as np
import pytest
import torch
import yaml

from genunc import streams
from genunc.cli import main
from genunc.config import load_config
from genunc.errors import ConfigError, GenuncError
from genunc.export import Export
from genunc.export.store import encode_png
from genunc.jobs import job_for
from genunc.pipelines.wrapped import WrappedImagePipeline
from genunc.zoo.shipped import LATENT_DIR


def _pixels(png) -> np.ndarray:
    from PIL import Image

    source = io.BytesIO(png) if isinstance(png, bytes) else png
    return np.asarray(Image.open(source), dtype=np.int64)


def _config(tmp_path, **generate):
    config = {
        "modality": "image", "model": "zoo:digits_latent", "features": "zoo:digits_classifier",
        "quality": "zoo:digits_judge",
        "posterior": {"dir": str(tmp_path / "posterior"), "data": "zoo:digits_train",
                      "repeats": 1},
        "generate": {"n_samples": 5, "num_draws": 3, "steps": 4, "guidance_scale": 1.0,
                     "sampler": "DDIMScheduler", "chunk_size": 2,
                     "scores": ["semantic", "variability", "pixel_variance", "random"],
                     "out": str(tmp_path / "export"), **generate},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_dit_pipeline_folder_runs_wrapped_and_chunking_changes_nothing(tmp_path):
    from diffusers import DDIMScheduler, DiTPipeline

    first = _config(tmp_path / "a", variance="monte_carlo", variability_target="clean")
    assert main(["generate", "-c", str(first)]) == 0
    second = _config(tmp_path / "b", chunk_size=5, variance="monte_carlo",
                     variability_target="clean")
    assert main(["generate", "-c", str(second), "--set",
                 f"posterior.dir={tmp_path / 'a' / 'posterior'}"]) == 0
    a, b = Export(tmp_path / "a" / "export"), Export(tmp_path / "b" / "export")
    assert [r["condition"] for r in a.records] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a.records, b.records, strict=True):
        for key in ("semantic", "variability", "variability_se", "pixel_variance", "random"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-9), key
        assert "judge_agrees" in ra
        # other batch shapes round differently (BLAS): at most one grey level apart
        assert np.abs(_pixels(a.path(ra)) - _pixels(b.path(rb))).max() <= 1
    assert a.metadata["posterior_fingerprint"]["head_name"] == "proj_out_2"

    # the exported images are the plain diffusers pipeline's, with each sample's own noise
    pipe = DiTPipeline.from_pretrained(LATENT_DIR)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(class_labels=[0, 1, 2, 3, 4], num_inference_steps=4, guidance_scale=1.0,
                 generator=streams.sample_generators(0, "initial_noise", range(5)),
                 output_type="pt").images
    for record, image in zip(a.records, plain, strict=True):
        assert np.abs(_pixels(a.path(record)) - _pixels(encode_png(image * 2 - 1))).max() <= 1


def test_wrapped_folders_refuse_own_loop_options_and_vice_versa(tmp_path, tiny_ddpm_folder):
    job = job_for("image")
    config = load_config(_config(tmp_path), ["generate.branch_at=2"])
    with pytest.raises(ConfigError, match="generate.branch_at need genunc's own sampling loop"):
        job.build_pipeline(config, posterior="none")
    config = load_config(_config(tmp_path), ["generate.sampler=DDIMSchedulr"])
    with pytest.raises(ConfigError, match="not a diffusers scheduler class"):
        job.build_pipeline(config, posterior="none")
    config = load_config(_config(tmp_path), ["posterior.tail=1"])
    pipe = job.build_pipeline(config, posterior="none")
    assert isinstance(pipe, WrappedImagePipeline)
    with pytest.raises(GenuncError, match="covers UNet denoisers"):
        job.fit_posterior(pipe, config, progress=False)
    folder = tiny_ddpm_folder(tmp_path / "ddpm")
    config = load_config(_config(tmp_path), [f"model={folder}", "quality=null"])
    with pytest.raises(ConfigError, match="generate.sampler, generate.guidance_scale apply to "
                                          "diffusers pipeline folders only"):
        job.build_pipeline(config, posterior="none")


def test_a_text_conditioned_pipeline_folder_takes_prompts_from_the_config(tmp_path, repo, capsys):
    spec = importlib.util.spec_from_file_location("from_pipe_tests", repo / "tests" / "test_from_pipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pipe, _, _ = module.build("sd", folder=tmp_path / "tok")
    pipe.save_pretrained(tmp_path / "sd")
    torch.save({"x": torch.rand(4, 3, 8, 8) * 2 - 1, "prompts": ["a cat", "dog", "cat", "a dog"]},
               tmp_path / "fit.pt")
    path = _config(tmp_path, steps=2, num_draws=2, guidance_scale=3.0, sampler=None,
                   scores=["variability", "pixel_variance"], n_samples=3, chunk_size=2)
    common = [f"model={tmp_path / 'sd'}", "quality=null", "features=pixels",
              f"posterior.data={tmp_path / 'fit.pt'}"]
    overrides = [arg for value in common for arg in ("--set", value)]
    assert main(["generate", "-c", str(path), *overrides]) == 2  # no prompts given
    assert "is text-conditioned: give generate.prompts" in capsys.readouterr().err
    assert main(["generate", "-c", str(path), *overrides,
                 "--set", "generate.prompts=[a cat, dog]"]) == 0
    export = Export(tmp_path / "export")
    assert [r["condition"] for r in export.records] == ["a cat", "dog", "a cat"]
    assert all(np.isfinite(r["variability"]) and r["variability"] > 0 for r in export.records)
