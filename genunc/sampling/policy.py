"""A learned unmasking policy: which masked positions to commit at each step.

Sampling from a masked-diffusion LM is a sequential decision problem with the frozen model as
the environment: at every step, for every still-masked position of the current block, the
policy says "unmask now" or "wait".  :class:`UnmaskingPolicy` is one small DiT-style transformer
block (width 128, feed-forward 512, 2 heads, adaLN conditioning on the time) that maps
per-position features to one Bernoulli logit per position.  It runs as the ``"policy"`` strategy
of :func:`genunc.sampling.masked.unmask` (``UnmaskingConfig("policy", policy=...)``) and is
trained with GRPO (:mod:`genunc.research.recipes.policy`).

Features per position (:func:`policy_features`, all from the backbone call of the step):

* ``masked``: 1 where the position is still masked (in any block), 0 elsewhere (prompt,
  committed tokens);
* ``in_block``: 1 for the positions of the block being filled (semi-autoregressive mode);
* ``top-k`` probabilities of the model's prediction at the position (sorted, ``top_k`` of them,
  default 3): the confidence heuristics' raw material, and the top-1 probability once more as
  ``-log10(1 - p + 1e-6) / 6`` (0 .. 1), which spreads out the confident end (0.9 vs 0.999);
* with ``inputs="confidence+mi"`` also the epistemic ``mutual_information`` of the head draws
  (``mi_draws``; fed as ``log10(MI + 1e-6) / 6 + 1``, so 1e-6 .. 1 nats map to 0 .. 1) and the
  ``posterior_confidence`` (the draws' mean probability of the MAP token).

Time: ``t`` = the fraction of the current block's positions still masked (1 at the block's
first step, small near its end), per sequence; embedded sinusoidally and fed to adaLN.

The block has no positional embedding: it is equivariant to permutations of the positions and
so decides from the features alone (the same weights serve any sequence length).

Decisions (:func:`policy_commit`): with ``position_temperature`` τ = 0 (the default, as for
the other strategies) a position is committed when its probability exceeds 0.5; with τ > 0 each
position is a Bernoulli draw with probability ``sigmoid(logit / τ)`` from the sampler's own
per-sequence stream (τ = 1: the policy as trained).  At least one position is committed per step,
so every rollout ends: when no draw says "unmask", one position is taken, the most probable
(τ = 0) or one drawn from ``softmax(logit / τ)`` over the active positions (τ > 0, Gumbel-max on
the same stream).  The log-probability of a step is that of the Bernoulli draws over the active
positions, plus, when the fallback was used, the log-softmax of the position it took; so the
fallback's choice is part of the policy and is trained too.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genunc._io import atomic_write
from genunc.errors import GenuncError, MissingFileError
from genunc.scores.tokens import confidence, mutual_information

INPUTS = ("confidence", "confidence+mi")
CONFIG_FILE = "policy.json"
WEIGHTS_FILE = "policy.safetensors"
MI_FLOOR = 1e-6


@dataclass
class PolicyConfig:
    inputs: str = "confidence"
    top_k: int = 3
    hidden: int = 128
    ff: int = 512
    heads: int = 2
    time_features: int = 32
    #: initial bias of the "unmask now" logit (negative: few positions per step at the start)
    init_bias: float = 0.0

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise GenuncError(f"policy inputs must be one of {INPUTS}, got {self.inputs!r}")
        if self.top_k < 1:
            raise GenuncError(f"top_k must be >= 1, got {self.top_k}")

    @property
    def uses_mi(self) -> bool:
        return self.inputs == "confidence+mi"

    @property
    def num_features(self) -> int:
        return 3 + self.top_k + (2 if self.uses_mi else 0)


@dataclass
class PolicyStep:
    """What one backbone call of a recorded rollout saw and did (tensors on the CPU; rows are
    the sampler's rows)."""

    features: Tensor  # (R, L, F) float32
    time: Tensor  # (R,) float32
    active: Tensor  # (R, L) bool: masked positions of the current block (the decisions taken)
    decisions: Tensor  # (R, L) bool: the Bernoulli draws ("unmask now"), False off active
    forced: Tensor  # (R, L) bool: the fallback position, where no draw said "unmask"
    log_prob: Tensor  # (R,) float64: log-probability of the decisions at rollout time
    committed: Tensor  # (R, L) bool: what was committed (decisions plus the forced one)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class UnmaskingPolicy(nn.Module):
    """One adaLN transformer block over the positions: features ``(R, L, F)`` and time ``(R,)``
    -> "unmask now" logits ``(R, L)``."""

    def __init__(self, config: PolicyConfig | None = None, *, metadata: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        self.config = config or PolicyConfig(**kwargs)
        #: what it was trained for and how (task, model, recipe, command); saved with it
        self.metadata: dict[str, Any] = dict(metadata or {})
        c = self.config
        self.embed = nn.Linear(c.num_features, c.hidden)
        self.time_mlp = nn.Sequential(nn.Linear(c.time_features, c.hidden), nn.SiLU(),
                                      nn.Linear(c.hidden, c.hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden, 6 * c.hidden))
        self.norm1 = nn.LayerNorm(c.hidden, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(c.hidden, c.heads, batch_first=True)
        self.norm2 = nn.LayerNorm(c.hidden, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(c.hidden, c.ff), nn.GELU(approximate="tanh"),
                                 nn.Linear(c.ff, c.hidden))
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden, 2 * c.hidden))
        self.final_norm = nn.LayerNorm(c.hidden, elementwise_affine=False)
        self.out = nn.Linear(c.hidden, 1)
        # adaLN-Zero: the block starts as the identity, the output as a constant logit
        for layer in (self.ada[-1], self.final_ada[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, c.init_bias)

    @property
    def uses_mi(self) -> bool:
        return self.config.uses_mi

    def _time_embedding(self, t: Tensor) -> Tensor:
        half = self.config.time_features // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
        angles = 1000.0 * t.float().unsqueeze(-1) * freqs
        return self.time_mlp(torch.cat([angles.sin(), angles.cos()], -1))

    def forward(self, features: Tensor, time: Tensor) -> Tensor:
        if features.shape[-1] != self.config.num_features:
            raise GenuncError(f"the policy reads {self.config.num_features} features per position "
                              f"({self.config.inputs}, top_k={self.config.top_k}), got "
                              f"{features.shape[-1]}")
        param = self.embed.weight
        h = self.embed(features.to(param))
        cond = self._time_embedding(time.to(param.device))
        s1, c1, g1, s2, c2, g2 = self.ada(cond).chunk(6, -1)
        y = _modulate(self.norm1(h), s1, c1)
        h = h + g1.unsqueeze(1) * self.attn(y, y, y, need_weights=False)[0]
        h = h + g2.unsqueeze(1) * self.mlp(_modulate(self.norm2(h), s2, c2))
        shift, scale = self.final_ada(cond).chunk(2, -1)
        return self.out(_modulate(self.final_norm(h), shift, scale)).squeeze(-1)

    def log_prob(self, features: Tensor, time: Tensor, active: Tensor, decisions: Tensor,
                 forced: Tensor, temperature: float = 1.0) -> Tensor:
        """``(R,)`` log-probability of a step's `decisions` and `forced` fallback over the
        `active` positions, with gradients (one batched pass over any number of recorded steps
        stacked as rows)."""
        return step_log_prob(self(features, time).double() / temperature, active, decisions,
                             forced)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike[str], half: bool = True,
                        **metadata: Any) -> Path:
        """Write ``policy.json`` (the architecture and inputs, plus ``metadata``: task, model,
        recipe, command) and ``policy.safetensors`` (float16 by default: half the size, and the
        saved policy is the one that is evaluated)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        dtype = torch.float16 if half else torch.float32
        state = {k: v.detach().cpu().to(dtype).contiguous() for k, v in self.state_dict().items()}
        atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(state, str(p)))
        self.metadata.update(metadata)
        body = {"policy": asdict(self.config), "weights_dtype": str(dtype).removeprefix("torch."),
                **self.metadata}
        atomic_write(directory / CONFIG_FILE, json.dumps(body, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str],
                        device: str | torch.device = "cpu") -> "UnmaskingPolicy":
        """The policy saved in `directory` (float32, eval mode)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_FILE).exists():
            raise MissingFileError(f"{directory} holds no {CONFIG_FILE}: not an unmasking policy")
        if not (directory / WEIGHTS_FILE).exists():
            raise MissingFileError(f"{directory} holds no {WEIGHTS_FILE}")
        body = json.loads((directory / CONFIG_FILE).read_text())
        config = PolicyConfig(**body.pop("policy"))
        body.pop("weights_dtype", None)
        policy = cls(config, metadata=body)
        state = {k: v.float() for k, v in load_file(str(directory / WEIGHTS_FILE)).items()}
        policy.load_state_dict(state)
        return policy.to(device).eval()


def step_log_prob(logits: Tensor, active: Tensor, decisions: Tensor, forced: Tensor) -> Tensor:
    """Bernoulli log-probability of `decisions` over `active`, plus the log-softmax (over
    `active`) of the `forced` position in rows that have one."""
    target = decisions.to(logits)
    bernoulli = -nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    total = (bernoulli * active.to(logits)).sum(-1)
    has_forced = forced.any(-1)
    if has_forced.any():
        choice = torch.log_softmax(logits.masked_fill(~active, -torch.inf), -1)
        picked = choice.masked_fill(~forced, 0).sum(-1)
        total = total + torch.where(has_forced, picked, torch.zeros_like(picked))
    return total


def mi_feature(mi: Tensor) -> Tensor:
    """Mutual information (nats) on a 0..1 scale: ``log10(MI + 1e-6) / 6 + 1``."""
    return torch.log10(mi.clamp_min(0) + MI_FLOOR) / 6 + 1


def policy_features(policy: UnmaskingPolicy, logits: Tensor, tokens: Tensor, masked: Tensor,
                    in_block: Tensor, draws_logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Features ``(R, L, F)`` and time ``(R,)`` for one step (module docstring).

    `logits` ``(R, L, V)`` and `tokens` ``(R, L)`` are the step's MAP prediction; `masked`
    ``(R, L)`` the positions still masked (anywhere); `in_block` ``(L,)`` the current block;
    `draws_logits` ``(M, R, L, V)`` the head draws' logits (needed by an MI policy).
    """
    if policy.uses_mi and draws_logits is None:
        raise GenuncError("this unmasking policy reads mutual information: pass mi_draws (head "
                          "draws from the posterior, num_draws >= 2) to the sampler")
    rows, length = masked.shape
    in_block = in_block.to(masked.device)
    probs = torch.softmax(logits.double(), -1)
    k = min(policy.config.top_k, probs.shape[-1])
    top = probs.topk(k, dim=-1).values
    if k < policy.config.top_k:
        top = torch.cat([top, top.new_zeros(rows, length, policy.config.top_k - k)], -1)
    block = in_block.to(probs).expand(rows, length)
    sharp = -torch.log10(1 - top[..., :1] + 1e-6) / 6
    parts = [masked.to(probs).unsqueeze(-1), block.unsqueeze(-1), top, sharp]
    if policy.uses_mi:
        mi = mutual_information(draws_logits)
        posterior_conf = confidence(draws_logits, tokens.expand(len(draws_logits), -1, -1)).mean(0)
        parts += [mi_feature(mi).unsqueeze(-1), posterior_conf.unsqueeze(-1)]
    features = torch.cat(parts, -1).float()
    time = ((masked & in_block).sum(-1) / in_block.sum().clamp_min(1)).float()
    return features, time


@torch.no_grad()
def policy_commit(policy: UnmaskingPolicy, features: Tensor, time: Tensor, active: Tensor,
                  uniforms: Tensor | None, temperature: float,
                  record: list[PolicyStep] | None = None) -> Tensor:
    """The positions to commit ``(R, L)``, only ever among `active` (module docstring).

    τ = `temperature` > 0: `uniforms` ``(R, 2, L)`` from the sampler's stream, the first for
    the Bernoulli draws, the second for the fallback's Gumbel-max; τ = 0: ``p > 0.5`` and the
    most probable fallback.  Appends a :class:`PolicyStep` to `record`.
    """
    logits = policy(features, time).double()
    scaled = logits / temperature if temperature > 0 else logits
    if temperature > 0:
        if uniforms is None:
            raise GenuncError("a sampled policy step needs the sampler's uniforms")
        uniforms = uniforms.to(logits.device).double()
        decisions = active & (uniforms[:, 0] < torch.sigmoid(scaled))
        u = uniforms[:, 1].clamp(1e-12, 1 - 1e-12)
        rank = scaled - torch.log(-torch.log(u))
    else:
        decisions = active & (logits > 0)
        rank = logits
    best = rank.masked_fill(~active, -torch.inf).argmax(-1, keepdim=True)
    needs = active.any(-1, keepdim=True) & ~decisions.any(-1, keepdim=True)
    forced = torch.zeros_like(active).scatter_(1, best, True) & needs
    commit = (decisions | forced) & active
    if record is not None:
        record.append(PolicyStep(features.cpu(), time.cpu(), active.cpu(), decisions.cpu(),
                                 forced.cpu(), step_log_prob(scaled, active, decisions, forced).cpu(),
                                 commit.cpu()))
    return commit


def stack_record(record: list[PolicyStep]) -> PolicyStep:
    """The recorded steps as one batch of ``S * R`` rows (step-major), for one batched pass."""
    if not record:
        raise GenuncError("the record is empty: no policy step was taken")
    return PolicyStep(*(torch.cat([getattr(s, f) for s in record]) for f in
                        ("features", "time", "active", "decisions", "forced", "log_prob",
                         "committed")))

