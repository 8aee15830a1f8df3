"""A tiny bidirectional transformer for masked diffusion, with the interface of LLaDA-style LMs.

``model(input_ids).logits`` is ``(B, L, V)``; the vocabulary head is ``model.head``, an
``nn.Linear`` (optionally tied to the input embedding, as many LMs do).  Optional time
conditioning adds an embedding of the masked fraction ``t`` (MDLM-style).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genunc.errors import GenuncError
from genunc.zoo.pretrained import Pretrained


@dataclass
class MaskedLMOutput:
    logits: Tensor


class MaskedDiffusionTransformer(Pretrained, nn.Module):
    def __init__(self, vocab_size: int, max_length: int, d_model: int = 128, n_layers: int = 4,
                 n_heads: int = 4, tie_head: bool = False, time_conditioning: bool = False) -> None:
        super().__init__()
        self.config = dict(vocab_size=vocab_size, max_length=max_length, d_model=d_model,
                           n_layers=n_layers, n_heads=n_heads, tie_head=tie_head,
                           time_conditioning=time_conditioning)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Parameter(torch.randn(max_length, d_model) * 0.02)
        self.time = nn.Sequential(nn.Linear(1, d_model), nn.SiLU(), nn.Linear(d_model, d_model)) \
            if time_conditioning else None
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        if tie_head:
            self.head.weight = self.embed.weight

    def forward(self, input_ids: Tensor, t: Tensor | None = None) -> MaskedLMOutput:
        h = self.embed(input_ids) + self.position[: input_ids.shape[1]]
        if self.time is not None:
            if t is None:
                raise GenuncError("this model is time-conditioned: pass t (masked fraction)")
            h = h + self.time(t.reshape(-1, 1).to(h.dtype)).unsqueeze(1)
        return MaskedLMOutput(logits=self.head(self.norm(self.blocks(h))))


def save_model(model: MaskedDiffusionTransformer, task: Any, directory: Path,
               extra: dict | None = None) -> None:
    """The model with its mask id and task, so the folder alone says how to run and check it."""
    model.save_pretrained(directory, mask_id=task.mask_id, task=task.spec(), **(extra or {}))


def load_text_adapter(path: Any, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """A folder written by the text recipes (``genunc zoo train arith-mdlm`` ...) as a
    :class:`~genunc.adapters.text.MaskedDiffusionLMAdapter` on its head, with the folder's
    config (task, mask id, training record)."""
    from genunc.adapters.text import MaskedDiffusionLMAdapter
    from genunc.zoo.pretrained import read_config

    config = read_config(path)
    model = MaskedDiffusionTransformer.from_pretrained(path, device=device)
    adapter = MaskedDiffusionLMAdapter(model, "head", config["mask_id"],
                                       time_conditioning=config["model"]["time_conditioning"])
    return adapter, config
