"""What every fill-in-the-answer task shares: a fixed-length prompt followed by the answer
positions the masked-diffusion model fills, and a checker that reads whole sequences."""

from __future__ import annotations

import torch
from torch import Tensor

from genunc.errors import GenuncError


class FillInTask:
    """Mixin for tasks laid out as ``prompt (prompt_length tokens) + answer`` over a vocabulary
    of ``symbols`` (one character per token) plus the mask token; subclasses give ``symbols``,
    ``length``, ``prompt_length`` and ``sequences(problems)`` (solved sequences)."""

    symbols: str
    length: int
    prompt_length: int

    @property
    def mask_id(self) -> int:
        return len(self.symbols)

    @property
    def vocab_size(self) -> int:
        return len(self.symbols) + 1

    def encode(self, text: str) -> list[int]:
        try:
            return [self.symbols.index(ch) for ch in text]
        except ValueError:
            raise GenuncError(f"{text!r} holds a character outside {self.symbols!r}") from None

    def decode(self, ids: Tensor | list[int]) -> str:
        return "".join("_" if int(i) == self.mask_id else self.symbols[int(i)] for i in ids)

    def sequences(self, problems) -> Tensor:  # pragma: no cover - every task defines it
        raise NotImplementedError

    def prompts(self, problems) -> Tensor:
        """The problems' sequences with the answer positions masked, ``(N, length)``."""
        x = self.sequences(problems)
        x[:, self.prompt_length :] = self.mask_id
        return x

    def prompt_mask(self, n: int) -> Tensor:
        """``(n, length)`` True over the prompt positions (what a posterior fit never predicts)."""
        mask = torch.zeros(n, self.length, dtype=torch.bool)
        mask[:, : self.prompt_length] = True
        return mask

    def _token_rows(self, tokens: Tensor) -> Tensor:
        """`tokens` as an ``(N, length)`` tensor, or a clear error."""
        tokens = torch.as_tensor(tokens)
        if tokens.dim() != 2 or tokens.shape[1] != self.length:
            raise GenuncError(f"expected (N, {self.length}) token sequences, got {tuple(tokens.shape)}")
        return tokens
