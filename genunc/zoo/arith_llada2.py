"""The shipped arithmetic model behind diffusers' ``LLaDA2Pipeline`` (a trained model through the
real pipeline, for :meth:`TextUncertaintyPipeline.from_pipe`).

    pipe = arith_llada2_pipeline()                     # LLaDA2Pipeline over arith_mdlm
    pipe(prompt="12*34=", gen_length=4, block_length=10, use_chat_template=False).texts

``LLaDA2Pipeline`` calls ``model(ids, attention_mask=, position_ids=).logits`` and reads
``tokenizer.mask_token_id``; :class:`LLaDA2Interface` gives a genunc masked-diffusion
transformer that call, and :func:`arith_tokenizer` is a character-level tokenizer over the
task's symbols.  A problem ``a*b=`` is 6 tokens and its answer 4, so ``gen_length=4`` with
``block_length`` 5 or 10 fills exactly the model's 10 positions.  Needs diffusers >= 0.42 and
transformers (tokenizers).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genunc.errors import GenuncError, ShapeMismatchError
from genunc.tasks import ArithmeticTask
from genunc.tasks.arithmetic import SYMBOLS
from genunc.zoo.pretrained import read_config
from genunc.zoo.shipped import ARITH_DIR
from genunc.zoo.text_model import MaskedDiffusionTransformer, MaskedLMOutput

MASK_TOKEN = "<mask>"


class LLaDA2Interface(nn.Module):
    """``model(input_ids, attention_mask=, position_ids=)`` over a genunc masked-diffusion
    transformer, whose head is the output embedding.  The model knows no padding and learned
    positions ``0..max_length-1``: a zero in the attention mask or other positions are refused."""

    def __init__(self, model: MaskedDiffusionTransformer) -> None:
        super().__init__()
        self.model = model

    @property
    def device(self) -> torch.device:
        return self.model.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.head.weight.dtype

    def get_output_embeddings(self) -> nn.Module:
        return self.model.head

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> MaskedLMOutput:
        length = input_ids.shape[1]
        if length > self.model.config["max_length"]:
            raise ShapeMismatchError(f"{length} positions, the model has "
                                     f"{self.model.config['max_length']}: shorten gen_length or "
                                     "choose a block_length that divides the sequence")
        if attention_mask is not None and not bool((attention_mask != 0).all()):
            raise GenuncError("this model has no padding: every position must be attended to "
                              "(equal-length prompts, block_length dividing prompt + gen_length)")
        if position_ids is not None and not torch.equal(
                position_ids, torch.arange(length, device=position_ids.device).expand_as(position_ids)):
            raise GenuncError("this model knows positions 0..L-1 only")
        return self.model(input_ids)


def arith_tokenizer(task: ArithmeticTask) -> Any:
    """Character-level ``PreTrainedTokenizerFast`` over the task's symbols, mask token last."""
    try:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        raise GenuncError("the LLaDA2 route needs transformers (pip install transformers)") from None
    vocab = {ch: i for i, ch in enumerate(SYMBOLS)}
    vocab[MASK_TOKEN] = task.mask_id
    chars = Tokenizer(models.WordLevel(vocab, unk_token=MASK_TOKEN))
    chars.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    chars.decoder = decoders.Fuse()
    # prompts of one task are equally long; padding would show as a refused attention mask
    return PreTrainedTokenizerFast(tokenizer_object=chars, mask_token=MASK_TOKEN, pad_token=MASK_TOKEN)


def arith_llada2_pipeline(path: str | os.PathLike[str] = ARITH_DIR, device: str = "cpu") -> Any:
    """``LLaDA2Pipeline`` over the arithmetic model in `path` (default: the shipped one)."""
    try:
        from diffusers import BlockRefinementScheduler, LLaDA2Pipeline
    except ImportError:
        raise GenuncError("the LLaDA2 route needs diffusers >= 0.42") from None
    config = read_config(Path(path))
    task = ArithmeticTask(config["task"]["op"], config["task"]["digits"])
    model = MaskedDiffusionTransformer.from_pretrained(path, device=device).eval()
    pipe = LLaDA2Pipeline(model=LLaDA2Interface(model), scheduler=BlockRefinementScheduler(),
                          tokenizer=arith_tokenizer(task))
    pipe.set_progress_bar_config(disable=True)
    return pipe
