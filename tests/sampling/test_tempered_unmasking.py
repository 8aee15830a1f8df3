"""Tempered choice of which positions to unmask (position_temperature)."""

import pytest
import torch

from genunc.adapters.text import MaskedDiffusionLMAdapter
from genunc.sampling.masked import UnmaskingConfig, unmask

V, MASK, L, PROMPT = 12, 11, 12, 4

TEMPERED = [
    UnmaskingConfig("low_confidence", steps=3, block_length=4, position_temperature=2.0),
    UnmaskingConfig("threshold", threshold=0.2, position_temperature=0.1),
    UnmaskingConfig("remask", threshold=0.2, remask_threshold=0.15, block_length=4,
                    position_temperature=0.5),
]


@pytest.fixture(scope="module")
def adapter(tiny_text_model):
    return MaskedDiffusionLMAdapter(tiny_text_model(V, L), "head", MASK)


def prompts(b=6):
    x = torch.randint(0, 10, (b, L), generator=torch.Generator().manual_seed(3))
    x[:, PROMPT:] = MASK
    return x


@pytest.mark.parametrize("config", TEMPERED, ids=lambda c: f"{c.strategy}-{c.position_temperature}")
def test_tempered_samplers_finish_and_reproduce(adapter, config):
    x = prompts()
    out = unmask(adapter, x, config, seed=5)
    assert (out.tokens != MASK).all() and torch.equal(out.tokens[:, :PROMPT], x[:, :PROMPT])
    assert (out.commit_step[:, PROMPT:] >= 0).all()
    again = unmask(adapter, x, config, seed=5)
    assert torch.equal(again.tokens, out.tokens) and torch.equal(again.commit_step, out.commit_step)
    # a row's randomness is its own: the same row alone gives the same order
    alone = unmask(adapter, x[2:3], config, seed=5, indices=[2])
    assert torch.equal(alone.commit_step[0], out.commit_step[2])


def test_tempering_changes_the_order_and_vanishes_as_tau_goes_to_zero(adapter):
    x = prompts()
    hard = unmask(adapter, x, UnmaskingConfig("low_confidence"), seed=0)
    near = unmask(adapter, x, UnmaskingConfig("low_confidence", position_temperature=1e-6), seed=0)
    assert torch.equal(near.commit_step, hard.commit_step)
    orders = {tuple(unmask(adapter, x, UnmaskingConfig("low_confidence", position_temperature=5.0),
                           seed=s).commit_step.flatten().tolist()) for s in range(2)}
    assert len(orders) > 1
    hard_t = unmask(adapter, x, UnmaskingConfig("threshold", threshold=0.2), seed=0)
    near_t = unmask(adapter, x, UnmaskingConfig("threshold", threshold=0.2, position_temperature=1e-9),
                    seed=0)
    assert torch.equal(near_t.commit_step, hard_t.commit_step)
