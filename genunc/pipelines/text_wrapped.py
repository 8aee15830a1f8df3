"""Uncertainty scores for the user's own masked-diffusion text pipeline (diffusers ``LLaDA2Pipeline``).

    pipe = LLaDA2Pipeline(model=model, scheduler=BlockRefinementScheduler(), tokenizer=tok)
    upipe = TextUncertaintyPipeline.from_pipe(pipe)          # -> WrappedTextPipeline
    upipe.fit_posterior(["text", ...] or [("prompt", "answer"), ...])
    out = upipe(prompt=["..."], gen_length=256, num_draws=8, generator=g,
                scores=("mutual_information", "semantic"), feature_extractor=answer_features)
    out.sequences, out.texts       # what pipe(prompt=["..."], gen_length=256, generator=g) returns
    out.scores["mutual_information"], out.token_scores["mutual_information"]

Nothing of the pipeline is re-implemented: the wrapper calls ``pipe(...)`` itself with

* a forward hook on the vocabulary head that keeps the head's input of the latest forward
  (it returns nothing, so the pipeline's output is untouched and equal to a plain call's by
  construction: same arguments, same generator, same model calls);
* a forward pre-hook on the model that reads the first call's input once (where the prompt
  ends, so that block positions map onto generated positions);
* the pipeline's step callback (``callback_on_step_end`` with ``transfer_index``,
  ``editing_transfer_index``, ``sampled_tokens``, ``sampled_probs``, ``block_x``), which says
  which positions were committed at this step.  The M head draws are evaluated on the kept
  head input of those positions only, in one batched op (:meth:`HeadDraws.apply`), and their
  mutual information is recorded.  A callback the user passes is still called, after genunc's,
  with the tensors it asked for.

Token scores (one per generated position, ``NaN`` where nothing was ever committed):

* ``mutual_information``: ``H[E_m p_m] - E_m H[p_m]`` over the M head draws at the step the
  token was committed, where ``p_m`` is the distribution the pipeline samples from under draw m
  (the scheduler's: softmax of the raw logits for greedy decoding; temperature, top-k and top-p
  applied as the scheduler applies them for multinomial sampling).  ``LLaDA2Pipeline`` does not
  suppress the mask token, so neither does genunc: its probability counts like any other.
* ``confidence``: the pipeline's own ``sampled_probs`` of the committed token (MAP).

A token that the pipeline later edits (``editing_threshold``) or commits again keeps the scores
of its *last* commit: the one that put the final token there.  Per-sequence scores average
(``mutual_information``, ``low_confidence``) or take the maximum (``mutual_information_max``)
over the scored positions: committed generated positions up to and including the first EOS
(what the decoded text shows; a sequence without EOS uses all of them).

``semantic`` runs the pipeline M more times, each with a head hook that replaces the head's
output by draw m's and a fresh copy of the generator's state from before the MAP call (without
a ``generator`` argument, the MAP call gets genunc's initial-noise stream of ``seed``, as wrapped
image pipelines do: the run is reproducible and torch's global RNG is left alone), so a
posterior collapsed to its mean gives
the MAP generation again; the texts of the M+1 generations go through a user ``feature_extractor``
(``list[str] -> (B, D)`` features) and the score is the entropy of a diagonal Gaussian over
them (:func:`genunc.scores.gaussian_entropy`).  The user's generator ends where a plain call
leaves it.

Tied heads (the vocabulary head sharing its weight with the input embedding) need nothing:
draws are applied functionally to the captured head input, so no weight is ever written.
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genunc import streams
from genunc._compat import check_compatible
from genunc._seed import snapshot
from genunc.adapters.base import resolve_module
from genunc.adapters.text import CanvasLMAdapter, MaskedAnswerLMAdapter, PipelineLMAdapter
from genunc.errors import ConfigError, GenuncError, HeadNotCalledError, MissingFileError, ShapeMismatchError
from genunc.pipelines.base import UncertaintyPipeline, load_diffusers_folder
from genunc.pipelines.text import TextChunk, TextUncertaintyPipeline
from genunc.pipelines.text_canvas import (
    CanvasRecorder,
    canvas_prompt_ids,
    scheduler_kind,
    wrapped_scheduler,
)
from genunc.posterior import HeadDraws, HeadPosterior, Posterior, TailDraws, TailPosterior
from genunc.posterior.capture import collect_head_data
from genunc.posterior.observe import DrawObserver, under_draw
from genunc.posterior.token_mi import LogitMap, TokenMI, check_mi_estimator, token_mi
from genunc.sampling.masked import sampling_logits
from genunc.scores import gaussian_entropy, random_scores
from genunc.scores.aggregate import Aggregate, aggregate
from genunc.scores.tokens import mutual_information

#: ``texts -> (B, D)`` features for the semantic score
TextFeatureExtractor = Callable[[list[str]], Tensor | np.ndarray]

#: tensors genunc reads from the pipeline's step callback
_CALLBACK_INPUTS = ("block_x", "transfer_index", "editing_transfer_index", "sampled_tokens",
                    "sampled_probs")
#: sampling arguments of the pipeline that shape the distribution it samples from
_SAMPLING_ARGS = ("temperature", "top_k", "top_p", "sampling_method")


@dataclass
class WrappedTextOutput:
    """The pipeline's own output plus genunc's scores (lower = more certain).

    Attributes:
        sequences, texts: what the pipeline returned (``texts`` None for ``output_type="seq"``).
        pipeline_output: the pipeline's return value itself (output object or tuple).
        scores: score name -> ``(B,)`` float64.
        token_scores: ``mutual_information`` / ``confidence`` -> ``(B, gen_length)`` float64 at
            each position's last commit (NaN where nothing was committed).
        committed_at: ``(B, gen_length)`` the pipeline step (its ``global_step``) of each
            position's last commit, -1 where none.
        scored: ``(B, gen_length)`` the positions the per-sequence scores reduce over.
        draw_sequences, draw_texts: with ``semantic``, the M perturbed generations
            ``(M, B, L)`` and their texts; generations that stopped earlier than others (an
            adaptive stop after fewer canvases) are padded with the pad token (EOS without one).
    """

    sequences: Tensor
    texts: list[str] | None
    pipeline_output: Any
    scores: dict[str, np.ndarray]
    token_scores: dict[str, Tensor]
    committed_at: Tensor
    scored: Tensor
    num_draws: int
    seed: int
    draw_sequences: Tensor | None = None
    draw_texts: list[list[str]] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise GenuncError(f"the head {type(module).__name__} is not a submodule of the pipeline's model")


class _Recorder:
    """Per-call state: the head input of the latest forward and what each commit scored."""

    def __init__(self, observer: DrawObserver, sampling: dict[str, Any], mask_token_id: int | None,
                 gen_length: int, user_callback: Any, user_inputs: Sequence[str],
                 estimator: TokenMI | None = None) -> None:
        self.observer = observer
        self.estimator = estimator
        self.sampling = sampling
        self.mask_token_id = mask_token_id
        self.gen_length = gen_length
        self.user_callback = user_callback
        self.user_inputs = tuple(user_inputs)
        self.prompt_length: int | None = None
        self.mi: Tensor | None = None
        self.confidence: Tensor | None = None
        self.tokens: Tensor | None = None
        self.step: Tensor | None = None

    # ---------------------------------------------------------------- hooks
    def model_pre_hook(self, module: nn.Module, args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> None:
        if self.prompt_length is not None:
            return
        ids = args[0] if args else kwargs.get("input_ids")
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise GenuncError("the pipeline's model must be called with (B, L) input ids first")
        if self.mask_token_id is None:
            raise GenuncError("the pipeline has no mask token id: pass mask_token_id=")
        # the first call sees the prompt followed by nothing but mask tokens
        masked = (ids == self.mask_token_id).all(0).flip(0).long()
        trailing = int(masked.cumprod(0).sum())
        self.prompt_length = ids.shape[1] - trailing

    # ---------------------------------------------------------------- step callback
    def callback(self, pipe: Any, step: int, timestep: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        self.record(step, kwargs)
        if self.user_callback is None:
            return kwargs
        mine = {k: kwargs[k] for k in self.user_inputs if k in kwargs}
        return self.user_callback(pipe, step, timestep, mine)

    @torch.no_grad()
    def record(self, step: int, kw: dict[str, Any]) -> None:
        block_x, sampled = kw["block_x"], kw["sampled_tokens"]
        length = sampled.shape[1]
        # committed = what the pipeline wrote: rows finished at EOS write nothing
        committed = ((kw["transfer_index"] | kw["editing_transfer_index"])
                     & (block_x[:, -length:] == sampled))
        batch = block_x.shape[0]
        if self.mi is None:
            shape = (batch, self.gen_length)
            self.mi = torch.full(shape, math.nan, dtype=torch.float64)
            self.confidence = torch.full(shape, math.nan, dtype=torch.float64)
            self.tokens = torch.full(shape, -1, dtype=torch.long)
            self.step = torch.full(shape, -1, dtype=torch.long)
        if self.prompt_length is None:
            raise HeadNotCalledError("the step callback ran before the model was called")
        offset = block_x.shape[1] - length - self.prompt_length  # generated index of block start
        rows, cols = torch.nonzero(committed, as_tuple=True)
        gen = cols + offset
        keep = (gen >= 0) & (gen < self.gen_length)  # the block-aligned tail is not returned
        rows, cols, gen = rows[keep], cols[keep], gen[keep]
        if not len(rows):
            return
        rows_cpu, gen_cpu = rows.cpu(), gen.cpu()
        self.tokens[rows_cpu, gen_cpu] = sampled[rows, cols].cpu()
        self.confidence[rows_cpu, gen_cpu] = kw["sampled_probs"][rows, cols].double().cpu()
        self.step[rows_cpu, gen_cpu] = step
        if self.observer.draws is None and self.estimator is None:
            return
        features = self.observer.features
        if features is None or features.dim() != 3 or features.shape[:2] != block_x.shape[:2]:
            raise ShapeMismatchError(
                f"the head's input {None if features is None else tuple(features.shape)} does not "
                f"line up with the model's input {tuple(block_x.shape)}: genunc needs the head "
                "applied once per forward to (B, L, hidden) features")
        if self.estimator is not None:  # draw-free: the MAP head's input at the commits
            phi = features[:, -length:][rows, cols]
            head = self.observer.head
            raw = F.linear(phi.to(head.weight.dtype), head.weight, head.bias).float()
            self.mi[rows_cpu, gen_cpu] = self.estimator(
                phi.float(), raw, LogitMap.for_sampling(**self.sampling)).mi.cpu()
            return
        # committed positions only, in the draws' precision (float32 for bf16 models)
        outputs = self.observer.latest().draw_outputs(rows, cols, last=length)
        logits = sampling_logits(outputs, **self.sampling)  # (M, K, V)
        self.mi[rows_cpu, gen_cpu] = mutual_information(logits).cpu()


class WrappedTextPipeline(TextUncertaintyPipeline):
    """A diffusers diffusion text pipeline with a head posterior: the text family's members
    that run the user's pipeline share this (the head, the posterior, the checks, the call and
    its scores).  Each pipeline family is a subclass that says how its commits are read and how
    its head is fitted: :class:`LLaDA2TextPipeline` and :class:`DiffusionGemmaTextPipeline`.

    Build it with :meth:`TextUncertaintyPipeline.from_pipe` (or :meth:`for_pipe`), which picks
    the subclass.  ``head``: the vocabulary head, as a module or its name in ``pipe.model``
    (default: ``model.get_output_embeddings()``).  ``feature_extractor``: ``texts -> (B, D)``
    features for the semantic score.
    """

    #: the step-callback tensors the wrapper reads when the user names none
    DEFAULT_INPUTS: ClassVar[list[str]] = []
    EXTRA_SCORE_COLUMNS: ClassVar[tuple[str, ...]] = ()

    #: score name -> the fewest head draws it needs (None: no posterior)
    SCORES = {"mutual_information": 2, "mutual_information_max": 2, "semantic": 1,
              "low_confidence": None, "random": None}

    def __init__(self, pipe: Any, posterior: HeadPosterior | None = None, *,
                 head: nn.Module | str | None = None,
                 feature_extractor: TextFeatureExtractor | None = None) -> None:
        model = getattr(pipe, "model", None)
        if not isinstance(model, nn.Module):
            raise GenuncError(f"{type(pipe).__name__} has no torch model at .model; genunc wraps "
                              "pipelines that call pipe.model(...)")
        if "callback_on_step_end" not in inspect.signature(pipe.__call__).parameters:
            raise GenuncError(f"{type(pipe).__name__} takes no callback_on_step_end: genunc cannot "
                              "see which tokens it commits")
        self._check_pipe(pipe, model)
        self.pipe = pipe
        if head is None:
            getter = getattr(model, "get_output_embeddings", None)
            module = getter() if callable(getter) else None
            if module is None:
                raise GenuncError("the model has no get_output_embeddings(); name its head: head=")
            self.head_name = _module_name(model, module)
        elif isinstance(head, str):
            resolve_module(model, head)
            self.head_name = head
        else:
            self.head_name = _module_name(model, head)
        UncertaintyPipeline.__init__(self, PipelineLMAdapter(model, self.head_name), posterior)
        self.feature_extractor = feature_extractor
        self.metadata: dict[str, Any] = {}

    @classmethod
    def for_pipe(cls, pipe: Any, posterior: HeadPosterior | None = None,
                 **kwargs: Any) -> "WrappedTextPipeline":
        """The wrapper of `pipe`'s family: DiffusionGemma where its step callback sees only the
        canvas, LLaDA2 otherwise (each checks what it needs of the pipeline)."""
        if cls is not WrappedTextPipeline:
            return cls(pipe, posterior, **kwargs)
        allowed = getattr(pipe, "_callback_tensor_inputs", None)
        canvas = allowed is not None and "canvas" in allowed and "transfer_index" not in allowed
        family = DiffusionGemmaTextPipeline if canvas else LLaDA2TextPipeline
        return family(pipe, posterior, **kwargs)

    @classmethod
    def _load(cls, path: Path, *, device: str, **kwargs: Any) -> "WrappedTextPipeline":
        if not (path / "model_index.json").exists():
            raise GenuncError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        return cls.for_pipe(load_diffusers_folder(path, device), **kwargs)

    # ------------------------------------------------------------------ runs of a job
    #: the pipeline knows no task, so nothing checks its answers
    checks_answers = False

    def prepare_run(self, generate: Mapping[str, Any], source: str) -> None:
        """Refuse the options of genunc's own text loop; silence the pipeline's progress bar.

        The pipeline draws a call's randomness from one generator, so each sample is its own
        call with its own stream (``generate.chunk_size: 1``): a run does not depend on how it
        is chunked."""
        if generate["chunk_size"] != 1:
            raise ConfigError(f"{source} draws a call's randomness from one generator: set "
                              "generate.chunk_size: 1 so that each sample has its own stream")
        if not generate["prompts"]:
            raise ConfigError(f"{source} answers prompts: give generate.prompts (a list; sample i "
                              "answers prompt i // candidates mod len)")
        if generate["candidates"] < 1:
            raise ConfigError(f"candidates must be >= 1, got {generate['candidates']}")
        own = [f"generate.{k}" for k, value in (("sampler", generate["sampler"]),
                                                 ("precision", generate["precision"]))
               if value not in (None, "float32")]
        if own:
            raise ConfigError(f"{', '.join(own)} belong to genunc's own text loop; {source} runs "
                              "its own scheduler, in the dtype it was saved in")
        self.pipe.set_progress_bar_config(disable=True)

    def fitting_data(self, posterior: Mapping[str, Any]) -> list[str | tuple[str, str]]:
        """``posterior.data``: a JSON-lines file of ``{"prompt", "answer"}`` pairs (or
        ``{"text"}``), the first ``posterior.max_samples`` of them."""
        path = Path(posterior["data"])
        if not path.is_file():
            raise MissingFileError(f"posterior data {path} not found (a JSON-lines file of "
                                   '{"prompt": ..., "answer": ...} pairs)')
        data: list[str | tuple[str, str]] = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                data.append(row["text"] if "text" in row else (row["prompt"], row["answer"]))
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{path}:{number} is not a JSON object with prompt and answer "
                                  "(or text)") from None
        return data[: posterior["max_samples"]] if posterior["max_samples"] else data

    def chunk_call(self, generate: Mapping[str, Any], indices: range) -> dict[str, Any]:
        """Sample i answers prompt ``i // candidates`` (mod the prompts) with the generator of
        its own ``initial_noise`` stream; the run's head draws are shared by every sample."""
        g, i = generate, indices.start
        call: dict[str, Any] = dict(
            prompt=[_prompt_of(g, i)], num_draws=g["num_draws"],
            scores=tuple(g["scores"]), seed=g["seed"], temperature=g["temperature"],
            mi_estimator=g["mi_estimator"], mi_top_k=g["mi_top_k"],
            generator=streams.torch_generator(g["seed"], "initial_noise", i,
                                              device=next(self.model.parameters()).device))
        for name, key in (("num_inference_steps", "steps"), ("block_length", "block_length"),
                          ("gen_length", "gen_length")):
            if g[key] is not None:
                call[name] = g[key]
        return call

    def chunk_texts(self, out: "WrappedTextOutput", generate: Mapping[str, Any],
                    indices: range, check: bool) -> TextChunk:
        if check:
            raise ConfigError("a diffusers text pipeline has no checker: quality must be null")
        texts = out.texts if out.texts is not None else \
            self.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
        mi = out.token_scores.get("mutual_information")
        token_mi = None if mi is None else [
            self._token_pieces(row, values) for row, values in zip(out.sequences.cpu(), mi)]
        return TextChunk(prompts=[_prompt_of(generate, i) for i in indices],
                         completions=list(texts), token_mi=token_mi)

    def _token_pieces(self, ids: Tensor, mi: Tensor) -> list[tuple[str, float | None]]:
        """A sequence's tokens through its first EOS as its text shows them, each with its
        mutual information at its last commit (None where nothing committed it).  A token's
        piece is what it adds to the decoded text (special tokens add nothing and are left out),
        so the pieces join to the completion, spaces included, whenever decoding a longer prefix
        extends the shorter one's text; where it does not, the token is decoded alone."""
        keep = _through_first_eos(ids[None], getattr(self.pipe, "eos_token_id", None))[0]
        ids_kept, values = ids[keep].tolist(), mi[keep].tolist()
        tok = self.tokenizer
        pieces: list[tuple[str, float | None]] = []
        before = ""
        for k, value in enumerate(values):
            text = tok.decode(ids_kept[: k + 1], skip_special_tokens=True)
            piece = text[len(before):] if text.startswith(before) else \
                tok.decode(ids_kept[k : k + 1], skip_special_tokens=True)
            before = text
            if piece:
                pieces.append((piece, None if math.isnan(value) else float(value)))
        return pieces

    def _check_pipe(self, pipe: Any, model: nn.Module) -> None:
        """Refuse a pipeline this family cannot read commits from."""
        raise NotImplementedError

    def _fit_defaults(self, fit_kwargs: dict[str, Any]) -> None:
        """Family defaults of the head fit (e.g. the likelihood on softcapped logits)."""

    def _record(self, call: dict[str, Any], draws: HeadDraws | TailDraws | None, sampling: dict[str, Any],
                mask_id: int | None, user_callback: Any, user_inputs: list[str],
                estimator: TokenMI | None = None) -> tuple[Any, Tensor, list[str] | None, Tensor,
                                                           Tensor, Tensor]:
        """Run the pipeline once with the recording hooks: ``(result, sequences, texts,
        mutual information, confidence, commit step)`` per generated position."""
        raise NotImplementedError

    @property
    def head(self) -> nn.Module:
        return resolve_module(self.model, self.head_name)

    def _pad_id(self, eos_id: int | None) -> int:
        """The token that pads generations of different lengths: the tokenizer's pad, else EOS."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        pad = eos_id if pad is None else pad
        if pad is None:
            raise GenuncError("the tokenizer has neither a pad nor an EOS token to pad generations with")
        return int(pad)

    @property
    def tokenizer(self) -> Any:
        """The pipeline's tokenizer (``DiffusionGemmaPipeline``: its processor's, or the processor)."""
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if tokenizer is None and getattr(self.pipe, "processor", None) is not None:
            tokenizer = getattr(self.pipe.processor, "tokenizer", self.pipe.processor)
        return tokenizer

    # ------------------------------------------------------------------ posterior
    def _encode(self, item: str | tuple[str, str], use_chat_template: bool) -> tuple[Tensor, Tensor]:
        """Token ids ``(L,)`` and which of them may be masked (the answer, or the whole text)."""
        tok = self.tokenizer
        if tok is None:
            raise GenuncError("fitting from text needs the pipeline's tokenizer")
        if isinstance(item, str):
            ids = list(tok(item)["input_ids"])
            return torch.tensor(ids, dtype=torch.long), torch.ones(len(ids), dtype=torch.bool)
        prompt, answer = item
        if use_chat_template and getattr(tok, "chat_template", None):  # as the pipeline encodes
            encoded = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                              add_generation_prompt=True, tokenize=True,
                                              return_dict=True)
            prompt_ids = list(encoded["input_ids"])
        else:
            prompt_ids = list(tok(prompt)["input_ids"])
        answer_ids = list(tok(answer, add_special_tokens=False)["input_ids"])
        if getattr(tok, "eos_token_id", None) is not None:
            answer_ids.append(tok.eos_token_id)  # the pipeline generates an EOS after the answer
        ids = torch.tensor(prompt_ids + answer_ids, dtype=torch.long)
        free = torch.zeros(len(ids), dtype=torch.bool)
        free[len(prompt_ids):] = True
        return ids, free

    def fitting(self, data: Iterable[str | tuple[str, str]], *, batch_size: int = 16,
                use_chat_template: bool = True, self_conditioning: float | None = None,
                corrupted_only: bool = False) -> tuple[PipelineLMAdapter, Iterable[Any]]:
        """The family's fitting adapter and its clean batches: what the shared collectors
        (:func:`~genunc.posterior.collect_head_data`, and the tail's) corrupt as the family's
        model is trained (see each subclass)."""
        raise NotImplementedError

    def collect_head_data(self, data: Iterable[str | tuple[str, str]], *, repeats: int = 4,
                          seed: int = 0, progress: bool = False,
                          **options: Any) -> tuple[Tensor, Tensor]:
        """Head inputs ``(N, hidden)`` and target token ids ``(N,)`` on corrupted answers
        (``options``: those of :meth:`fitting`)."""
        adapter, batches = self.fitting(data, **options)
        collected = collect_head_data(adapter, batches, repeats=repeats, seed=seed,
                                      progress=progress)
        return collected.features, collected.targets

    def fit_posterior(self, data: Iterable[str | tuple[str, str]], *, repeats: int = 4,
                      seed: int = 0, batch_size: int = 16, use_chat_template: bool = True,
                      self_conditioning: float | None = None, corrupted_only: bool = False,
                      tail: int | Sequence[str] | None = None, progress: bool = False,
                      **fit_kwargs: Any) -> HeadPosterior | TailPosterior:
        """Fit the posterior on texts or ``(prompt, answer)`` pairs: over the vocabulary head
        (``tail=None``) or over a tail (the last `tail` blocks, or the tail's module names).

        Tokenised with the pipeline's tokenizer (the prompt as the pipeline encodes it, the
        answer followed by EOS); answers are corrupted as the model is trained (masked for
        LLaDA2, uniform noise on the canvas for DiffusionGemma, see :meth:`fitting`) and the
        posterior is fitted with the classification likelihood there.  DiffusionGemma's
        likelihood is on its softcapped logits (``final_logit_softcapping``, as it samples from
        them; ``output_softcap``).  ``fit_kwargs`` go to :meth:`HeadPosterior.fit_features` or
        :meth:`TailPosterior.fit_data` (structure, prior_precision, ``unseen_classes``: by
        default vocabulary rows no target names stay at their values).
        """
        options = dict(batch_size=batch_size, use_chat_template=use_chat_template,
                       self_conditioning=self_conditioning, corrupted_only=corrupted_only)
        self._fit_defaults(fit_kwargs)
        if tail is not None:
            adapter, batches = self.fitting(data, **options)
            self.posterior = Posterior.fit(adapter, batches, tail=tail, repeats=repeats, seed=seed,
                                           progress=progress, **fit_kwargs)
            return self.posterior
        features, targets = self.collect_head_data(data, repeats=repeats, seed=seed,
                                                   progress=progress, **options)
        self.posterior = HeadPosterior.fit_features(self.head, (features, targets),
                                                    likelihood="classification",
                                                    head_name=self.head_name, **fit_kwargs)
        return self.posterior

    # ------------------------------------------------------------------ calls
    def _check(self, scores: tuple[str, ...], num_draws: int, draws: HeadDraws | TailDraws | None,
               feature_extractor: TextFeatureExtractor | None, output_type: str,
               check_only: bool = False) -> int | None:
        """Check a call; return the fewest draws its scores need (None: no posterior).  A
        check-only call (a job checking its options before the posterior is fitted) does not
        require the posterior yet."""
        scores = self._check_scores(scores)
        m = len(draws) if draws is not None else num_draws
        uses_posterior, needed = self._check_draws({s: self.SCORES[s] for s in scores}, m)
        if not uses_posterior:
            return None
        if draws is None and self.posterior is None and not check_only:
            raise GenuncError("no posterior: call fit_posterior(...) or pass posterior= first")
        if "semantic" in scores:
            if feature_extractor is None:
                raise GenuncError("the semantic score needs feature_extractor= (texts -> (B, D) features), "
                                  "e.g. an answer parser or genunc.features.text embeddings")
            if output_type != "text" or self.tokenizer is None:
                raise GenuncError("the semantic score embeds texts: keep output_type='text' and a "
                                  "tokenizer on the pipeline")
        return needed

    def __call__(self, *args: Any, num_draws: int = 8,
                 scores: Sequence[str] = ("mutual_information",), seed: int = 0,
                 draws: HeadDraws | TailDraws | None = None,
                 feature_extractor: TextFeatureExtractor | None = None,
                 mi_estimator: str = "sampled", mi_top_k: int | None = None,
                 check_only: bool = False, **kwargs: Any) -> WrappedTextOutput | None:
        """Run ``pipe(*args, **kwargs)`` and score every sequence (see the module docstring).

        Args:
            num_draws: M head draws (from the posterior's ``head_draws`` stream of `seed`).
            scores: names from :attr:`SCORES`.
            seed: seeds the head draws and the ``random`` baseline; the pipeline's own
                randomness comes from its ``generator`` argument, as in a plain call.
            draws: M head draws to use instead of drawing them (e.g. shared across calls).
            feature_extractor: overrides the wrapper's for this call.
            mi_estimator: how ``mutual_information`` is estimated: ``sampled`` from the M
                draws; ``linearised`` / ``bridge`` in closed form and ``pruned`` from draws of
                the top-``mi_top_k`` rows, none of which builds M full heads (see
                docs/concepts/scores.md).  Greedy or temperature sampling only for those three
                (the scheduler's top-k / top-p act on the whole vocabulary).
            mi_top_k: the pruned vocabulary (``pruned``: default 64; ``linearised``: the
                variances of those rows only, default the whole vocabulary).
            check_only: check genunc's arguments and return None without generating.
            kwargs: the pipeline's own arguments, passed through unchanged.
        """
        signature = inspect.signature(self.pipe.__call__)
        bound = signature.bind_partial(*args, **kwargs).arguments
        call = {name: (bound[name] if name in bound else p.default)
                for name, p in signature.parameters.items()
                if name in bound or p.default is not inspect.Parameter.empty}
        scores = tuple(scores)
        feature_extractor = feature_extractor or self.feature_extractor
        needed = self._check(scores, num_draws, draws, feature_extractor,
                             call.get("output_type", "text"), check_only)
        check_mi_estimator(mi_estimator, mi_top_k)
        mi_wanted = any(s.startswith("mutual_information") for s in scores)
        sampling = {k: call[k] for k in _SAMPLING_ARGS if k in call}
        estimator = None
        if mi_wanted and mi_estimator != "sampled":
            if draws is not None:
                raise GenuncError("draws= are materialised head draws: use them with "
                                  "mi_estimator='sampled'")
            LogitMap.for_sampling(**sampling)  # refuses top-k / top-p sampling
            if not check_only:
                estimator = token_mi(self.posterior, mi_estimator, num_draws=num_draws,
                                     top_k=mi_top_k, seed=int(seed))
        if check_only:
            return None
        if needed is not None and draws is None and (estimator is None or "semantic" in scores):
            generator = streams.torch_generator(int(seed), "head_draws",
                                                device=self.posterior.mean.device)
            draws = self.posterior.sample(num_draws, seed=generator)
        if draws is not None:  # moved once, not at every step (a vocabulary head's draws are large)
            draws = draws.to(device=next(self.head.parameters()).device)
        user_callback = call.pop("callback_on_step_end", None)
        user_inputs = call.pop("callback_on_step_end_tensor_inputs", None)
        user_inputs = getattr(user_callback, "tensor_inputs", None) or user_inputs or \
            list(self.DEFAULT_INPUTS)
        mask_id = call.get("mask_token_id")
        mask_id = getattr(self.pipe, "mask_token_id", None) if mask_id is None else mask_id
        eos_id = call.get("eos_token_id")
        eos_id = getattr(self.pipe, "eos_token_id", None) if eos_id is None else eos_id
        if call.get("generator") is None:  # genunc's stream of `seed`, as wrapped image pipelines
            call["generator"] = streams.torch_generator(  # do: reproducible, global RNG untouched
                int(seed), "initial_noise", device=next(self.model.parameters()).device)
        semantic = "semantic" in scores
        start = snapshot(call["generator"]) if semantic else None

        result, sequences, texts, mi, confidence, step = self._record(
            call, draws if mi_wanted and estimator is None else None, sampling, mask_id,
            user_callback, user_inputs, estimator)
        committed = step >= 0
        seq_cpu = sequences.cpu()
        scored = committed & _through_first_eos(seq_cpu, eos_id)
        out_scores: dict[str, np.ndarray] = {}
        if "mutual_information" in scores:
            out_scores["mutual_information"] = _per_sequence(mi, scored, "mean")
        if "mutual_information_max" in scores:
            out_scores["mutual_information_max"] = _per_sequence(mi, scored, "max")
        if "low_confidence" in scores:
            out_scores["low_confidence"] = 1 - _per_sequence(confidence, scored, "mean")
        if "random" in scores:
            out_scores["random"] = random_scores(int(seed), range(len(sequences)))
        token_scores = {"confidence": confidence}
        if mi_wanted:
            token_scores["mutual_information"] = mi
        output = WrappedTextOutput(sequences=sequences, texts=texts, pipeline_output=result,
                                   scores=out_scores, token_scores=token_scores,
                                   committed_at=step, scored=scored,
                                   num_draws=len(draws) if draws is not None else
                                   (estimator.num_draws or 0) if estimator is not None else 0,
                                   seed=int(seed))
        if semantic:
            draw_seqs, draw_texts = [], []
            for m in range(len(draws)):
                run = dict(call, return_dict=True, generator=snapshot(start))
                with under_draw(self.head, draws[m]):
                    drawn = self.pipe(**run)
                draw_seqs.append(drawn.sequences)
                draw_texts.append(list(drawn.texts))
            feats = torch.stack([torch.as_tensor(np.asarray(feature_extractor(list(t))), dtype=torch.float64)
                                 for t in [list(texts), *draw_texts]])
            output.scores["semantic"] = gaussian_entropy(feats, scale=self.feature_scale)
            output.draw_sequences = _stacked(draw_seqs, self._pad_id(eos_id))
            output.draw_texts = draw_texts
        return output


class LLaDA2TextPipeline(WrappedTextPipeline):
    """``LLaDA2Pipeline`` (block refinement over masked tokens): commits are read in its step
    callback, the head is fitted on masked answers."""

    DEFAULT_INPUTS: ClassVar[list[str]] = ["block_x"]

    def _check_pipe(self, pipe: Any, model: nn.Module) -> None:
        allowed = getattr(pipe, "_callback_tensor_inputs", None)
        missing = [k for k in _CALLBACK_INPUTS if allowed is not None and k not in allowed]
        if missing:
            raise GenuncError(f"{type(pipe).__name__}'s step callback does not expose {missing}: "
                              "genunc cannot see which tokens it commits (LLaDA2Pipeline does)")

    def fitting(self, data: Iterable[str | tuple[str, str]], *, batch_size: int = 16,
                use_chat_template: bool = True, self_conditioning: float | None = None,
                corrupted_only: bool = False) -> tuple[PipelineLMAdapter, Iterable[Any]]:
        """A :class:`~genunc.adapters.text.MaskedAnswerLMAdapter` and ``{"x", "prompt_mask"}``
        batches: each example is masked at every repeat at a random level ``t ~ U(1/L, 1)``
        over its answer tokens (at least one, the convention of
        :func:`~genunc.adapters.text.mask_answers`), and the model is called as the pipeline
        calls it; targets at masked positions.  Examples of one length are batched."""
        if self_conditioning is not None or corrupted_only:
            raise GenuncError("self_conditioning and corrupted_only describe DiffusionGemma's canvases; "
                              "LLaDA2Pipeline's targets are its masked positions")
        mask_id = getattr(self.pipe, "mask_token_id", None)
        if mask_id is None:
            raise GenuncError("the pipeline has no mask_token_id (set it on the tokenizer)")
        encoded = [self._encode(item, use_chat_template) for item in data]
        if not encoded:
            raise ShapeMismatchError("no examples to fit on")
        if any(not free.any() for _, free in encoded):
            raise GenuncError("every example needs at least one answer token to mask")
        batches = [{"x": torch.stack([ids for ids, _ in batch]),
                    "prompt_mask": ~torch.stack([free for _, free in batch])}
                   for batch in _by_length(encoded, batch_size)]
        return MaskedAnswerLMAdapter(self.model, self.head_name, mask_id), batches

    def _record(self, call: dict[str, Any], draws: HeadDraws | TailDraws | None, sampling: dict[str, Any],
                mask_id: int | None, user_callback: Any, user_inputs: list[str],
                estimator: TokenMI | None = None) -> tuple[Any, Tensor, list[str] | None, Tensor,
                                                           Tensor, Tensor]:
        observer = DrawObserver(self.model, self.head, draws)
        recorder = _Recorder(observer, sampling, mask_id,
                             int(call["gen_length"]), user_callback, user_inputs, estimator)
        inputs = sorted(set(_CALLBACK_INPUTS) | set(user_inputs))
        with ExitStack() as stack:
            stack.enter_context(observer.watching())
            stack.enter_context(_hook(self.model.register_forward_pre_hook(
                recorder.model_pre_hook, with_kwargs=True)))
            result = self.pipe(**call, callback_on_step_end=recorder.callback,
                               callback_on_step_end_tensor_inputs=inputs)
        sequences, texts = _unpack(result)
        if recorder.tokens is None:
            raise HeadNotCalledError("the pipeline committed no tokens (its step callback never ran)")
        committed = recorder.step >= 0
        if not torch.equal(recorder.tokens[committed], sequences.cpu()[committed]):
            warnings.warn("some returned tokens differ from those the pipeline committed (a step "
                          "callback rewrote them?): their scores describe the committed tokens",
                          stacklevel=3)
        mi, confidence, step = recorder.mi, recorder.confidence, recorder.step
        return result, sequences, texts, mi, confidence, step


class DiffusionGemmaTextPipeline(WrappedTextPipeline):
    """``DiffusionGemmaPipeline`` (a canvas refined by its scheduler): commits are read from the
    scheduler (:mod:`genunc.pipelines.text_canvas`), the head is fitted on corrupted canvases
    with the likelihood on the model's softcapped logits."""

    DEFAULT_INPUTS: ClassVar[list[str]] = ["canvas"]

    def _check_pipe(self, pipe: Any, model: nn.Module) -> None:
        config = getattr(model, "config", None)
        if getattr(config, "canvas_length", None) is None or not hasattr(pipe, "scheduler"):
            raise GenuncError(f"{type(pipe).__name__}'s callback sees only the canvas: genunc reads "
                              "commits from DiffusionGemmaPipeline's scheduler, which needs "
                              "pipe.scheduler and a model with config.canvas_length")
        scheduler_kind(pipe.scheduler)
        check_compatible("DiffusionGemmaPipeline")

    def _fit_defaults(self, fit_kwargs: dict[str, Any]) -> None:
        fit_kwargs.setdefault("output_softcap", getattr(self.model, "final_logit_softcapping", None))

    def _canvas_examples(self, data: Iterable[str | tuple[str, str]],
                         use_chat_template: bool) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """``(prompt ids, prompt attention, clean canvas, target positions)`` per example.

        The prompt as ``DiffusionGemmaPipeline(prompt=...)`` encodes it (the processor's chat
        template, generation prompt added); a plain string is an answer to the empty prompt.  The
        canvas: the answer's tokens, EOS, then the pad token up to ``config.canvas_length`` (what
        transformers' DiffusionGemma ``generate`` writes after EOS); targets: answer and EOS.
        """
        if not use_chat_template:
            raise GenuncError("DiffusionGemmaPipeline always encodes prompts with the chat template; "
                              "fit with use_chat_template=True")
        processor, tok = getattr(self.pipe, "processor", None), self.tokenizer
        if processor is None or tok is None:
            raise GenuncError("fitting from text needs the pipeline's processor")
        canvas_length = int(self.model.config.canvas_length)
        text_config = self.model.config.get_text_config(decoder=True)
        eos = getattr(self.pipe, "eos_token_id", None)
        eos = getattr(tok, "eos_token_id", None) if eos is None else eos
        if eos is None:
            raise GenuncError("the pipeline's tokenizer has no EOS token: an answer's end cannot be marked")
        pad = getattr(tok, "pad_token_id", None)
        pad = getattr(text_config, "pad_token_id", None) if pad is None else pad
        pad = eos if pad is None else pad
        examples = []
        for i, item in enumerate(data):
            prompt, answer = ("", item) if isinstance(item, str) else item
            ids, attention = canvas_prompt_ids(processor, prompt)
            if not len(ids):
                raise ShapeMismatchError(f"example {i}: the prompt {prompt!r} encodes to no tokens, "
                                         "so the encoder has nothing to read (the pipeline fails on it too)")
            answer_ids = [*tok(answer, add_special_tokens=False)["input_ids"], int(eos)]
            if len(answer_ids) > canvas_length:
                raise ShapeMismatchError(
                    f"example {i}: the answer and its EOS take {len(answer_ids)} tokens, more than one "
                    f"canvas ({canvas_length}); genunc fits one canvas per example: shorten the answer")
            clean = torch.full((canvas_length,), int(pad), dtype=torch.long)
            clean[: len(answer_ids)] = torch.tensor(answer_ids, dtype=torch.long)
            target = torch.zeros(canvas_length, dtype=torch.bool)
            target[: len(answer_ids)] = True
            examples.append((ids, attention, clean, target))
        if not examples:
            raise ShapeMismatchError("no examples to fit on")
        return examples

    def fitting(self, data: Iterable[str | tuple[str, str]], *, batch_size: int = 16,
                use_chat_template: bool = True, self_conditioning: float | None = None,
                corrupted_only: bool = False) -> tuple[PipelineLMAdapter, Iterable[Any]]:
        """A :class:`~genunc.adapters.text.CanvasLMAdapter` and its batches of examples (see
        :meth:`_canvas_examples`): the prompt goes through the model's encoder into a KV cache as
        the pipeline encodes it; the answer and its EOS are the clean decoder canvas (the rest of
        the canvas filled with the pad token), corrupted at every repeat by the uniform kernel at
        ``alpha = 1 - t``, ``t ~ U(0, 1)``; targets are the clean answer and EOS tokens at every
        answer position, corrupted or not (the denoiser predicts the clean token everywhere, and the
        pipeline samples every canvas position from its logits); ``corrupted_only=True`` keeps only
        positions whose token the noise changed. A row's head input comes from the pipeline's first-
        step call (no self-conditioning) or, with probability ``self_conditioning`` (default 0.5),
        from a second call conditioned on the first call's logits, as the pipeline's later steps
        are. Examples with prompts of one length are batched."""
        examples = self._canvas_examples(data, use_chat_template)
        adapter = CanvasLMAdapter(self.model, self.head_name, corrupted_only=corrupted_only,
                                  self_conditioning=0.5 if self_conditioning is None else
                                  float(self_conditioning))
        batches = ({key: torch.stack(column) for key, column in
                    zip(("prompt", "attention", "clean", "target"), zip(*batch))}
                   for batch in _by_length(examples, batch_size))
        return adapter, adapter.encoded(batches)

    def _record(self, call: dict[str, Any], draws: HeadDraws | TailDraws | None, sampling: dict[str, Any],
                mask_id: int | None, user_callback: Any, user_inputs: list[str],
                estimator: TokenMI | None = None) -> tuple[Any, Tensor, list[str] | None, Tensor,
                                                           Tensor, Tensor]:
        observer = DrawObserver(self.model, self.head, draws)
        recorder = CanvasRecorder(observer, self.pipe.scheduler,
                                  cap=getattr(self.model, "final_logit_softcapping", None),
                                  stability_threshold=call.get("stability_threshold", 1),
                                  confidence_threshold=call.get("confidence_threshold"),
                                  user_callback=user_callback, user_inputs=user_inputs,
                                  estimator=estimator)
        inputs = sorted({"canvas"} | set(user_inputs))
        with ExitStack() as stack:
            stack.enter_context(observer.watching())
            stack.enter_context(wrapped_scheduler(self.pipe.scheduler, recorder))
            result = self.pipe(**call, callback_on_step_end=recorder.callback,
                               callback_on_step_end_tensor_inputs=inputs)
        sequences, texts = _unpack(result)
        mi, confidence, step = recorder.finish(sequences)
        if recorder.outside_changes:
            warnings.warn(f"{recorder.outside_changes} canvas token(s) were changed by something "
                          "genunc does not model (a step callback?): those lost their record",
                          stacklevel=3)
        return result, sequences, texts, mi, confidence, step


# ---------------------------------------------------------------------- helpers
@contextmanager
def _hook(handle: Any):
    try:
        yield handle
    finally:
        handle.remove()


def _prompt_of(generate: Mapping[str, Any], sample: int) -> str:
    """The prompt sample `sample` of a run answers: ``i // candidates``, mod the prompts."""
    prompts = generate["prompts"]
    return prompts[(sample // generate["candidates"]) % len(prompts)]


def _by_length(examples: Sequence[tuple[Tensor, ...]], size: int) -> Iterator[list[tuple[Tensor, ...]]]:
    """Batches of at most `size` examples whose first tensors (the token ids, or the prompt) have
    one length, shortest first, each length's examples in their order: what can be stacked."""
    groups: dict[int, list[tuple[Tensor, ...]]] = {}
    for example in examples:
        groups.setdefault(len(example[0]), []).append(example)
    for _, group in sorted(groups.items()):
        for start in range(0, len(group), size):
            yield group[start : start + size]


def _stacked(sequences: Sequence[Tensor], pad: int) -> Tensor:
    """``M x (B, L_m)`` -> ``(M, B, max L_m)``, the shorter ones padded with `pad`."""
    length = max(seq.shape[1] for seq in sequences)
    return torch.stack([F.pad(seq, (0, length - seq.shape[1]), value=pad) for seq in sequences])


def _unpack(result: Any) -> tuple[Tensor, list[str] | None]:
    if isinstance(result, tuple):
        return result[0], result[1] if len(result) > 1 else None
    return result.sequences, getattr(result, "texts", None)


def _through_first_eos(sequences: Tensor, eos_token_id: int | None) -> Tensor:
    """``(B, L)`` True up to and including each row's first EOS (everywhere without one)."""
    if eos_token_id is None:
        return torch.ones_like(sequences, dtype=torch.bool)
    is_eos = (sequences == eos_token_id).long()
    before = is_eos.cumsum(1) - is_eos  # EOS tokens strictly before each position
    return before == 0



def _per_sequence(values: Tensor, mask: Tensor, how: Aggregate) -> np.ndarray:
    """The one token-score reduction (:func:`genunc.scores.aggregate`), NaN for a sequence
    that committed nothing."""
    return aggregate(values, mask, how, empty="nan").numpy()
