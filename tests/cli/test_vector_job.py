"""The vector job end to end through the CLI: a tiny vector model folder, an .npz of fitting
pairs and one of contexts, then fit, generate, evaluate and filter."""

import json

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMScheduler

from genunc.cli import main
from genunc.export import Export
from genunc.pipelines import VectorUncertaintyPipeline
from genunc.zoo.toy import ToyVectorDenoiser

D, C, CONTEXTS, CANDIDATES = 3, 4, 3, 4


@pytest.fixture
def config_file(tmp_path):
    torch.manual_seed(0)
    scheduler = DDPMScheduler(num_train_timesteps=5, trained_betas=np.linspace(0.05, 0.6, 5).tolist(),
                              clip_sample=True)
    VectorUncertaintyPipeline(ToyVectorDenoiser(D, C, width=16), scheduler).save_pretrained(
        tmp_path / "model")
    rng = np.random.default_rng(0)
    cond = rng.normal(size=(80, C)).astype(np.float32)
    np.savez(tmp_path / "pairs.npz", x=np.tanh(cond[:, :D]), cond=cond)
    np.savez(tmp_path / "contexts.npz", cond=cond[:CONTEXTS], x=np.tanh(cond[:CONTEXTS, :D]))
    config = {
        "modality": "vector", "model": str(tmp_path / "model"), "features": None,
        "quality": "reference",
        "posterior": {"data": str(tmp_path / "pairs.npz"), "repeats": 2, "batch_size": 32},
        "generate": {"n_samples": CONTEXTS * CANDIDATES, "candidates": CANDIDATES,
                     "num_draws": 3, "steps": None, "contexts": str(tmp_path / "contexts.npz"),
                     "scores": ["action_variance", "action_variance_x0", "variability", "random"],
                     "chunk_size": 5,
                     "out": str(tmp_path / "export")},
    }
    path = tmp_path / "vector.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_generate_evaluate_filter(config_file, tmp_path, capsys):
    assert main(["fit", "-c", str(config_file)]) == 0
    assert (tmp_path / "model" / "genunc_posterior" / "genunc_posterior.json").exists()
    assert main(["generate", "-c", str(config_file)]) == 0
    export = Export(tmp_path / "export")
    records = export.records
    assert [r["condition"] for r in records] == [0] * 4 + [1] * 4 + [2] * 4
    assert [r["candidate"] for r in records] == list(range(4)) * 3
    assert export.metadata["posterior_fingerprint"]["head_name"] == "head"
    sample = json.loads((tmp_path / "export" / records[5]["file"]).read_text())["sample"]
    assert len(sample["x"]) == D and len(sample["cond"]) == C
    contexts = np.load(tmp_path / "contexts.npz")
    np.testing.assert_allclose(sample["cond"], contexts["cond"][1], rtol=1e-6)
    error = np.linalg.norm(np.array(sample["x"]) - contexts["x"][1])
    assert records[5]["reference_error"] == pytest.approx(error, rel=1e-5)

    # the export's candidates are the pipeline's (B, N) call: sample b*N + n, whatever the chunks
    pipe = VectorUncertaintyPipeline.from_pretrained(tmp_path / "model")
    out = pipe(torch.from_numpy(contexts["cond"]), num_candidates=CANDIDATES, num_draws=3,
               scores=("action_variance", "action_variance_x0", "variability", "random"), seed=0)
    for name in ("action_variance", "action_variance_x0", "action_variance_x0_se", "variability",
                 "random"):
        np.testing.assert_allclose(export.column(name).astype(float),
                                   out.scores[name].reshape(-1), rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(sample["x"], out.samples[1, 1].numpy(), rtol=1e-5, atol=1e-6)

    assert main(["evaluate", str(tmp_path / "export"), "--quality", "reference_error",
                 "--fail-above", "0.5"]) == 0
    assert "action_variance" in capsys.readouterr().out
    assert main(["filter", str(tmp_path / "export"), "--out", str(tmp_path / "best"),
                 "--score", "action_variance", "--best-of", "condition"]) == 0
    best = Export(tmp_path / "best").records
    assert sorted(r["condition"] for r in best) == [0, 1, 2]


def test_without_a_quality_there_is_no_quality_column(config_file, tmp_path):
    assert main(["generate", "-c", str(config_file), "--set", "quality=null",
                 "--set", "generate.scores=[variability]", "--set", "generate.num_draws=0"]) == 0
    records = Export(tmp_path / "export").records
    assert len(records) == 12 and "reference_error" not in records[0]


def test_the_jobs_x0_steps_reach_action_variance_x0(config_file, tmp_path):
    assert main(["generate", "-c", str(config_file), "--set", "quality=null", "--set",
                 "generate.scores=[action_variance_x0]", "--set", "generate.x0_steps=[0, 2]"]) == 0
    pipe = VectorUncertaintyPipeline.from_pretrained(tmp_path / "model")
    contexts = torch.from_numpy(np.load(tmp_path / "contexts.npz")["cond"])
    out = pipe(contexts, num_candidates=CANDIDATES, num_draws=3, scores=("action_variance_x0",),
               x0_steps=[0, 2], seed=0)
    default = pipe(contexts, num_candidates=CANDIDATES, num_draws=3,
                   scores=("action_variance_x0",), seed=0)
    column = Export(tmp_path / "export").column("action_variance_x0").astype(float)
    np.testing.assert_allclose(column, out.scores["action_variance_x0"].reshape(-1), rtol=1e-5)
    assert not np.allclose(column, default.scores["action_variance_x0"].reshape(-1))


@pytest.mark.parametrize("override, message", [
    ("features=zoo:digits_classifier", "set features: null"),
    ("generate.contexts=null", "need generate.contexts"),
    ("generate.branch_at=2", "generate.branch_at do not apply to vectors"),
    ("posterior.data=zoo:digits_train", "an .npz of 'x' and 'cond'"),
    ("generate.steps=50", "exceeds the scheduler's 5 train timesteps"),
    ("quality=zoo:digits_judge", "vector quality is one of"),
])
def test_what_vectors_cannot_do_is_a_one_line_error(config_file, override, message, capsys):
    assert main(["generate", "-c", str(config_file), "--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_contexts_of_the_wrong_width_are_refused(config_file, tmp_path, capsys):
    np.savez(tmp_path / "contexts.npz", cond=np.zeros((2, C + 1), np.float32))
    assert main(["generate", "-c", str(config_file), "--set", "quality=null"]) == 2
    assert "cond must have shape (B, 4), got (2, 5)" in capsys.readouterr().err
