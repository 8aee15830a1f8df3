"""benchmarks/paper_protocol.py end to end on tiny random EDM and GeoLDM folders (seconds): the
output's structure, one JSON for the printed table, and intervals around their estimates."""

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from molecule_folders import edm_folder, geoldm_folder  # noqa: E402  (the tiny EDM / GeoLDM folders)


def _intervals(node, path=""):
    """Every ``[estimate, low, high]`` triple in the results, with where it is."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _intervals(value, f"{path}/{key}")
    elif isinstance(node, list) and len(node) == 3 and all(
            v is None or isinstance(v, float) for v in node):
        yield path, node


@pytest.fixture(scope="module")
def run(tmp_path_factory, qm9_slice):
    import paper_protocol

    from genunc.data.qm9 import save_cache

    tmp = tmp_path_factory.mktemp("paper_protocol")
    save_cache(qm9_slice.subset(range(40)), tmp / "molecules.npz")
    folder = edm_folder(tmp / "edm")
    out = tmp / "results.json"
    argv = ["--model", str(folder), "--data", str(tmp / "molecules.npz"), "--n", "24",
            "--n-val", "12", "--steps", "4", "--n-fit", "16", "--n-real", "20", "--boot", "50",
            "--min-bin", "3", "--semantic-n", "6", "--draws", "2", "--nll-levels", "2",
            "--work", str(tmp / "work"), "--out", str(out)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert paper_protocol.main(argv) == 0
    return paper_protocol, out, printed.getvalue()


def test_protocol_runs_on_a_tiny_edm_folder(run):
    module, out, printed = run
    results = json.loads(out.read_text())
    assert set(results) >= {"protocol", "paper", "validation_choice", "quality", "correlations",
                            "selection", "semantic"}
    p = results["protocol"]
    assert p["n"] == 24 and p["test_seed"] == module.TEST_SEED and p["val_seed"] == module.VAL_SEED
    assert "nll" in p["likelihood_baseline"] and "denoising_loss" in p["likelihood_baseline"]
    scores = list(results["correlations"])
    assert module.PAPER_ROW in scores and "random" in scores and len(scores) == 7
    # an EDM folder's likelihood baseline is its own bound, with the proxy beside it
    assert "nll (likelihood baseline)" in scores and "denoising_loss (likelihood proxy)" in scores
    assert any("chosen on validation" in s for s in scores)
    for row in results["correlations"].values():
        assert set(row) == {"size", "molecule_stable", "atom_stable", "valid"}
        for label in ("molecule_stable", "atom_stable", "valid"):
            assert set(row[label]) == {"raw", "partial", "binned"}
    for rows in results["selection"].values():
        assert list(rows) == ["50", "70", "90"]
        for row in rows.values():
            for m in ("molecule_stable", "valid", "uniqueness"):
                assert m in row and f"{m}_vs_random" in row
    # the random score against itself: no difference on any resample
    assert results["selection"]["random"]["70"]["valid_vs_random"] == [0.0, 0.0, 0.0]
    assert results["semantic"]["n"] == 6 and "semantic" in results["semantic"]["correlations"]
    assert results["validation_choice"]["window"] in module.windows(4)
    # every interval is ordered and holds its estimate; atom counts vary, so rho(size) exists
    triples = list(_intervals({k: v for k, v in results.items() if k not in ("protocol", "paper")}))
    assert len(triples) > 100
    for where, (est, low, high) in triples:
        if est is None or low is None:
            continue
        assert low <= high + 1e-12, where
        # uniqueness counts distinct SMILES, which is not smooth under resampling: on a few
        # molecules its percentile interval may miss the estimate (ordered is all it promises)
        if "uniqueness" not in where:
            assert low - 1e-9 <= est <= high + 1e-9, where
    assert results["correlations"]["random"]["size"][0] is not None
    for q in results["quality"].values():
        assert 0 <= q["atom_stability"] <= 1
    # the printed table is the JSON's numbers
    assert printed.startswith("# Paper protocol")
    rho = results["correlations"]["random"]["size"]
    assert module.fmt(rho) in printed
    assert f"{100 * results['quality']['model']['validity']:.1f}%" in printed


def test_the_json_has_no_nan(run):
    _, out, _ = run
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert not any(isinstance(v, float) and not math.isfinite(v)
                   for _, t in _intervals(json.loads(text)) for v in t if v is not None)


def test_protocol_with_a_block_posterior_reports_its_monte_carlo_error(tmp_path, qm9_slice):
    """``--tail 1``: EDM's last block + head, Monte-Carlo variability over the draws, which
    covers the position noise (non-zero variability_pos) and reports its draw noise."""
    import paper_protocol

    from genunc.data.qm9 import save_cache

    save_cache(qm9_slice.subset(range(20)), tmp_path / "molecules.npz")
    out = tmp_path / "results.json"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert paper_protocol.main([
            "--model", str(edm_folder(tmp_path / "edm")), "--data", str(tmp_path / "molecules.npz"),
            "--n", "12", "--n-val", "8", "--steps", "3", "--n-fit", "12", "--n-real", "8",
            "--boot", "20", "--min-bin", "3", "--tail", "1", "--draws", "3", "--nll-levels", "2",
            "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    p = results["protocol"]
    assert p["tail"] == 1 and p["variance"] == "monte_carlo"
    assert p["monte_carlo_error"]["median_se"] > 0
    assert "Monte-Carlo error" in printed.getvalue()
    assert results["correlations"]["variability_pos"]["size"][0] is not None  # positions vary


def test_protocol_runs_on_a_tiny_geoldm_folder(tmp_path, qm9_slice):
    """The same command and output on a GeoLDM folder (posterior in the latent dynamics, scores
    on the decoded molecules)."""
    import paper_protocol

    from genunc.data.qm9 import save_cache

    save_cache(qm9_slice.subset(range(20)), tmp_path / "molecules.npz")
    out = tmp_path / "results.json"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert paper_protocol.main([
            "--model", str(geoldm_folder(tmp_path / "geoldm")),
            "--data", str(tmp_path / "molecules.npz"), "--n", "12", "--n-val", "8", "--steps", "3",
            "--n-fit", "12", "--n-real", "8", "--boot", "20", "--min-bin", "3", "--draws", "2",
            "--nll-levels", "2", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["protocol"]["n"] == 12 and printed.getvalue().startswith("# Paper protocol")
    # GeoLDM's own likelihood is the baseline, the proxy beside it
    assert "nll (likelihood baseline)" in results["correlations"]
    assert "denoising_loss (likelihood proxy)" in results["correlations"]
    assert "GeoLDM" in results["protocol"]["likelihood_baseline"]
    assert set(results["correlations"]) == set(results["selection"])
    for where, (est, low, high) in _intervals(results["correlations"]):
        if est is not None and low is not None:
            assert low - 1e-9 <= est <= high + 1e-9, where
