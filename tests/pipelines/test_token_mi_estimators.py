"""``mi_estimator`` through genunc's own text pipeline and the wrapped LLaDA2 and DiffusionGemma
pipelines: the
draw-free estimators score the same candidates, pruned at K = V equals sampled MI over the
same numbers, and what cannot be estimated is refused in one line."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from genunc.errors import GenuncError
from genunc.pipelines.text import TextUncertaintyPipeline
from genunc.posterior.token_mi import token_mi
from genunc.sampling.masked import UnmaskingConfig, unmask
from genunc.tasks import ArithmeticTask

sys.path.insert(0, str(Path(__file__).parent))  # test_text_from_pipe's tiny LLaDA2 pipeline

TASK = ArithmeticTask("*", 2)
ESTIMATORS = ("linearised", "bridge", "pruned")


def test_every_estimator_scores_the_same_candidates(sampler):
    s, _ = sampler
    prompts = TASK.prompts(TASK.split()["test"][:6])
    config = UnmaskingConfig("low_confidence", temperature=1.0, block_length=2)
    names = ("mutual_information", "mutual_information_max", "low_posterior_confidence")
    ref = s(prompts, config, num_draws=4, scores=names, seed=3, progress=False)
    for estimator in ESTIMATORS:
        out = s(prompts, config, num_draws=4, scores=names, seed=3, progress=False,
                mi_estimator=estimator, mi_top_k=None if estimator == "bridge" else 3)
        assert torch.equal(out.tokens, ref.tokens)  # MI does not steer the sampler
        for name in names:
            assert out.scores[name].shape == (6,) and np.isfinite(out.scores[name]).all()
        assert (out.scores["mutual_information"] > 0).all()
        assert ((out.scores["low_posterior_confidence"] >= 0)
                & (out.scores["low_posterior_confidence"] <= 1)).all()
        # pruned draws come with their jackknife error, as sampled ones do
        assert ("mutual_information_mc_error" in out.scores) == (estimator == "pruned")


def test_pruned_at_k_equal_v_equals_sampled_mi_over_the_same_numbers(sampler):
    """unmask with the pruned estimator (K = V) and with the M full heads it draws rows from
    (materialise): the same commit-time MI and posterior confidence at every position."""
    s, _ = sampler
    prompts = TASK.prompts(TASK.split()["test"][:4])
    config = UnmaskingConfig("low_confidence", temperature=1.0)
    pruned = token_mi(s.posterior, "pruned", num_draws=4, top_k=s.adapter.vocab_size, seed=5)
    a = unmask(s.adapter, prompts, config, mi_estimator=pruned, seed=1)
    b = unmask(s.adapter, prompts, config, mi_draws=pruned.materialise(), seed=1)
    assert torch.equal(a.tokens, b.tokens)
    for name in ("mutual_information", "posterior_confidence"):
        torch.testing.assert_close(a.token_stats[name], b.token_stats[name], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(a.mi_leave_one_out, b.mi_leave_one_out, rtol=1e-5, atol=1e-9)


def test_collapsed_posterior_gives_near_zero_mi_for_every_estimator(sampler):
    s, _ = sampler
    tight = s.posterior.with_prior_precision(1e12)
    pipe = TextUncertaintyPipeline(s.adapter, tight)
    prompts = TASK.prompts(TASK.split()["test"][:3])
    for estimator in ("sampled", *ESTIMATORS):
        out = pipe(prompts, num_draws=3, scores=("mutual_information",), progress=False,
                   mi_estimator=estimator)
        assert out.scores["mutual_information"].max() < 1e-8, estimator


def test_bad_estimator_arguments_are_refused(sampler):
    s, _ = sampler
    prompts = TASK.prompts(TASK.split()["test"][:2])
    with pytest.raises(GenuncError, match="mi_estimator must be one of"):
        s(prompts, mi_estimator="probit", check_only=True)
    with pytest.raises(GenuncError, match="mi_top_k must be an integer >= 1"):
        s(prompts, mi_estimator="pruned", mi_top_k=0, check_only=True)
    with pytest.raises(GenuncError, match="mi_top_k applies to 'linearised' and 'pruned'"):
        s(prompts, mi_estimator="bridge", mi_top_k=3, check_only=True)
    with pytest.raises(GenuncError, match="num_draws must be >= 2"):
        s(prompts, num_draws=1, mi_estimator="pruned", progress=False)
    kron_free = TextUncertaintyPipeline(s.adapter, None)
    with pytest.raises(GenuncError, match="no posterior"):
        kron_free(prompts, mi_estimator="bridge", progress=False)


# ---------------------------------------------------------------------- wrapped LLaDA2
def test_wrapped_llada2_estimators():
    pytest.importorskip("diffusers")
    from test_text_from_pipe import CALL, PROMPTS, SAMPLED, VOCAB, fitted_wrapper, gen  # noqa: I001

    upipe = fitted_wrapper()
    plain = upipe(prompt=PROMPTS, generator=gen(2), num_draws=4, **SAMPLED)
    committed = plain.committed_at >= 0
    for estimator in ESTIMATORS:
        out = upipe(prompt=PROMPTS, generator=gen(2), num_draws=4, **SAMPLED,
                    scores=("mutual_information", "mutual_information_max"),
                    mi_estimator=estimator, mi_top_k=None if estimator == "bridge" else 5)
        assert torch.equal(out.sequences, plain.sequences)
        mi = out.token_scores["mutual_information"]
        assert torch.isfinite(mi[committed]).all() and (mi[committed] > 0).any()
        assert torch.isnan(mi[~committed]).all()
    # pruned at K = V: the sampled path over the M full heads the estimator draws rows from
    pruned = token_mi(upipe.posterior, "pruned", num_draws=4, top_k=VOCAB, seed=7)
    for kwargs in (CALL, SAMPLED, dict(SAMPLED, temperature=0.7)):
        a = upipe(prompt=PROMPTS, generator=gen(4), num_draws=4, seed=7, mi_estimator="pruned",
                  mi_top_k=VOCAB, **kwargs)
        b = upipe(prompt=PROMPTS, generator=gen(4), draws=pruned.materialise(), **kwargs)
        torch.testing.assert_close(a.token_scores["mutual_information"],
                                   b.token_scores["mutual_information"], rtol=1e-5, atol=1e-9,
                                   equal_nan=True)
    with pytest.raises(GenuncError, match="top_k / top_p"):
        upipe(prompt=PROMPTS, generator=gen(), num_draws=4, mi_estimator="bridge",
              **dict(SAMPLED, top_k=5))
    with pytest.raises(GenuncError, match="materialised head draws"):
        upipe(prompt=PROMPTS, draws=pruned.materialise(), mi_estimator="pruned", **CALL)


@pytest.fixture(scope="module")
def gemma():
    """test_text_gemma's fitted wrapper, with a softcap of 2 so that it bends the logits (the
    tiny model's logits are O(1): at Gemma's 30 the softcap would be the identity)."""
    pytest.importorskip("diffusers")
    try:
        import test_text_gemma
    except (ImportError, GenuncError) as err:  # the transformers/diffusers pair the tests skip
        pytest.skip(str(err))
    upipe = test_text_gemma.fitted_wrapper()
    upipe.model.final_logit_softcapping = 2.0
    return upipe, test_text_gemma


@pytest.mark.parametrize("scheduler", ["block_refinement", "entropy_bound", "ddim"])
def test_wrapped_diffusion_gemma_estimators(gemma, scheduler):
    """Each scheduler's logit map (softcap, then its temperature or annealed temperature; the
    adaptive stop's argmax commits): pruned at K = V equals sampled MI over the M full heads made
    from the same numbers; every estimator leaves the generation unchanged."""
    upipe, module = gemma
    index = ["block_refinement", "entropy_bound", "ddim"].index(scheduler)
    upipe.pipe.scheduler = module.SCHEDULERS[index]()
    vocab = len(module.WORDS)
    pruned = token_mi(upipe.posterior, "pruned", num_draws=4, top_k=vocab, seed=7)
    for options in (dict(temperature=1.0), dict(temperature=0.0),
                    dict(temperature=1.0, confidence_threshold=10.0)):
        call = dict(prompt=module.PROMPTS, **module.CALL, **options)
        a = upipe(generator=module.gen(4), num_draws=4, seed=7, mi_estimator="pruned",
                  mi_top_k=vocab, **call)
        b = upipe(generator=module.gen(4), draws=pruned.materialise(), **call)
        torch.testing.assert_close(a.token_scores["mutual_information"],
                                   b.token_scores["mutual_information"], rtol=1e-5, atol=1e-9,
                                   equal_nan=True)
        committed = b.committed_at >= 0
        assert committed.any()
        for estimator in ("linearised", "bridge"):
            out = upipe(generator=module.gen(4), num_draws=4, mi_estimator=estimator, **call)
            assert torch.equal(out.sequences, b.sequences)
            mi = out.token_scores["mutual_information"]
            assert torch.isfinite(mi[committed]).all() and (mi[committed] > 0).any()


def test_wrapped_diffusion_gemma_linearised_mi_is_sampled_mi_for_a_tight_posterior(gemma):
    """Through the softcap (delta method) and the temperature: with small logit variances the
    closed form is sampled MI at M = 2,000 at every committed position within 10% (measured:
    within 3%, the Monte-Carlo error at that M; the closed form's dropped terms are of higher
    order in the variances)."""
    upipe, module = gemma
    upipe.pipe.scheduler = module.SCHEDULERS[0]()
    tight = TextUncertaintyPipeline.from_pipe(upipe.pipe,
                                              posterior=upipe.posterior.with_prior_precision(400.0))
    call = dict(prompt=module.PROMPTS, **module.CALL, temperature=0.7)
    closed = tight(generator=module.gen(5), mi_estimator="linearised", **call)
    sampled = tight(generator=module.gen(5), num_draws=2000, seed=3, **call)
    committed = sampled.committed_at >= 0
    a = closed.token_scores["mutual_information"][committed]
    b = sampled.token_scores["mutual_information"][committed]
    assert len(a) >= 8
    torch.testing.assert_close(a, b, rtol=0.1, atol=0.0)
