"""Sample from a masked-diffusion LM with per-sequence uncertainty scores.

    sampler = TextUncertaintySampler.from_pretrained("genunc/zoo/weights/arith_mdlm")
    sampler.fit_posterior(batches)                          # or loaded from genunc_posterior/
    out = sampler(prompts, UnmaskingConfig("low_confidence"), num_draws=8, seed=0)

Scores (lower = more certain; one backbone pass per step unless noted):

* ``mutual_information`` / ``_max`` / ``_span``: the epistemic MI of the head draws at each
  token's commit step, averaged over generated tokens / their maximum / averaged over the answer
  span (``span=``);
* ``low_posterior_confidence``: 1 - the committed tokens' probability averaged over the head
  draws (the Bayesian model average of ``low_confidence``), same cost as MI;
* ``semantic``: entropy of a diagonal Gaussian over embedder features of the MAP and M
  generations from the same randomness ((M+1)x the rows, same NFE);
* baselines from the MAP logits: ``low_confidence`` (1 - mean committed-token probability),
  ``low_margin`` (1 - mean top-2 margin), ``low_self_certainty`` (- mean self-certainty),
  and ``random``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from genunc.adapters.text import MaskedDiffusionLMAdapter
from genunc.errors import GenuncError, ShapeMismatchError
from genunc.posterior.laplace_head import POSTERIOR_DIR, HeadPosterior
from genunc.sampling.masked import UnmaskingConfig, unmask
from genunc.scores import gaussian_entropy, random_scores
from genunc.scores.tokens import aggregate

SCORES = ("mutual_information", "mutual_information_max", "mutual_information_span",
          "low_posterior_confidence", "semantic", "low_confidence", "low_margin",
          "low_self_certainty", "random")
NEEDS_DRAWS = {"mutual_information", "mutual_information_max", "mutual_information_span",
               "low_posterior_confidence"}

#: ``(tokens (B, L), generated (B, L) bool) -> features (B, D)``
Embedder = Callable[[Tensor, Tensor], Tensor | np.ndarray]


def one_hot_answer(vocab_size: int) -> Embedder:
    """Answer-level features for verifiable tasks: the one-hot tokens of the generated span, so
    two generations embed alike exactly when they give the same answer."""

    def embed(tokens: Tensor, generated: Tensor) -> Tensor:
        onehot = torch.nn.functional.one_hot(tokens.long(), vocab_size).double()
        return (onehot * generated.unsqueeze(-1)).flatten(1)

    return embed


@dataclass
class TextOutput:
    tokens: Tensor  # (B, L)
    scores: dict[str, np.ndarray]
    nfe: float  # mean over sequences of the backbone calls each needed (its own steps)
    backbone_rows: int
    row_nfe: np.ndarray | None = None  # (B,) per sequence
    token_stats: dict[str, Tensor] = field(default_factory=dict)
    draw_tokens: Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)


class TextUncertaintySampler:
    def __init__(self, adapter: MaskedDiffusionLMAdapter, posterior: HeadPosterior | None = None,
                 embedder: Embedder | None = None, metadata: dict[str, Any] | None = None) -> None:
        self.adapter = adapter
        self.posterior = posterior
        self.embedder = embedder or one_hot_answer(adapter.vocab_size)
        self.metadata = metadata or {}
        if posterior is not None:
            posterior.check_matches(adapter.model)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "cpu") -> "TextUncertaintySampler":
        """A model saved by :func:`genunc.zoo.arith.save_model` (and its posterior, if present)."""
        from safetensors.torch import load_file

        from genunc.zoo.text_model import MaskedDiffusionTransformer

        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        model = MaskedDiffusionTransformer(**config["model"])
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        model = model.to(device).eval()
        adapter = MaskedDiffusionLMAdapter(model, "head", config["mask_id"],
                                           time_conditioning=config["model"]["time_conditioning"])
        sampler = cls(adapter, metadata=config)
        sampler.posterior = HeadPosterior.load_saved(directory / POSTERIOR_DIR, model)
        return sampler

    def fit_posterior(self, batches: Any, *, repeats: int = 1, seed: int = 0,
                      progress: bool = True, **kwargs: Any) -> HeadPosterior:
        """Fit the head posterior on clean sequences (dicts with ``x`` and ``prompt_mask``)."""
        self.posterior = HeadPosterior.fit(self.adapter, batches, repeats=repeats, seed=seed,
                                           progress=progress, **kwargs)
        return self.posterior

    @torch.no_grad()
    def __call__(self, prompts: Tensor, config: UnmaskingConfig | None = None, *,
                 num_draws: int = 5, scores: tuple[str, ...] = ("mutual_information",),
                 span: Tensor | None = None, seed: int = 0, chunk_size: int = 512) -> TextOutput:
        """Fill the masked positions of ``prompts`` ``(B, L)`` and score every sequence.

        Args:
            span: ``(L,)`` or ``(B, L)`` bool, the answer positions for ``mutual_information_span``
                (default: every generated position).
        """
        unknown = set(scores) - set(SCORES)
        if unknown:
            raise GenuncError(f"unknown scores {sorted(unknown)}; choose from {SCORES}")
        uses_draws = (NEEDS_DRAWS | {"semantic"}) & set(scores)
        if uses_draws:
            if self.posterior is None:
                raise GenuncError("no posterior: call fit_posterior(...) or load one first")
            if num_draws < 2:
                raise GenuncError(f"{sorted(uses_draws)} need num_draws >= 2, got {num_draws}")
        if prompts.dim() != 2:
            raise ShapeMismatchError(f"prompts must be (B, L) token ids, got {tuple(prompts.shape)}")
        draws = self.posterior.sample(num_draws, seed=seed) if uses_draws else None
        parts: dict[str, list[np.ndarray]] = {}
        tokens, draw_tokens, stats_all = [], [], []
        rows = 0
        row_nfe: list[np.ndarray] = []
        tic = time.perf_counter()
        for start in range(0, len(prompts), chunk_size):
            x = prompts[start : start + chunk_size]
            g = torch.Generator().manual_seed(seed * 1_000_003 + start)
            out = unmask(self.adapter, x, config, posterior=self.posterior,
                         mi_draws=draws if NEEDS_DRAWS & set(scores) else None,
                         trajectory_draws=draws if "semantic" in scores else None, generator=g)
            row_nfe.append(out.row_nfe.cpu().numpy())
            rows += out.backbone_rows
            tokens.append(out.tokens.cpu())
            stats_all.append({k: v.cpu() for k, v in out.token_stats.items()})
            generated = out.generated.cpu()
            answer = generated if span is None else \
                torch.as_tensor(span, dtype=torch.bool).expand_as(generated) & generated
            st = stats_all[-1]
            values = {
                "mutual_information": lambda: aggregate(st["mutual_information"], generated),
                "mutual_information_max": lambda: aggregate(st["mutual_information"], generated, "max"),
                "mutual_information_span": lambda: aggregate(st["mutual_information"], answer),
                "low_posterior_confidence":
                    lambda: 1 - aggregate(st["posterior_confidence"], generated),
                "low_confidence": lambda: 1 - aggregate(st["confidence"], generated),
                "low_margin": lambda: 1 - aggregate(st["margin"], generated),
                "low_self_certainty": lambda: -aggregate(st["self_certainty"], generated),
            }
            for name in scores:
                if name in values:
                    parts.setdefault(name, []).append(values[name]().numpy())
            if "semantic" in scores:
                draw_tokens.append(out.draw_tokens.cpu())
                generations = torch.cat([out.tokens.cpu().unsqueeze(0), out.draw_tokens.cpu()])
                feats = torch.stack([torch.as_tensor(self.embedder(t, generated)) for t in generations])
                parts.setdefault("semantic", []).append(gaussian_entropy(feats))
        result = {k: np.concatenate(v) for k, v in parts.items()}
        if "random" in scores:
            result["random"] = random_scores(len(prompts), seed)
        stats = {k: torch.cat([s[k] for s in stats_all]) for k in stats_all[0]}
        per_row = np.concatenate(row_nfe)
        return TextOutput(torch.cat(tokens), result, float(per_row.mean()), rows, per_row, stats,
                          torch.cat(draw_tokens, 1) if draw_tokens else None,
                          {"sampling": time.perf_counter() - tic})
