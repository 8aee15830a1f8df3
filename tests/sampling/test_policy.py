"""The learned unmasking policy: the "policy" strategy, rollout records, GRPO pieces, saving."""

import dataclasses

import numpy as np
import pytest
import torch

from genunc.adapters.text import MaskedDiffusionLMAdapter
from genunc.errors import GenuncError
from genunc.pipelines import TextUncertaintyPipeline
from genunc.posterior import HeadPosterior
from genunc.research.recipes.policy import (
    TOP1,
    PolicyRecipe,
    group_advantages,
    grpo_loss,
    imitation_loss,
    policy_reward,
    recompute_log_probs,
)
from genunc.sampling.masked import UnmaskingConfig, unmask
from genunc.sampling.policy import PolicyConfig, UnmaskingPolicy
from genunc.tasks import SudokuTask
from genunc.zoo.text_model import save_model

V, MASK, L, PROMPT = 12, 11, 12, 4


def prompts(b=4):
    x = torch.randint(0, 10, (b, L), generator=torch.Generator().manual_seed(1))
    x[:, PROMPT:] = MASK
    return x


def random_policy(inputs="confidence", bias=0.0, seed=0):
    """An untrained policy with random (not zero) output weights, so decisions vary."""
    torch.manual_seed(seed)
    policy = UnmaskingPolicy(PolicyConfig(inputs=inputs, init_bias=bias))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1 * torch.randn_like(p))
        policy.out.bias.fill_(bias)
    return policy.eval()


@pytest.fixture(scope="module")
def fitted(tiny_text_model):
    adapter = MaskedDiffusionLMAdapter(tiny_text_model(V, L), "head", MASK)
    data = torch.randint(0, 10, (40, L), generator=torch.Generator().manual_seed(2))
    prompt_mask = torch.zeros(40, L, dtype=torch.bool)
    prompt_mask[:, :PROMPT] = True
    batches = [{"x": data[i : i + 20], "prompt_mask": prompt_mask[i : i + 20]} for i in (0, 20)]
    return adapter, HeadPosterior.fit(adapter, batches, progress=False)


@pytest.mark.parametrize("block_length", [None, 3])
@pytest.mark.parametrize("bias", [0.0, -1e4, 1e4], ids=["random", "never", "always"])
@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_rollouts_always_finish(fitted, block_length, bias, tau):
    adapter, _ = fitted
    x = prompts()
    record = []
    config = UnmaskingConfig("policy", policy=random_policy(bias=bias), block_length=block_length,
                             position_temperature=tau, policy_record=record)
    out = unmask(adapter, x, config, seed=3)
    assert (out.tokens != MASK).all() and torch.equal(out.tokens[:, :PROMPT], x[:, :PROMPT])
    answer = L - PROMPT
    blocks = 1 if block_length is None else -(-answer // block_length)
    assert blocks <= out.nfe <= answer
    assert len(record) == out.nfe
    for step in record:  # every step commits at least one active position of each unfinished row
        unfinished = step.active.any(-1)
        assert (step.committed.sum(-1)[unfinished] >= 1).all()
        assert not (step.committed & ~step.active).any()
    if bias < 0:  # a policy that never wants to unmask: one forced commit per step
        assert out.nfe == answer
        assert all(not s.decisions.any() for s in record)
    if bias > 0:  # one that always does: one step per block
        assert out.nfe == blocks


def test_safety_cap_applies(fitted):
    adapter, _ = fitted
    config = UnmaskingConfig("policy", policy=random_policy(bias=-1e4), max_steps_per_block=3)
    out = unmask(adapter, prompts(), config)
    assert out.nfe == 3 and (out.tokens != MASK).all()


def test_same_seed_same_rollout_other_seed_differs(fitted):
    adapter, _ = fitted
    policy = random_policy()
    x = prompts(6)

    def run(seed):
        record = []
        config = UnmaskingConfig("policy", policy=policy, position_temperature=1.0,
                                 policy_record=record)
        out = unmask(adapter, x, config, seed=seed)
        return out, record

    a, rec_a = run(5)
    b, rec_b = run(5)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.commit_step, b.commit_step)
    assert len(rec_a) == len(rec_b)
    assert all(torch.equal(s.decisions, t.decisions) for s, t in zip(rec_a, rec_b))
    c, rec_c = run(6)
    assert not torch.equal(a.commit_step, c.commit_step)
    # a row's decisions come from its own stream: alone it rolls out the same way
    alone = unmask(adapter, x[2:3], UnmaskingConfig("policy", policy=policy, position_temperature=1.0),
                   seed=5, indices=[2])
    assert torch.equal(alone.commit_step[0], a.commit_step[2])


def test_deterministic_policy_ignores_the_seed(fitted):
    adapter, _ = fitted
    config = UnmaskingConfig("policy", policy=random_policy())
    a, b = unmask(adapter, prompts(), config, seed=0), unmask(adapter, prompts(), config, seed=9)
    assert torch.equal(a.commit_step, b.commit_step)


@pytest.mark.parametrize("inputs", ["confidence", "confidence+mi"])
@pytest.mark.parametrize("bias", [0.0, -3.0])
def test_recomputed_log_probs_match_the_rollout(fitted, inputs, bias):
    adapter, posterior = fitted
    policy = random_policy(inputs, bias=bias)
    record = []
    config = UnmaskingConfig("policy", policy=policy, block_length=4, position_temperature=1.0,
                             policy_record=record)
    unmask(adapter, prompts(5), config, seed=1,
           mi_draws=posterior.sample(3, seed=0) if inputs != "confidence" else None)
    at_rollout = torch.stack([s.log_prob for s in record]).sum(0)
    if bias < 0:  # the fallback position was drawn, and its choice is in the log-probability
        assert any(s.forced.any() for s in record)
    again = recompute_log_probs(policy, record)
    assert again.requires_grad
    assert torch.allclose(again.detach(), at_rollout, atol=1e-5)
    assert (at_rollout < 0).all()


def test_reward_formula():
    r = policy_reward(np.array([True, True, False, True, True]), np.array([1, 4, 1, 16, 8]), 16, 1.0)
    assert torch.allclose(r, torch.tensor([1.0, 13 / 16, 0.0, 1 / 16, 9 / 16], dtype=torch.float64))
    r2 = policy_reward(np.array([True, True]), np.array([4, 2]), 8, 2.0)
    assert torch.allclose(r2, torch.tensor([(5 / 8) ** 2, (7 / 8) ** 2], dtype=torch.float64))
    assert torch.equal(policy_reward(np.array([True]), np.array([3]), 8, 0.0),
                       torch.tensor([1.0], dtype=torch.float64))


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.3, 0.3, 0.3, 0.3], dtype=torch.float64)
    adv = group_advantages(r, 4)
    assert torch.allclose(adv[:4].mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-12)
    assert adv[0] > adv[2] > adv[1]
    assert torch.equal(adv[4:], torch.zeros(4, dtype=torch.float64))
    centred = group_advantages(r, 4, scale=False)
    assert torch.allclose(centred, torch.tensor([0.5, -0.5, 0, 0, 0, 0, 0, 0], dtype=torch.float64))
    # an all-right group differing only by speed: normalising blows the tiny spread up to +-1
    fast = torch.tensor([1.0, 0.99, 1.0, 0.99], dtype=torch.float64)
    assert group_advantages(fast, 4).abs().max() > 0.99
    assert group_advantages(fast, 4, scale=False).abs().max() < 0.01


def _rollout(adapter, policy, seed=0):
    record = []
    config = UnmaskingConfig("policy", policy=policy, position_temperature=1.0, policy_record=record)
    out = unmask(adapter, prompts(4).repeat_interleave(4, 0), config, seed=seed)
    return out, record


def test_one_grpo_step_changes_parameters(fitted):
    adapter, _ = fitted
    policy = random_policy()
    out, record = _rollout(adapter, policy)
    # a made-up verifier: reward the rollouts that took fewer steps
    rewards = policy_reward(np.ones(16, bool), out.row_nfe, L - PROMPT, 1.0)
    advantages = group_advantages(rewards, 4)
    assert advantages.abs().sum() > 0
    before = [p.detach().clone() for p in policy.parameters()]
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    policy.train()
    grpo_loss(policy, record, advantages).backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, policy.parameters()))


def test_equal_rewards_give_zero_gradient(fitted):
    adapter, _ = fitted
    policy = random_policy()
    _, record = _rollout(adapter, policy)
    advantages = group_advantages(torch.full((16,), 0.7, dtype=torch.float64), 4)
    policy.train()
    grpo_loss(policy, record, advantages).backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in policy.parameters())


def test_imitation_teaches_the_threshold_rule(fitted):
    """The warm start: behaviour cloning on the policy's own states moves its deterministic
    decisions to "unmask where the top-1 probability exceeds the threshold"."""
    adapter, _ = fitted
    policy = random_policy(bias=-2.0)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)

    def agreement(record):
        from genunc.sampling.policy import stack_record

        steps = stack_record(record)
        with torch.no_grad():
            wants = policy(steps.features, steps.time) > 0
        target = steps.features[..., TOP1] > 0.2
        return float((wants == target)[steps.active].double().mean())

    _, record = _rollout(adapter, policy.eval())
    before = agreement(record)
    for seed in range(60):
        _, record = _rollout(adapter, policy.eval(), seed)
        policy.train()
        loss = imitation_loss(policy, record, 0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, record = _rollout(adapter, policy.eval(), 99)
    assert agreement(record) > max(before, 0.9)
    with pytest.raises(GenuncError, match="warm_start"):
        PolicyRecipe(warm_start=1.5)
    assert "--warm-start 0.9 --warm-steps 100" in PolicyRecipe(warm_start=0.9).command()
    assert "--advantage centred" in PolicyRecipe(advantage="centred").command()
    with pytest.raises(GenuncError, match="advantage"):
        PolicyRecipe(advantage="scaled")


def test_mi_policy_needs_draws(fitted, tmp_path):
    adapter, posterior = fitted
    policy = random_policy("confidence+mi")
    config = UnmaskingConfig("policy", policy=policy)
    with pytest.raises(GenuncError, match="mutual information"):
        unmask(adapter, prompts(), config)
    out = unmask(adapter, prompts(), config, mi_draws=posterior.sample(3, seed=0))
    assert (out.tokens != MASK).all()
    with pytest.raises(GenuncError, match="trajectory_draws"):
        unmask(adapter, prompts(), config, mi_draws=posterior.sample(3, seed=0),
               trajectory_draws=posterior.sample(2, seed=0, with_map=True))


def test_config_checks():
    with pytest.raises(GenuncError, match="policy"):
        UnmaskingConfig("policy")
    with pytest.raises(GenuncError, match="policy"):
        UnmaskingConfig("threshold", policy=random_policy())
    with pytest.raises(GenuncError, match="inputs"):
        PolicyConfig(inputs="mi")
    with pytest.raises(GenuncError, match="features"):
        random_policy()(torch.zeros(1, L, 3), torch.zeros(1))


@pytest.mark.parametrize("inputs", ["confidence", "confidence+mi"])
def test_saved_policy_loads_and_runs_in_the_pipeline(tmp_path, tiny_text_model, inputs):
    task = SudokuTask(2, train_size=40, test_size=8)
    save_model(tiny_text_model(task.vocab_size, task.length), task, tmp_path / "model")
    policy = random_policy(inputs)
    policy.save_pretrained(tmp_path / "policy", task=task.spec(), model="tiny")
    loaded = UnmaskingPolicy.from_pretrained(tmp_path / "policy")
    assert loaded.config == policy.config and loaded.metadata["model"] == "tiny"
    assert loaded.metadata["task"] == task.spec()
    assert (tmp_path / "policy" / "policy.safetensors").stat().st_size < 1_000_000
    pipe = TextUncertaintyPipeline.from_pretrained(tmp_path / "model")
    split = task.split()
    x = task.prompts(split["test"])
    config = UnmaskingConfig("policy", policy=loaded, block_length=8)
    if inputs == "confidence+mi":
        with pytest.raises(GenuncError, match="posterior"):
            pipe(x, config, scores=("low_confidence",), progress=False)
        with pytest.raises(GenuncError, match="num_draws"):
            pipe(x, config, num_draws=1, scores=("low_confidence",), progress=False)
    pipe.fit_posterior([{"x": task.sequences(split["train"]),
                         "prompt_mask": task.prompt_mask(len(split["train"]))}], progress=False)
    out = pipe(x, config, num_draws=3, scores=("low_confidence", "mutual_information"), seed=0,
               progress=False)
    assert (out.tokens != task.mask_id).all() and task.check(out.tokens).shape == (len(x),)
    direct = unmask(pipe.adapter, x, config, seed=0,
                    mi_draws=pipe.posterior.sample(3, seed=0) if loaded.uses_mi else None)
    if not loaded.uses_mi:  # the pipeline runs the same sampler
        assert torch.equal(direct.tokens, out.tokens)
    # float16 storage: the saved policy is close to, and evaluated as, the rounded one
    feats = torch.rand(2, task.length, policy.config.num_features)
    t = torch.rand(2)
    assert torch.allclose(loaded(feats, t), policy(feats, t), atol=5e-2)
    replaced = dataclasses.replace(config, steps=4)
    assert replaced.policy is loaded


def _shipped() -> list[str]:
    from genunc.zoo.shipped import WEIGHTS_DIR

    return sorted(p.name for p in WEIGHTS_DIR.glob("policy_*"))


SHIPPED = _shipped()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_policies_load_and_answer(name):
    from genunc.tasks import task_from_spec
    from genunc.zoo.shipped import WEIGHTS_DIR

    folder = WEIGHTS_DIR / name
    assert (folder / "policy.safetensors").stat().st_size < 1_000_000
    policy = UnmaskingPolicy.from_pretrained(folder)
    task_name = name.split("_")[1]
    assert policy.metadata["command"].startswith(f"genunc zoo train unmask-policy --task {task_name} ")
    assert "--advantage centred" in policy.metadata["command"]  # the recipe docs/results.md reports
    assert policy.metadata["training"]["rollouts"] > 0
    pipe = TextUncertaintyPipeline.from_pretrained(WEIGHTS_DIR / policy.metadata["model"], posterior=None)
    task = task_from_spec(pipe.metadata["task"])
    assert task.spec() == policy.metadata["task"]
    split = task.split()
    x = task.prompts(split["test"][:16])
    draws = None
    if policy.uses_mi:
        pipe.fit_posterior([{"x": task.sequences(split["train"][:256]),
                             "prompt_mask": task.prompt_mask(256)}], progress=False)
        draws = pipe.posterior.sample(3, seed=0)
    config = UnmaskingConfig("policy", policy=policy, block_length=policy.metadata["block_length"])
    out = unmask(pipe.adapter, x, config, mi_draws=draws)
    assert (out.tokens != task.mask_id).all()
    assert torch.equal(out.tokens[:, : task.prompt_length], x[:, : task.prompt_length])
    assert out.nfe <= task.answer_length and task.check(out.tokens).mean() > 0


def test_cli_policy_flags(tmp_path, capsys):
    from genunc.cli import main

    assert main(["zoo", "train", "sudoku4-mdlm", "--alpha", "1", "--out", str(tmp_path)]) == 2
    assert "unmask-policy only" in capsys.readouterr().err
    assert main(["zoo", "train", "unmask-policy", "--batch-size", "4", "--out", str(tmp_path)]) == 2
    from genunc.zoo.shipped import policy_dir

    shipped = policy_dir("sudoku4", "confidence", None)
    assert main(["zoo", "train", "unmask-policy", "--task", "sudoku4", "--out", str(shipped)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_every_task_and_mode_has_a_shipped_policy():
    expected = {f"policy_{task}_{inputs}" for task in ("sudoku4", "sort") for inputs in ("conf", "mi")}
    expected |= {"policy_sudoku4_conf_b4", "policy_sudoku4_mi_b4"}
    assert set(SHIPPED) == expected
