"""GRPO recipe for the learned unmasking policy (``genunc zoo train unmask-policy``).

The environment is a shipped, frozen masked-diffusion model (``sudoku4_mdlm`` or ``sort_mdlm``);
the agent is an :class:`~genunc.sampling.policy.UnmaskingPolicy`.  Each optimiser step draws
``prompts_per_batch`` problems from the task's training split, runs ``group`` rollouts of each
through the very sampler used at test time (:func:`~genunc.sampling.masked.unmask` with the
``"policy"`` strategy, Bernoulli decisions at τ = 1 from per-rollout streams, greedy tokens),
and scores every rollout with

    r = 1[answer correct] * ((L - steps + 1) / L) ** alpha

where ``L`` is the number of answer tokens and ``steps`` the backbone calls the rollout used.
Advantages are normalised within each group of rollouts of one prompt (GRPO, no KL term; a
group whose rewards are all equal teaches nothing).  One gradient step is taken per batch of
rollouts (on-policy, so the importance ratio is 1 and PPO's clipping never binds); the
log-probabilities are recomputed with gradients from the sampler's record in one batched pass.

With ``inputs="confidence+mi"`` the policy also reads the mutual information of head draws from
the model's Laplace head posterior, fitted on the first ``n_fit`` training problems (the same
fit as the benchmarks); a fresh set of ``num_draws`` draws is taken at every optimiser step.

A validation set (the last ``val_prompts`` problems of the training split, never trained on)
gives the deterministic (p > 0.5) policy's accuracy and NFE at the end; the test split is not
touched.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from genunc import streams
from genunc.errors import GenuncError
from genunc.posterior import HeadPosterior
from genunc.sampling.masked import UnmaskingConfig, unmask
from genunc.sampling.policy import PolicyConfig, PolicyStep, UnmaskingPolicy, stack_record
from genunc.zoo.shipped import SORT_DIR, SUDOKU4_DIR
from genunc.zoo.text_model import load_text_adapter

#: --task: the frozen model each policy is trained for
MODELS = {"sudoku4": SUDOKU4_DIR, "sort": SORT_DIR}


@dataclass
class PolicyRecipe:
    task: str = "sudoku4"
    inputs: str = "confidence"
    block_length: int | None = None
    steps: int = 300
    prompts_per_batch: int = 8
    group: int = 8
    alpha: float = 0.5
    lr: float = 3e-4
    top_k: int = 3
    init_bias: float = -2.0
    num_draws: int = 8
    n_fit: int = 2000
    val_prompts: int = 300
    #: behaviour cloning of the threshold heuristic (commit where top-1 probability > this)
    #: for ``warm_steps`` steps before GRPO; None: GRPO from the initial bias alone
    warm_start: float | None = None
    warm_steps: int = 100
    warm_lr: float = 1e-3
    #: "normalised": GRPO's (r - mean) / std within a group; "centred": r - mean (Dr. GRPO)
    advantage: str = "normalised"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in MODELS:
            raise GenuncError(f"unknown task {self.task!r}; policies train for {sorted(MODELS)}")
        if self.group < 2:
            raise GenuncError("GRPO compares rollouts within a group: group must be >= 2")
        if self.alpha < 0:
            raise GenuncError(f"alpha must be >= 0, got {self.alpha}")
        if self.advantage not in ("normalised", "centred"):
            raise GenuncError(f"advantage is 'normalised' or 'centred', got {self.advantage!r}")
        if self.warm_start is not None and not 0 < self.warm_start < 1:
            raise GenuncError(f"warm_start is a confidence threshold in (0, 1), got "
                              f"{self.warm_start}")

    def command(self) -> str:
        block = f" --block-length {self.block_length}" if self.block_length else ""
        if self.warm_start is not None:
            block += f" --warm-start {self.warm_start:g} --warm-steps {self.warm_steps}"
        if self.advantage != "normalised":
            block += f" --advantage {self.advantage}"
        return (f"genunc zoo train unmask-policy --task {self.task} --inputs {self.inputs}{block} "
                f"--steps {self.steps} --prompts-per-batch {self.prompts_per_batch} "
                f"--group {self.group} --alpha {self.alpha:g} --seed {self.seed}")


def policy_reward(correct: np.ndarray | torch.Tensor, steps: np.ndarray | torch.Tensor,
                  answer_length: int, alpha: float) -> torch.Tensor:
    """``1[correct] * ((L - steps + 1) / L) ** alpha`` per rollout (float64)."""
    correct = torch.as_tensor(np.asarray(correct), dtype=torch.float64)
    steps = torch.as_tensor(np.asarray(steps), dtype=torch.float64)
    speed = ((answer_length - steps + 1) / answer_length).clamp_min(0)
    return correct * speed**alpha


def group_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-6,
                     scale: bool = True) -> torch.Tensor:
    """``(r - mean) / (std + eps)`` within consecutive groups of `group` rollouts; exactly 0 for
    a group whose rewards are all equal.  ``scale=False``: ``r - mean`` only.

    Why the choice matters here: in a group whose rollouts are all right, the rewards differ
    only by the small speed factor, and dividing by their tiny spread turns that into
    advantages as large as a right-vs-wrong difference elsewhere, so easy prompts teach "go
    faster" at full strength whatever alpha is (the std-normalisation bias Dr. GRPO describes).
    """
    r = rewards.reshape(-1, group).double()
    centred = r - r.mean(1, keepdim=True)
    if not scale:
        return centred.reshape(-1)
    std = r.std(1, keepdim=True, unbiased=False)
    adv = torch.where(std > 1e-12, centred / (std + eps), torch.zeros_like(centred))
    return adv.reshape(-1)


def recompute_log_probs(policy: UnmaskingPolicy, record: list[PolicyStep]) -> torch.Tensor:
    """``(rollouts,)`` summed log-probability of each rollout's recorded decisions, with
    gradients, from one batched pass over all recorded steps."""
    stacked = stack_record(record)
    rows = len(record[0].time)
    device = next(policy.parameters()).device
    logp = policy.log_prob(stacked.features.to(device), stacked.time.to(device),
                           stacked.active.to(device), stacked.decisions.to(device),
                           stacked.forced.to(device))
    return logp.reshape(len(record), rows).sum(0)


def grpo_loss(policy: UnmaskingPolicy, record: list[PolicyStep],
              advantages: torch.Tensor) -> torch.Tensor:
    """``- sum_i A_i log pi(rollout_i) / (number of decisions)``: the on-policy GRPO
    objective, normalised by the decisions taken in the batch."""
    logp = recompute_log_probs(policy, record)
    decisions = sum(int(s.active.sum()) for s in record)
    return -(advantages.to(logp) * logp).sum() / max(decisions, 1)


def imitation_loss(policy: UnmaskingPolicy, record: list[PolicyStep],
                   threshold: float) -> torch.Tensor:
    """Behaviour cloning of the threshold heuristic on the states the policy itself visited:
    the mean negative log-likelihood of "unmask exactly where the top-1 probability exceeds
    `threshold`" over the recorded active positions (a warm start that puts GRPO on the
    heuristic's speed/accuracy curve instead of at "commit everything at once")."""
    stacked = stack_record(record)
    device = next(policy.parameters()).device
    active = stacked.active.to(device)
    target = active & (stacked.features[..., TOP1].to(device) > threshold)
    logp = policy.log_prob(stacked.features.to(device), stacked.time.to(device), active, target,
                           torch.zeros_like(active))
    return -logp.sum() / active.sum().clamp_min(1)


#: the feature column of the top-1 probability (after the mask and current-block flags)
TOP1 = 2


def _posterior_batches(task, problems: np.ndarray) -> list[dict]:
    return [{"x": task.sequences(problems[i : i + 256]),
             "prompt_mask": task.prompt_mask(len(problems[i : i + 256]))}
            for i in range(0, len(problems), 256)]


def evaluate_policy(adapter, task, problems: np.ndarray, policy: UnmaskingPolicy,
                    block_length: int | None, mi_draws=None, seed: int = 0) -> dict:
    """Deterministic (p > 0.5) accuracy and mean NFE of `policy` on `problems`."""
    config = UnmaskingConfig("policy", policy=policy.eval(), block_length=block_length)
    out = unmask(adapter, task.prompts(problems), config, mi_draws=mi_draws, seed=seed)
    return {"accuracy": float(task.check(out.tokens).mean()),
            "nfe": float(out.row_nfe.double().mean())}


def train_policy(recipe: PolicyRecipe, out_dir: str | Path, progress: bool = True) -> dict:
    """Train `recipe` and save the policy (``policy.json`` + ``policy.safetensors``) in
    `out_dir`; returns the training report (also stored in ``policy.json``)."""
    from genunc.tasks import task_from_spec

    tic = time.perf_counter()
    torch.manual_seed(recipe.seed)
    model_dir = MODELS[recipe.task]
    adapter, model_config = load_text_adapter(model_dir)
    task = task_from_spec(model_config["task"])
    split = task.split()
    train, val = split["train"][: -recipe.val_prompts], split["train"][-recipe.val_prompts :]
    uses_mi = recipe.inputs == "confidence+mi"
    posterior = None
    if uses_mi:  # as TextUncertaintyPipeline.fit_posterior fits it (seed 0, two noisings)
        posterior = HeadPosterior.fit(adapter, _posterior_batches(task, split["train"][: recipe.n_fit]),
                                      repeats=2, seed=0, progress=False)

    def draws(step: int):
        if not uses_mi:
            return None
        gen = streams.torch_generator(recipe.seed, "head_draws", step)
        return posterior.sample(recipe.num_draws, seed=gen)

    policy = UnmaskingPolicy(PolicyConfig(inputs=recipe.inputs, top_k=recipe.top_k,
                                          init_bias=recipe.init_bias))
    opt = torch.optim.Adam(policy.parameters(), lr=recipe.lr)
    order = streams.numpy_generator(recipe.seed, "prompt_order", 1)
    p, g = recipe.prompts_per_batch, recipe.group
    history: list[dict] = []
    warm = recipe.warm_steps if recipe.warm_start is not None else 0
    imitation = torch.optim.Adam(policy.parameters(), lr=recipe.warm_lr)
    for step in tqdm(range(warm), desc="imitating the threshold heuristic", disable=not progress):
        problems = train[order.integers(0, len(train), p)]
        record = []
        config = UnmaskingConfig("policy", policy=policy.eval(), block_length=recipe.block_length,
                                 position_temperature=1.0, policy_record=record)
        unmask(adapter, task.prompts(problems), config, mi_draws=draws(step), seed=recipe.seed + 1,
               indices=range(step * p, (step + 1) * p))
        policy.train()
        loss = imitation_loss(policy, record, recipe.warm_start)
        imitation.zero_grad()
        loss.backward()
        imitation.step()
    bar = tqdm(range(recipe.steps), desc=f"GRPO {recipe.task} {recipe.inputs}", disable=not progress)
    for step in bar:
        problems = train[order.integers(0, len(train), p)]
        prompts = task.prompts(problems).repeat_interleave(g, 0)
        record: list[PolicyStep] = []
        config = UnmaskingConfig("policy", policy=policy.eval(), block_length=recipe.block_length,
                                 position_temperature=1.0, policy_record=record)
        out = unmask(adapter, prompts, config, mi_draws=draws(step), seed=recipe.seed,
                     indices=range(step * p * g, (step + 1) * p * g))
        correct = task.check(out.tokens)
        rewards = policy_reward(correct, out.row_nfe.cpu(), task.answer_length, recipe.alpha)
        advantages = group_advantages(rewards, g, scale=recipe.advantage == "normalised")
        policy.train()
        loss = grpo_loss(policy, record, advantages)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        history.append({"reward": float(rewards.mean()), "accuracy": float(correct.mean()),
                        "nfe": float(out.row_nfe.double().mean())})
        recent = history[-20:]
        bar.set_postfix(reward=f"{np.mean([h['reward'] for h in recent]):.3f}",
                        acc=f"{np.mean([h['accuracy'] for h in recent]):.2f}",
                        nfe=f"{np.mean([h['nfe'] for h in recent]):.1f}")
    seconds = time.perf_counter() - tic
    policy.eval()
    # evaluate the policy as saved (float16 weights): write, read back, evaluate, write again
    out_dir = Path(out_dir)
    meta = {"task": task.spec(), "model": model_dir.name, "block_length": recipe.block_length,
            "recipe": asdict(recipe), "command": recipe.command()}
    policy.save_pretrained(out_dir, **meta)
    saved = UnmaskingPolicy.from_pretrained(out_dir)
    val_draws = draws(recipe.steps)
    report = {"validation": evaluate_policy(adapter, task, val, saved, recipe.block_length,
                                            val_draws, seed=recipe.seed),
              "train_seconds": seconds, "rollouts": recipe.steps * p * g,
              "backbone_calls": None, "device": "cpu", "threads": torch.get_num_threads(),
              "curve": [{k: float(np.mean([h[k] for h in history[i : i + 25]])) for k in history[0]}
                        for i in range(0, len(history), 25)]}
    report.pop("backbone_calls")
    saved.save_pretrained(out_dir, training=report)
    return {**meta, "training": report}
