"""What the three pipelines share: one score catalogue rule, one request check, one policy for
saved posteriors."""

import numpy as np
import pytest
import torch

from genunc.errors import FingerprintMismatchError, GenuncError, MissingFileError
from genunc.features import flatten_pixels
from genunc.pipelines import (
    ImageUncertaintyPipeline,
    MoleculeUncertaintyPipeline,
    TextUncertaintyPipeline,
    UncertaintyOutput,
    UncertaintyPipeline,
)

PIPELINES = [ImageUncertaintyPipeline, MoleculeUncertaintyPipeline, TextUncertaintyPipeline]


@pytest.mark.parametrize("cls", PIPELINES, ids=lambda c: c.__name__)
def test_one_rule_for_how_many_draws_a_score_needs(cls):
    """None: no posterior; 0: the posterior but no draws (the exact variability); 1: MAP versus
    perturbed generations; 2: a disagreement across draws."""
    assert issubclass(cls, UncertaintyPipeline)
    for name, needed in cls.SCORES.items():
        if name == "random" or name.startswith(("low_confidence", "low_margin", "low_self",
                                                 "denoising")) or name == "nll":
            assert needed is None, name
        elif name == "variability":
            assert needed == 0, name
        elif name.startswith("mutual_information"):
            assert needed == 2, name
        else:
            assert needed == 1, name
    assert set(cls.EXTRA_SCORE_COLUMNS).isdisjoint(cls.SCORES)


@pytest.fixture
def image_pipe(tiny_ddpm_folder, tmp_path):
    return ImageUncertaintyPipeline.from_pretrained(tiny_ddpm_folder(tmp_path / "ddpm"),
                                                    feature_extractor=flatten_pixels)


def test_requests_are_checked_before_anything_runs(image_pipe):
    with pytest.raises(GenuncError, match="no posterior, and \\['semantic'\\] need one"):
        image_pipe(2, scores=("semantic",), progress=False)
    out = image_pipe(3, scores=("random",), num_draws=0, num_inference_steps=2, progress=False)
    assert isinstance(out, UncertaintyOutput) and out.scores["random"].shape == (3,)
    assert out.num_draws == 0 and out.backbone_rows == 3 * 2
    for bad in ({"num_samples": 0}, {"chunk_size": 0}, {"num_inference_steps": -1}):
        name = next(iter(bad))
        kwargs = {"num_samples": 2, **bad}
        with pytest.raises(GenuncError, match=f"{name} must be at least 1"):
            image_pipe(kwargs.pop("num_samples"), scores=("random",), progress=False, **kwargs)


def test_head_draws_put_the_map_first_and_come_from_their_own_stream(image_pipe):
    from genunc import streams

    g = torch.Generator().manual_seed(0)
    image_pipe.fit_posterior((torch.randn(16, 1, 8, 8, generator=g).clamp(-1, 1),
                              torch.randint(0, 3, (16,), generator=g)), progress=False)
    request = image_pipe._request(("semantic",), 3, seed=5, num_samples=4)
    assert request.draws.with_map and len(request.draws) == 4
    torch.testing.assert_close(request.draws.flat[0], image_pipe.posterior.mean)
    expected = image_pipe.posterior.sample(3, seed=streams.torch_generator(5, "head_draws"))
    torch.testing.assert_close(request.perturbed.flat, expected.flat, rtol=0, atol=0)
    assert not request.perturbed.with_map
    # the same draws whichever samples a call holds: chunks of one run share them
    later = image_pipe._request(("semantic",), 3, seed=5, num_samples=2, first_sample=64)
    torch.testing.assert_close(later.draws.flat, request.draws.flat, rtol=0, atol=0)
    # the exact variability needs the posterior but no draws
    exact = image_pipe._request(("variability",), 0, seed=5, num_samples=2)
    assert exact.draws is None
    with pytest.raises(GenuncError, match="need num_draws >= 2"):
        image_pipe._request(("variability",), 1, seed=5, num_samples=2, variance="monte_carlo")
    for bad in ({"seed": -1}, {"first_sample": -2}, {"variance": "mc"},
                {"variability_target": "x0"}):
        with pytest.raises(GenuncError):
            image_pipe._request(("variability",), 2, **{"seed": 0, **bad}, num_samples=2)


def test_load_or_fit_posterior_policy(image_pipe, tmp_path, tiny_unet):
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(16, 1, 8, 8, generator=g).clamp(-1, 1), torch.randint(0, 3, (16,), generator=g))
    directory = tmp_path / "posterior"
    assert image_pipe.load_or_fit_posterior(directory) is None  # nothing saved, no data
    fitted = image_pipe.load_or_fit_posterior(directory, data, progress=False)
    assert (directory / "genunc_posterior.json").exists()
    again = image_pipe.load_or_fit_posterior(directory, data, progress=False)
    np.testing.assert_array_equal(again.mean.numpy(), fitted.mean.numpy())
    assert again is not fitted  # loaded, not refitted in memory

    other = ImageUncertaintyPipeline(tiny_unet(seed=7), image_pipe.adapter.scheduler)
    with pytest.raises(FingerprintMismatchError):
        other.load_or_fit_posterior(directory, data, progress=False)
    refitted = other.load_or_fit_posterior(directory, data, stale="refit", progress=False)
    assert refitted is other.posterior
    refitted.check_matches(other.model)


def test_from_pretrained_needs_a_model_folder(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        ImageUncertaintyPipeline.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(MissingFileError, match="no diffusers UNet config"):
        ImageUncertaintyPipeline.from_pretrained(tmp_path)
