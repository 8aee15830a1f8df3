"""The vector pipeline: N candidates per context, each its own chain, scored by the spread of the
posterior's chains (action_variance) and the exact noise-prediction variability."""

import copy

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from torch.func import functional_call

from genunc import streams
from genunc.errors import GenuncError, ShapeMismatchError
from genunc.pipelines import VectorUncertaintyOutput, VectorUncertaintyPipeline
from genunc.posterior import POSTERIOR_DIR
from genunc.zoo.toy import ToyVectorDenoiser

D, C, STEPS = 3, 4, 5
SCORES = ("action_variance", "action_variance_x0", "variability", "random")


def _scheduler():
    return DDPMScheduler(num_train_timesteps=STEPS, trained_betas=np.linspace(0.05, 0.6, STEPS).tolist(),
                         clip_sample=True)


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(n, C, generator=g)
    return {"x": cond[:, :D].tanh() + 0.1 * torch.randn(n, D, generator=g), "cond": cond}


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    pipe = VectorUncertaintyPipeline(ToyVectorDenoiser(D, C, width=16).eval(), _scheduler())
    pipe.fit_posterior(_data(), progress=False)
    return pipe


@pytest.fixture
def pipe(fitted):
    return VectorUncertaintyPipeline(fitted.model, fitted.scheduler, posterior=fitted.posterior)


@pytest.fixture
def cond():
    return torch.randn(3, C, generator=torch.Generator().manual_seed(7))


def _call(pipe, cond, **kwargs):
    kwargs = {"num_candidates": 4, "num_draws": 3, "scores": SCORES, "seed": 1, **kwargs}
    return pipe(cond, **kwargs)


def test_shapes(pipe, cond):
    out = _call(pipe, cond, keep_draw_samples=True)
    assert isinstance(out, VectorUncertaintyOutput)
    assert out.samples.shape == (3, 4, D) and out.draw_samples.shape == (3, 3, 4, D)
    assert out.samples.abs().max() <= 1  # the scheduler's clip_sample bounds the clean sample
    for name in SCORES:
        assert out.scores[name].shape == (3, 4) and np.isfinite(out.scores[name]).all()
    assert out.variability_per_step["variability"].shape == (STEPS, 3, 4)
    assert out.semantic_x0_per_step.shape == (1, 3, 4)  # action_variance_x0 at the last step
    assert out.scores["action_variance_x0_se"].shape == (3, 4)
    assert out.backbone_rows == STEPS * 12 * 4  # the MAP and 3 draws' chains, one batch
    assert (out.scores["action_variance"] > 0).all() and (out.scores["variability"] > 0).all()


def test_the_same_seed_gives_the_same_samples_and_scores(pipe, cond):
    a, b, c = _call(pipe, cond), _call(pipe, cond), _call(pipe, cond, seed=2)
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)
    for name in SCORES:
        np.testing.assert_array_equal(a.scores[name], b.scores[name])
        assert not np.allclose(a.scores[name], c.scores[name])
    assert not torch.allclose(a.samples, c.samples)


def test_each_candidate_is_its_own_chain_and_contexts_condition(pipe):
    same = torch.randn(1, C).repeat(2, 1)
    out = _call(pipe, same, num_candidates=3)
    assert not torch.allclose(out.samples[0, 0], out.samples[0, 1])  # own noise per candidate
    # context rows that are equal but are other samples draw other noise ...
    assert not torch.allclose(out.samples[0], out.samples[1])
    # ... and a candidate's vector depends on its context, for the same noise (same index)
    other = _call(pipe, torch.randn(2, C), num_candidates=3)
    assert not torch.allclose(out.samples, other.samples)


def test_plain_generation_is_the_scored_calls_map_chain(pipe, cond):
    """num_draws=0, scores=() is the cost baseline: the same vectors as any scored call (bit for
    bit here; a BLAS may round a batch of another size differently: 6e-8 seen for 10 rows)."""
    plain = pipe(cond, num_candidates=4, num_draws=0, scores=(), seed=1)
    assert plain.scores == {} and plain.backbone_rows == STEPS * 12
    for scores in (SCORES, ("variability",), ("action_variance",)):
        scored = _call(pipe, cond, scores=scores)
        torch.testing.assert_close(scored.samples, plain.samples, rtol=0, atol=1e-6)


def test_results_do_not_depend_on_chunks_or_how_contexts_are_split(pipe, cond):
    whole = _call(pipe, cond)
    chunked = _call(pipe, cond, chunk_size=5)
    first, rest = _call(pipe, cond[:1]), _call(pipe, cond[1:], first_sample=4)
    # one context's candidates, as candidates of single-candidate contexts
    rows = _call(pipe, cond.repeat_interleave(4, 0), num_candidates=1)
    for other in (chunked, rows):
        torch.testing.assert_close(other.samples.reshape(3, 4, D), whole.samples, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat([first.samples, rest.samples]), whole.samples, rtol=0,
                               atol=1e-6)
    for name in SCORES:
        np.testing.assert_allclose(chunked.scores[name], whole.scores[name], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(rows.scores[name].reshape(3, 4), whole.scores[name], rtol=1e-5,
                                   atol=1e-9)
        np.testing.assert_allclose(np.concatenate([first.scores[name], rest.scores[name]]),
                                   whole.scores[name], rtol=1e-5, atol=1e-9)


def test_a_collapsed_posterior_gives_identical_chains_and_no_action_variance(pipe, cond):
    pipe.posterior = pipe.posterior.with_prior_precision(1e30)  # posterior variance ~1e-30
    out = _call(pipe, cond, keep_draw_samples=True)
    for draw in out.draw_samples:  # bit for bit here (the same rows of one batched op)
        torch.testing.assert_close(draw, out.samples, rtol=0, atol=1e-6)
    assert out.scores["action_variance"].max() <= 1e-12  # exactly 0 here
    assert out.scores["action_variance_x0"].max() <= 1e-12
    assert out.scores["variability"].max() < 1e-20


def _reference(pipe, cond, n, seed, params=None):
    """Slow reference: one chain per candidate, the model called with one weight set, the
    scheduler stepped by hand with each sample's own generators."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(STEPS)
    rows = cond.repeat_interleave(n, 0)
    indices = range(len(rows))
    x = streams.randn_rows((D,), streams.sample_generators(seed, "initial_noise", indices))
    gens = streams.sample_generators(seed, "sampler_noise", indices)
    for t in scheduler.timesteps:
        with torch.no_grad():
            eps = functional_call(pipe.model, params or {}, (x, t.expand(len(x)), rows))
        x = scheduler.step(eps, t, x, generator=gens).prev_sample
    return x.reshape(len(cond), n, D)


def test_chains_and_scores_equal_slow_per_draw_references(pipe, cond):
    out = _call(pipe, cond, keep_draw_samples=True)
    torch.testing.assert_close(out.samples, _reference(pipe, cond, 4, 1), rtol=0, atol=1e-6)
    draws = pipe.posterior.sample(3, seed=streams.torch_generator(1, "head_draws"), with_map=True)
    finals = [out.samples]
    for m in range(1, 4):
        params = {f"head.{k}": v[m] for k, v in draws.params.items()}
        finals.append(_reference(pipe, cond, 4, 1, params))
        torch.testing.assert_close(out.draw_samples[m - 1], finals[-1], rtol=0, atol=1e-5)
    spread = torch.stack(finals).double().var(0).sum(-1).numpy()
    np.testing.assert_allclose(out.scores["action_variance"], spread, rtol=1e-4, atol=1e-12)


def test_monte_carlo_variability_estimates_the_exact_one(pipe, cond):
    exact = _call(pipe, cond, scores=("variability",))
    mc = _call(pipe, cond, scores=("variability",), num_draws=400, variance="monte_carlo")
    ratio = mc.scores["variability"] / exact.scores["variability"]
    assert abs(np.median(ratio) - 1) < 0.1


def test_save_load_round_trip(pipe, cond, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    pipe.posterior.save(tmp_path / "model" / POSTERIOR_DIR)
    loaded = VectorUncertaintyPipeline.from_pretrained(tmp_path / "model")
    assert type(loaded.model) is ToyVectorDenoiser and loaded.posterior is not None
    torch.testing.assert_close(loaded.posterior.posterior_variance, pipe.posterior.posterior_variance)
    a, b = _call(pipe, cond), _call(loaded, cond)
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)
    for name in SCORES:
        np.testing.assert_array_equal(a.scores[name], b.scores[name])
    # the posterior alone, through the base's persistence policy
    fresh = VectorUncertaintyPipeline(pipe.model, pipe.scheduler)
    assert fresh.load_or_fit_posterior(tmp_path / "model" / POSTERIOR_DIR).digest() == \
        pipe.posterior.digest()


def test_fit_takes_a_dict_a_pair_or_batches(fitted):
    data = _data()
    pipe = VectorUncertaintyPipeline(fitted.model, fitted.scheduler)
    digests = {pipe.fit_posterior(form, progress=False, batch_size=32).digest() for form in (
        data, (data["x"], data["cond"]),
        [(data["x"][i:i + 32], data["cond"][i:i + 32]) for i in range(0, 96, 32)])}
    assert len(digests) == 1  # the same batches, so the same noisy pairs and posterior


@pytest.mark.parametrize("bad, message", [
    (torch.randn(4), r"cond must have shape \(B, 4\), got \(4,\)"),
    (torch.randn(2, C + 1), r"cond must have shape \(B, 4\), got \(2, 5\)"),
    (np.zeros((2, C)), "cond must be a \\(B, C\\) tensor, got ndarray"),
])
def test_bad_contexts_are_one_line_errors(pipe, bad, message):
    with pytest.raises(ShapeMismatchError, match=message) as info:
        pipe(bad, num_candidates=2)
    assert "\n" not in str(info.value)


def test_bad_arguments_are_refused_before_anything_runs(pipe, cond):
    with pytest.raises(GenuncError, match="num_candidates must be"):
        pipe(cond, num_candidates=0)
    with pytest.raises(GenuncError, match=r"\['action_variance'\] need num_draws >= 1"):
        pipe(cond, num_draws=0, scores=("action_variance",))
    with pytest.raises(GenuncError, match="unknown scores"):
        pipe(cond, scores=("semantic",))
    with pytest.raises(GenuncError, match="no posterior"):
        VectorUncertaintyPipeline(pipe.model, pipe.scheduler)(cond)
    assert pipe(cond, check_only=True) is None


def test_action_variance_x0_is_the_spread_of_the_heads_clean_predictions_along_the_map_chain(
        pipe, cond):
    """At each step of the MAP chain, every head (MAP first, then the M draws) predicts the clean
    vector from the MAP chain's x_t (the scheduler's own pred_original_sample, clipped as the
    scheduler clips): the score is their total variance, mean over the steps; no backbone rows
    beyond the MAP chain's, and the vectors are the plain call's."""
    out = _call(pipe, cond, scores=("action_variance_x0",), x0_steps=[1, 3])
    plain = pipe(cond, num_candidates=4, num_draws=0, scores=(), seed=1)
    assert out.backbone_rows == plain.backbone_rows
    torch.testing.assert_close(out.samples, plain.samples, rtol=0, atol=1e-6)

    draws = pipe.posterior.sample(3, seed=streams.torch_generator(1, "head_draws"), with_map=True)
    heads = [{f"head.{k}": v[m] for k, v in draws.params.items()} for m in range(4)]
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(STEPS)
    rows = cond.repeat_interleave(4, 0)
    indices = range(len(rows))
    x = streams.randn_rows((D,), streams.sample_generators(1, "initial_noise", indices))
    gens = streams.sample_generators(1, "sampler_noise", indices)
    per_step = []
    for i, t in enumerate(scheduler.timesteps):
        with torch.no_grad():
            eps = [functional_call(pipe.model, h, (x, t.expand(len(x)), rows)) for h in heads]
        if i in (1, 3):
            clean = torch.stack([copy.deepcopy(scheduler).step(e, t, x).pred_original_sample
                                 for e in eps]).double()
            per_step.append(clean.var(0).sum(-1).numpy())
        x = scheduler.step(eps[0], t, x, generator=gens).prev_sample
    np.testing.assert_allclose(out.semantic_x0_per_step.reshape(2, -1), np.stack(per_step),
                               rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(out.scores["action_variance_x0"].ravel(), np.mean(per_step, 0),
                               rtol=1e-4, atol=1e-12)
    assert (out.scores["action_variance_x0"] > 0).all()
    with pytest.raises(GenuncError, match="x0_steps"):
        _call(pipe, cond, scores=("action_variance_x0",), x0_steps=[STEPS])
