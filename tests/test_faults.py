"""Deliberate faults, one per finding of the reliability audit: each must give a clear one-line
error, lose nothing and mix nothing.  Numbers refer to the audit's list."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from genunc.cli import main
from genunc.errors import GenuncError
from genunc.export import Export, ExportWriter


@pytest.fixture
def digits_config(tiny_image_config, tmp_path):
    """A tiny image config writing its posterior and export into tmp_path, two samples a chunk,
    with its posterior already fitted."""
    return tiny_image_config(posterior_dir=str(tmp_path / "posterior"), fitted=True, steps=2,
                             chunk_size=2)


@pytest.fixture
def unfitted_digits_config(tiny_image_config, tmp_path):
    """The same config before its posterior is fitted."""
    return tiny_image_config(posterior_dir=str(tmp_path / "posterior"), steps=2, chunk_size=2)


def _err(capsys) -> str:
    return _last_line(capsys.readouterr().err)


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# 1 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mistake, says", [
    ("generate.scores=[semantc]", "unknown scores ['semantc']"),
    ("generate.num_draws=0", "['semantic'] need num_draws >= 1, got 0"),
    ("generate.steps=0", "generate.steps: 0 is not allowed"),
    ("generate.branch_at=1", None),  # valid: the control
])
def test_a_mistake_leaves_no_folder_and_the_corrected_run_works(unfitted_digits_config, tmp_path,
                                                                capsys, mistake, says):
    digits_config = unfitted_digits_config
    code = main(["generate", "-c", str(digits_config), "--set", mistake])
    if says is None:
        assert code == 0
        return
    assert code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "export").exists()
    assert not (tmp_path / "posterior").exists()  # checked before the posterior was fitted
    assert main(["generate", "-c", str(digits_config)]) == 0
    assert len(Export(tmp_path / "export")) == 6


# 2 ---------------------------------------------------------------------------------------------
def test_a_refitted_posterior_is_not_mixed_into_a_resumed_export(digits_config, tmp_path, capsys):
    assert main(["generate", "-c", str(digits_config)]) == 0
    manifest = tmp_path / "export" / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[:2]))  # as if interrupted after the first chunk
    assert main(["fit", "-c", str(digits_config), "--set", "posterior.structure=kron"]) == 0
    assert main(["generate", "-c", str(digits_config)]) == 2
    assert "posterior_sha256" in capsys.readouterr().err
    assert manifest.read_text() == "".join(lines[:2])  # nothing added under the new posterior


# 3 ---------------------------------------------------------------------------------------------
def test_a_corrupt_manifest_line_is_an_error_never_a_shorter_export(digits_config, tmp_path,
                                                                    capsys):
    assert main(["generate", "-c", str(digits_config)]) == 0
    export = tmp_path / "export"
    manifest = export / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    lines[2] = '{"sample_id": "000002", "semantic": oops\n'
    manifest.write_text("".join(lines))
    before = manifest.read_bytes()
    for argv in (["filter", str(export), "--out", str(tmp_path / "kept"), "--fraction", "0.5"],
                 ["evaluate", str(export), "--quality", "random"],
                 ["generate", "-c", str(digits_config)]):
        assert main(argv) == 2, argv
        assert "manifest.jsonl, line 3" in _err(capsys)
        assert manifest.read_bytes() == before  # generate did not cut the records after it
    assert not (tmp_path / "kept").exists()
    assert main(["repair", str(export)]) == 0
    assert "moved 1 damaged" in capsys.readouterr().out
    assert len(Export(export)) == 5
    assert (export / "manifest.quarantine.jsonl").read_text() == lines[2]


def test_a_torn_last_line_is_still_cut_silently(tmp_path):
    with ExportWriter(tmp_path / "e", "json") as writer:
        for i in range(3):
            writer.add(i, {}, {"score": float(i)})
    with (tmp_path / "e" / "manifest.jsonl").open("a") as handle:
        handle.write('{"sample_id": "3", "sco')  # a crash mid-append
    assert len(Export(tmp_path / "e")) == 3


# 5 ---------------------------------------------------------------------------------------------
def _labelled_export(path, labels):
    with ExportWriter(path, "json") as writer:
        for i, label in enumerate(labels):
            writer.add(i, {}, {"semantic": i / len(labels), "ok": label,
                               "p": 0.9 if i < len(labels) * 0.9 else 0.1})
    return path


def test_one_label_rule_for_risk_control_and_evaluate(tmp_path, capsys):
    strings = ["true"] * 180 + ["false"] * 20
    calib = _labelled_export(tmp_path / "calib", strings)
    target = _labelled_export(tmp_path / "target", strings)
    # "false" is a failure, not a truthy string
    assert main(["filter", str(target), "--out", str(tmp_path / "safe"), "--risk-alpha", "0.05",
                 "--calibration", str(calib), "--label", "ok"]) == 0
    kept = Export(tmp_path / "safe")
    assert 0 < len(kept) < 200 and kept.metadata["filter"]["risk_control"]["failure"] == "ok is false"
    risk = kept.metadata["filter"]["risk_control"]
    assert {"alpha", "delta", "method", "threshold", "calibration_export"} <= set(risk)
    # a continuous column needs an explicit rule, in both commands
    assert main(["filter", str(target), "--out", str(tmp_path / "x"), "--risk-alpha", "0.05",
                 "--calibration", str(calib), "--label", "p"]) == 2
    assert "--fail-below" in _err(capsys)
    assert main(["evaluate", str(target), "--quality", "p"]) == 0
    assert "AUROC: n/a" in capsys.readouterr().out
    assert main(["evaluate", str(target), "--quality", "p", "--fail-below", "0.5"]) == 0
    assert "failure = p < 0.5" in capsys.readouterr().out


# 6 ---------------------------------------------------------------------------------------------
def test_exports_and_posteriors_follow_the_umask(unfitted_digits_config, tmp_path):
    digits_config = unfitted_digits_config
    old = os.umask(0o022)
    try:
        assert main(["generate", "-c", str(digits_config)]) == 0
    finally:
        os.umask(old)
    written = [*(tmp_path / "export").rglob("*"), *(tmp_path / "posterior").iterdir()]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in written if p.is_file()}
    assert modes and all(mode == 0o644 for mode in modes.values()), modes


# 7 ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_molecule_example_refuses_to_report_an_old_export(tiny_molecule_folder, tmp_path,
                                                              repo, python_run):
    model = tiny_molecule_folder(tmp_path / "model")
    base = [str(repo / "examples" / "filter_molecules.py"), "--model", str(model),
            "--posterior-data", str(tmp_path / "molecules.npz"), "--n-fit", "10", "--n", "3",
            "--draws", "2", "--steps", "2", "--out", str(tmp_path / "out")]
    first = python_run(base)
    assert first.returncode == 0, first.stderr
    again = python_run(base + ["--seed", "5"])
    assert again.returncode != 0 and "seed: 0 -> 5" in again.stderr
    assert "Traceback" not in again.stderr


# 8 ---------------------------------------------------------------------------------------------
def test_a_second_writer_is_refused(tmp_path):
    first = ExportWriter(tmp_path / "e", "json")
    with pytest.raises(GenuncError, match="another genunc process is writing"):
        ExportWriter(tmp_path / "e", "json")
    first.add("a", {}, {"score": 1.0})
    first.finalize()
    with ExportWriter(tmp_path / "e", "json") as again:  # released: the next run may resume
        assert "a" in again


# 9 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("generate.n_samples=ten", "generate.n_samples"), ("generate.n_samples=2.5", "generate.n_samples"),
    ("generate.n_samples=-3", "generate.n_samples"), ("generate.seed=abc", "generate.seed"),
    ("generate.chunk_size=0", "generate.chunk_size"), ("generate.out=", "generate.out"),
    ("generate.steps=-1", "generate.steps"), ("generate.scores=semantic", "generate.scores"),
    ("posterior.structure=lowrnk", "posterior.structure"),
    ("posterior.predictive=glm", "posterior.predictive"),
])
def test_bad_config_values_name_the_key_and_write_nothing(unfitted_digits_config, tmp_path,
                                                          capsys, override, key):
    digits_config = unfitted_digits_config
    assert main(["generate", "-c", str(digits_config), "--set", override]) == 2
    err = capsys.readouterr().err
    assert f"  {key}: " in err and "expected" in err and "Traceback" not in err
    assert not (tmp_path / "export").exists() and not (tmp_path / "posterior").exists()


def test_malformed_yaml_and_a_folder_as_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("generate: {n_samples: [1, 2\n")
    assert main(["generate", "-c", str(bad)]) == 2
    assert "not valid YAML (line" in _err(capsys)
    assert main(["generate", "-c", str(tmp_path)]) == 2
    assert "is not a file" in _err(capsys)


# 10 --------------------------------------------------------------------------------------------
def test_zoo_train_keeps_its_hands_off_the_shipped_weights(capsys):
    from genunc.zoo.shipped import CLASSIFIER_DIR

    before = (CLASSIFIER_DIR / "model.safetensors").stat().st_mtime_ns
    assert main(["zoo", "train", "digits-classifier", "--out", str(CLASSIFIER_DIR)]) == 2
    assert "--overwrite" in _err(capsys)
    assert (CLASSIFIER_DIR / "model.safetensors").stat().st_mtime_ns == before


# 11 --------------------------------------------------------------------------------------------
def test_a_damaged_sdf_sample_is_named_not_merged(qm9_slice, tmp_path):
    from genunc.metrics.molecule import to_rdkit

    writer = ExportWriter(tmp_path / "e", "sdf")
    for i in range(3):
        writer.add(i, to_rdkit(*qm9_slice.molecule(i)), {"variability": float(i)})
    text = (tmp_path / "e" / "samples" / "1.sdf").read_text()
    (tmp_path / "e" / "samples" / "1.sdf").write_text(text.replace("$$$$", ""))
    with pytest.raises(GenuncError, match="1.sdf is damaged"):
        writer.finalize()
    assert not (tmp_path / "e" / "samples.sdf").exists()


@pytest.mark.parametrize("damage", ["empty weights", "half weights", "garbage json",
                                    "missing json"])
def test_a_damaged_posterior_is_a_one_line_error_never_a_silent_refit(digits_config, tmp_path,
                                                                      capsys, damage):
    assert main(["fit", "-c", str(digits_config)]) == 0
    weights = tmp_path / "posterior" / "genunc_posterior.safetensors"
    meta = tmp_path / "posterior" / "genunc_posterior.json"
    if damage == "empty weights":
        weights.write_bytes(b"")
    elif damage == "half weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "garbage json":
        meta.write_text("{not json")
    else:
        meta.unlink()
    damaged = weights.read_bytes() if weights.exists() else None
    assert main(["generate", "-c", str(digits_config)]) == 2
    err = capsys.readouterr().err
    assert ("damaged" in err or "no complete genunc posterior" in err) and "Traceback" not in err
    assert (weights.read_bytes() if weights.exists() else None) == damaged  # not refitted


def test_images_labels_and_tokens_out_of_range(tiny_ddpm_folder, tmp_path, arith_task,
                                               tiny_text_model):
    from genunc.pipelines import ImageUncertaintyPipeline, TextUncertaintyPipeline
    from genunc.zoo.text_model import save_model

    pipe = ImageUncertaintyPipeline.from_pretrained(tiny_ddpm_folder(tmp_path / "m"))
    x = torch.rand(16, 1, 8, 8)
    with pytest.raises(GenuncError, match="look like \\[0, 1\\] images; rescale them with x \\* 2 - 1"):
        pipe.fit_posterior(x, progress=False)
    with pytest.raises(GenuncError, match="must lie in \\[-1, 1\\]"):
        pipe.fit_posterior(x * 4 - 2, progress=False)
    with pytest.raises(GenuncError, match="images must be \\(B, 1, 8, 8\\)"):
        pipe.fit_posterior(torch.rand(16, 1, 16, 16) * 2 - 1, progress=False)
    with pytest.raises(GenuncError, match="class labels must lie in \\[0, 3\\)"):
        pipe.fit_posterior((x * 2 - 1, torch.full((16,), 5)), progress=False)
    save_model(tiny_text_model(arith_task.vocab_size, arith_task.length), arith_task, tmp_path / "t")
    text = TextUncertaintyPipeline.from_pretrained(tmp_path / "t")
    prompts = arith_task.prompts(arith_task.split()["test"][:2])
    prompts[0, 0] = 99
    with pytest.raises(GenuncError, match="prompt token ids must lie in \\[0, 14\\)"):
        text(prompts, scores=("random",))
    with pytest.raises(GenuncError, match="token ids must lie in \\[0, 14\\)"):
        text.fit_posterior([{"x": prompts}], progress=False)


def test_small_cli_mistakes(tmp_path, capsys, qm9_slice):
    export = _labelled_export(tmp_path / "e", [True, False, True])
    assert main(["filter", str(export), "--out", str(tmp_path / "k"), "--threshold", "nan"]) == 2
    assert "threshold must be a number" in _err(capsys)
    with ExportWriter(tmp_path / "empty", "json"):
        pass
    assert main(["evaluate", str(tmp_path / "empty"), "--quality", "ok"]) == 2
    assert "holds no samples" in _err(capsys)
    from genunc.metrics.molecule import to_rdkit

    with ExportWriter(tmp_path / "m", "sdf") as writer:
        writer.add(0, to_rdkit(*qm9_slice.molecule(0)), {"variability": 0.5})
    existing = tmp_path / "kept.sdf"
    existing.write_text("mine")
    assert main(["filter", str(tmp_path / "m" / "samples.sdf"), "--out", str(existing),
                 "--score", "variability", "--k", "1"]) == 2
    assert "exists" in _err(capsys) and existing.read_text() == "mine"


def test_import_genunc_and_help_do_not_load_torch():
    code = ("import sys, genunc, genunc.cli; genunc.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'laplace', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_manifest_records_round_trip_numbers_exactly(tmp_path):
    values = np.random.default_rng(0).random(5)
    with ExportWriter(tmp_path / "e", "json") as writer:
        for i, v in enumerate(values):
            writer.add(i, {}, {"score": float(v)})
    lines = (tmp_path / "e" / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["score"] for line in lines] == values.tolist()


def test_ctrl_c_keeps_what_was_made_and_the_rerun_resumes(digits_config, tmp_path, capsys,
                                                          monkeypatch):
    from genunc.jobs.image import ImageJob

    real = ImageJob.records
    calls = {"n": 0}

    def interrupted_on_the_second_chunk(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ImageJob, "records", interrupted_on_the_second_chunk)
    assert main(["generate", "-c", str(digits_config)]) == 130
    assert "interrupted: 2 samples kept" in _err(capsys)
    monkeypatch.setattr(ImageJob, "records", real)
    assert main(["generate", "-c", str(digits_config)]) == 0
    assert [r["sample_id"] for r in Export(tmp_path / "export").records] == \
        [f"{i:06d}" for i in range(6)]


def test_risk_control_refuses_a_calibration_export_that_shares_samples(digits_config, tmp_path,
                                                                       capsys):
    """Sample i of a run draws from the streams of (seed, i): a calibration export with the same
    seed and settings (another size or folder) holds the very samples it would certify; one
    with another seed shares none."""
    base = ["generate", "-c", str(digits_config), "--set", "generate.n_samples=4"]
    assert main(base) == 0
    for seed, out in ((0, "calib_overlap"), (1, "calib_apart")):
        assert main(base + ["--set", f"generate.seed={seed}", "--set", "generate.n_samples=3",
                            "--set", f"generate.out={tmp_path / out}"]) == 0
    risk = ["--risk-alpha", "0.5", "--label", "random", "--fail-below", "0.5", "--score",
            "semantic"]
    assert main(["filter", str(tmp_path / "export"), "--out", str(tmp_path / "kept"), *risk,
                 "--calibration", str(tmp_path / "calib_overlap")]) == 2
    assert "share their first 3 samples" in _err(capsys)
    assert main(["filter", str(tmp_path / "export"), "--out", str(tmp_path / "kept"), *risk,
                 "--calibration", str(tmp_path / "calib_apart")]) == 0


# damaged posteriors of both kinds, loaded directly --------------------------------------------
def _saved_posterior(kind, directory):
    """A small fitted posterior of `kind` saved in `directory`, and the model it loads onto."""
    from torch import nn

    from genunc.adapters import NoisePredictionAdapter
    from genunc.posterior import HeadPosterior, Tail, TailData, TailPosterior
    from genunc.zoo.toy import ToyImageDenoiser

    torch.manual_seed(0)
    if kind == "head":
        model = ToyImageDenoiser(channels=1, width=8)
        adapter = NoisePredictionAdapter(model, "conv_out")
        HeadPosterior.fit(adapter, [torch.randn(8, 1, 6, 6)], progress=False).save(directory)
        return model
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    tail = Tail(model, ["1"])
    x = torch.randn(20, 3, dtype=torch.float64)
    with torch.no_grad(), tail.capture() as rec:
        y = model(x)
        inputs = tail.inputs_of(rec, len(x))
    data = TailData()
    data.add(inputs, y + 0.1 * torch.randn_like(y))
    TailPosterior.fit_data(tail, data).save(directory)
    return model


def _damage(directory, damage):
    from safetensors.torch import load_file, save_file

    meta_path = next(directory.glob("*.json"))
    weights = next(directory.glob("*.safetensors"))
    meta = json.loads(meta_path.read_text())
    if damage == "empty weights":
        weights.write_bytes(b"")
        return weights
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-7])
        return weights
    if damage == "torn json":
        meta_path.write_text(meta_path.read_text()[:40])
        return meta_path
    if damage == "json of another shape":
        meta_path.write_text("[1, 2, 3]\n")
        return meta_path
    if damage == "a key gone from the json":
        del meta["structure"]
        meta_path.write_text(json.dumps(meta))
        return meta_path
    if damage == "newer format":
        meta["format_version"] = 99
        meta_path.write_text(json.dumps(meta))
        return meta_path
    tensors = load_file(str(weights))
    if damage == "a tensor gone":
        del tensors["H"]
    else:  # "a tensor of the wrong size"
        tensors["H"] = tensors["H"][:-1]
    save_file(tensors, str(weights))
    return meta_path  # the files disagree: the description is what names the posterior


@pytest.mark.parametrize("kind", ["head", "tail"])
@pytest.mark.parametrize("damage", ["empty weights", "truncated weights", "torn json",
                                    "json of another shape", "a key gone from the json",
                                    "newer format", "a tensor gone", "a tensor of the wrong size"])
def test_every_damaged_posterior_file_is_a_one_line_error_naming_it(tmp_path, kind, damage):
    from genunc.posterior import Posterior

    model = _saved_posterior(kind, tmp_path)
    assert Posterior.load(tmp_path, model) is not None  # the undamaged control loads
    named = _damage(tmp_path, damage)
    with pytest.raises(GenuncError) as info:
        Posterior.load(tmp_path, model)
    message = str(info.value)
    assert "\n" not in message and str(named) in message and "refit" in message


# a full disk or a read-only folder mid-export -------------------------------------------------
@pytest.mark.parametrize("code", ["ENOSPC", "EROFS"])
@pytest.mark.parametrize("where", ["samples", "manifest.jsonl"])
def test_a_disk_that_fills_or_turns_read_only_mid_export(digits_config, tmp_path, capsys,
                                                         monkeypatch, code, where):
    """The write of the fourth sample's file (or of its manifest line) fails as a full disk or
    a read-only remount would: one line, the three committed samples stay readable and exactly
    what a clean run makes, and the rerun completes the export without duplicates."""
    import errno

    assert main(["generate", "-c", str(digits_config), "--set",
                 f"generate.out={tmp_path / 'clean'}"]) == 0
    capsys.readouterr()
    real_fsync, seen = os.fsync, {"n": 0}

    def failing_fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if "/export/" in target and where in target:
            seen["n"] += 1
            if seen["n"] == 4:
                raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), target)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    assert main(["generate", "-c", str(digits_config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and os.strerror(getattr(errno, code)) in _last_line(err)
    monkeypatch.setattr(os, "fsync", real_fsync)
    clean = {r["sample_id"]: r for r in Export(tmp_path / "clean").records}
    partial = Export(tmp_path / "export").records
    assert 3 <= len(partial) <= 4  # a manifest line whose fsync failed may already be there
    for record in partial:
        assert {k: v for k, v in record.items()} == clean[record["sample_id"]]
        assert (tmp_path / "export" / record["file"]).read_bytes() == \
            (tmp_path / "clean" / record["file"]).read_bytes()
    assert main(["generate", "-c", str(digits_config)]) == 0
    assert Export(tmp_path / "export").records == list(clean.values())


def test_a_reader_never_takes_an_export_still_being_written_for_a_finished_one(tmp_path):
    writer = ExportWriter(tmp_path / "e", "json")
    writer.add(0, {}, {"score": 0.0})
    with pytest.raises(GenuncError, match="is still being written"):
        Export(tmp_path / "e")
    assert len(Export(tmp_path / "e", partial=True)) == 1  # asked for: what is committed so far
    writer.finalize()
    assert len(Export(tmp_path / "e")) == 1


# damaged model folders ------------------------------------------------------------------------
def _model_folder(modality, path, request):
    if modality == "image":
        return request.getfixturevalue("tiny_ddpm_folder")(path)
    if modality == "molecule":
        return request.getfixturevalue("tiny_molecule_folder")(path)
    if modality == "vector":
        from diffusers import DDPMScheduler

        from genunc.pipelines import VectorUncertaintyPipeline
        from genunc.zoo.toy import ToyVectorDenoiser

        return VectorUncertaintyPipeline(ToyVectorDenoiser(3, 4, width=64),
                                         DDPMScheduler(num_train_timesteps=5)).save_pretrained(path)
    from genunc.zoo.text_model import save_model

    task = request.getfixturevalue("arith_task")
    save_model(request.getfixturevalue("tiny_text_model")(task.vocab_size, task.length), task,
               path)
    return path


@pytest.mark.parametrize("modality", ["image", "molecule", "text", "vector"])
@pytest.mark.parametrize("damage", ["truncated weights", "empty weights", "torn config"])
def test_a_damaged_model_folder_is_a_one_line_error_naming_the_folder(tmp_path, request,
                                                                      modality, damage):
    from genunc import pipelines

    folder = _model_folder(modality, tmp_path / "m", request)
    cls = getattr(pipelines, f"{modality.capitalize()}UncertaintyPipeline")
    assert cls.from_pretrained(folder).model is not None  # the undamaged control loads
    files = [p for p in folder.rglob("*") if p.is_file()]
    if damage == "torn config":
        target = next(p for p in files if p.name == "config.json")
        target.write_text(target.read_text()[:25])
    else:
        target = max(files, key=lambda p: p.stat().st_size)
        target.write_bytes(b"" if damage == "empty weights" else target.read_bytes()[:-50])
    with pytest.raises(GenuncError) as info:
        cls.from_pretrained(folder)
    message = str(info.value)
    assert "\n" not in message and str(folder) in message and "damaged" in message


# fit data that does not fit the model: dtype, shape, non-finite values -------------------------
def test_fit_data_of_the_wrong_kind_is_named(tiny_ddpm_folder, tiny_molecule_folder, tmp_path,
                                             arith_task, tiny_text_model):
    from genunc.pipelines import (
        ImageUncertaintyPipeline,
        MoleculeUncertaintyPipeline,
        TextUncertaintyPipeline,
    )
    from genunc.zoo.text_model import save_model

    image = ImageUncertaintyPipeline.from_pretrained(tiny_ddpm_folder(tmp_path / "i"))
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    with pytest.raises(GenuncError, match="images must lie in \\[-1, 1\\]"):
        image.fit_posterior((x * 127.5 + 127.5).to(torch.uint8), progress=False)
    x[3, 0, 2, 2] = float("nan")
    with pytest.raises(GenuncError, match="images hold NaN or infinite values"):
        image.fit_posterior(x, progress=False)
    with pytest.raises(GenuncError, match="class labels must be integers"):
        image.fit_posterior((x.nan_to_num(), torch.full((16,), 0.5)), progress=False)

    molecule = MoleculeUncertaintyPipeline.from_pretrained(tiny_molecule_folder(tmp_path / "m"))
    width = molecule.adapter.layout.width
    good = {"x": torch.randn(4, 5, width), "node_mask": torch.ones(4, 5)}
    with pytest.raises(GenuncError, match=f"x must be \\(B, N, {width}\\)"):
        molecule.fit_posterior([{**good, "x": torch.randn(4, 5, width + 1)}], progress=False)
    bad = good["x"].clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(GenuncError, match="molecules hold NaN or infinite values"):
        molecule.fit_posterior([{**good, "x": bad}], progress=False)

    save_model(tiny_text_model(arith_task.vocab_size, arith_task.length), arith_task, tmp_path / "t")
    text = TextUncertaintyPipeline.from_pretrained(tmp_path / "t")
    tokens = torch.randint(0, arith_task.vocab_size, (4, arith_task.length))
    with pytest.raises(GenuncError, match="token ids must be integers, got torch.float32"):
        text.fit_posterior([{"x": tokens.float() + 0.5}], progress=False)


@pytest.mark.parametrize("kind", ["head", "tail"])
def test_folders_of_the_previous_formats_still_load(tmp_path, kind):
    """Before one format: head posteriors had no ``kind`` (format 1) and block posteriors their
    own file names; both load, to the same draws, and a refit replaces the old files."""
    from genunc.posterior import Posterior
    from genunc.posterior.io import LEGACY_TAIL_FILES, META_FILE, TENSORS_FILE

    model = _saved_posterior(kind, tmp_path / "new")
    new = Posterior.load(tmp_path / "new", model)
    meta = json.loads((tmp_path / "new" / META_FILE).read_text())
    meta["format_version"] = 1
    old = tmp_path / "old"
    old.mkdir()
    if kind == "head":
        del meta["kind"]
        names = (META_FILE, TENSORS_FILE)
    else:
        names = LEGACY_TAIL_FILES
    (old / names[0]).write_text(json.dumps(meta))
    (old / names[1]).write_bytes((tmp_path / "new" / TENSORS_FILE).read_bytes())
    loaded = Posterior.load(old, model)
    assert type(loaded) is type(new) and loaded.digest() == new.digest()
    a, b = loaded.sample(3, seed=0), new.sample(3, seed=0)
    for key, value in b.params.items():
        assert torch.equal(a.params[key], value)
    new.save(old)
    assert sorted(p.name for p in old.iterdir()) == [META_FILE, TENSORS_FILE]


def test_a_posterior_of_the_other_kind_is_named(tmp_path):
    from genunc.posterior import HeadPosterior, TailPosterior

    model = _saved_posterior("tail", tmp_path)
    with pytest.raises(GenuncError, match="holds a tail posterior, not a head posterior"):
        HeadPosterior.load(tmp_path, model)
    assert TailPosterior.load(tmp_path, model) is not None
