"""Unmasking samplers for masked-diffusion LMs, with commit-time token statistics."""

import math

import pytest
import torch

from genunc.adapters.text import MaskedDiffusionLMAdapter
from genunc.errors import GenuncError
from genunc.posterior import HeadPosterior
from genunc.sampling.masked import UnmaskingConfig, unmask

V, MASK, L, PROMPT = 12, 11, 10, 4


def prompts(b=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 10, (b, L), generator=g)
    x[:, PROMPT:] = MASK
    return x


@pytest.fixture(scope="module")
def fitted(tiny_text_model):
    adapter = MaskedDiffusionLMAdapter(tiny_text_model(V, L), "head", MASK)
    g = torch.Generator().manual_seed(2)
    data = torch.randint(0, 10, (40, L), generator=g)
    prompt_mask = torch.zeros(40, L, dtype=torch.bool)
    prompt_mask[:, :PROMPT] = True
    batches = [{"x": data[i : i + 20], "prompt_mask": prompt_mask[i : i + 20]} for i in (0, 20)]
    posterior = HeadPosterior.fit(adapter, batches, progress=False)
    return adapter, posterior


CONFIGS = [
    UnmaskingConfig("random"),
    UnmaskingConfig("low_confidence", steps=3, block_length=4),
    UnmaskingConfig("low_confidence", temperature=1.0, position_temperature=0.5),
    UnmaskingConfig("threshold", threshold=0.05, block_length=3),
    UnmaskingConfig("remask", threshold=0.1, remask_threshold=0.09, block_length=3),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.strategy}-{c.block_length}-{c.temperature}")
def test_every_sampler_fills_all_masks_and_keeps_the_prompt(fitted, config):
    adapter, posterior = fitted
    x = prompts()
    out = unmask(adapter, x, config, mi_draws=posterior.sample(3, seed=0),
                 seed=0)
    assert out.tokens.shape == x.shape
    assert (out.tokens != MASK).all()
    assert torch.equal(out.tokens[:, :PROMPT], x[:, :PROMPT])
    assert (out.commit_step[:, PROMPT:] >= 0).all() and (out.commit_step[:, :PROMPT] == -1).all()
    assert set(out.token_stats) == {"confidence", "margin", "self_certainty", "mutual_information",
                                    "posterior_confidence"}
    pc = out.token_stats["posterior_confidence"][:, PROMPT:]
    assert ((pc > 0) & (pc <= 1)).all()
    assert (out.token_stats["mutual_information"][:, PROMPT:] >= 0).all()
    # self-certainty is a KL to the uniform over the V - 1 predictable tokens
    sc = out.token_stats["self_certainty"][:, PROMPT:]
    assert (sc >= 0).all() and (sc <= math.log(V - 1) + 1e-9).all()
    assert out.nfe >= 1


def test_step_counts(fitted):
    adapter, _ = fitted
    x = prompts()
    one_per_step = unmask(adapter, x, UnmaskingConfig("low_confidence"))
    assert one_per_step.nfe == L - PROMPT
    scheduled = unmask(adapter, x, UnmaskingConfig("low_confidence", steps=2))
    assert scheduled.nfe == 2
    parallel = unmask(adapter, x, UnmaskingConfig("threshold", threshold=0.05))
    assert parallel.nfe < one_per_step.nfe
    assert (parallel.row_nfe <= parallel.nfe).all() and parallel.row_nfe.max() == parallel.nfe
    assert (one_per_step.row_nfe == L - PROMPT).all()
    blocks = unmask(adapter, x, UnmaskingConfig("threshold", threshold=0.0, block_length=2))
    assert blocks.nfe == math.ceil((L - PROMPT) / 2)  # threshold 0 fills a block per call
    # an untrained model is never 90% sure: one token per step, and re-checked drafts under 85%
    # go back to the mask, so blocks run until the cap (2 x block length) and then fill up
    remask = unmask(adapter, x, UnmaskingConfig("remask", threshold=0.9, remask_threshold=0.85,
                                                  block_length=3))
    assert L - PROMPT < remask.nfe <= 2 * 2 * 3
    assert remask.backbone_rows > remask.nfe * x.shape[0]  # verification rows ride along


def test_same_seed_same_output(fitted):
    adapter, posterior = fitted
    config = UnmaskingConfig("random", temperature=0.8, position_temperature=1.0)
    runs = [unmask(adapter, prompts(), config, mi_draws=posterior.sample(3, seed=5),
                   seed=9)
            for _ in range(2)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    for name in runs[0].token_stats:
        assert torch.equal(runs[0].token_stats[name], runs[1].token_stats[name])
    other = unmask(adapter, prompts(), config, seed=10)
    assert not torch.equal(other.tokens, runs[0].tokens)


def test_trajectory_draws_share_randomness_with_the_map(fitted):
    adapter, posterior = fitted
    config = UnmaskingConfig("low_confidence", temperature=1.0, block_length=3)
    plain = unmask(adapter, prompts(), config, seed=4)
    forked = unmask(adapter, prompts(), config,
                    trajectory_draws=posterior.sample(4, seed=1, with_map=True),
                    seed=4)
    assert torch.equal(forked.tokens, plain.tokens)  # the MAP row is unaffected by the draws
    assert forked.draw_tokens.shape == (4, 3, L) and (forked.draw_tokens != MASK).all()
    assert forked.nfe == plain.nfe and forked.backbone_rows == 5 * plain.backbone_rows


def test_tied_head_is_untied_and_logit_shift_aligns_targets(tiny_text_model):
    model = tiny_text_model(V, L, tie_head=True)
    assert model.head.weight is model.embed.weight
    with pytest.warns(UserWarning, match="untied"):
        adapter = MaskedDiffusionLMAdapter(model, "head", MASK, logit_shift=True)
    assert model.head.weight is not model.embed.weight
    torch.testing.assert_close(model.head.weight, model.embed.weight)
    x0 = prompts(4)
    x0[:, PROMPT:] = torch.arange(L - PROMPT)
    prompt_mask = torch.zeros_like(x0, dtype=torch.bool)
    prompt_mask[:, :PROMPT] = True
    pairs = adapter.training_pairs({"x": x0, "prompt_mask": prompt_mask},
                                   torch.Generator().manual_seed(0))
    # head row i is asked for token i + 1, and only where that token was masked
    masked = pairs.inputs["x"] == MASK
    assert torch.equal(pairs.mask[:, :-1], masked[:, 1:])
    assert torch.equal(pairs.target[:, :-1], x0[:, 1:])
    logits = adapter.denoise(pairs.inputs["x"])
    raw = model(pairs.inputs["x"]).logits
    torch.testing.assert_close(logits[:, 1:, :MASK], raw[:, :-1, :MASK])
    assert (logits[..., MASK] < -1e30).all()


def test_bad_inputs(fitted, tiny_text_model):
    adapter, posterior = fitted
    x = prompts()
    ragged = x.clone()
    ragged[0, PROMPT] = 3
    with pytest.raises(GenuncError, match="same positions"):
        unmask(adapter, ragged)
    with pytest.raises(GenuncError, match="num_draws >= 2"):
        unmask(adapter, x, mi_draws=posterior.sample(1))
    with pytest.raises(GenuncError, match="MAP first"):
        unmask(adapter, x, trajectory_draws=posterior.sample(2))
    with pytest.raises(GenuncError, match="unknown strategy"):
        UnmaskingConfig("greedy")
    with pytest.raises(GenuncError, match="nn.Linear"):
        MaskedDiffusionLMAdapter(tiny_text_model(V, L), "blocks", MASK)


@pytest.mark.parametrize("config", [UnmaskingConfig("threshold", temperature=1.0, threshold=0.5),
                                    UnmaskingConfig("random", temperature=0.7, block_length=3)],
                         ids=["threshold", "random-blocks"])
def test_a_sequence_does_not_depend_on_its_batch(fitted, config):
    """Each row's noise comes from its own stream (keyed by its global index), so splitting a
    batch, even where rows need different numbers of steps, changes no sequence."""
    adapter, posterior = fitted
    x = prompts()
    whole = unmask(adapter, x, config, mi_draws=posterior.sample(3, seed=0), seed=7,
                   indices=[10, 11, 12])
    parts = [unmask(adapter, x[i : i + 1], config, mi_draws=posterior.sample(3, seed=0), seed=7,
                    indices=[10 + i]) for i in range(len(x))]
    assert torch.equal(whole.tokens, torch.cat([p.tokens for p in parts]))
    for name in whole.token_stats:
        torch.testing.assert_close(whole.token_stats[name],
                                   torch.cat([p.token_stats[name] for p in parts]))
    shifted = unmask(adapter, x, config, seed=7, indices=[20, 21, 22])
    assert not torch.equal(shifted.tokens, whole.tokens)
