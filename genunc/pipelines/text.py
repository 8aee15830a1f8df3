"""Sample from a masked-diffusion LM with per-sequence uncertainty scores.

    pipe = TextUncertaintyPipeline.from_pretrained("genunc/zoo/weights/arith_mdlm")
    pipe.fit_posterior(batches)                             # or loaded from genunc_posterior/
    out = pipe(prompts, UnmaskingConfig("low_confidence"), num_draws=8, seed=0)

Scores (lower = more certain; one backbone pass per step unless noted):

* ``mutual_information`` / ``_max`` / ``_span``: the epistemic MI of the head draws at each
  token's commit step, averaged over generated tokens / their maximum / averaged over the answer
  span (``span=``);
* ``low_posterior_confidence``: 1 - the committed tokens' probability averaged over the head
  draws (the Bayesian model average of ``low_confidence``), same cost as MI;
* ``semantic``: entropy of a diagonal Gaussian over feature_extractor features of the MAP and M
  generations from the same randomness ((M+1)x the rows, same NFE);
* baselines from the MAP logits: ``low_confidence`` (1 - mean committed-token probability),
  ``low_margin`` (1 - mean top-2 margin), ``low_self_certainty`` (- mean self-certainty),
  and ``random``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from genunc import streams
from genunc.adapters.text import MaskedDiffusionLMAdapter
from genunc.errors import ConfigError, GenuncError, ShapeMismatchError
from genunc.pipelines.base import (
    ScoreCollector,
    UncertaintyOutput,
    UncertaintyPipeline,
    load_diffusers_folder,
)
from genunc.posterior import HeadPosterior
from genunc.posterior.token_mi import check_mi_estimator, token_mi
from genunc.sampling.masked import POSTERIOR_STATS, UnmaskingConfig, unmask
from genunc.scores import Aggregate, aggregate
from genunc.scores.tokens import jackknife_standard_error
from genunc.tasks import Task, task_from_spec
from genunc.zoo.text_model import load_text_adapter

#: the posterior data that means "the model's own task, training split"
TASK_TRAIN = ("zoo:task_train", "zoo:arith_train")

if TYPE_CHECKING:
    from genunc.pipelines.text_wrapped import WrappedTextPipeline


def _same(values: Tensor) -> Tensor:
    return values


def _one_minus(values: Tensor) -> Tensor:
    return 1 - values


def _negated(values: Tensor) -> Tensor:
    return -values


#: per-sequence scores read off the token statistics recorded at commit time, turned so that
#: lower = more certain: name -> (token statistic, positions averaged over, how, transform)
_TOKEN_SCORES: dict[str, tuple[str, str, Aggregate, Callable[[Tensor], Tensor]]] = {
    "mutual_information": ("mutual_information", "generated", "mean", _same),
    "mutual_information_max": ("mutual_information", "generated", "max", _same),
    "mutual_information_span": ("mutual_information", "span", "mean", _same),
    "low_posterior_confidence": ("posterior_confidence", "generated", "mean", _one_minus),
    "low_confidence": ("confidence", "generated", "mean", _one_minus),
    "low_margin": ("margin", "generated", "mean", _one_minus),
    "low_self_certainty": ("self_certainty", "generated", "mean", _negated),
}

#: ``(tokens (B, L), generated (B, L) bool) -> features (B, D)``
TokenFeatureExtractor = Callable[[Tensor, Tensor], Tensor | np.ndarray]


def one_hot_answer(vocab_size: int) -> TokenFeatureExtractor:
    """Answer-level features for verifiable tasks: the one-hot tokens of the generated span, so
    two generations embed alike exactly when they give the same answer."""

    def embed(tokens: Tensor, generated: Tensor) -> Tensor:
        onehot = torch.nn.functional.one_hot(tokens.long(), vocab_size).double()
        return (onehot * generated.unsqueeze(-1)).flatten(1)

    return embed


@dataclass
class TextUncertaintyOutput(UncertaintyOutput):
    tokens: Tensor | None = None  # (B, L)
    nfe: float = 0.0  # mean over sequences of the backbone calls each needed (its own steps)
    row_nfe: np.ndarray | None = None  # (B,) per sequence
    token_stats: dict[str, Tensor] = field(default_factory=dict)
    draw_tokens: Tensor | None = None


@dataclass
class TextChunk:
    """A chunk of a text run, as an export writes it: per sample its prompt (the ``condition``
    column), its completion, the NFE where the loop counts them, the checker's verdict where
    the pipeline has a checker and the run asked for it, and, where the run computed mutual
    information, each completion's tokens with the MI at their commit step (what ``genunc
    report`` colours; None for a token a wrapped pipeline returned but never committed)."""

    prompts: list[str]
    completions: list[str]
    nfe: np.ndarray | None = None
    correct: np.ndarray | None = None
    token_mi: list[list[tuple[str, float | None]]] | None = None


class TextUncertaintyPipeline(UncertaintyPipeline):
    """A masked-diffusion LM + head posterior + unmasking sampler."""

    #: the model's task checks answers (the export's ``correct`` column, ``quality: checker``)
    checks_answers = True

    #: with M >= 3 draws, each mutual-information score's jackknife Monte-Carlo standard error
    EXTRA_SCORE_COLUMNS = ("mutual_information_mc_error", "mutual_information_max_mc_error",
                           "mutual_information_span_mc_error")
    SCORES = {"mutual_information": 2, "mutual_information_max": 2,
              "mutual_information_span": 2, "low_posterior_confidence": 1, "semantic": 1,
              "low_confidence": None, "low_margin": None, "low_self_certainty": None,
              "random": None}

    def __init__(self, adapter: MaskedDiffusionLMAdapter, posterior: HeadPosterior | None = None,
                 feature_extractor: TokenFeatureExtractor | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        super().__init__(adapter, posterior)
        self.feature_extractor = feature_extractor or one_hot_answer(adapter.vocab_size)
        self.metadata = metadata or {}

    @classmethod
    def _load(cls, path: Path, *, device: str) -> "TextUncertaintyPipeline":
        """A folder written by ``genunc zoo train arith-mdlm``."""
        if (path / "model_index.json").exists():  # a diffusers text pipeline folder
            return cls.from_pipe(load_diffusers_folder(path, device))
        adapter, config = load_text_adapter(path, device)
        return cls(adapter, metadata=config)

    # ------------------------------------------------------------------ runs of a job
    @property
    def task(self) -> Task:
        """The task the model folder names (its prompts, checker and training problems)."""
        spec = self.metadata.get("task") or {}
        try:
            return task_from_spec(spec)
        except ConfigError:
            raise ConfigError(f"the model folder names no known task (got {spec!r})") from None

    def prepare_run(self, generate: Mapping[str, Any], source: str) -> None:
        if generate["candidates"] < 1:
            raise ConfigError(f"candidates must be >= 1, got {generate['candidates']}")
        if generate["gen_length"] is not None:
            raise ConfigError(f"generate.gen_length is for diffusers text pipelines; {source} "
                              "answers its task's prompts, whose length the task fixes")

    def fitting_data(self, posterior: Mapping[str, Any]) -> list[dict[str, Tensor]]:
        """The task's training problems (``posterior.data: zoo:task_train``) as sequences with
        their prompt masks, ``posterior.batch_size`` per batch."""
        if posterior["data"] not in TASK_TRAIN:
            raise ConfigError(f"text posterior data is one of {TASK_TRAIN} (the model's task's "
                              f"training problems), got {posterior['data']!r}")
        task = self.task
        pairs = task.split()["train"][: posterior["max_samples"] or 4000]
        size = posterior["batch_size"]
        return [{"x": task.sequences(pairs[i : i + size]),
                 "prompt_mask": task.prompt_mask(len(pairs[i : i + size]))}
                for i in range(0, len(pairs), size)]

    def chunk_call(self, generate: Mapping[str, Any], indices: range) -> dict[str, Any]:
        """Held-out prompts of the task in a seeded order, ``candidates`` samples each."""
        g = generate
        task = self.task
        test = task.split()["test"]
        order = streams.numpy_generator(g["seed"], "prompt_order").permutation(len(test))
        index = np.arange(indices.start, indices.stop)
        pairs = test[order[(index // g["candidates"]) % len(test)]]
        config = UnmaskingConfig(g["sampler"] or "low_confidence", steps=g["steps"],
                                 block_length=g["block_length"], threshold=g["threshold"],
                                 temperature=g["temperature"])
        return dict(prompts=task.prompts(pairs), config=config, num_draws=g["num_draws"],
                    scores=tuple(g["scores"]), seed=g["seed"], first_sample=indices.start,
                    precision=g["precision"], mi_estimator=g["mi_estimator"],
                    mi_top_k=g["mi_top_k"], progress=False)

    def chunk_texts(self, out: "TextUncertaintyOutput", generate: Mapping[str, Any],
                    indices: range, check: bool) -> TextChunk:
        """The chunk's prompts, completions, NFE and (with `check`) the checker's verdicts."""
        task = self.task
        texts = [task.decode(tokens) for tokens in out.tokens]
        mi = out.token_stats.get("mutual_information")
        token_mi = None if mi is None else [
            [(task.decode([t]), float(v)) for t, v in zip(row[task.prompt_length :].tolist(),
                                                          values[task.prompt_length :].tolist())]
            for row, values in zip(out.tokens, mi)]
        return TextChunk(prompts=[text[: task.prompt_length] for text in texts],
                         completions=[text[task.prompt_length :] for text in texts],
                         nfe=out.row_nfe.astype(int),
                         correct=task.check(out.tokens).astype(bool) if check else None,
                         token_mi=token_mi)

    @classmethod
    def from_pipe(cls, pipe: Any, posterior: HeadPosterior | None = None,
                  **kwargs: Any) -> "WrappedTextPipeline":
        """Wrap the user's own diffusers text pipeline (``LLaDA2Pipeline``, or
        ``DiffusionGemmaPipeline`` with ``BlockRefinementScheduler``, ``EntropyBoundScheduler`` or
        ``DiscreteDDIMScheduler``): calls run it with hooks and return exactly its output plus
        scores (see :mod:`genunc.pipelines.text_wrapped` and :mod:`genunc.pipelines.text_canvas`).
        ``kwargs``: ``head`` (module or name; default ``model.get_output_embeddings()``),
        ``extractor`` (texts -> features, for ``semantic``)."""
        from genunc.pipelines.text_wrapped import WrappedTextPipeline

        return WrappedTextPipeline.for_pipe(pipe, posterior, **kwargs)

    @torch.no_grad()
    def __call__(self, prompts: Tensor, config: UnmaskingConfig | None = None, *,
                 num_draws: int = 5, num_inference_steps: int | None = None,
                 scores: tuple[str, ...] = ("mutual_information",), span: Tensor | None = None,
                 seed: int = 0, first_sample: int = 0, chunk_size: int = 512,
                 precision: str = "float32", progress: bool = True,
                 mi_estimator: str = "sampled", mi_top_k: int | None = None,
                 check_only: bool = False) -> TextUncertaintyOutput | None:
        """Fill the masked positions of ``prompts`` ``(B, L)`` and score every sequence.

        Args:
            num_inference_steps: unmasking steps (overrides ``config.steps``).
            span: ``(L,)`` or ``(B, L)`` bool, the answer positions for ``mutual_information_span``
                (default: every generated position).
            seed: the run's seed (every stream of the call is keyed by it).
            first_sample: the global index of the first sequence (sequence ``i`` draws its
                sampling noise from the streams of index ``first_sample + i``; the head draws
                are the run's).
            precision: the backbone's precision: ``float32``, or ``bfloat16`` / ``float16``
                autocast (the GPU speed-up); head draws, variances, scores and sampler states
                stay in full precision.
            mi_estimator: how ``mutual_information`` (and ``low_posterior_confidence``) are
                estimated: ``sampled`` (M materialised head draws), ``linearised`` / ``bridge``
                (closed forms from the logits' Gaussian, no draws) or ``pruned`` (M draws of
                the MAP's ``mi_top_k`` vocabulary rows only, default 64); ``linearised`` with
                ``mi_top_k`` computes the variances of those rows only (cheaper, exact at K = V);
                see docs/concepts/scores.md.
            check_only: check the arguments and return None, generating nothing.
        """
        if prompts.dim() != 2:
            raise ShapeMismatchError(f"prompts must be (B, L) token ids, got {tuple(prompts.shape)}")
        check_mi_estimator(mi_estimator, mi_top_k)
        scores = self._check_scores(scores)
        # a draw-free estimator serves the posterior token scores: no full head draws for them
        served = () if mi_estimator == "sampled" else tuple(
            n for n in scores if n in _TOKEN_SCORES and _TOKEN_SCORES[n][0] in POSTERIOR_STATS)
        request = self._request(tuple(n for n in scores if n not in served), num_draws, seed,
                                check_only, num_samples=len(prompts),
                                first_sample=first_sample, chunk_size=chunk_size,
                                precision=precision, num_inference_steps=num_inference_steps)
        request.scores = scores
        vocab = self.adapter.vocab_size
        if prompts.numel() and (int(prompts.min()) < 0 or int(prompts.max()) >= vocab):
            raise GenuncError(f"prompt token ids must lie in [0, {vocab}) (the mask id is "
                              f"{self.adapter.mask_id}); got [{int(prompts.min())}, "
                              f"{int(prompts.max())}]")
        config = config or UnmaskingConfig()
        if num_inference_steps is not None:
            config = dataclasses.replace(config, steps=num_inference_steps)
        if check_only:
            return None
        semantic = request.wants("semantic")
        token_scores = [name for name in request.scores if name in _TOKEN_SCORES]
        uses_draws = any(_TOKEN_SCORES[n][0] in POSTERIOR_STATS for n in token_scores)
        if config.strategy == "policy" and config.policy.uses_mi:
            # the policy reads the draws' mutual information at every step
            if num_draws < 2:
                raise GenuncError("this unmasking policy reads mutual information: it needs "
                                  f"num_draws >= 2, got {num_draws}")
            if semantic:
                raise GenuncError("a policy that reads mutual information runs without the "
                                  "semantic score (its draws generate sequences of their own)")
            if request.draws is None:
                if self.posterior is None:
                    raise GenuncError("this unmasking policy reads mutual information: fit or "
                                      "load a posterior first")
                generator = streams.torch_generator(int(seed), "head_draws",
                                                    device=self.posterior.mean.device)
                request.draws = self.posterior.sample(num_draws, seed=generator, with_map=True)
            uses_draws = True
        estimator = None
        if served:
            if config.strategy == "policy" and config.policy.uses_mi:
                raise GenuncError("a policy that reads mutual information needs "
                                  "mi_estimator='sampled' (it reads every position's MI)")
            estimator = token_mi(self.posterior, mi_estimator, num_draws=num_draws,
                                 top_k=mi_top_k, seed=int(seed))
            uses_draws = False
        mi_draws = request.perturbed if uses_draws else None
        collected = ScoreCollector()
        tokens, draw_tokens, stats_all, row_nfe = [], [], [], []
        for sl in self.chunks(len(prompts), chunk_size, "unmasking", progress):
            x = prompts[sl]
            with collected.timer("sampling"):
                out = unmask(self.adapter, x, config, mi_draws=mi_draws, mi_estimator=estimator,
                             trajectory_draws=request.draws if semantic else None, seed=seed,
                             indices=request.indices[sl],
                             precision=precision)
            row_nfe.append(out.row_nfe.cpu().numpy())
            collected.backbone_rows += out.backbone_rows
            tokens.append(out.tokens.cpu())
            stats = {k: v.cpu() for k, v in out.token_stats.items()}
            stats_all.append(stats)
            generated = out.generated.cpu()
            positions = {"generated": generated,
                         "span": generated if span is None else
                         torch.as_tensor(span, dtype=torch.bool).expand_as(generated) & generated}
            for name in token_scores:
                stat, where, how, transform = _TOKEN_SCORES[name]
                collected.add(name, transform(aggregate(stats[stat], positions[where], how)))
                if stat == "mutual_information" and out.mi_leave_one_out is not None:
                    # the score from each set of M - 1 draws: its jackknife Monte-Carlo error
                    left = out.mi_leave_one_out.cpu()
                    mask = positions[where].expand_as(left)
                    collected.add(f"{name}_mc_error",
                                  jackknife_standard_error(aggregate(left, mask, how)))
            if semantic:
                draw_tokens.append(out.draw_tokens.cpu())
                generations = torch.cat([out.tokens.cpu().unsqueeze(0), out.draw_tokens.cpu()])
                feats = torch.stack([torch.as_tensor(self.feature_extractor(t, generated))
                                     for t in generations])
                collected.add("semantic", self.semantic_entropy(feats))
        per_row = np.concatenate(row_nfe)
        return TextUncertaintyOutput(
            **collected.output_fields(request),
            tokens=torch.cat(tokens), nfe=float(per_row.mean()), row_nfe=per_row,
            token_stats={k: torch.cat([s[k] for s in stats_all]) for k in stats_all[0]},
            draw_tokens=torch.cat(draw_tokens, 1) if draw_tokens else None)
