"""Unmasking with draws of a tail (last transformer block + final norm + head) instead of the head."""

import pytest
import torch
from torch import nn

from genunc.adapters.text import MaskedDiffusionLMAdapter
from genunc.errors import GenuncError
from genunc.posterior import HeadPosterior, TailPosterior, default_tail
from genunc.posterior.draws import HeadDraws
from genunc.posterior.heads import head_ops_for
from genunc.posterior.tail import Tail, TailDraws
from genunc.sampling.masked import UnmaskingConfig, unmask
from genunc.scores.tokens import mutual_information

V, MASK, L, PROMPT = 12, 11, 10, 4


def prompts(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 10, (b, L), generator=g)
    x[:, PROMPT:] = MASK
    return x


def _batches():
    g = torch.Generator().manual_seed(2)
    data = torch.randint(0, 10, (40, L), generator=g)
    prompt_mask = torch.zeros(40, L, dtype=torch.bool)
    prompt_mask[:, :PROMPT] = True
    return [{"x": data[i : i + 20], "prompt_mask": prompt_mask[i : i + 20]} for i in (0, 20)]


@pytest.fixture(scope="module")
def adapter(tiny_text_model):
    model = tiny_text_model(V, L)
    model.blocks = nn.TransformerEncoder(model.blocks.layers[0], 2, enable_nested_tensor=False)
    torch.manual_seed(3)
    for p in model.blocks.layers[1].parameters():  # the copied layer gets weights of its own
        p.data.add_(0.2 * torch.randn_like(p))
    return MaskedDiffusionLMAdapter(model.eval(), "head", MASK)


@pytest.fixture(scope="module")
def tail(adapter):
    return Tail(adapter.model, default_tail(adapter.model, 1))


def _map_tail_draws(tail, m, with_map=True):
    return TailDraws({k: v.detach()[None].repeat(m, *[1] * v.dim())
                      for k, v in tail.parameters().items()}, tail, with_map)


def _perturbed(tail, m, scale=0.3, seed=0, with_map=True):
    g = torch.Generator().manual_seed(seed)
    params = {k: v.detach()[None] + scale * torch.randn(m, *v.shape, generator=g)
              for k, v in tail.parameters().items()}
    if with_map:
        params = {k: torch.cat([tail.parameters()[k].detach()[None], v[1:]]) for k, v in params.items()}
    return TailDraws(params, tail, with_map)


CONFIGS = [UnmaskingConfig("low_confidence"),
           UnmaskingConfig("low_confidence", temperature=1.0, block_length=3),
           UnmaskingConfig("remask", threshold=0.15, remask_threshold=0.12, temperature=0.7)]
IDS = ["greedy", "tempered-blocks", "remask"]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_map_tail_draws_give_the_head_paths_tokens_and_statistics(adapter, tail, config):
    x = prompts(4)
    head = adapter.head
    head_map = HeadDraws({k: v.detach()[None].repeat(3, *[1] * v.dim())
                          for k, v in head.named_parameters()}, head_ops_for(head), True)
    by_head = unmask(adapter, x, config, mi_draws=head_map[1:], trajectory_draws=head_map, seed=5)
    by_tail = unmask(adapter, x, config, mi_draws=_map_tail_draws(tail, 2, False),
                     trajectory_draws=_map_tail_draws(tail, 3), seed=5)
    plain = unmask(adapter, x, config, seed=5)
    assert torch.equal(by_tail.tokens, by_head.tokens)
    assert torch.equal(by_tail.tokens, plain.tokens)
    assert torch.equal(by_tail.draw_tokens, by_head.draw_tokens)
    assert torch.equal(by_tail.commit_step, by_head.commit_step)
    assert by_tail.nfe == by_head.nfe and by_tail.backbone_rows == by_head.backbone_rows
    for name, value in by_head.token_stats.items():
        torch.testing.assert_close(by_tail.token_stats[name], value, atol=1e-5, rtol=1e-5)
    # the MAP copies agree with each other: no mutual information, posterior confidence = MAP's
    assert by_tail.token_stats["mutual_information"].abs().max() <= 1e-6
    torch.testing.assert_close(by_tail.token_stats["posterior_confidence"],
                               by_tail.token_stats["confidence"], atol=1e-5, rtol=1e-5)


def test_mutual_information_of_batched_tail_draws_equals_a_loop_with_the_weights_swapped_in(
        adapter, tail):
    """Greedy one-token-per-step unmasking: the state at step s is the prompt plus the tokens
    committed before s, so each position's MI can be recomputed from full model calls, one per
    draw with that draw's tail weights in the model."""
    x = prompts(3)
    draws = _perturbed(tail, 4, with_map=False)
    out = unmask(adapter, x, UnmaskingConfig("low_confidence"), mi_draws=draws, seed=0)
    mi = out.token_stats["mutual_information"]
    assert mi[:, PROMPT:].min() > 1e-4  # the draws disagree: the check is not about zeros
    for step in range(L - PROMPT):
        state = torch.where((out.commit_step < step) & (out.commit_step >= 0), out.tokens, x)
        state = torch.where(torch.arange(L) < PROMPT, x, state)
        logits = []
        for m in range(len(draws)):
            with torch.no_grad(), tail.swapped(draws.draw(m)):
                logits.append(adapter.denoise(state).double())
        expected = mutual_information(torch.stack(logits))
        at = out.commit_step == step
        assert at.sum() == len(x)
        torch.testing.assert_close(mi[at], expected[at], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_trajectory_draw_tokens_equal_running_each_draw_on_its_own(adapter, tail, config):
    x = prompts(3, seed=4)
    draws = _perturbed(tail, 4, scale=0.5, seed=1)
    out = unmask(adapter, x, config, trajectory_draws=draws, seed=7)
    alone = []
    for m in range(len(draws)):
        with tail.swapped(draws.draw(m)):
            alone.append(unmask(adapter, x, config, seed=7).tokens)
    assert torch.equal(out.tokens, alone[0])
    for m in range(1, len(draws)):
        assert torch.equal(out.draw_tokens[m - 1], alone[m])
    assert any(not torch.equal(a, alone[0]) for a in alone[1:])  # the draws do change tokens


def test_head_and_tail_draws_do_not_mix(adapter, tail, tiny_text_model):
    head = adapter.head
    head_map = HeadDraws({k: v.detach()[None].repeat(3, *[1] * v.dim())
                          for k, v in head.named_parameters()}, head_ops_for(head), True)
    with pytest.raises(GenuncError, match="one posterior"):
        unmask(adapter, prompts(), mi_draws=_map_tail_draws(tail, 2, False),
               trajectory_draws=head_map)


def test_text_tail_posterior_fit_freezes_unseen_classes_and_matches_monte_carlo_curvature(
        adapter, tail):
    posterior = TailPosterior.fit(adapter, _batches(), tail.names, repeats=2)
    assert posterior.likelihood == "classification"
    assert posterior.info["curvature"] == "exact"
    # answer tokens are 0..9: the other rows (10 and the mask token) have no data
    assert posterior.info["classes_without_data"] == [10, MASK]
    assert 0 < posterior.prior_precision < 1e6
    assert posterior.n_params == tail.n_params - 2 * (16 + 1)  # two frozen head rows
    draws = posterior.sample(5, seed=0)
    weight, bias = draws.params["head.weight"], draws.params["head.bias"]
    head = adapter.head
    for row in (10, MASK):
        assert torch.equal(weight[:, row], head.weight.detach()[row].expand(5, -1))
        assert torch.equal(bias[:, row], head.bias.detach()[row].expand(5))
    assert (weight[:, :10] - head.weight.detach()[:10]).abs().max() > 0
    moved = (draws.params["blocks.layers.1.linear1.weight"]
             - adapter.model.blocks.layers[1].linear1.weight.detach()).abs().max()
    assert moved > 0
    mc = TailPosterior.fit(adapter, _batches(), tail.names, repeats=2, curvature="mc",
                           mc_samples=64, prior_precision=1.0)
    exact = TailPosterior.fit(adapter, _batches(), tail.names, repeats=2, prior_precision=1.0)
    h_mc, h_exact = mc.laplace.H, exact.laplace.H
    rel = (h_mc - h_exact).norm() / h_exact.norm()
    assert rel < 0.25, rel
    assert torch.corrcoef(torch.stack([h_mc, h_exact]))[0, 1] > 0.95


def test_a_text_tail_posterior_saves_and_loads(adapter, tail, tmp_path):
    posterior = TailPosterior.fit(adapter, _batches(), tail.names)
    posterior.save(tmp_path)
    loaded = TailPosterior.load(tmp_path, adapter.model)
    assert loaded.likelihood == "classification"
    torch.testing.assert_close(loaded.sample(3, seed=1).flat, posterior.sample(3, seed=1).flat)
    assert loaded.info["classes_without_data"] == posterior.info["classes_without_data"]


def test_head_posterior_path_is_unchanged_by_the_tail_support(adapter):
    posterior = HeadPosterior.fit(adapter, _batches(), progress=False)
    out = unmask(adapter, prompts(), mi_draws=posterior.sample(3, seed=0),
                 trajectory_draws=posterior.sample(3, seed=1, with_map=True), seed=0)
    assert out.draw_tokens.shape == (3, 3, L)
    assert torch.isfinite(out.token_stats["mutual_information"]).all()


@pytest.mark.parametrize("options", [dict(), dict(unseen_classes="prior"),
                                     dict(output_softcap=0.5), dict(structure="full")],
                         ids=["freeze", "prior", "softcap", "full"])
def test_a_one_module_tail_is_the_head_posterior(adapter, options):
    """The head is the one-module case of a tail: over the same noisy pairs, a tail posterior
    of the head alone has the head posterior's marginal variances, with classes without data
    frozen (left out of the Laplace by both) or left at the prior, the likelihood on
    softcapped logits where asked, and the same evidence (the fit core both kinds share)."""
    fit = dict(repeats=2, prior_precision=1.0, **options)
    head = HeadPosterior.fit(adapter, _batches(), progress=False, **fit)
    tail = TailPosterior.fit(adapter, _batches(), ["head"], **fit)
    assert tail.n_params == head.n_params
    assert tail.info["unseen_classes"] == head.info["unseen_classes"]
    torch.testing.assert_close(tail.posterior_variance, head.posterior_variance,
                               rtol=1e-4, atol=1e-7)
    assert tail.log_marginal_likelihood() == pytest.approx(head.log_marginal_likelihood(),
                                                           rel=1e-4)


def test_a_softcap_changes_the_tail_fit_it_is_given(adapter):
    """The control for the softcap case above: a cap near the logits' size moves the fit."""
    plain = TailPosterior.fit(adapter, _batches(), ["head"], prior_precision=1.0)
    capped = TailPosterior.fit(adapter, _batches(), ["head"], prior_precision=1.0,
                               output_softcap=0.5)
    assert not torch.allclose(plain.posterior_variance, capped.posterior_variance, rtol=1e-3)
    with pytest.raises(GenuncError, match="softcap must be positive"):
        TailPosterior.fit(adapter, _batches(), ["head"], output_softcap=0.0)
