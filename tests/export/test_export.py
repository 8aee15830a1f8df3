"""Exports: round trip per format, crash + resume loses and duplicates nothing, filtering."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from rdkit import Chem
from rdkit.Chem import AllChem

from genunc.errors import GenuncError
from genunc.export import Export, ExportWriter, filter_export


def _records(n):
    rng = np.random.default_rng(0)
    return [{"seed": 7, "condition": i % 3, "semantic": float(rng.normal()),
             "variability": float(rng.random()), "quality_ok": bool(i % 4)} for i in range(n)]


def test_png_round_trip(tmp_path):
    images = torch.rand(5, 1, 6, 6) * 2 - 1
    meta = {"model": "tiny", "posterior_fingerprint": {"weights_sha256": "abc"}, "config": {"M": 5}}
    with ExportWriter(tmp_path / "exp", "png", metadata=meta) as writer:
        for i, (img, rec) in enumerate(zip(images, _records(5))):
            writer.add(f"s{i:03d}", img, rec)
    export = Export(tmp_path / "exp")
    assert len(export) == 5 and export.metadata["config"] == {"M": 5}
    assert export.metadata["genunc_version"]
    pixels = np.asarray(Image.open(export.path(export.records[2])))
    expected = np.clip((images[2, 0].numpy() + 1) * 127.5, 0, 255).round()
    np.testing.assert_array_equal(pixels, expected)
    np.testing.assert_allclose(export.column("semantic"), [r["semantic"] for r in _records(5)])
    header = (tmp_path / "exp" / "manifest.csv").read_text().splitlines()[0]
    assert "semantic" in header and "sample_id" in header


def test_sdf_round_trip_keeps_scores(tmp_path):
    mols = []
    for smiles in ["C", "CCO", "c1ccccc1"]:
        mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
        AllChem.EmbedMolecule(mol, randomSeed=0)
        mols.append(mol)
    with ExportWriter(tmp_path / "mols", "sdf") as writer:
        for i, (mol, rec) in enumerate(zip(mols, _records(3))):
            writer.add(i, mol, rec)
    supplier = Chem.SDMolSupplier(str(tmp_path / "mols" / "samples.sdf"), removeHs=False)
    read = list(supplier)
    assert [Chem.MolToSmiles(Chem.RemoveHs(m)) for m in read] == ["C", "CCO", "c1ccccc1"]
    for mol, rec in zip(read, _records(3)):
        assert mol.GetDoubleProp("semantic") == pytest.approx(rec["semantic"])
        assert mol.GetIntProp("quality_ok") == int(rec["quality_ok"])
    np.testing.assert_allclose(read[1].GetConformer().GetPositions(),
                               mols[1].GetConformer().GetPositions(), atol=1e-4)


def test_jsonl_round_trip(tmp_path):
    texts = ["12+7=19", "3*4=12", "9-5=3"]
    with ExportWriter(tmp_path / "txt", "json") as writer:
        for i, (text, rec) in enumerate(zip(texts, _records(3))):
            writer.add(f"p{i}", {"prompt": text.split("=")[0], "completion": text}, rec)
    lines = [json.loads(line) for line in (tmp_path / "txt" / "samples.jsonl").read_text().splitlines()]
    assert [line["sample"]["completion"] for line in lines] == texts
    assert lines[0]["semantic"] == pytest.approx(_records(3)[0]["semantic"])


CRASHER = textwrap.dedent("""
    import os, sys, json
    import numpy as np
    from genunc.export import ExportWriter
    from genunc.export import store
    directory, crash_at, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    real_write = store.atomic_write
    count = {"n": 0}
    def dying_write(path, data):
        count["n"] += 1
        if count["n"] == crash_at and mode == "mid-file":
            tmp = path.parent / ("." + path.name + ".partial.tmp")
            tmp.write_bytes(data[: len(data) // 2])
            os._exit(3)
        real_write(path, data)
    store.atomic_write = dying_write
    writer = ExportWriter(directory, "json", metadata={"run": "crash-test"})
    for i in range(20):
        if mode == "mid-manifest" and i == crash_at:
            writer._manifest.write('{"sample_id": "s%03d", "torn": ' % i)
            writer._manifest.flush()
            os._exit(3)
        writer.add(f"s{i:03d}", {"value": i}, {"score": float(i)})
    writer.finalize()
""")


@pytest.mark.parametrize("mode", ["mid-file", "mid-manifest"])
def test_resume_after_a_kill_loses_nothing_and_duplicates_nothing(tmp_path, mode):
    script = tmp_path / "crash.py"
    script.write_text(CRASHER)
    directory = tmp_path / "exp"
    first = subprocess.run([sys.executable, str(script), str(directory), "8", mode])
    assert first.returncode == 3  # killed mid-run
    assert not (directory / "manifest.csv").exists()
    survivors = Export(directory)
    assert 5 <= len(survivors) <= 8  # torn line or half-written file were not committed
    second = subprocess.run([sys.executable, str(script), str(directory), "999", mode])
    assert second.returncode == 0
    export = Export(directory)
    ids = [r["sample_id"] for r in export.records]
    assert ids == [f"s{i:03d}" for i in range(20)]
    assert len((directory / "manifest.jsonl").read_text().splitlines()) == 20
    for record in export.records:
        assert json.loads(export.path(record).read_text())["sample"]["value"] == int(record["score"])


def test_filter_export_writes_a_new_export_and_leaves_the_source(tmp_path):
    with ExportWriter(tmp_path / "src", "json") as writer:
        for i, rec in enumerate(_records(12)):
            writer.add(f"s{i:02d}", {"i": i}, rec)
    before = sorted(p.name for p in (tmp_path / "src").rglob("*"))
    src_manifest = (tmp_path / "src" / "manifest.jsonl").read_bytes()
    filter_export(tmp_path / "src", tmp_path / "top", "semantic", fraction=0.5)
    filter_export(tmp_path / "src", tmp_path / "best", "semantic", group_by="condition", link="symlink")
    top, best = Export(tmp_path / "top"), Export(tmp_path / "best")
    scores = np.array([r["semantic"] for r in _records(12)])
    assert sorted(top.column("semantic")) == sorted(np.sort(scores)[:6])
    assert sorted(best.column("condition").tolist()) == [0, 1, 2]
    assert (tmp_path / "best" / best.records[0]["file"]).is_symlink()
    assert top.metadata["filter"]["fraction"] == 0.5 and top.metadata["n_source"] == 12
    assert sorted(p.name for p in (tmp_path / "src").rglob("*")) == before
    assert (tmp_path / "src" / "manifest.jsonl").read_bytes() == src_manifest
    with pytest.raises(GenuncError, match="exactly one"):
        filter_export(tmp_path / "src", tmp_path / "x", "semantic", fraction=0.5, k=3)
    with pytest.raises(GenuncError, match="already holds"):
        filter_export(tmp_path / "src", tmp_path / "top", "semantic", k=3)
    with pytest.raises(GenuncError, match="column 'nope' missing"):
        filter_export(tmp_path / "src", tmp_path / "y", "nope", k=3)


def test_writer_refuses_mixed_formats(tmp_path):
    ExportWriter(tmp_path / "e", "json").finalize()
    with pytest.raises(GenuncError, match="holds a json export"):
        ExportWriter(tmp_path / "e", "png")
    with pytest.raises(GenuncError, match="unknown export format"):
        ExportWriter(tmp_path / "f", "gif")


def test_parquet_manifest_when_pyarrow_is_installed(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    with ExportWriter(tmp_path / "e", "json") as writer:
        for i, rec in enumerate(_records(4)):
            writer.add(i, {}, rec)
    table = pq.read_table(tmp_path / "e" / "manifest.parquet").to_pylist()
    assert [row["semantic"] for row in table] == [r["semantic"] for r in _records(4)]
