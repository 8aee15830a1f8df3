"""The image and molecule pipelines with a posterior over a block (a tail) instead of the head."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from genunc.errors import GenuncError
from genunc.features import flatten_pixels
from genunc.pipelines import ImageUncertaintyPipeline, MoleculeUncertaintyPipeline
from genunc.posterior import TailPosterior
from genunc.sampling.diffusers_loop import run_trajectory
from genunc.streams import randn_rows


def _image_pipe(tiny_unet):
    pipe = ImageUncertaintyPipeline(tiny_unet(), DDPMScheduler(num_train_timesteps=100),
                                    feature_extractor=flatten_pixels)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(16, 1, 8, 8, generator=g).clamp(-1, 1)
    pipe.fit_posterior((images, torch.randint(0, 3, (16,), generator=g)), tail=1, repeats=1,
                       progress=False, curvature="mc", mc_samples=2)
    return pipe


def test_image_pipeline_with_a_tail_posterior(tiny_unet):
    pipe = _image_pipe(tiny_unet)
    assert isinstance(pipe.posterior, TailPosterior)
    assert pipe.posterior.names == ["up_blocks.1", "conv_norm_out", "conv_act", "conv_out"]
    kwargs = dict(num_draws=3, num_inference_steps=4, seed=2, progress=False, chunk_size=3,
                  variance="monte_carlo", keep_draw_images=True)
    out = pipe(5, scores=("semantic", "variability", "pixel_variance"), **kwargs)
    assert set(out.scores) == {"semantic", "variability", "variability_se", "pixel_variance"}
    for name, values in out.scores.items():
        assert values.shape == (5,) and np.isfinite(values).all(), name
    assert (out.scores["variability_se"] > 0).all()
    assert (out.scores["variability_se"] < out.scores["variability"]).all()
    # the batched draws' trajectories are the trajectories of the model with that draw's tail
    draws = pipe._request(("semantic",), 3, 2, num_samples=5).draws
    x_T = randn_rows(pipe.adapter.sample_shape, pipe._request(("random",), 3, 2, num_samples=5)
                     .generators("initial_noise"))
    cond = {"class_labels": torch.arange(5) % 3}
    for m in (1, 3):
        with pipe.posterior.tail.swapped(draws.draw(m)):
            alone = run_trajectory(pipe.adapter, pipe.sampling_scheduler, x_T, cond,
                                   num_inference_steps=4).samples
        assert (alone - out.draw_images[m - 1]).abs().max() < 1e-4
    # the MAP images are those of the plain model; variability is Monte Carlo only
    plain = pipe(5, scores=("random",), **{**kwargs, "variance": "exact"})
    torch.testing.assert_close(plain.images, out.images)
    with pytest.raises(GenuncError, match="monte_carlo"):
        pipe(2, scores=("variability",), **{**kwargs, "variance": "exact"})


def test_molecule_pipeline_with_a_tail_posterior(qm9_slice, tiny_molecule_model):
    model = tiny_molecule_model(n_layers=2)
    model.cpu_chunk_atoms = 60  # the last layer runs once per chunk of molecules
    pipe = MoleculeUncertaintyPipeline(model, qm9_slice.atom_count_histogram(), timesteps=30)
    pipe.fit_posterior([pipe.adapter.encode(qm9_slice, np.arange(i, i + 6)) for i in (0, 6)],
                       tail=1, repeats=1, progress=False, mc_samples=2)
    assert pipe.posterior.names == ["layers.1", "head"]
    out = pipe(4, num_draws=3, num_inference_steps=4, scores=("semantic", "variability"),
               variance="monte_carlo", sampler="ddim", seed=1, progress=False)
    assert {"semantic", "variability", "variability_se", "variability_pos_se"} <= set(out.scores)
    for name, values in out.scores.items():
        assert values.shape == (4,) and np.isfinite(values).all(), name
    assert (out.scores["variability_se"] > 0).all()
    assert len(out.draw_molecules) == 3 and len(out.molecules) == 4
    # the MAP molecules do not depend on the draws running beside them
    plain = pipe(4, num_draws=3, num_inference_steps=4, scores=("random",), sampler="ddim",
                 seed=1, progress=False)
    for (pa, ta), (pb, tb) in zip(out.molecules, plain.molecules):
        np.testing.assert_allclose(pa, pb, atol=1e-5)
        np.testing.assert_array_equal(ta, tb)
    # linearised draws: the variability re-runs the block's expansion on the MAP trajectory;
    # the semantic score would swap weights into a graph model, which has no linearised form
    pipe.posterior.predictive = "linearised"
    lin = pipe(4, num_draws=3, num_inference_steps=4, scores=("variability",),
               variance="monte_carlo", sampler="ddim", seed=1, progress=False)
    assert np.isfinite(lin.scores["variability"]).all()
    assert not np.allclose(lin.scores["variability"], out.scores["variability"])
    with pytest.raises(GenuncError, match="predictive='sample'"):
        pipe(2, num_draws=3, num_inference_steps=2, scores=("semantic",), sampler="ddim", seed=1,
             progress=False)


def test_text_pipeline_with_a_tail_posterior(tiny_text_model, tmp_path):
    from genunc.pipelines import TextUncertaintyPipeline
    from genunc.sampling.masked import UnmaskingConfig
    from genunc.tasks import ArithmeticTask
    from genunc.zoo.text_model import save_model

    task = ArithmeticTask("*", 2)
    save_model(tiny_text_model(task.vocab_size, task.length), task, tmp_path)
    pipe = TextUncertaintyPipeline.from_pretrained(tmp_path, posterior=None)
    pairs = task.split()["train"][:40]
    batches = [{"x": task.sequences(pairs[i : i + 20]), "prompt_mask": task.prompt_mask(20)}
               for i in (0, 20)]
    pipe.load_or_fit_posterior(tmp_path / "tail_posterior", batches, tail=1, progress=False)
    assert isinstance(pipe.posterior, TailPosterior)
    assert pipe.posterior.names == ["blocks.layers.0", "norm", "head"]
    assert pipe.posterior.likelihood == "classification"
    prompts = task.prompts(task.split()["test"][:6])
    config = UnmaskingConfig("low_confidence", temperature=1.0)
    names = ("mutual_information", "mutual_information_max", "low_posterior_confidence",
             "semantic", "low_confidence")
    a = pipe(prompts, config, num_draws=3, scores=names, seed=4, chunk_size=4, progress=False)
    b = pipe(prompts, config, num_draws=3, scores=names, seed=4, chunk_size=6, progress=False)
    other = pipe(prompts, config, num_draws=3, scores=names, seed=5, progress=False)
    for name in a.scores:
        assert a.scores[name].shape == (6,) and np.isfinite(a.scores[name]).all(), name
        np.testing.assert_allclose(a.scores[name], b.scores[name], rtol=1e-9, atol=1e-12)
    assert a.scores["mutual_information"].max() > 0
    assert not np.array_equal(a.scores["mutual_information"], other.scores["mutual_information"])
    # the MAP generations are the plain model's: the posterior only adds scores
    plain = pipe(prompts, config, num_draws=3, scores=("random",), seed=4, progress=False)
    assert torch.equal(plain.tokens, a.tokens)
    # reloaded from its folder, the same scores
    again = TextUncertaintyPipeline.from_pretrained(tmp_path, posterior=None)
    again.load_or_fit_posterior(tmp_path / "tail_posterior", batches, tail=1)
    c = again(prompts, config, num_draws=3, scores=names, seed=4, progress=False)
    for name in a.scores:
        np.testing.assert_allclose(c.scores[name], a.scores[name], rtol=1e-9, atol=1e-12)
    # linearised draws: the same MAP generations, other (finite) posterior scores
    again.posterior.predictive = "linearised"
    lin = again(prompts, config, num_draws=3, scores=names, seed=4, progress=False)
    assert torch.equal(lin.tokens, a.tokens)
    for name in a.scores:
        assert np.isfinite(lin.scores[name]).all(), name
    assert not np.allclose(lin.scores["mutual_information"], a.scores["mutual_information"])
