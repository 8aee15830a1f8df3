"""Scored molecules in SDF: export round trip, SDF filtering, interrupted exports, the CLI path."""

import numpy as np
import pytest
import yaml

from genunc.cli import main
from genunc.errors import GenuncError
from genunc.export import Export, ExportWriter, filter_export
from genunc.export.sdf import filter_sdf, read_sdf_scores
from genunc.metrics.molecule import to_rdkit


def write_export(directory, qm9_slice, n, finalize=True):
    writer = ExportWriter(directory, "sdf", metadata={"modality": "molecule"})
    for i in range(n):
        pos, types = qm9_slice.molecule(i)
        writer.add(f"{i:06d}", to_rdkit(pos, types),
                   {"variability": 0.1 * ((7 * i) % n), "valid": i % 3 != 0, "smiles": "C" * (i + 1)})
    if finalize:
        writer.finalize()
    else:
        writer.close()
    return directory


def test_sdf_round_trip_keeps_scores_and_coordinates(qm9_slice, tmp_path):
    from rdkit import Chem

    export = Export(write_export(tmp_path / "export", qm9_slice, 6))
    supplier = Chem.SDMolSupplier(str(export.directory / "samples.sdf"), sanitize=False,
                                  removeHs=False)
    mols = list(supplier)
    assert len(mols) == 6
    for i, mol in enumerate(mols):
        pos, types = qm9_slice.molecule(i)
        assert mol.GetProp("sample_id") == f"{i:06d}"
        assert mol.GetDoubleProp("variability") == pytest.approx(0.1 * ((7 * i) % 6))
        assert mol.GetProp("valid") == str(int(i % 3 != 0))
        np.testing.assert_allclose(mol.GetConformer().GetPositions(), pos, atol=1e-4)
    records, scores = read_sdf_scores(export.directory / "samples.sdf", "variability")
    np.testing.assert_allclose(scores, export.column("variability").astype(float))


def test_filter_sdf_keeps_least_uncertain_in_order(qm9_slice, tmp_path):
    src = write_export(tmp_path / "export", qm9_slice, 10) / "samples.sdf"
    info = filter_sdf(src, tmp_path / "kept.sdf", "variability", fraction=0.3)
    assert info == {"kept": 3, "total": 10, "score": "variability", "fraction": 0.3}
    _, kept = read_sdf_scores(tmp_path / "kept.sdf", "variability")
    _, all_scores = read_sdf_scores(src, "variability")
    np.testing.assert_allclose(np.sort(kept), np.sort(all_scores)[:3])
    assert filter_sdf(src, tmp_path / "all.sdf", "variability", k=99)["kept"] == 10
    assert filter_sdf(src, tmp_path / "none.sdf", "variability", threshold=-1)["kept"] == 0
    with pytest.raises(GenuncError, match="no property 'semantic'"):
        filter_sdf(src, tmp_path / "x.sdf", "semantic", k=1)
    with pytest.raises(GenuncError, match="exactly one"):
        filter_sdf(src, tmp_path / "x.sdf", "variability", k=1, fraction=0.5)
    with pytest.raises(GenuncError, match="new file"):
        filter_sdf(src, src, "variability", k=1)
    truncated = tmp_path / "truncated.sdf"
    truncated.write_text(src.read_text()[:-200])
    with pytest.raises(GenuncError, match="truncated"):
        filter_sdf(truncated, tmp_path / "x.sdf", "variability", k=1)


def test_filter_on_interrupted_export_loses_nothing(qm9_slice, tmp_path):
    directory = write_export(tmp_path / "export", qm9_slice, 7, finalize=False)
    with (directory / "manifest.jsonl").open("a") as f:
        f.write('{"sample_id": "000007", "variab')  # the crash tore the last line
    out = filter_export(directory, tmp_path / "kept", "variability", fraction=1.0)
    kept = Export(out)
    assert sorted(r["sample_id"] for r in kept.records) == [f"{i:06d}" for i in range(7)]
    assert all(kept.path(r).exists() for r in kept.records)
    _, scores = read_sdf_scores(out / "samples.sdf", "variability")
    assert len(scores) == 7


def test_molecule_cli_fit_generate_filter(tiny_molecule_folder, tmp_path, capsys):
    model_dir = tiny_molecule_folder(tmp_path / "model")
    config = {
        "modality": "molecule", "model": str(model_dir), "features": "descriptors",
        "quality": "edm_metrics",
        "posterior": {"data": str(tmp_path / "molecules.npz"), "max_samples": 30, "repeats": 1,
                      "batch_size": 10},
        "generate": {"n_samples": 5, "num_draws": 2, "steps": 3, "chunk_size": 3,
                     "scores": ["variability", "denoising_loss", "random"],
                     "out": str(tmp_path / "export")},
    }
    path = tmp_path / "mol.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "-c", str(path)]) == 0
    assert main(["generate", "-c", str(path)]) == 0
    export = Export(tmp_path / "export")
    assert len(export) == 5 and export.format == "sdf"
    assert export.metadata["posterior_fingerprint"]["head_name"] == "head"
    for column in ("variability", "variability_pos", "variability_type", "denoising_loss",
                   "molecule_stable", "atom_stable_fraction", "valid", "n_atoms"):
        assert all(column in r for r in export.records)
    assert main(["filter", str(tmp_path / "export" / "samples.sdf"), "--out",
                 str(tmp_path / "kept.sdf"), "--score", "variability", "--k", "2"]) == 0
    assert "kept 2 of 5 molecules" in capsys.readouterr().out
    assert main(["filter", str(tmp_path / "export"), "--out", str(tmp_path / "kept"),
                 "--score", "denoising_loss", "--fraction", "0.6"]) == 0
    assert len(Export(tmp_path / "kept")) == 3


@pytest.mark.slow
def test_filter_molecules_example_runs_on_a_tiny_model(tiny_molecule_folder, tmp_path, repo,
                                                       python_run):
    model_dir = tiny_molecule_folder(tmp_path / "model")
    example = repo / "examples" / "filter_molecules.py"
    run = python_run(
        [example, "--model", model_dir, "--posterior-data", tmp_path / "molecules.npz",
         "--n-fit", "20", "--n", "6", "--draws", "2", "--steps", "3", "--keep", "0.5",
         "--out", tmp_path / "out"])
    assert run.returncode == 0, run.stderr
    assert "(3 of 6 records)" in run.stdout and "kept     3 molecules" in run.stdout
    _, kept = read_sdf_scores(tmp_path / "out" / "kept.sdf", "variability")
    _, everything = read_sdf_scores(tmp_path / "out" / "export" / "samples.sdf", "variability")
    np.testing.assert_allclose(np.sort(kept), np.sort(everything)[:3])
