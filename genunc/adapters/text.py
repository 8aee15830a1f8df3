"""Adapter for masked-diffusion language models (LLaDA-, MDLM- and Dream-style).

Such a model is called as ``model(input_ids)`` (optionally with a time argument) and returns
logits ``(B, L, V)`` from an ``nn.Linear`` vocabulary head.  Three interface details differ
between model families, and the adapter absorbs them:

* **mask id**: the absorbing state; never a valid prediction, so its logit is removed.
* **time conditioning** (MDLM): the model also takes the masked fraction ``t``.
* **logit shift** (Dream): the logit at position ``i`` predicts token ``i + 1`` (the model was
  initialised from an autoregressive LM); the adapter shifts logits right by one so that
  position ``i``'s logits always describe token ``i``.

Tied heads (vocabulary head sharing its weight with the input embedding) are untied by
cloning the weight at construction: a posterior draw of the head must never move the embedding.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genunc.adapters.base import DenoiserAdapter, TrainingPairs
from genunc.adapters.generic import MaskedTokenAdapter
from genunc.errors import GenuncError, ShapeMismatchError


def shared_parameters(model: nn.Module, module: nn.Module) -> list[str]:
    """Names of parameters outside ``module`` that are (or share storage with) its parameters."""
    inside = {id(p) for p in module.parameters()}
    storage = {p.data_ptr() for p in module.parameters()}
    module_names = {name for name, m in model.named_modules() if m is module}
    tied = []
    for name, p in model.named_parameters(remove_duplicate=False):
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if owner in module_names:
            continue
        if id(p) in inside or p.data_ptr() in storage:
            tied.append(name)
    return tied


class MaskedDiffusionLMAdapter(MaskedTokenAdapter):
    """A masked-diffusion LM with an ``nn.Linear`` head.

    Batches are dicts with ``x`` ``(B, L)`` token ids and optionally ``prompt_mask`` ``(B, L)``
    (True where the token is given and never masked), or plain ``(B, L)`` tensors.
    """

    def __init__(self, model: nn.Module, head_name: str, mask_id: int, *,
                 time_conditioning: bool = False, logit_shift: bool = False,
                 untie_head: bool = True, call: Callable[..., Tensor] | None = None) -> None:
        super().__init__(model, head_name, mask_id, call)
        if not isinstance(self.head, nn.Linear):
            raise GenuncError(f"the text adapter expects an nn.Linear vocabulary head; "
                              f"'{head_name}' is a {type(self.head).__name__}")
        self.time_conditioning = time_conditioning
        self.logit_shift = logit_shift
        tied = shared_parameters(model, self.head)
        if tied:
            if not untie_head:
                raise GenuncError(f"the head shares weights with {tied}; pass untie_head=True")
            self.head.weight = nn.Parameter(self.head.weight.detach().clone(),
                                            requires_grad=self.head.weight.requires_grad)
            warnings.warn(f"untied the head '{head_name}' from {tied} (cloned its weight) so that "
                          "posterior draws of the head leave the embedding alone", stacklevel=2)

    @property
    def vocab_size(self) -> int:
        return self.head.out_features

    def masked_fraction(self, x: Tensor) -> Tensor:
        return (x == self.mask_id).float().mean(-1)

    def denoise(self, x: Tensor, **kwargs: Any) -> Tensor:
        if self.time_conditioning:
            kwargs.setdefault("t", self.masked_fraction(x))
        out = self.call(self.model, x, **kwargs)
        return self.post_head(out, {"x": x})

    def post_head(self, head_output: Tensor, inputs: Mapping[str, Any]) -> Tensor:
        """Shift (Dream) and forbid the mask token; broadcasts over a leading draw axis."""
        out = head_output
        if self.logit_shift:
            out = torch.cat([out[..., :1, :], out[..., :-1, :]], dim=-2)
        out = out.clone()
        out[..., self.mask_id] = torch.finfo(out.dtype).min
        return out

    def head_output_variance(self, posterior: Any, phi: Tensor,
                             inputs: Mapping[str, Any]) -> Tensor:
        raise GenuncError("logits pass through a softmax: the token scores (mutual information) "
                          "use head draws, there is no closed-form variance for them")

    def training_pairs(self, batch: Any, generator: torch.Generator) -> TrainingPairs:
        if isinstance(batch, Mapping):
            x0, fixed = torch.as_tensor(batch["x"]), batch.get("prompt_mask")
        else:
            x0, fixed = torch.as_tensor(batch), None
        if x0.is_floating_point() or x0.is_complex():
            raise GenuncError(f"token ids must be integers, got {x0.dtype}")
        x0 = x0.long()
        if x0.dim() != 2:
            raise ShapeMismatchError(f"token batches are (B, L), got {tuple(x0.shape)}")
        if x0.numel() and (int(x0.min()) < 0 or int(x0.max()) >= self.vocab_size):
            raise GenuncError(f"token ids must lie in [0, {self.vocab_size}); got "
                              f"[{int(x0.min())}, {int(x0.max())}]")
        b, length = x0.shape
        free = torch.ones_like(x0, dtype=torch.bool) if fixed is None else ~fixed.bool()
        if not free.any(-1).all():
            raise GenuncError("every sequence needs at least one maskable (non-prompt) position")
        x_t, masked = mask_answers(x0, free, self.mask_id, generator)
        inputs: dict[str, Any] = {"x": x_t.to(self.device)}
        if self.time_conditioning:
            inputs["t"] = self.masked_fraction(x_t).to(self.device)
        target, rows = x0, masked
        if self.logit_shift:  # head row i predicts token i + 1
            target = torch.cat([x0[:, 1:], x0[:, -1:]], dim=1)
            rows = torch.cat([masked[:, 1:], torch.zeros_like(masked[:, :1])], dim=1)
            if not rows.any(-1).all():
                raise GenuncError("with logit_shift the first position cannot be predicted; "
                                  "keep it in the prompt")
        return TrainingPairs(inputs=inputs, target=target.to(self.device), mask=rows.to(self.device))


def mask_answers(x0: Tensor, free: Tensor, mask_id: int,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The absorbing-state corruption masked-diffusion LMs are trained with: per sequence a level
    ``t ~ U(1/L, 1)``, each free (non-prompt) token masked with probability ``t``, and at least
    one free token masked.  Returns ``(x_t, masked)``."""
    b, length = x0.shape
    t = torch.rand(b, 1, generator=generator).clamp_min(1.0 / length)
    masked = (torch.rand(b, length, generator=generator) < t) & free
    pick = torch.multinomial(free.float(), 1, generator=generator).squeeze(1)
    masked[torch.arange(b), pick] = True
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def check_layout(generate_mask: Tensor) -> Sequence[int]:
    """Columns to generate; every row must generate the same columns (prompts of equal length)."""
    if generate_mask.dim() != 2:
        raise ShapeMismatchError(f"generate_mask must be (B, L), got {tuple(generate_mask.shape)}")
    if not (generate_mask == generate_mask[:1]).all():
        raise GenuncError("all sequences in a batch must generate the same positions; pad prompts "
                          "to a common length")
    cols = torch.nonzero(generate_mask[0]).squeeze(1).tolist()
    if not cols:
        raise GenuncError("nothing to generate: generate_mask is all False")
    return cols


class PipelineLMAdapter(DenoiserAdapter):
    """The language model inside a diffusers text pipeline that genunc runs with hooks
    (:class:`~genunc.pipelines.text_wrapped.WrappedTextPipeline`): the model and its vocabulary
    head, which is all the posterior needs (fingerprints, draws, the classification
    likelihood).  The pipeline runs its own loop, and each pipeline family corrupts fitting data
    as that family is trained, so this adapter is never asked to denoise or to make pairs."""

    likelihood = "classification"

    def denoise(self, **inputs: Any) -> Tensor:
        raise GenuncError("a wrapped text pipeline runs its own loop: call the wrapper, not its "
                          "adapter")

    def training_pairs(self, batch: Any, generator: torch.Generator) -> TrainingPairs:
        raise GenuncError("fit a wrapped text pipeline with its fit_posterior (texts, or "
                          "(prompt, answer) pairs)")


class MaskedAnswerLMAdapter(PipelineLMAdapter):
    """The language model of a pipeline that unmasks (``LLaDA2Pipeline``), made to fit as it is
    trained: clean ``{"x": (B, L) ids, "prompt_mask": (B, L)}`` batches are masked over their
    answers (:func:`mask_answers`) and the model is called as the pipeline calls it (a 2-D
    attention mask of ones, position ids), so :func:`~genunc.posterior.collect_head_data` and
    the head fit run as for every other adapter."""

    def __init__(self, model: nn.Module, head_name: str, mask_id: int) -> None:
        super().__init__(model, head_name)
        self.mask_id = int(mask_id)

    def denoise(self, x: Tensor, **inputs: Any) -> Tensor:
        b, length = x.shape
        return self.model(x, attention_mask=torch.ones_like(x),
                          position_ids=torch.arange(length, device=x.device).expand(b, -1))

    def training_pairs(self, batch: Any, generator: torch.Generator) -> TrainingPairs:
        x0 = torch.as_tensor(batch["x"]).long()
        free = ~torch.as_tensor(batch["prompt_mask"]).bool()
        x_t, masked = mask_answers(x0, free, self.mask_id, generator)
        return TrainingPairs(inputs={"x": x_t.to(self.device)}, target=x0.to(self.device),
                             mask=masked.to(self.device))


def uniform_corruption(clean: Tensor, vocab_size: int, generator: torch.Generator) -> Tensor:
    """``x_t ~ Cat(alpha x_0 + (1 - alpha) / K)`` per position, ``alpha = 1 - t``, ``t ~ U(0, 1)``
    per row: each token survives with probability alpha, otherwise it is replaced by a token drawn
    uniformly from the whole vocabulary (which may be the clean one again).  The forward process
    of ``DiscreteDDIMScheduler`` (linear schedule) and of ``DiffusionGemmaPipeline``'s canvas, whose
    noise is ``torch.randint(0, vocab_size)``."""
    batch, length = clean.shape
    alpha = 1 - torch.rand(batch, 1, generator=generator)
    keep = torch.rand(batch, length, generator=generator) < alpha
    noise = torch.randint(0, vocab_size, (batch, length), generator=generator)
    return torch.where(keep, clean, noise)


class CanvasLMAdapter(PipelineLMAdapter):
    """The encoder-decoder model of a pipeline that refines a canvas (``DiffusionGemmaPipeline``),
    made to fit as it is trained, so :func:`~genunc.posterior.collect_head_data` runs as for every
    other adapter.

    Batches (:meth:`encoded`) hold ``prompt`` ids and ``attention`` ``(B, P)``, the ``clean``
    canvas ``(B, C)`` and the ``target`` positions ``(B, C)``; the prompt is encoded once per
    batch into the KV cache the decoder reads, as the pipeline encodes it.  Each pair corrupts the
    canvas (:func:`uniform_corruption`) and calls the decoder with the pipeline's keyword
    arguments.  With probability `self_conditioning` a row is conditioned on the logits of a
    first, unconditioned call (the pipeline's later steps feed the previous logits back); that
    first call runs while the pair is made, so the head sees one call per pair.  Rows left
    unconditioned in a mixed batch get the model's ``self_conditioning_mask`` (zeroed soft
    embeddings, which is what ``self_conditioning_logits=None`` means)."""

    def __init__(self, model: nn.Module, head_name: str, *, self_conditioning: float,
                 corrupted_only: bool) -> None:
        super().__init__(model, head_name)
        if not 0 <= self_conditioning <= 1:
            raise GenuncError(f"self_conditioning is a probability, got {self_conditioning}")
        self.self_conditioning = float(self_conditioning)
        self.corrupted_only = bool(corrupted_only)
        self.text_config = model.config.get_text_config(decoder=True)
        self.vocab_size = int(self.text_config.vocab_size)

    @torch.no_grad()
    def encoded(self, batches: Iterable[Mapping[str, Tensor]]) -> Iterator[dict[str, Any]]:
        """Each batch with its prompt encoded: the encoder's KV cache, the decoder's attention
        mask (``create_diffusion_decoder_attention_mask``) and the canvas positions, which
        continue after the prompt."""
        from transformers import DynamicCache

        device, model = self.device, self.model
        for batch in batches:
            prompt, attention = batch["prompt"].to(device), batch["attention"].to(device)
            (size, length), canvas_length = prompt.shape, batch["clean"].shape[1]
            cache = DynamicCache(config=self.text_config)
            model.model.encoder(input_ids=prompt, attention_mask=attention, past_key_values=cache,
                                position_ids=torch.arange(0, length, device=device).unsqueeze(0))
            mask = model.model.decoder.create_diffusion_decoder_attention_mask(
                config=model.config, inputs_embeds=torch.empty((size, canvas_length, 0), device=device),
                past_key_values=cache,
                decoder_attention_mask=F.pad(attention.bool(), (0, canvas_length), value=True))
            positions = torch.arange(length, length + canvas_length, device=device).unsqueeze(0)
            yield {**batch, "cache": cache, "mask": mask, "positions": positions}

    def input_rows(self, inputs: Mapping[str, Any], index: slice, rows: int) -> dict[str, Any]:
        """Tensors cut as for every adapter; the encoder's KV cache copied and cut to the same
        samples (the tail's decoder layers read it)."""
        cut = super().input_rows({k: v for k, v in inputs.items() if k != "cache"}, index, rows)
        cache = copy.deepcopy(inputs["cache"])
        cache.batch_select_indices(torch.arange(rows)[index].to(self.device))
        return {**cut, "cache": cache}

    def denoise(self, canvas: Tensor, cache: Any, mask: Any, positions: Tensor,
                conditioning: Tensor | None = None, conditioned: Tensor | None = None) -> Tensor:
        extra = {} if conditioned is None else {"self_conditioning_mask": conditioned}
        return self.model(decoder_input_ids=canvas, past_key_values=cache,
                          self_conditioning_logits=conditioning, decoder_attention_mask=mask,
                          decoder_position_ids=positions, **extra).logits

    @torch.no_grad()
    def training_pairs(self, batch: Any, generator: torch.Generator) -> TrainingPairs:
        clean, target = batch["clean"], batch["target"]
        x_t = uniform_corruption(clean, self.vocab_size, generator)
        conditioned = torch.rand(clean.shape[0], generator=generator) < self.self_conditioning
        inputs = {"canvas": x_t.to(self.device), "cache": batch["cache"], "mask": batch["mask"],
                  "positions": batch["positions"]}
        if conditioned.any():
            inputs["conditioning"] = self.denoise(**inputs)
            if not conditioned.all():
                inputs["conditioned"] = conditioned.to(self.device)
        rows = target & (x_t != clean) if self.corrupted_only else target
        return TrainingPairs(inputs=inputs, target=clean.to(self.device), mask=rows.to(self.device))
