"""Several processes, one export: shards merged into what a single process writes."""

import subprocess
import sys

import numpy as np
import pytest
import yaml

from genunc.cli import main
from genunc.errors import GenuncError
from genunc.export import Export
from genunc.jobs import shards
from genunc.jobs.shards import ProcessShard, merge_shards


def test_blocks_follow_accelerates_rule_and_tile_the_indices():
    blocks = [ProcessShard(r, 3).indices(10) for r in range(3)]
    assert blocks == [range(0, 4), range(4, 7), range(7, 10)]
    assert [ProcessShard(r, 4).indices(2) for r in range(4)] == [range(0, 1), range(1, 2),
                                                                 range(2, 2), range(2, 2)]


def test_the_launch_is_read_from_the_environment():
    assert ProcessShard.from_environment({}) == ProcessShard(0, 1)
    assert ProcessShard.from_environment({"RANK": "1", "WORLD_SIZE": "2"}) == ProcessShard(1, 2)
    with pytest.raises(GenuncError, match="not a process"):
        ProcessShard.from_environment({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(GenuncError, match="whole numbers"):
        ProcessShard.from_environment({"RANK": "a", "WORLD_SIZE": "2"})


def _as_rank(monkeypatch, rank, world):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


def _same_export(merged: Export, single: Export, columns):
    from genunc.jobs.base import shared_samples

    assert shared_samples(merged.metadata, single.metadata) == len(single)  # same run, other folder
    assert [r["sample_id"] for r in merged.records] == [r["sample_id"] for r in single.records]
    for name in columns:
        # a chunk's batch shape differs between the runs, so BLAS may round differently
        np.testing.assert_allclose(merged.column(name), single.column(name), rtol=1e-4, atol=1e-8)


def _image_config(tiny_image_config, fitted=True):
    return tiny_image_config(n_samples=7, chunk_size=2, fitted=fitted)


def _molecule_config(tiny_molecule_folder, tmp_path):
    model = tiny_molecule_folder(tmp_path / "model")
    config = {"modality": "molecule", "model": str(model), "features": "descriptors",
              "posterior": {"data": str(tmp_path / "molecules.npz"), "max_samples": 20,
                            "repeats": 1, "batch_size": 10},
              "generate": {"n_samples": 5, "num_draws": 2, "steps": 3, "chunk_size": 2,
                           "scores": ["variability", "semantic", "denoising_loss", "random"],
                           "out": str(tmp_path / "export")}}
    path = tmp_path / "mol.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("modality", ["image", "molecule"])
def test_two_processes_write_the_export_one_process_writes(modality, request, tmp_path, monkeypatch):
    if modality == "image":
        path = _image_config(request.getfixturevalue("tiny_image_config"))
        columns = ("semantic", "variability", "random")
    else:
        path = _molecule_config(request.getfixturevalue("tiny_molecule_folder"), tmp_path)
        columns = ("semantic", "variability", "denoising_loss", "random")
        assert main(["fit", "-c", str(path)]) == 0
    single = tmp_path / "single"
    assert main(["generate", "-c", str(path), "--set", f"generate.out={single}"]) == 0
    out = tmp_path / "export"
    for rank in (1, 0):  # rank 1 first: the last to finish merges, whichever it is
        _as_rank(monkeypatch, rank, 2)
        assert main(["generate", "-c", str(path)]) == 0
    merged = Export(out)
    assert merged.metadata["merged_from"] == ["rank-00000-of-00002", "rank-00001-of-00002"]
    assert len(Export(shards.shards_root(out) / "rank-00000-of-00002")) == (4 if modality == "image" else 3)
    _same_export(merged, Export(single), columns)
    assert all(merged.path(r).exists() for r in merged.records)
    # the merged export is an export like any other
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["filter", str(out), "--out", str(tmp_path / "kept"), "--score", "random",
                 "--k", "2"]) == 0


@pytest.fixture
def sampler_dir(tmp_path, tiny_text_model):
    from genunc.tasks import ArithmeticTask
    from genunc.zoo.text_model import save_model

    task = ArithmeticTask("*", 2)
    directory = tmp_path / "arith"
    save_model(tiny_text_model(task.vocab_size, task.length), task, directory)
    return directory


def _text_config(sampler_dir, tmp_path):
    config = {
        "modality": "text", "model": str(sampler_dir), "features": "answer", "quality": "checker",
        "posterior": {"dir": str(tmp_path / "posterior"), "data": "zoo:arith_train",
                      "max_samples": 60, "batch_size": 30, "repeats": 1},
        "generate": {"n_samples": 6, "candidates": 2, "num_draws": 2, "steps": None,
                     "temperature": 1.0, "chunk_size": 2, "sampler": "low_confidence",
                     "scores": ["mutual_information", "semantic", "random"],
                     "out": str(tmp_path / "export")}}
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_text_run_in_two_processes_equals_one(sampler_dir, tmp_path, monkeypatch):
    path = _text_config(sampler_dir, tmp_path)
    assert main(["fit", "-c", str(path)]) == 0
    assert main(["generate", "-c", str(path), "--set", f"generate.out={tmp_path / 'single'}"]) == 0
    for rank in (0, 1):
        _as_rank(monkeypatch, rank, 2)
        assert main(["generate", "-c", str(path)]) == 0
    merged, single = Export(tmp_path / "export"), Export(tmp_path / "single")
    _same_export(merged, single, ("mutual_information", "semantic", "random"))
    assert [r["completion"] for r in merged.records] == [r["completion"] for r in single.records]


def test_an_interrupted_rank_resumes_and_a_missing_shard_is_named(tiny_image_config, tmp_path,
                                                                   monkeypatch, capsys):
    from genunc.jobs.image import ImageJob

    path = _image_config(tiny_image_config)
    out = tmp_path / "export"
    assert main(["generate", "-c", str(path), "--set", f"generate.out={tmp_path / 'single'}"]) == 0

    _as_rank(monkeypatch, 0, 2)
    assert main(["generate", "-c", str(path)]) == 0
    assert not (out / "run.json").exists()  # rank 1 has not run: nothing merged
    assert main(["merge", str(out)]) == 2
    assert "rank-00001-of-00002 were never started" in capsys.readouterr().err

    real = ImageJob.generate_chunk
    calls = []

    def dies_after_one_chunk(self, pipe, config, ids):
        calls.append(ids)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(self, pipe, config, ids)

    monkeypatch.setattr(ImageJob, "generate_chunk", dies_after_one_chunk)
    _as_rank(monkeypatch, 1, 2)
    assert main(["generate", "-c", str(path)]) == 130  # killed after its first chunk
    assert main(["merge", str(out)]) == 2
    assert "holds 2 of its 3 samples (missing 6)" in capsys.readouterr().err

    monkeypatch.setattr(ImageJob, "generate_chunk", real)
    assert main(["generate", "-c", str(path)]) == 0  # resumes rank 1, then merges
    merged = Export(out)
    _same_export(merged, Export(tmp_path / "single"), ("semantic", "variability", "random"))
    assert main(["merge", str(out)]) == 0  # merging again leaves the merge as it is
    assert len(Export(out)) == 7


def test_other_ranks_wait_for_rank_zeros_posterior(tiny_image_config, monkeypatch):
    path = _image_config(tiny_image_config, fitted=False)
    monkeypatch.setattr("genunc.jobs.base.POSTERIOR_WAIT_S", 0.5)
    _as_rank(monkeypatch, 1, 2)
    with pytest.raises(GenuncError, match="waited 0 s for rank 0's posterior fit"):
        main(["--debug", "generate", "-c", str(path)])


def test_other_ranks_never_read_a_posterior_rank_zero_is_still_writing(tiny_image_config, tmp_path,
                                                                      monkeypatch):
    """Rank 1 starting while rank 0 has written one of the posterior's two files waits for the
    other instead of failing on an incomplete folder; a folder of the other kind is refused at
    once, not awaited."""
    import threading

    from genunc.config import load_config
    from genunc.jobs.base import posterior_dir
    from genunc.posterior.io import TENSORS_FILE

    path = _image_config(tiny_image_config)
    folder = posterior_dir(load_config(path))
    tensors = folder / TENSORS_FILE
    held = tensors.read_bytes()
    tensors.unlink()  # rank 0 mid-save: the metadata is there, the tensors not yet
    timer = threading.Timer(1.5, tensors.write_bytes, args=(held,))
    timer.start()
    _as_rank(monkeypatch, 1, 2)
    try:
        assert main(["generate", "-c", str(path)]) == 0  # rank 1's shard, after the wait
    finally:
        timer.join()
    assert main(["generate", "-c", str(path), "--set", "posterior.tail=1", "--set",
                 "generate.variance=monte_carlo"]) == 2


def test_merge_refuses_shards_of_different_runs(tiny_image_config, tmp_path, monkeypatch, capsys):
    path = _image_config(tiny_image_config)
    _as_rank(monkeypatch, 0, 2)
    assert main(["generate", "-c", str(path)]) == 0
    _as_rank(monkeypatch, 1, 2)
    assert main(["generate", "-c", str(path), "--set", "generate.seed=5"]) == 2  # merge refused
    assert "they differ in generate.seed" in capsys.readouterr().err
    assert not (tmp_path / "export" / "run.json").exists()
    with pytest.raises(GenuncError, match="made by another run.*generate.seed"):
        merge_shards(tmp_path / "export")


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # --multi_gpu: accelerate's multi-process launcher, which runs on CPUs where there is no GPU
    # (with --cpu, or without --multi_gpu on a CPU machine, it starts one process only)
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "29517"],
}


@pytest.mark.slow
@pytest.mark.parametrize("modality, launcher", [("molecule", "torchrun"), ("text", "torchrun"),
                                                ("image", "accelerate")])
def test_launch(modality, launcher, request, tmp_path):
    """The real launchers the CLI docs (docs/cli.md) name: two concurrent processes, environment set by the
    launcher, rank 1 waiting for rank 0's posterior fit; the merged export equals a 1-process
    run's.  Each launcher once, and each modality once (every modality's sharding is also
    tested in-process, above, with the ranks set by hand)."""
    if modality == "image":
        path = _image_config(request.getfixturevalue("tiny_image_config"))
        columns = ("semantic", "variability", "random")
    elif modality == "molecule":
        path = _molecule_config(request.getfixturevalue("tiny_molecule_folder"), tmp_path)
        columns = ("semantic", "variability", "denoising_loss", "random")
    else:
        path = _text_config(request.getfixturevalue("sampler_dir"), tmp_path)
        columns = ("mutual_information", "semantic", "random")
    run = subprocess.run(
        [sys.executable, *LAUNCHERS[launcher], "-m", "genunc", "generate", "-c", str(path)],
        capture_output=True, text=True, timeout=300, env={**_quiet_env(), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    shards = sorted(p.name for p in (tmp_path / "export.shards").glob("rank-*"))
    assert shards == ["rank-00000-of-00002", "rank-00001-of-00002"]  # two processes did run
    assert main(["generate", "-c", str(path), "--set", f"generate.out={tmp_path / 'single'}"]) == 0
    _same_export(Export(tmp_path / "export"), Export(tmp_path / "single"), columns)


def _quiet_env():
    import os

    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}


def test_cuda_means_each_process_its_own_gpu():
    from genunc.jobs.shards import process_device

    assert process_device("cuda", {"LOCAL_RANK": "3"}) == "cuda:3"
    assert process_device("cuda", {}) == "cuda"
    assert process_device("cuda:1", {"LOCAL_RANK": "3"}) == "cuda:1"
    assert process_device("cpu", {"LOCAL_RANK": "3"}) == "cpu"
