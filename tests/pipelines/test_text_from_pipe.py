"""TextUncertaintyPipeline.from_pipe: the user's own diffusers LLaDA2Pipeline, run with hooks.

A tiny bidirectional transformer with the interface LLaDA2Pipeline calls (``model(ids,
attention_mask=, position_ids=).logits``, ``get_output_embeddings()``) and a head tied to its
input embedding, and a word-level tokenizer built here: no hub, a few seconds.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
from diffusers import BlockRefinementScheduler, LLaDA2Pipeline  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from genunc import streams  # noqa: E402
from genunc.errors import FingerprintMismatchError, GenuncError  # noqa: E402
from genunc.pipelines.text import TextUncertaintyPipeline  # noqa: E402
from genunc.posterior import HeadDraws  # noqa: E402
from genunc.sampling.masked import sampling_logits  # noqa: E402
from genunc.scores.tokens import mutual_information  # noqa: E402

WORDS = ["<pad>", "<eos>", "<mask>", "<unk>", *map(str, range(10)), "+", "=", "a", "b", "c", "d"]
MASK, EOS, VOCAB = 2, 1, len(WORDS)
PROMPTS = ["1 + 2 =", "3 + 4 ="]
CALL = dict(gen_length=10, block_length=4, num_inference_steps=4, use_chat_template=False)
SAMPLED = dict(CALL, temperature=1.0, threshold=0.9)


def tokenizer():
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>",
                                   eos_token="<eos>", mask_token="<mask>", unk_token="<unk>")


class TinyLLaDA(nn.Module):
    """Embeddings + one bidirectional encoder layer + a vocabulary head tied to the embedding."""

    def __init__(self, vocab=VOCAB, dim=16, max_len=64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.block = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab)
        self.lm_head.weight = self.embed.weight
        with torch.no_grad():  # a trained model never predicts the mask token
            self.lm_head.bias[MASK] = -30.0
        self.eval()

    @property
    def device(self):
        return self.embed.weight.device

    @property
    def dtype(self):
        return self.embed.weight.dtype

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        h = self.embed(input_ids) + self.pos(position_ids)
        pad = None if attention_mask is None else attention_mask == 0
        return SimpleNamespace(logits=self.lm_head(self.norm(self.block(h, src_key_padding_mask=pad))))


def pipeline(seed=0):
    pipe = LLaDA2Pipeline(model=TinyLLaDA(seed=seed), scheduler=BlockRefinementScheduler(),
                          tokenizer=tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


FIT_DATA = [(f"{a} + {b} =", f"{'abcd'[(a + b) % 4]} {'abcd'[a % 4]}")
            for a in range(5) for b in range(4)]


@pytest.fixture(scope="module")
def fitted():
    return fitted_wrapper()


def fitted_wrapper():
    """A wrapper with a diagonal posterior fitted on (prompt, answer) pairs; also the golden
    runs' LLaDA2 wrapper (benchmarks/golden.py)."""
    upipe = TextUncertaintyPipeline.from_pipe(pipeline())
    upipe.fit_posterior(FIT_DATA, repeats=2, prior_precision=1.0)
    return upipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kwargs", [CALL, SAMPLED, dict(SAMPLED, top_k=5, top_p=0.8),
                                    dict(CALL, editing_threshold=None)])
def test_output_equals_the_plain_pipeline(fitted, kwargs):
    plain_gen, wrapped_gen = gen(3), gen(3)
    plain = fitted.pipe(prompt=PROMPTS, generator=plain_gen, **kwargs)
    out = fitted(prompt=PROMPTS, generator=wrapped_gen, num_draws=4,
                 scores=("mutual_information", "low_confidence"), **kwargs)
    assert torch.equal(out.sequences, plain.sequences)
    assert out.texts == plain.texts
    assert torch.equal(plain_gen.get_state(), wrapped_gen.get_state())  # the generator moved alike


def test_token_scores_sit_on_committed_positions(fitted):
    out = fitted(prompt=PROMPTS, generator=gen(), num_draws=4, **SAMPLED,
                 scores=("mutual_information", "mutual_information_max", "low_confidence"))
    mi = out.token_scores["mutual_information"]
    assert mi.shape == out.sequences.shape == (2, CALL["gen_length"])
    committed = out.sequences != MASK  # the model never samples the mask: unmasked = committed
    assert torch.equal(out.committed_at >= 0, committed)
    assert torch.isfinite(mi[committed]).all() and torch.isnan(mi[~committed]).all()
    assert (mi[committed] >= 0).all() and (mi[committed] > 0).any()
    conf = out.token_scores["confidence"]
    assert ((conf[committed] > 0) & (conf[committed] <= 1)).all()
    for b in range(2):
        row = mi[b][out.scored[b]]
        assert out.scores["mutual_information"][b] == pytest.approx(float(row.mean()))
        assert out.scores["mutual_information_max"][b] == pytest.approx(float(row.max()))


def test_commit_time_mutual_information_recomputed_by_hand(fitted):
    """Tokens committed at the first step: MI of the draws on that step's head input."""
    draws = fitted.posterior.sample(4, seed=1)
    out = fitted(prompt=PROMPTS, num_draws=4, draws=draws, **dict(CALL, editing_threshold=None))
    ids = fitted.tokenizer(PROMPTS, return_tensors="pt")["input_ids"]  # 4 tokens = one block
    x = torch.cat([ids, torch.full((2, 4), MASK)], 1)
    kept = {}
    handle = fitted.head.register_forward_hook(lambda m, a, o: kept.update(phi=a[0]))
    with torch.no_grad():
        fitted.model(x, attention_mask=torch.ones_like(x), position_ids=torch.arange(8).expand(2, -1))
    handle.remove()
    expected = mutual_information(draws.apply(kept["phi"][:, 4:]))  # (2, 4)
    first = out.committed_at[:, :4] == 0
    assert first.any()
    torch.testing.assert_close(out.token_scores["mutual_information"][:, :4][first], expected[first])


def test_collapsed_posterior_gives_zero_mi_and_the_map_generations(fitted):
    mean = HeadDraws.from_flat(fitted.posterior.mean.repeat(3, 1), fitted.posterior.ops)
    out = fitted(prompt=PROMPTS, generator=gen(5), draws=mean, **SAMPLED,
                 scores=("mutual_information", "semantic"), feature_extractor=answer_features)
    committed = out.committed_at >= 0
    assert (out.token_scores["mutual_information"][committed] < 1e-12).all()  # 0 up to rounding
    for m in range(3):
        assert torch.equal(out.draw_sequences[m], out.sequences)  # shared randomness
    floor = 0.5 * np.log(2 * np.pi * np.e * 1e-3) * len(WORDS)
    np.testing.assert_allclose(out.scores["semantic"], floor)
    tight = fitted.posterior.with_prior_precision(1e12)
    out = fitted(prompt=PROMPTS, num_draws=3, draws=tight.sample(3), **CALL)
    assert out.scores["mutual_information"].max() < 1e-8
    wide = fitted.posterior.with_prior_precision(1e-2)
    out = fitted(prompt=PROMPTS, num_draws=3, draws=wide.sample(3), **CALL)
    assert out.scores["mutual_information"].min() > 1e-4


def answer_features(texts):
    """Bag-of-words counts over the vocabulary."""
    return np.array([[text.split().count(w) for w in WORDS] for text in texts], dtype=float)


def test_semantic_runs_perturbed_generations_and_leaves_tied_embeddings_alone(fitted):
    model = fitted.model
    before = model.embed.weight.detach().clone()
    wide = fitted.posterior.with_prior_precision(1e-3)
    g = gen(7)
    out = fitted(prompt=PROMPTS, generator=g, num_draws=4, draws=wide.sample(4, seed=2),
                 **SAMPLED, scores=("mutual_information", "semantic"), feature_extractor=answer_features)
    assert model.lm_head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, before)  # bit for bit
    assert out.draw_sequences.shape == (4, 2, CALL["gen_length"])
    assert not all(torch.equal(d, out.sequences) for d in out.draw_sequences)
    assert np.isfinite(out.scores["semantic"]).all()
    assert torch.equal(g.get_state(), (p := gen(7), fitted.pipe(prompt=PROMPTS, generator=p,
                                                                **SAMPLED))[0].get_state())


def test_reproducible_with_the_same_generator_and_seed(fitted):
    a, b = (fitted(prompt=PROMPTS, generator=gen(9), num_draws=3, seed=4, **SAMPLED,
                   scores=("mutual_information", "semantic"), feature_extractor=answer_features)
            for _ in range(2))
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.draw_sequences, b.draw_sequences)
    for name in a.scores:
        np.testing.assert_array_equal(a.scores[name], b.scores[name])
    c = fitted(prompt=PROMPTS, generator=gen(9), num_draws=3, seed=5, **SAMPLED)
    assert not np.array_equal(c.scores["mutual_information"], a.scores["mutual_information"])


def test_a_posterior_fitted_on_another_model_is_refused(fitted):
    with pytest.raises(FingerprintMismatchError):
        TextUncertaintyPipeline.from_pipe(pipeline(seed=1), posterior=fitted.posterior)
    other = TextUncertaintyPipeline.from_pipe(pipeline(seed=1))
    with pytest.raises(FingerprintMismatchError):
        other.posterior = fitted.posterior


def test_posterior_fit_masks_answer_tokens_only(fitted):
    features, targets = fitted.collect_head_data(FIT_DATA, repeats=2)
    answer_ids = {WORDS.index(w) for w in "abcd"} | {EOS}
    assert features.shape == (len(targets), 16)
    assert set(targets.tolist()) <= answer_ids
    assert fitted.posterior.info["unseen_classes"] == "freeze"
    assert MASK in fitted.posterior.info["classes_without_data"]
    text_only = fitted.collect_head_data(["1 + 2 = a b"], repeats=3)[1]
    assert not set(text_only.tolist()) <= answer_ids  # plain texts: every token may be masked


def test_user_callback_still_runs_and_arguments_are_checked(fitted):
    seen = []

    def callback(pipe, step, timestep, kwargs):
        seen.append(sorted(kwargs))
        return kwargs

    out = fitted(PROMPTS, generator=gen(), num_draws=2, callback_on_step_end=callback,
                 callback_on_step_end_tensor_inputs=["sampled_probs"], **SAMPLED)
    plain = fitted.pipe(PROMPTS, generator=gen(), **SAMPLED)
    assert seen and all(keys == ["sampled_probs"] for keys in seen)
    assert torch.equal(out.sequences, plain.sequences)
    with pytest.raises(GenuncError, match="extractor"):
        fitted(prompt=PROMPTS, scores=("semantic",), **CALL)
    with pytest.raises(GenuncError, match="num_draws"):
        fitted(prompt=PROMPTS, num_draws=1, **CALL)
    with pytest.raises(GenuncError, match="posterior"):
        TextUncertaintyPipeline.from_pipe(pipeline())(prompt=PROMPTS, **CALL)


def test_sampling_logits_match_the_scheduler():
    logits = torch.randn(64, len(WORDS), generator=gen(0)) * 3
    for kwargs in [dict(temperature=0.0), dict(temperature=0.7, top_k=5, top_p=0.8),
                   dict(temperature=1.3, top_p=0.5), dict(temperature=1.0, sampling_method="greedy")]:
        token, prob = BlockRefinementScheduler._sample_from_logits(
            logits, temperature=kwargs["temperature"], top_k=kwargs.get("top_k"),
            top_p=kwargs.get("top_p"), generator=gen(1),
            use_multinomial=kwargs.get("sampling_method", "multinomial") == "multinomial"
            and kwargs["temperature"] != 0)
        ours = sampling_logits(logits, **kwargs).float().softmax(-1)
        torch.testing.assert_close(ours.gather(-1, token[:, None]).squeeze(1), prob)


def test_the_shipped_arithmetic_model_runs_through_llada2_pipeline():
    from genunc.tasks import ArithmeticTask
    from genunc.zoo.arith_llada2 import arith_llada2_pipeline

    task, pipe = ArithmeticTask("*", 2), arith_llada2_pipeline()
    split = task.split(seed=0)
    prompts = [task.problem_text(a, b) for a, b in split["train"][:40]]
    call = dict(gen_length=4, block_length=10, num_inference_steps=4, use_chat_template=False,
                threshold=1.01, editing_threshold=None)
    upipe = TextUncertaintyPipeline.from_pipe(pipe)
    upipe.fit_posterior([(task.problem_text(a, b), task.answer_text(task.solve(a, b)))
                         for a, b in split["train"][:100]], repeats=1)
    out = upipe(prompt=prompts, num_draws=4, scores=("mutual_information",), **call)
    plain = pipe(prompt=prompts, **call)
    assert torch.equal(out.sequences, plain.sequences) and out.texts == plain.texts
    solved = torch.tensor([task.encode(p + t) for p, t in zip(prompts, out.texts)])
    assert task.check(solved).mean() > 0.4  # the trained model (train problems: ~0.6 correct)
    assert torch.isfinite(out.token_scores["mutual_information"]).all()  # all 4 answer digits
    with pytest.raises(GenuncError, match="padding"):
        pipe(prompt=prompts[:1], gen_length=3, block_length=5, use_chat_template=False)


@pytest.mark.slow
def test_the_llada2_example_runs(repo, python_run):
    import os

    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    done = python_run([repo / "examples" / "llada2.py", "--num-draws", "3"], env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if " MI " in line]
    assert len(rows) == 8 and all("correct" in r or "wrong" in r for r in rows)


def test_a_pipeline_whose_callback_hides_the_commits_is_refused():
    class CanvasOnly:  # a callback that sees the canvas only, but no DiffusionGemma model/scheduler
        _callback_tensor_inputs = ["canvas", "logits"]
        model = TinyLLaDA()

        def __call__(self, prompt=None, callback_on_step_end=None):
            raise AssertionError("never called")

    with pytest.raises(GenuncError, match="canvas_length"):
        TextUncertaintyPipeline.from_pipe(CanvasOnly())

    class BlockOnly(CanvasOnly):
        _callback_tensor_inputs = ["block_x"]

    with pytest.raises(GenuncError, match="transfer_index"):
        TextUncertaintyPipeline.from_pipe(BlockOnly())


def test_without_a_generator_the_run_follows_the_seed_and_leaves_the_global_rng(fitted):
    """One replay rule for every wrapped pipeline: no generator means genunc's initial-noise
    stream of `seed` (as for images), so the same seed repeats the texts and every score, another
    seed need not, and torch's global RNG is never advanced."""
    kwargs = dict(prompt=PROMPTS, num_draws=3, **SAMPLED,
                  scores=("mutual_information", "semantic"), feature_extractor=answer_features)
    state = torch.get_rng_state()
    first, again = fitted(seed=5, **kwargs), fitted(seed=5, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.texts == again.texts
    np.testing.assert_array_equal(first.scores["semantic"], again.scores["semantic"])
    streamed = fitted(generator=streams.torch_generator(5, "initial_noise"), seed=5, **kwargs)
    assert streamed.texts == first.texts


def test_from_pipe_returns_a_member_of_the_family_it_is_called_on(fitted, tmp_path):
    from genunc.pipelines import LLaDA2TextPipeline, WrappedTextPipeline

    assert isinstance(fitted, LLaDA2TextPipeline) and isinstance(fitted, TextUncertaintyPipeline)
    assert WrappedTextPipeline.score_columns() == tuple(WrappedTextPipeline.SCORES)
    tmp_path.joinpath("m").mkdir()
    with pytest.raises(GenuncError, match="not a diffusers pipeline folder"):
        LLaDA2TextPipeline.from_pretrained(tmp_path / "m")
