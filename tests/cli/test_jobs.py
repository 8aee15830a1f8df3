"""End to end through the CLI on a tiny model, from a config file in a temp dir."""

import json

import numpy as np
import pytest
import yaml

from genunc.cli import main
from genunc.config import dump_config, load_config
from genunc.errors import GenuncError
from genunc.export import Export, ExportWriter
from genunc.jobs import job_for, modalities


@pytest.fixture
def config_file(tiny_image_config):
    return tiny_image_config()


@pytest.fixture
def fitted_config_file(tiny_image_config):
    """The config with its posterior already fitted (the session's fit, copied)."""
    return tiny_image_config(fitted=True)


def test_fit_generate_filter_evaluate(config_file, tmp_path, capsys):
    assert main(["fit", "-c", str(config_file)]) == 0
    assert (tmp_path / "model" / "genunc_posterior" / "genunc_posterior.json").exists()
    assert main(["generate", "-c", str(config_file)]) == 0
    export = Export(tmp_path / "export")
    assert [r["sample_id"] for r in export.records] == [f"{i:06d}" for i in range(6)]
    assert export.metadata["posterior_fingerprint"]["head_name"] == "conv_out"
    assert export.metadata["config"]["generate"]["num_draws"] == 2
    assert [r["condition"] for r in export.records] == [0, 1, 2, 0, 1, 2]

    # a second run resumes: nothing is regenerated or duplicated
    before = (tmp_path / "export" / "manifest.jsonl").read_text()
    assert main(["generate", "-c", str(config_file)]) == 0
    assert (tmp_path / "export" / "manifest.jsonl").read_text() == before

    # command-line overrides, and a config change is refused for an existing export
    assert main(["generate", "-c", str(config_file), "--set", "generate.n_samples=8"]) == 2
    assert "differs in:\n  generate.n_samples: 6 -> 8\n" in capsys.readouterr().err

    assert main(["filter", str(tmp_path / "export"), "--out", str(tmp_path / "top"),
                 "--score", "semantic", "--k", "3"]) == 0
    assert len(Export(tmp_path / "top")) == 3
    assert main(["filter", str(tmp_path / "export"), "--out", str(tmp_path / "top"),
                 "--score", "semantic", "--k", "3"]) == 2  # never overwrites an export
    assert "already holds an export" in capsys.readouterr().err
    assert main(["filter", str(tmp_path / "export"), "--out", str(tmp_path / "best"),
                 "--best-of", "condition"]) == 0
    assert len(Export(tmp_path / "best")) == 3
    assert main(["filter", str(tmp_path / "export"), "--out", str(tmp_path / "mix"),
                 "--score", "semantic", "--fraction", "0.5", "--within", "condition"]) == 0
    assert sorted(r["condition"] for r in Export(tmp_path / "mix").records) == [0, 1, 2]
    assert main(["filter", str(tmp_path / "export"), "--out", str(tmp_path / "bad"),
                 "--score", "semantic", "--k", "2", "--within", "condition"]) == 2
    assert "give fraction" in capsys.readouterr().err

    calib = tmp_path / "calib"
    with ExportWriter(calib, "json") as writer:
        for i in range(200):
            writer.add(i, {}, {"semantic": i / 200, "ok": i < 190})
    assert main(["filter", str(tmp_path / "export"), "--out", str(tmp_path / "safe"),
                 "--risk-alpha", "0.2", "--calibration", str(calib), "--label", "ok"]) == 0
    assert "with probability >= 0.9" in capsys.readouterr().out

    assert main(["evaluate", str(tmp_path / "export"), "--quality", "random",
                 "--scores", "semantic,variability", "--plot", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert "Spearman" in out and (tmp_path / "r.png").stat().st_size > 0


def test_an_export_does_not_depend_on_its_chunk_size(fitted_config_file, tmp_path):
    """Sample i draws from the streams of (seed, i) and every chunk shares the head draws, so
    the same export made in chunks of 4, 1 or 6 holds the same samples and scores."""
    config_file = fitted_config_file
    manifests = []
    for size in (4, 1, 6):
        out = tmp_path / f"export_{size}"
        assert main(["generate", "-c", str(config_file), "--set", f"generate.chunk_size={size}",
                     "--set", f"generate.out={out}"]) == 0
        manifests.append(Export(out).records)
    first = manifests[0]
    for other in manifests[1:]:
        assert [r["sample_id"] for r in other] == [r["sample_id"] for r in first]
        for name in ("semantic", "variability", "random"):
            np.testing.assert_allclose([r[name] for r in other], [r[name] for r in first],
                                       rtol=1e-4, atol=1e-8)


def test_image_quality_columns_come_from_the_independent_judge(fitted_config_file, tmp_path,
                                                              monkeypatch):
    """The export's quality label is the judge's verdict, never the feature network's."""
    config_file = fitted_config_file
    from genunc.features import DigitsFeatures

    def no_classifier(*args, **kwargs):
        raise AssertionError("the quality columns must not read the digits classifier")

    monkeypatch.setattr(DigitsFeatures, "probabilities", no_classifier)
    out = tmp_path / "judged"
    assert main(["generate", "-c", str(config_file), "--set", "quality=zoo:digits_judge",
                 "--set", f"generate.out={out}"]) == 0
    records = Export(out).records
    assert all(isinstance(r["judge_agrees"], bool) and 0 <= r["p_class"] <= 1 for r in records)
    assert "classifier_agrees" not in records[0]


def test_config_overrides_and_typos(config_file):
    config = load_config(config_file, ["generate.num_draws=7", "posterior.structure=kron"])
    assert config["generate"]["num_draws"] == 7 and config["posterior"]["structure"] == "kron"
    with pytest.raises(GenuncError, match="unknown config key 'generate.n_sample'"):
        load_config(config_file, ["generate.n_sample=7"])
    with pytest.raises(GenuncError, match="section.key=value"):
        load_config(config_file, ["generate.num_draws"])


def test_shipped_configs_name_shipped_models_and_known_scores(repo):
    paths = sorted(repo.glob("configs/*.yaml"))
    rl = {"hopper", "pendulum"}  # genunc rl's configs, checked in tests/rl
    assert [p.stem for p in paths if p.stem not in rl] == ["arith", "digits", "digits_latent", "qm9"]
    for path in (p for p in paths if p.stem not in rl):
        config = load_config(path)
        job = job_for(config["modality"])
        assert job.model_dir(config).is_dir(), path
        assert set(config["generate"]["scores"]) <= set(job.pipeline_class.SCORES), path
    defaults = load_config(None)
    assert yaml.safe_load(dump_config(defaults)) == defaults  # defaults are plain data


def test_every_modality_is_one_registered_job():
    assert modalities() == ("image", "molecule", "text", "vector")
    for name in modalities():
        job = job_for(name)
        assert job.modality == name and job.pipeline_class.score_columns()
    with pytest.raises(GenuncError, match="unknown modality 'audio'"):
        job_for("audio")


def test_model_dir_resolves_zoo_names_and_paths(tmp_path, monkeypatch):
    job = job_for("image")
    monkeypatch.setattr(job, "shipped_models", lambda: {"digits_ddpm": tmp_path / "ddpm"})
    config = load_config(None, ["model=zoo:digits_ddpm"])
    assert job.model_dir(config) == tmp_path / "ddpm"
    assert job.model_dir(load_config(None, [f"model={tmp_path}"])) == tmp_path
    with pytest.raises(GenuncError, match="unknown zoo image model 'zoo:nope'; shipped: zoo:digits_ddpm"):
        job.model_dir(load_config(None, ["model=zoo:nope"]))
    with pytest.raises(GenuncError, match="names no model"):
        job.model_dir(load_config(None, []))


def test_a_stale_posterior_is_refused_by_generate_and_replaced_by_fit(fitted_config_file,
                                                                      tmp_path, tiny_unet, capsys):
    config_file = fitted_config_file
    tiny_unet(seed=1).save_pretrained(tmp_path / "model")  # the model was retrained
    assert main(["generate", "-c", str(config_file)]) == 2
    assert "fitted on a different head" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()
    assert main(["fit", "-c", str(config_file)]) == 0  # refits over the stale one
    assert main(["generate", "-c", str(config_file)]) == 0


def test_a_block_posterior_through_the_cli(config_file, tmp_path, capsys):
    """posterior.tail fits a posterior over the last block; the export carries the Monte-Carlo
    variability with its standard error; a config asking for the head is refused that folder."""
    tail = ["--set", "posterior.tail=1", "--set", "generate.variance=monte_carlo",
            "--set", "generate.num_draws=3"]
    assert main(["fit", "-c", str(config_file), *tail]) == 0
    folder = tmp_path / "model" / "genunc_posterior"
    assert json.loads((folder / "genunc_posterior.json").read_text())["kind"] == "tail"
    assert main(["generate", "-c", str(config_file), *tail]) == 0
    export = Export(tmp_path / "export")
    se, score = export.column("variability_se"), export.column("variability")
    assert np.all(np.isfinite(se)) and np.all(se > 0) and np.all(se < score)
    assert main(["generate", "-c", str(config_file), "--set",
                 f"generate.out={tmp_path / 'head'}"]) == 2
    assert "holds a posterior over the tail but the config asks for one over the head" in \
        capsys.readouterr().err
    assert main(["fit", "-c", str(config_file)]) == 0  # a head fit replaces the block posterior
    assert json.loads((folder / "genunc_posterior.json").read_text())["kind"] == "head"


def test_a_lowrank_block_posterior_through_the_cli(config_file, tmp_path, capsys):
    """posterior.structure=lowrank fits the block's GGN diagonal plus its top posterior.rank
    eigenpairs; asked for the head, it is refused with what to use instead."""
    options = ["--set", "posterior.tail=1", "--set", "posterior.structure=lowrank",
               "--set", "posterior.rank=3"]
    assert main(["fit", "-c", str(config_file), *options]) == 0
    meta = json.loads((tmp_path / "model" / "genunc_posterior" / "genunc_posterior.json")
                      .read_text())
    assert meta["structure"] == "lowrank" and meta["info"]["rank"] == 3
    assert main(["fit", "-c", str(config_file), "--set", "posterior.structure=lowrank"]) == 2
    assert "lowrank is for a tail posterior" in capsys.readouterr().err
    # the predictive is a choice of use: the saved posterior serves both, and the export says so
    for predictive in ("sample", "linearised"):
        assert main(["generate", "-c", str(config_file), *options, "--set",
                     f"posterior.predictive={predictive}", "--set", "generate.num_draws=3",
                     "--set", "generate.variance=monte_carlo", "--set",
                     f"generate.out={tmp_path / predictive}"]) == 0
    sample, linear = (Export(tmp_path / p).column("variability") for p in ("sample", "linearised"))
    assert np.all(np.isfinite(linear)) and not np.allclose(sample, linear)
    assert main(["generate", "-c", str(config_file), "--set", "posterior.predictive=linearised"]) == 2
    assert "linearised is for a tail posterior" in capsys.readouterr().err
