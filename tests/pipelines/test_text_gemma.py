"""TextUncertaintyPipeline.from_pipe on diffusers' DiffusionGemmaPipeline: commits read from the
user's own scheduler (genunc.pipelines.text_canvas).

A tiny random ``DiffusionGemmaForBlockDiffusion`` (2 layers, 2 experts, hidden 16, canvas 4,
final-logit softcapping 30, LM head tied to the embeddings) built from a config, and a word-level
tokenizer with a one-line chat template: no hub, seconds.
"""

import copy
import functools
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"):
    pytest.skip("transformers without DiffusionGemma", allow_module_level=True)
from diffusers import (  # noqa: E402
    BlockRefinementScheduler,
    DiffusionGemmaPipeline,
    DiscreteDDIMScheduler,
    EntropyBoundScheduler,
)
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    DiffusionGemmaConfig,
    DiffusionGemmaForBlockDiffusion,
    DynamicCache,
    PreTrainedTokenizerFast,
)

from genunc.errors import GenuncError  # noqa: E402
from genunc.pipelines.text import TextUncertaintyPipeline  # noqa: E402
from genunc.pipelines.text_canvas import softcap  # noqa: E402
from genunc.posterior import HeadDraws, HeadPosterior  # noqa: E402
from genunc.scores.tokens import mutual_information  # noqa: E402

WORDS = ["<pad>", "<eos>", "<bos>", "<unk>", *map(str, range(10)), "+", "=", "a", "b", "c", "d"]
PROMPTS = ["1 + 2 =", "3 + 4 ="]
CALL = dict(gen_length=8, num_inference_steps=8)
HIDDEN = 16


def tokenizer():
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<bos>", unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tok


def tiny_model(seed=0):
    """A fresh copy of the tiny model for `seed`."""
    return copy.deepcopy(_built_model(seed))


@functools.cache
def _built_model(seed):
    text = dict(vocab_size=len(WORDS), hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, global_head_dim=8,
                sliding_window=8, max_position_embeddings=128,
                layer_types=["sliding_attention", "full_attention"], num_experts=2, top_k_experts=1,
                moe_intermediate_size=16)
    # a tiny vision tower too: by default Gemma 4's (167M weights, 0.7 GB, 2 s to build) comes along,
    # unused by text prompts
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8, position_embedding_size=64)
    # + 1: with these sizes, seed 0's weights give one prompt an EntropyBound completion with no
    # commit before its EOS (a NaN score, which the tests below do not expect of every prompt)
    torch.manual_seed(seed + 1)
    return DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(text_config=text, vision_config=vision,
                                                                canvas_length=4)).eval()


def pipeline(scheduler=None, seed=0):
    pipe = DiffusionGemmaPipeline(model=tiny_model(seed), scheduler=scheduler or BlockRefinementScheduler(),
                                  processor=tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def fitted():
    return fitted_wrapper()


def fitted_wrapper():
    """A wrapper with a diagonal posterior fitted on the head's inputs of a plain run (argmax
    targets); also the golden runs' DiffusionGemma wrapper (benchmarks/golden.py)."""
    pipe = pipeline()
    kept = []
    handle = pipe.model.lm_head.register_forward_hook(
        lambda m, a, o: kept.append((a[0].reshape(-1, HIDDEN), o.reshape(-1, o.shape[-1]).argmax(-1))))
    pipe(prompt=["1 + 2 =", "3 + 4 =", "5 + 5 ="], generator=gen(1), temperature=1.0, **CALL)
    handle.remove()
    features, targets = (torch.cat(t).detach() for t in zip(*kept))
    posterior = HeadPosterior.fit_features(pipe.model.lm_head, (features, targets),
                                           likelihood="classification", head_name="lm_head",
                                           prior_precision=1.0)
    return TextUncertaintyPipeline.from_pipe(pipe, posterior=posterior)


def calls_of(pipe, fn):
    count = [0]
    handle = pipe.model.register_forward_pre_hook(lambda m, a: count.__setitem__(0, count[0] + 1))
    try:
        return fn(), count[0]
    finally:
        handle.remove()


SCHEDULERS = [BlockRefinementScheduler, EntropyBoundScheduler, DiscreteDDIMScheduler,
              lambda: DiscreteDDIMScheduler(corrector_steps=2, corrector_k=2)]
OPTIONS = [dict(temperature=1.0), dict(temperature=0.0), dict(temperature=0.7, confidence_threshold=None),
           dict(temperature=1.0, confidence_threshold=10.0),  # the adaptive stop fires (DDIM)
           dict(temperature=1.0, confidence_threshold=2.9, stability_threshold=2)]


@pytest.mark.parametrize("make", SCHEDULERS,
                         ids=["block_refinement", "entropy_bound", "ddim", "ddim_corrector"])
def test_output_equals_the_plain_pipeline(fitted, make):
    pipe = fitted.pipe
    pipe.scheduler = make()
    try:
        for options in OPTIONS:
            g_plain, g_wrapped = gen(3), gen(3)
            plain, n_plain = calls_of(pipe, functools.partial(
                pipe, prompt=PROMPTS, generator=g_plain, **CALL, **options))
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # genunc's mirror of the pipeline saw every change
                out, n_wrapped = calls_of(pipe, functools.partial(
                    fitted, prompt=PROMPTS, generator=g_wrapped, num_draws=4, **CALL, **options,
                    scores=("mutual_information", "mutual_information_max", "low_confidence")))
            assert torch.equal(out.sequences, plain.sequences) and out.texts == plain.texts
            assert torch.equal(g_plain.get_state(), g_wrapped.get_state()) and n_plain == n_wrapped
            mi, committed = out.token_scores["mutual_information"], out.committed_at >= 0
            assert mi.shape == out.sequences.shape
            assert torch.isfinite(mi[committed]).all() and torch.isnan(mi[~committed]).all()
            assert (mi[committed] > 0).all()
            conf = out.token_scores["confidence"][committed]
            assert ((conf > 0) & (conf <= 1)).all()
            assert np.isfinite(out.scores["mutual_information"]).all()
            assert "step" not in vars(pipe.scheduler) and "step_correct" not in vars(pipe.scheduler)
    finally:
        pipe.scheduler = BlockRefinementScheduler()


def test_block_refinement_commits_every_position_once(fitted):
    """BlockRefinement commits each canvas position exactly once: every returned token is scored,
    at the step the scheduler's transfer_index named it."""
    seen = []
    original = fitted.pipe.scheduler.step

    @functools.wraps(original)  # the pipeline passes only the arguments step's signature names
    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.transfer_index.clone())
        return out

    fitted.pipe.scheduler.step = spy
    try:
        out = fitted(prompt=PROMPTS, generator=gen(4), num_draws=3, temperature=1.0,
                     confidence_threshold=None, **CALL)
    finally:
        del fitted.pipe.scheduler.step
    assert fitted.pipe.scheduler.step == original  # the user's own wrapper was left as found
    assert (out.committed_at >= 0).all()
    for step, transfer in enumerate(seen):
        canvas = step // CALL["num_inference_steps"]
        block = out.committed_at[:, canvas * 4 : (canvas + 1) * 4]
        assert torch.equal(block == step, transfer)


def test_commit_time_mi_recomputed_by_hand_through_the_softcap(fitted):
    """The first step's commits: MI of the draws on that call's head input, softcapped as the model
    does, at the scheduler's temperature; the MAP through genunc's transform is the model's logits."""
    draws = fitted.posterior.sample(4, seed=1)
    kept = []
    handle = fitted.model.lm_head.register_forward_hook(lambda m, a, o: kept.append(a[0].detach()))
    logits = []
    original = fitted.pipe.scheduler.step

    @functools.wraps(original)
    def spy(*args, **kwargs):
        logits.append(kwargs["model_output"])
        return original(*args, **kwargs)

    fitted.pipe.scheduler.step = spy
    try:
        out = fitted(prompt=PROMPTS, generator=gen(2), draws=draws, temperature=0.5,
                     confidence_threshold=None, **CALL)
    finally:
        handle.remove()
        del fitted.pipe.scheduler.step
    assert fitted.model.final_logit_softcapping == 30.0
    torch.testing.assert_close(softcap(fitted.model.lm_head(kept[0]), 30.0), logits[0])
    expected = mutual_information(softcap(draws.apply(kept[0]), 30.0) / 0.5)  # (2, 4)
    first = out.committed_at[:, :4] == 0
    assert first.any()
    torch.testing.assert_close(out.token_scores["mutual_information"][:, :4][first], expected[first])


def test_collapsed_posterior_gives_zero_mi_and_leaves_the_tied_embedding_alone(fitted):
    model = fitted.model
    before = model.model.decoder.embed_tokens.weight.detach().clone()
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    mean = HeadDraws.from_flat(fitted.posterior.mean.repeat(3, 1), fitted.posterior.ops)
    out = fitted(prompt=PROMPTS, generator=gen(5), draws=mean, temperature=1.0, **CALL,
                 scores=("mutual_information", "semantic"), feature_extractor=bag_of_words)
    committed = out.committed_at >= 0
    assert (out.token_scores["mutual_information"][committed] < 1e-12).all()
    for m in range(3):
        assert torch.equal(out.draw_sequences[m], out.sequences)  # same generator state, MAP head
    tight = fitted.posterior.with_prior_precision(1e12)
    out = fitted(prompt=PROMPTS, generator=gen(5), draws=tight.sample(3), temperature=1.0, **CALL)
    assert out.scores["mutual_information"].max() < 1e-8
    wide = fitted.posterior.with_prior_precision(1e-3)
    out = fitted(prompt=PROMPTS, generator=gen(5), draws=wide.sample(3, seed=2), temperature=1.0, **CALL,
                 scores=("mutual_information", "semantic"), feature_extractor=bag_of_words)
    assert out.scores["mutual_information"].min() > 1e-4 and np.isfinite(out.scores["semantic"]).all()
    assert torch.equal(model.model.decoder.embed_tokens.weight, before)  # bit for bit
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight


def bag_of_words(texts):
    return np.array([[text.split().count(w) for w in WORDS] for text in texts], dtype=float)


def test_reproducible_and_the_user_callback_still_runs(fitted):
    a, b = (fitted(prompt=PROMPTS, generator=gen(9), num_draws=3, seed=4, temperature=1.0, **CALL)
            for _ in range(2))
    assert torch.equal(a.sequences, b.sequences)
    np.testing.assert_array_equal(a.scores["mutual_information"], b.scores["mutual_information"])
    c = fitted(prompt=PROMPTS, generator=gen(9), num_draws=3, seed=5, temperature=1.0, **CALL)
    assert not np.array_equal(c.scores["mutual_information"], a.scores["mutual_information"])
    seen = []

    def callback(pipe, step, timestep, kwargs):
        seen.append(sorted(kwargs))
        return kwargs

    out = fitted(PROMPTS, generator=gen(9), num_draws=2, temperature=1.0, callback_on_step_end=callback,
                 callback_on_step_end_tensor_inputs=["logits"], **CALL)
    assert seen and all(keys == ["logits"] for keys in seen)
    assert torch.equal(out.sequences, a.sequences)


def test_a_callback_that_edits_the_canvas_loses_those_records(fitted):
    def edit(pipe, step, timestep, kwargs):
        canvas = kwargs["canvas"].clone()
        canvas[:, 0] = 5  # the digit "1" at every canvas's first position
        return {"canvas": canvas}

    plain = fitted.pipe(PROMPTS, generator=gen(6), temperature=1.0, confidence_threshold=None,
                        callback_on_step_end=edit, **CALL)
    with pytest.warns(UserWarning, match="changed by something genunc does not model"):
        out = fitted(PROMPTS, generator=gen(6), num_draws=2, temperature=1.0, confidence_threshold=None,
                     callback_on_step_end=edit, **CALL)
    assert torch.equal(out.sequences, plain.sequences)
    assert (out.sequences[:, ::4] == 5).all()
    # a position keeps its record only where the scheduler itself committed the token the callback forces
    assert torch.isnan(out.token_scores["mutual_information"][:, ::4]).any()
    assert torch.isfinite(out.token_scores["mutual_information"][:, 1::4]).all()


def test_a_chunk_exports_each_shown_token_with_its_mi(fitted):
    """What the text job writes for genunc report: the tokens the decoded text shows, each with
    its MI at its last commit (the pieces join to the text), None where genunc lost the record."""
    generate = {"prompts": PROMPTS, "candidates": 1}
    out = fitted(PROMPTS, generator=gen(6), num_draws=2, temperature=1.0, confidence_threshold=None,
                 **CALL)
    chunk = fitted.chunk_texts(out, generate, range(2), check=False)
    assert chunk.completions == out.texts and len(chunk.token_mi) == 2 and all(chunk.token_mi)
    for pieces, text, ids, mi in zip(chunk.token_mi, out.texts, out.sequences.tolist(),
                                     out.token_scores["mutual_information"]):
        assert "".join(piece for piece, _ in pieces) == text
        end = ids.index(1) if 1 in ids else len(ids)  # <eos>
        shown = [k for k in range(end) if not WORDS[ids[k]].startswith("<")]
        assert [value for _, value in pieces] == pytest.approx([float(mi[k]) for k in shown])
        assert all(value > 0 for _, value in pieces)

    def edit(pipe, step, timestep, kwargs):
        canvas = kwargs["canvas"].clone()
        canvas[:, 0] = 5
        return {"canvas": canvas}

    with pytest.warns(UserWarning, match="changed by something genunc does not model"):
        edited = fitted(PROMPTS, generator=gen(6), num_draws=2, temperature=1.0,
                        confidence_threshold=None, callback_on_step_end=edit, **CALL)
    pieces = fitted.chunk_texts(edited, generate, range(2), check=False).token_mi
    assert any(value is None for row in pieces for _, value in row)


def test_unsupported_scheduler_is_refused():
    class OtherScheduler:
        def step(self, model_output, timestep, sample):
            raise AssertionError("never called")

    pipe = pipeline()
    pipe.scheduler = OtherScheduler()
    with pytest.raises(GenuncError, match="BlockRefinementScheduler"):
        TextUncertaintyPipeline.from_pipe(pipe)


@pytest.mark.parametrize("versions, refused", [
    ({"transformers": "5.24.0", "diffusers": "0.42.1"}, True),
    ({"transformers": "5.31.0.dev0", "diffusers": "0.40.0"}, True),
    ({"transformers": "5.23.0", "diffusers": "0.42.1"}, False),
    ({"transformers": "5.24.0", "diffusers": "0.43.0"}, False),
])
def test_a_known_broken_transformers_diffusers_pair_is_refused_before_anything_runs(
        versions, refused, monkeypatch):
    """transformers >= 5.24 with diffusers <= 0.42.1 breaks DiffusionGemmaPipeline (TypeError deep
    in diffusers): wrapping it names both versions and the fix in one line, and calls no model."""
    from packaging.version import Version

    import genunc._compat as compat

    monkeypatch.setattr(compat, "installed_version", lambda name: Version(versions[name]))
    pipe = pipeline()
    if not refused:
        assert type(TextUncertaintyPipeline.from_pipe(pipe)).__name__ == "DiffusionGemmaTextPipeline"
        return
    calls = []
    pipe.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(GenuncError) as info:
        TextUncertaintyPipeline.from_pipe(pipe)
    assert not calls
    message = str(info.value)
    assert "\n" not in message and "DiffusionGemmaPipeline" in message
    assert f"transformers {versions['transformers']}" in message
    assert f"diffusers {versions['diffusers']}" in message and "transformers<5.24" in message


# ---------------------------------------------------------------------- fit_posterior
FIT_DATA = [("1 + 2 =", "3"), ("3 + 4 =", "7"), ("5 + 5 =", "1 0"), ("2 + 2 =", "4"), ("1 + 1 =", "2"),
            ("4 + 4 =", "8")]
ANSWER_IDS = {WORDS.index(w) for w in "3710482"} | {WORDS.index("<eos>")}


@pytest.fixture(scope="module")
def self_fitted():
    """A wrapper whose posterior fit_posterior fitted on (prompt, answer) pairs."""
    upipe = TextUncertaintyPipeline.from_pipe(pipeline())
    embedding = upipe.model.model.decoder.embed_tokens.weight.detach().clone()
    upipe.fit_posterior(FIT_DATA, repeats=3, prior_precision=1.0)
    assert torch.equal(upipe.model.model.decoder.embed_tokens.weight, embedding)  # the tied head untouched
    assert upipe.model.lm_head.weight is upipe.model.model.decoder.embed_tokens.weight
    return upipe


def test_fit_posterior_on_pairs(self_fitted):
    posterior = self_fitted.posterior
    posterior.check_matches(self_fitted.model)  # fingerprint of the wrapped model's head
    TextUncertaintyPipeline.from_pipe(self_fitted.pipe, posterior=posterior)
    summary = posterior.summary()
    assert summary["likelihood"] == "classification" and summary["head"] == "lm_head"
    assert all(np.isfinite(summary[k]) for k in ("log_marglik", "relative_perturbation", "n_params"))
    assert posterior.info["output_softcap"] == 30.0  # the likelihood is on the logits the model samples
    # vocabulary rows no target names stay at their pretrained values in every draw
    unseen = set(posterior.info["classes_without_data"])
    assert posterior.info["unseen_classes"] == "freeze"
    assert unseen == set(range(len(WORDS))) - ANSWER_IDS
    assert summary["n_params"] == len(ANSWER_IDS) * HIDDEN
    weight = posterior.sample(3, seed=1).params["weight"]  # (3, V, hidden)
    frozen = sorted(unseen)
    assert torch.equal(weight[:, frozen], self_fitted.model.lm_head.weight[frozen].expand(3, -1, -1))
    seen = sorted(ANSWER_IDS)
    assert not torch.equal(weight[0, seen], self_fitted.model.lm_head.weight[seen])


def test_fitted_posterior_wrapped_call_equals_the_plain_pipeline(self_fitted):
    pipe = self_fitted.pipe
    plain_gen, wrapped_gen = gen(3), gen(3)
    plain = pipe(prompt=PROMPTS, generator=plain_gen, temperature=1.0, **CALL)
    out = self_fitted(prompt=PROMPTS, generator=wrapped_gen, num_draws=4, temperature=1.0, **CALL,
                      scores=("mutual_information", "semantic"), feature_extractor=bag_of_words)
    assert torch.equal(out.sequences, plain.sequences) and out.texts == plain.texts
    assert torch.equal(plain_gen.get_state(), wrapped_gen.get_state())
    committed = out.committed_at >= 0
    mi = out.token_scores["mutual_information"]
    assert committed.any() and torch.isfinite(mi[committed]).all() and (mi[committed] > 0).all()
    assert np.isfinite(out.scores["mutual_information"]).all() and np.isfinite(out.scores["semantic"]).all()


class _Calls:
    """Records, by pre-hooks, what the model and its encoder are called with, and the head's input."""

    def __init__(self, model):
        self.model_calls, self.encoder_calls, self.head_inputs = [], [], []
        self.handles = [
            model.register_forward_pre_hook(lambda m, a, kw: self.model_calls.append(dict(kw)),
                                            with_kwargs=True),
            model.model.encoder.register_forward_pre_hook(
                lambda m, a, kw: self.encoder_calls.append(dict(kw)), with_kwargs=True),
            model.lm_head.register_forward_hook(lambda m, a, o: self.head_inputs.append(a[0].detach())),
        ]

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("self_conditioning", [0.0, 1.0])
def test_captured_features_are_the_pipeline_call_at_the_head_input(self_fitted, self_conditioning):
    """The fit encodes the prompt and calls pipe.model as the pipeline does; a manual forward on the
    canvas it corrupted gives the head inputs it kept, at the answer's positions."""
    pipe, model = self_fitted.pipe, self_fitted.model
    prompt, answer = FIT_DATA[2]  # "1 0": two answer tokens, EOS, one pad
    calls = _Calls(model)
    try:
        features, targets = self_fitted.collect_head_data([(prompt, answer)], repeats=1, seed=7,
                                                          self_conditioning=self_conditioning)
        fit_model, fit_encoder = calls.model_calls, calls.encoder_calls
        calls.model_calls, calls.encoder_calls = [], []
        pipe(prompt=[prompt], generator=gen(0), temperature=1.0, confidence_threshold=None, **CALL)
        pipe_model, pipe_encoder = calls.model_calls, calls.encoder_calls
    finally:
        calls.remove()
    assert len(fit_model) == (2 if self_conditioning else 1) and len(fit_encoder) == 1
    # the same encoder input and the same model call signature as the pipeline's first canvas
    assert fit_encoder[0].keys() == pipe_encoder[0].keys()
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert torch.equal(fit_encoder[0][key], pipe_encoder[0][key]), key
    assert all(call.keys() == pipe_model[0].keys() for call in fit_model)
    assert torch.equal(fit_model[0]["decoder_position_ids"], pipe_model[0]["decoder_position_ids"])
    assert fit_model[0]["self_conditioning_logits"] is None
    canvas = fit_model[0]["decoder_input_ids"]
    ids = [WORDS.index(w) for w in answer.split()] + [WORDS.index("<eos>")]
    assert torch.equal(targets, torch.tensor(ids))  # every answer position, EOS, no pad
    # a manual forward, written as the pipeline's own lines, on that canvas
    prompt_ids, attention, _ = pipe._prepare_inputs(prompt=[prompt], messages=None, image=None,
                                                    add_generation_prompt=True)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    kept = []
    handle = model.lm_head.register_forward_hook(lambda m, a, o: kept.append(a[0].detach()))
    try:
        with torch.no_grad():
            model.model.encoder(input_ids=prompt_ids, attention_mask=attention, past_key_values=cache,
                                position_ids=torch.arange(prompt_ids.shape[1]).unsqueeze(0))
            mask = model.model.decoder.create_diffusion_decoder_attention_mask(
                config=model.config, inputs_embeds=torch.empty((1, 4, 0)), past_key_values=cache,
                decoder_attention_mask=torch.nn.functional.pad(attention.bool(), (0, 4), value=True))
            positions = torch.arange(prompt_ids.shape[1], prompt_ids.shape[1] + 4).unsqueeze(0)
            logits = model(decoder_input_ids=canvas, past_key_values=cache, self_conditioning_logits=None,
                           decoder_attention_mask=mask, decoder_position_ids=positions).logits
            if self_conditioning:
                model(decoder_input_ids=canvas, past_key_values=cache, self_conditioning_logits=logits,
                      decoder_attention_mask=mask, decoder_position_ids=positions)
    finally:
        handle.remove()
    torch.testing.assert_close(features, kept[-1][0, : len(ids)], rtol=1e-5, atol=1e-6)
    if self_conditioning:
        assert not torch.allclose(kept[0], kept[1])  # the second call is the self-conditioned one


def test_mixed_self_conditioning_rows_are_the_unconditioned_call(self_fitted):
    """In a batch where only some rows are self-conditioned, the fit makes one conditioned call
    with the model's self_conditioning_mask: its unmasked rows are what the pipeline's first,
    unconditioned call (self_conditioning_logits=None) gives, and its masked rows are not."""
    model = self_fitted.model
    calls = _Calls(model)
    try:
        self_fitted.collect_head_data(FIT_DATA, repeats=6, seed=1, self_conditioning=0.5)
    finally:
        calls.remove()
    mixed = [i for i, call in enumerate(calls.model_calls) if "self_conditioning_mask" in call]
    assert mixed  # 6 repeats of 4 rows at p = 0.5 draw a mixed batch
    for i in mixed:
        call, head_input = calls.model_calls[i], calls.head_inputs[i]
        kept = []
        handle = model.lm_head.register_forward_hook(
            lambda m, a, o, kept=kept: kept.append(a[0].detach()))
        try:
            with torch.no_grad():
                model(**{**call, "self_conditioning_logits": None, "self_conditioning_mask": None})
        finally:
            handle.remove()
        off = ~call["self_conditioning_mask"]
        assert off.any() and (~off).any()
        torch.testing.assert_close(head_input[off], kept[0][off], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(head_input[~off], kept[0][~off])


def test_uniform_corruption_and_corrupted_only(self_fitted):
    """Canvas tokens survive with probability alpha = 1 - t, else are uniform over the vocabulary;
    corrupted_only keeps the answer positions whose token the noise changed."""
    calls = _Calls(self_fitted.model)
    try:
        features, targets = self_fitted.collect_head_data(FIT_DATA, repeats=20, seed=3,
                                                          self_conditioning=0.0, corrupted_only=True)
    finally:
        calls.remove()
    canvases = torch.cat([call["decoder_input_ids"] for call in calls.model_calls])
    clean = torch.tensor([[WORDS.index(w) for w in a.split()] + [1] + [0] * (3 - len(a.split()))
                          for _, a in FIT_DATA]).repeat(20, 1)
    assert canvases.shape == clean.shape and (canvases < len(WORDS)).all()
    changed = canvases != clean
    assert 0.3 < changed.float().mean() < 0.7  # E[t] (1 - 1/K) with t ~ U(0, 1)
    answer = clean != 0
    assert len(targets) == int((changed & answer).sum()) and features.shape == (len(targets), HIDDEN)
    assert torch.equal(targets, clean[changed & answer])


def test_fit_errors_are_clear(self_fitted):
    with pytest.raises(GenuncError, match="no examples"):
        self_fitted.fit_posterior([])
    with pytest.raises(GenuncError, match="more than one canvas"):
        self_fitted.fit_posterior([("1 + 2 =", "1 2 3 4")])  # 4 tokens and EOS in a canvas of 4
    with pytest.raises(GenuncError, match="chat template"):
        self_fitted.fit_posterior(FIT_DATA, use_chat_template=False)
    with pytest.raises(GenuncError, match="probability"):
        self_fitted.fit_posterior(FIT_DATA, self_conditioning=2.0)
    with pytest.raises(GenuncError, match="encodes to no tokens"):
        self_fitted.fit_posterior(["3"])  # a plain text is an answer to the empty prompt
