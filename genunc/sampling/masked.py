"""Unmasking samplers for masked-diffusion LMs, with head draws and commit-time uncertainty.

Every sampler fills the masked positions of ``x`` block by block (semi-autoregressive, LLaDA);
within a block, each step runs the backbone once and commits some masked positions:

* ``random``: ``k`` random positions per step (the plain reverse process);
* ``low_confidence``: the ``k`` positions whose chosen token is most probable (LLaDA);
* ``threshold``: every position whose confidence exceeds ``threshold``, at least one (Fast-dLLM's
  parallel decoding), so easy blocks take fewer steps;
* ``remask``: as ``threshold``, and tokens committed earlier in the block are re-masked when
  their confidence, re-checked with the block's own drafts hidden, falls below
  ``remask_threshold`` (WINO's draft-and-verify).  The check rides in the same backbone call
  as extra rows, so it costs rows but no extra function evaluation.

``k`` follows LLaDA's schedule: a block of ``n`` positions and ``s`` steps commits ``n // s``
tokens per step, the remainder spread over the first steps.  ``temperature`` samples tokens
(Gumbel-max; 0 = greedy).

``position_temperature`` τ tempers the choice of *which positions* to commit (0 = the hard
heuristics above):

* ``low_confidence``: Gumbel-top-k over ``log(confidence) / τ``, i.e. ``k`` positions drawn
  without replacement with probability proportional to ``confidence ** (1 / τ)``;
* ``threshold`` / ``remask``: each masked position is committed with probability
  ``sigmoid((confidence - threshold) / τ)`` (at least one: the Gumbel-top-1 of the
  ``low_confidence`` rule), and ``remask`` re-masks a draft with probability
  ``sigmoid((remask_threshold - confidence) / τ)``: the hard thresholds as τ -> 0, per-position
  Bernoulli "unmask now" decisions (the form an RL unmasking policy takes) for τ > 0;
* ``policy``: a learned :class:`~genunc.sampling.policy.UnmaskingPolicy` gives each masked
  position of the block an "unmask now" probability p; τ = 0 commits p > 0.5, τ > 0 draws
  Bernoulli(sigmoid(logit / τ)) from the sampler's stream (τ = 1: as trained).  The most probable
  position is always committed, and ``max_steps_per_block`` caps the block as for ``threshold``.
  ``policy_record`` (a list) opts in to recording each step's policy inputs and decisions
  (:class:`~genunc.sampling.policy.PolicyStep`), which GRPO training reuses.

Uncertainty, at no extra backbone cost: the head's input features are captured by a hook, the M
head draws are applied to them in one op, and for each position the epistemic mutual
information of the draws and the draws' mean probability of the committed token are recorded
*at the step it is committed*, with the MAP's confidence, margin and self-certainty.  With
``trajectory_draws`` (the MAP first, then M draws) every draw also generates a full sequence of
its own from the same randomness (one batch of (M+1)·B rows), for the semantic score.

Both also take :class:`~genunc.posterior.tail.TailDraws` (a posterior over the last block, the
final norm and the head): the tail's inputs are recorded during the one backbone call
(:meth:`Tail.capture`), then the tail alone is re-run under all M draws batched (MI), or row
group ``g`` under draw ``g`` (trajectory draws); the backbone still runs once per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import Tensor

from genunc import streams
from genunc.adapters.text import MaskedDiffusionLMAdapter, check_layout
from genunc.errors import GenuncError, ShapeMismatchError
from genunc.sampling.precision import backbone_autocast, full_precision
from genunc.sampling.tails import shared_tail
from genunc.scores.tokens import (
    confidence,
    margin,
    mutual_information,
    mutual_information_leave_one_out,
    self_certainty,
)

if TYPE_CHECKING:
    from genunc.posterior.draws import HeadDraws, TailDraws
    from genunc.sampling.policy import PolicyStep, UnmaskingPolicy

class TokenMI(Protocol):
    """What the sampler needs of a draw-free MI estimator (:mod:`genunc.posterior.token_mi`,
    built from the posterior outside the loop): per position ``(N, F)`` head features and
    ``(N, V)`` MAP logits -> an output with ``mi`` ``(N,)``, ``token_probability`` and, with
    draws, ``leave_one_out``."""

    num_draws: int | None

    def __call__(self, features: Tensor, logits: Tensor, logit_map: Any = None,
                 tokens: Tensor | None = None) -> Any: ...


Strategy = Literal["random", "low_confidence", "threshold", "remask", "policy"]
STRATEGIES = ("random", "low_confidence", "threshold", "remask", "policy")
TOKEN_STATS = ("confidence", "margin", "self_certainty", "mutual_information",
               "posterior_confidence")
POSTERIOR_STATS = ("mutual_information", "posterior_confidence")


@dataclass
class UnmaskingConfig:
    """How to unmask.  ``steps`` is the total over all blocks for ``random`` / ``low_confidence``;
    ``threshold`` / ``remask`` stop a block when it is full (at most ``max_steps_per_block``)."""

    strategy: Strategy = "low_confidence"
    steps: int | None = None  # default: one token per step
    block_length: int | None = None  # default: one block
    threshold: float = 0.9
    remask_threshold: float = 0.3
    temperature: float = 0.0
    position_temperature: float = 0.0
    max_steps_per_block: int | None = None  # threshold/remask/policy safety cap (default: 2 x block)
    policy: UnmaskingPolicy | None = None  # the "policy" strategy's network
    #: opt-in: the "policy" strategy appends one PolicyStep per backbone call (for training)
    policy_record: list[PolicyStep] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise GenuncError(f"unknown strategy {self.strategy!r}; choose from {STRATEGIES}")
        if self.steps is not None and self.steps < 1:
            raise GenuncError(f"steps must be >= 1, got {self.steps}")
        if self.block_length is not None and self.block_length < 1:
            raise GenuncError(f"block_length must be >= 1, got {self.block_length}")
        if not 0 <= self.threshold <= 1:
            raise GenuncError(f"threshold must lie in [0, 1], got {self.threshold}")
        if self.strategy == "remask" and not 0 <= self.remask_threshold <= self.threshold:
            raise GenuncError("remasking needs 0 <= remask_threshold <= threshold")
        if self.temperature < 0 or self.position_temperature < 0:
            raise GenuncError("temperatures must be non-negative")
        if (self.strategy == "policy") != (self.policy is not None):
            raise GenuncError("the 'policy' strategy needs policy=UnmaskingPolicy(...), and only "
                              "it takes one")


@dataclass
class UnmaskingOutput:
    tokens: Tensor  # (B, L) from the MAP head
    generated: Tensor  # (B, L) bool: the positions the sampler filled
    nfe: int  # backbone calls for the batch (function evaluations; the slowest row sets it)
    backbone_rows: int  # rows pushed through the backbone, summed over calls
    #: (B,) calls each sequence needed: steps at which it still had masked positions
    row_nfe: Tensor | None = None
    #: per position, recorded at commit time from the MAP logits (and the draws, for MI)
    token_stats: dict[str, Tensor] = field(default_factory=dict)
    draw_tokens: Tensor | None = None  # (M, B, L) with trajectory_draws
    commit_step: Tensor | None = None  # (B, L) step index at which each position was (last) filled
    #: (M, B, L) with M >= 3 draws: each position's mutual information without draw m, for the
    #: jackknife estimate of its Monte-Carlo error
    mi_leave_one_out: Tensor | None = None


def _full_precision_inputs(inputs: Any) -> Any:
    """Recorded tail inputs with floating tensors in float32 (a bfloat16 backbone's
    activations): the draws run in full precision."""
    return inputs._map(lambda x: x.float() if isinstance(x, Tensor) and x.is_floating_point()
                       and x.dtype != torch.float64 else x)


def _blocks(cols: list[int], block_length: int | None) -> list[list[int]]:
    size = block_length or len(cols)
    return [cols[i : i + size] for i in range(0, len(cols), size)]


def _schedule(n: int, steps: int) -> list[int]:
    """LLaDA's tokens-per-step for a block of n positions and `steps` steps."""
    steps = max(1, min(steps, n))
    base, extra = divmod(n, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def _gumbel(uniforms: Tensor) -> Tensor:
    u = uniforms.clamp(1e-12, 1 - 1e-12)
    return -torch.log(-torch.log(u))


class _RowNoise:
    """The sampler's randomness for each sequence and each (block, step), from that sequence's
    own stream: a sequence's draws do not depend on the batch it runs in, nor on how many steps
    its batch-mates needed."""

    def __init__(self, seed: int, indices: Sequence[int]) -> None:
        self.seed, self.indices = seed, list(indices)
        self.key: tuple[int, int] = (-1, -1)
        self.generators: list[torch.Generator] = []

    def at(self, block: int, step: int) -> "_RowNoise":
        if self.key != (block, step):
            self.key, self.generators = (block, step), []
        return self

    def uniforms(self, *shape: int) -> Tensor:
        """``(B, *shape)`` uniforms; successive calls at one step draw fresh numbers.  The
        generators are made on first use (greedy samplers never need them)."""
        if not self.generators:
            self.generators = streams.sample_generators(self.seed, "sampler_noise", self.indices,
                                                        *self.key)
        return streams.rand_rows(shape, self.generators)


def _policy_step(adapter: MaskedDiffusionLMAdapter, config: UnmaskingConfig, logits: Tensor,
                 tokens: Tensor, xs: Tensor, in_block: Tensor, noise: _RowNoise,
                 draws_logits: Tensor | None, groups: int) -> Tensor:
    """The ``policy`` strategy's commits for one step (rows: every group's sequences);
    `draws_logits`: the head draws' logits of this step's MAP rows (an MI policy reads them)."""
    from genunc.sampling.policy import policy_commit, policy_features

    if config.policy.uses_mi and groups > 1:
        raise GenuncError("a policy that reads mutual information runs without "
                          "trajectory_draws (the MI is the MAP rows')")
    if not config.policy.uses_mi:
        draws_logits = None
    masked = xs == adapter.mask_id
    features, time = policy_features(config.policy, logits, tokens, masked, in_block, draws_logits)
    tau = config.position_temperature
    coins = noise.uniforms(2, xs.shape[1]).repeat(groups, 1, 1) if tau > 0 else None
    return policy_commit(config.policy, features, time, masked & in_block, coins, tau,
                         record=config.policy_record).to(xs.device)


@torch.no_grad()
def unmask(
    adapter: MaskedDiffusionLMAdapter,
    x: Tensor,
    config: UnmaskingConfig | None = None,
    *,
    mi_draws: HeadDraws | TailDraws | None = None,
    mi_estimator: TokenMI | None = None,
    trajectory_draws: HeadDraws | TailDraws | None = None,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    precision: str = "float32",
) -> UnmaskingOutput:
    """Fill every ``mask_id`` position of ``x`` ``(B, L)``; see the module docstring.

    ``trajectory_draws`` must hold the MAP first (:meth:`HeadPosterior.sample` with
    ``with_map=True``): its sequences are the output ``tokens``.  ``seed`` and ``indices``
    (the rows' global sample indices, default ``0 .. B-1``) key the sampling noise.

    ``mi_estimator`` (instead of ``mi_draws``): a draw-free estimator of the mutual information
    (:mod:`genunc.posterior.token_mi`: closed form or pruned vocabulary), evaluated only at the
    positions each step commits, on the MAP head's input there; no head draws are built.
    """
    config = config or UnmaskingConfig()
    if trajectory_draws is not None and not trajectory_draws.with_map:
        raise GenuncError("trajectory draws must hold the MAP first (sample(..., with_map=True))")
    if mi_draws is not None and len(mi_draws) < 2:
        raise GenuncError("mutual information compares draws: it needs num_draws >= 2")
    if mi_estimator is not None:
        if mi_draws is not None:
            raise GenuncError("pass mi_draws (sampled MI) or mi_estimator, not both")
        if trajectory_draws is not None and getattr(trajectory_draws, "tail", None) is not None:
            raise GenuncError("a draw-free MI estimator reads the head's input: it runs beside "
                              "head trajectory draws, not tail draws")
        if config is not None and config.strategy == "policy" and config.policy.uses_mi:
            raise GenuncError("a policy that reads mutual information needs mi_draws (it reads "
                              "every position's MI at every step)")
    device = adapter.device
    x = x.to(device).long()
    b, length = x.shape
    noise_source = _RowNoise(seed, range(b) if indices is None else indices)
    if len(noise_source.indices) != b:
        raise ShapeMismatchError(f"{len(noise_source.indices)} sample indices for {b} rows")
    generate_mask = x == adapter.mask_id
    cols = list(check_layout(generate_mask.cpu()))
    blocks = _blocks(cols, config.block_length)
    total_steps = config.steps or len(cols)
    steps_per_block = [max(1, round(total_steps * len(bl) / len(cols))) for bl in blocks]

    groups = 1 if trajectory_draws is None else len(trajectory_draws)
    heads = trajectory_draws.to(device) if groups > 1 else None
    tail = shared_tail(mi_draws, trajectory_draws)
    #: the MAP rows' head features, or with tail draws their recorded tail inputs
    state: dict[str, Any] = {"phi": None}

    def hook(module, args, output):
        phi = args[0]
        state["phi"] = phi[:b]
        if heads is None:
            return None
        # rows are [set][group][sequence]: set 1 holds the remask verification copies
        sets = phi.shape[0] // (groups * b)
        rest = phi.shape[1:]
        per_group = phi.reshape(sets, groups, b, *rest).transpose(0, 1).reshape(groups, sets * b, *rest)
        with full_precision(phi.device):
            out = heads.apply(per_group, per_draw=True)
        out = out.reshape(groups, sets, b, *out.shape[2:]).transpose(0, 1)
        return out.reshape(output.shape).to(output.dtype)

    def tail_hook(module, args, output):
        # after the body pass: what entered each tail module is recorded; re-runs of the tail
        # (below) call this module too and are left alone
        if tail.rerunning:
            return None
        n_rows = output.shape[0]
        inputs = tail.inputs_of(recorder, n_rows)
        recorder.reset()
        with full_precision(output.device):
            inputs = _full_precision_inputs(inputs)
            state["phi"] = inputs.select(slice(0, b))
            if heads is None:
                return None
            # rows [set][group][sequence] -> [group][set][sequence]: group g re-runs under draw g
            sets = n_rows // (groups * b)
            order = torch.arange(n_rows).reshape(sets, groups, b).transpose(0, 1).reshape(-1)
            out = heads.apply(inputs.select(order), per_draw=True)
        out = out.reshape(groups, sets, b, *out.shape[2:]).transpose(0, 1)
        return out.reshape(output.shape).to(output.dtype)

    predictable = torch.ones(adapter.vocab_size, dtype=torch.bool, device=device)
    predictable[adapter.mask_id] = False
    xs = x.repeat(groups, 1)
    stats = {name: torch.zeros(b, length, dtype=torch.float64, device=device) for name in TOKEN_STATS}
    n_mi = len(mi_draws) if mi_draws is not None else \
        (mi_estimator.num_draws or 0) if mi_estimator is not None else 0
    loo = None if n_mi < 3 else torch.zeros(n_mi, b, length, dtype=torch.float64, device=device)
    commit_step = torch.full((b, length), -1, dtype=torch.long, device=device)
    filled_by_sampler = torch.zeros_like(xs, dtype=torch.bool)
    nfe = rows = 0
    row_nfe = torch.zeros(b, dtype=torch.long, device=device)
    stack = ExitStack()
    if tail is None:
        handle = adapter.head.register_forward_hook(hook)
    else:
        recorder = stack.enter_context(tail.capture())
        handle = tail.modules[-1].register_forward_hook(tail_hook)
    try:
        for block_no, (block, block_steps) in enumerate(zip(blocks, steps_per_block)):
            in_block = torch.zeros(length, dtype=torch.bool, device=device)
            in_block[block] = True
            schedule = _schedule(len(block), block_steps)
            cap = config.max_steps_per_block or 2 * len(block)
            step = 0
            while True:
                masked = (xs == adapter.mask_id) & in_block
                if not masked.any():
                    break
                verify = config.strategy == "remask" and step > 0 and step < cap - 1
                inputs = xs
                if verify:  # the same rows with this block's drafts hidden again
                    drafts = filled_by_sampler & in_block
                    inputs = torch.cat([xs, xs.masked_fill(drafts, adapter.mask_id)], 0)
                with backbone_autocast(precision, device):
                    logits_all = adapter.denoise(inputs).float()
                nfe += 1
                row_nfe += masked[:b].any(-1)
                rows += inputs.shape[0]
                logits = logits_all[: groups * b].double()
                # randomness shared by the MAP and every draw: same noise, repeated per group
                noise_now = noise_source.at(block_no, step)
                if config.temperature > 0:
                    noise = _gumbel(noise_now.uniforms(length, logits.shape[-1])).to(device)
                    tokens = (logits / config.temperature + noise.repeat(groups, 1, 1)).argmax(-1)
                else:
                    tokens = logits.argmax(-1)
                conf = confidence(logits, tokens)
                # the M draws' logits for the MAP rows: read by an MI policy and by the stats
                draws_logits = None if mi_draws is None else \
                    adapter.post_head(mi_draws.apply(state["phi"]), {"x": xs[:b]})
                if config.strategy == "random":
                    rank = noise_now.uniforms(length).to(device).repeat(groups, 1)
                else:
                    rank = conf.clamp_min(1e-300).log()
                    if config.position_temperature > 0:
                        pos_noise = _gumbel(noise_now.uniforms(length)).to(device).repeat(groups, 1)
                        rank = rank + config.position_temperature * pos_noise
                rank = rank.masked_fill(~masked, -torch.inf)
                if config.strategy in ("random", "low_confidence") and step < len(schedule) - 1:
                    k = schedule[step]
                    chosen = torch.zeros_like(masked)
                    top = rank.topk(k, dim=-1).indices
                    chosen.scatter_(1, top, True)
                    commit = chosen & masked
                elif config.strategy in ("random", "low_confidence"):
                    commit = masked  # last scheduled step: fill the rest of the block
                elif step >= cap - 1:
                    commit = masked  # safety cap reached: fill the rest
                elif config.strategy == "policy":
                    commit = _policy_step(adapter, config, logits, tokens, xs, in_block,
                                          noise_now, draws_logits, groups)
                else:
                    if config.position_temperature > 0:
                        coin = noise_now.uniforms(length).to(device).repeat(groups, 1)
                        soft = torch.sigmoid((conf - config.threshold) / config.position_temperature)
                        commit = masked & (coin < soft)
                    else:
                        commit = masked & (conf > config.threshold)
                    best = rank.argmax(-1, keepdim=True)
                    has_masked = masked.any(-1, keepdim=True)
                    commit.scatter_(1, best, has_masked | commit.gather(1, best))
                    commit &= masked
                # record commit-time statistics for the MAP rows
                map_commit = commit[:b]
                map_logits = logits[:b]
                values = {"confidence": conf[:b], "margin": margin(map_logits),
                          # over the tokens that can be predicted: the mask's -inf would swamp it
                          "self_certainty": self_certainty(map_logits[..., predictable])}
                if draws_logits is not None:
                    values["mutual_information"] = mutual_information(draws_logits)
                    if loo is not None:
                        loo = torch.where(map_commit, mutual_information_leave_one_out(draws_logits),
                                          loo)
                    # the committed token's probability averaged over the draws (Bayesian model
                    # average): unlike MI it depends on *which* token was taken
                    values["posterior_confidence"] = confidence(
                        draws_logits, tokens[:b].expand(len(mi_draws), -1, -1)).mean(0)
                if mi_estimator is not None:
                    values.update(_estimated_mi(adapter, mi_estimator, state["phi"], map_logits,
                                                tokens[:b], map_commit, loo))
                    loo = values.pop("leave_one_out", loo)
                for name, value in values.items():
                    stats[name] = torch.where(map_commit, value.to(torch.float64), stats[name])
                commit_step = torch.where(map_commit, torch.full_like(commit_step, step), commit_step)
                xs = torch.where(commit, tokens, xs)
                if verify:
                    check = logits_all[groups * b :].double()
                    check_conf = confidence(check, xs)
                    if config.position_temperature > 0:
                        coin = noise_now.uniforms(length).to(device)
                        soft = torch.sigmoid((config.remask_threshold - check_conf)
                                             / config.position_temperature)
                        low = coin.repeat(groups, 1) < soft
                    else:
                        low = check_conf < config.remask_threshold
                    # only rows still unmasking: a finished row would have stopped on its own
                    remask = drafts & ~commit & low & masked.any(-1, keepdim=True)
                    xs = xs.masked_fill(remask, adapter.mask_id)
                    filled_by_sampler &= ~remask
                filled_by_sampler |= commit
                step += 1
    finally:
        handle.remove()
        stack.close()

    if not (xs != adapter.mask_id).all():
        raise GenuncError("internal error: the sampler left masked positions")  # pragma: no cover
    grouped = xs.reshape(groups, b, length)
    return UnmaskingOutput(
        tokens=grouped[0], generated=generate_mask, nfe=nfe, backbone_rows=rows,
        token_stats=stats if mi_draws is not None or mi_estimator is not None else
        {k: v for k, v in stats.items() if k not in POSTERIOR_STATS},
        draw_tokens=grouped[1:] if groups > 1 else None, commit_step=commit_step,
        mi_leave_one_out=loo,
        row_nfe=row_nfe,
    )


def _estimated_mi(adapter: MaskedDiffusionLMAdapter, estimator: TokenMI, phi: Tensor,
                  logits: Tensor, tokens: Tensor, commit: Tensor,
                  loo: Tensor | None) -> dict[str, Tensor]:
    """A draw-free estimator's ``mutual_information`` and ``posterior_confidence`` ``(B, L)``
    at the committed positions (zero elsewhere), and the updated leave-one-out values."""
    if getattr(adapter, "logit_shift", False):  # position i's logits come from features i - 1
        phi = torch.cat([phi[:, :1], phi[:, :-1]], 1)
    rows, cols = torch.nonzero(commit, as_tuple=True)
    out = estimator(phi[rows, cols], logits[rows, cols], tokens=tokens[rows, cols])
    mi = torch.zeros(commit.shape, dtype=torch.float64, device=logits.device)
    mi[rows, cols] = out.mi.to(mi.device)
    prob = torch.zeros_like(mi)
    prob[rows, cols] = out.token_probability.to(mi.device)
    values = {"mutual_information": mi, "posterior_confidence": prob}
    if loo is not None and out.leave_one_out is not None:
        loo = loo.clone()
        loo[:, rows, cols] = out.leave_one_out.to(loo.device)
        values["leave_one_out"] = loo
    return values


def sampling_logits(logits: Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, sampling_method: str = "multinomial") -> Tensor:
    """Logits whose softmax is the distribution ``BlockRefinementScheduler`` samples from.

    Greedy decoding (temperature 0, or ``sampling_method="greedy"``) takes the argmax of the raw
    logits and reports their softmax as confidence; multinomial sampling divides by the
    temperature, then keeps the top-k, then the top-p nucleus (removed entries get the dtype's
    lowest value, as the scheduler does).  Broadcasts over leading axes (e.g. draws).
    """
    multinomial = sampling_method == "multinomial" or (sampling_method == "auto" and temperature != 0)
    if temperature == 0 or not multinomial:
        return logits
    out = logits / temperature if temperature != 1 else logits
    lowest = torch.finfo(out.dtype).min
    if top_k is not None and 0 < top_k < out.shape[-1]:
        kth = out.topk(top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, lowest)
    if top_p is not None and top_p < 1:
        ordered, order = out.sort(dim=-1, descending=True)
        cumulative = ordered.float().softmax(-1).cumsum(-1)
        drop = cumulative > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
        drop[..., 0] = False
        out = out.scatter(-1, order, ordered.masked_fill(drop, lowest))
    return out
