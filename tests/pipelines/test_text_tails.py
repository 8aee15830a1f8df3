"""Tail posteriors through the wrapped text pipelines (LLaDA2Pipeline, DiffusionGemmaPipeline).

A tail is fitted by the same adapter as the head (the shared tail collector over the family's
corruption); at each commit the tail is re-run on the inputs its pre-hooks recorded in that
forward pass.  Checked against the head where they must agree (a one-module tail is the head),
against the MAP where the draws collapse, and against the plain pipeline's outputs, for both
families with the tiny pipelines their own test modules build.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).parent))  # the families' tiny pipelines
import test_text_from_pipe as llada  # noqa: E402
import test_text_gemma as gemma  # noqa: E402

from genunc.errors import GenuncError  # noqa: E402
from genunc.pipelines.text import TextUncertaintyPipeline  # noqa: E402
from genunc.posterior import HeadDraws, TailDraws, TailPosterior  # noqa: E402

FAMILIES = {
    "llada2": SimpleNamespace(module=llada, tail=["block", "norm", "lm_head"], call=llada.SAMPLED,
                              features=llada.answer_features),
    "gemma": SimpleNamespace(module=gemma,
                             tail=["model.decoder.layers.1", "model.decoder.norm", "lm_head"],
                             call=dict(gemma.CALL, temperature=1.0), features=gemma.bag_of_words),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    """A family and a wrapper of its tiny pipeline with a fitted tail posterior."""
    spec = FAMILIES[request.param]
    upipe = TextUncertaintyPipeline.from_pipe(spec.module.pipeline())
    upipe.fit_posterior(spec.module.FIT_DATA, repeats=2, prior_precision=1.0, tail=spec.tail)
    return SimpleNamespace(**vars(spec), upipe=upipe)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_one_module_tail_scores_as_the_head_with_the_same_weights(name):
    spec = FAMILIES[name]
    module = spec.module
    upipe = TextUncertaintyPipeline.from_pipe(module.pipeline())
    head = upipe.fit_posterior(module.FIT_DATA, repeats=2, prior_precision=1.0)
    tail = upipe.fit_posterior(module.FIT_DATA, repeats=2, prior_precision=1.0, tail=["lm_head"])
    assert isinstance(tail, TailPosterior)
    draws = tail.sample(4, seed=2)
    by_tail = upipe(prompt=module.PROMPTS, generator=module.gen(3), draws=draws, **spec.call)
    upipe.posterior = head
    same = HeadDraws({k.removeprefix("lm_head."): v for k, v in draws.params.items()}, head.ops)
    by_head = upipe(prompt=module.PROMPTS, generator=module.gen(3), draws=same, **spec.call)
    assert torch.equal(by_tail.sequences, by_head.sequences)
    mi_tail, mi_head = (o.token_scores["mutual_information"] for o in (by_tail, by_head))
    committed = by_head.committed_at >= 0
    assert committed.any() and (mi_head[committed] > 0).all()
    torch.testing.assert_close(mi_tail[committed], mi_head[committed], rtol=1e-4, atol=1e-7)


def test_a_fitted_block_tail_keeps_the_plain_outputs_and_scores_them(family):
    upipe, module = family.upipe, family.module
    assert isinstance(upipe.posterior, TailPosterior)
    assert upipe.posterior.tail.names == family.tail
    plain_gen, wrapped_gen = module.gen(4), module.gen(4)
    plain = upipe.pipe(prompt=module.PROMPTS, generator=plain_gen, **family.call)
    out = upipe(prompt=module.PROMPTS, generator=wrapped_gen, num_draws=3, seed=1,
                scores=("mutual_information", "semantic"), feature_extractor=family.features,
                **family.call)
    assert torch.equal(out.sequences, plain.sequences) and out.texts == plain.texts
    assert torch.equal(plain_gen.get_state(), wrapped_gen.get_state())
    committed = out.committed_at >= 0
    mi = out.token_scores["mutual_information"]
    assert committed.any() and (mi[committed] > 0).all()
    assert np.isfinite(out.scores["semantic"]).all() and out.draw_sequences.shape[0] == 3
    again = upipe.pipe(prompt=module.PROMPTS, generator=module.gen(4), **family.call)
    assert torch.equal(again.sequences, plain.sequences)  # the draws' weights were restored


def test_tail_draws_at_the_map_give_zero_mutual_information(family):
    tail = family.upipe.posterior.tail
    at_map = TailDraws({k: v.detach()[None].repeat(3, *[1] * v.dim())
                        for k, v in tail.parameters().items()}, tail)
    out = family.upipe(prompt=family.module.PROMPTS, generator=family.module.gen(5), draws=at_map,
                       **family.call)
    committed = out.committed_at >= 0
    assert committed.any() and (out.token_scores["mutual_information"][committed] < 1e-6).all()


def test_a_tail_fit_refuses_what_the_head_fit_refuses():
    upipe = TextUncertaintyPipeline.from_pipe(llada.pipeline())
    with pytest.raises(GenuncError, match="DiffusionGemma"):
        upipe.fit_posterior(llada.FIT_DATA, tail=FAMILIES["llada2"].tail, corrupted_only=True)
    with pytest.raises(GenuncError, match="nest"):
        upipe.fit_posterior(llada.FIT_DATA, tail=["block", "block.linear1"])
