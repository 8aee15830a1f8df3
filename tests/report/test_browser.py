"""genunc report in a real browser, one small export per modality made here by ``genunc fit``
and ``genunc generate``: headless Chromium loads the page from disk, no console error, a
screenshot that is not blank, and the numbers the page shows (its table's cells, its retention
curves' data) are those ``genunc evaluate`` prints for the same export.

The exports: the tiny image model judged by the digits judge (``judge_agrees``); the tiny
molecule model judged by RDKit validity (``valid``: it makes no stable molecule); the shipped
arithmetic model on 24 answers (``correct``: an untrained model answers nothing right).  A
quality column that never passes would make every number NaN or 0, checking nothing.

With ``GENUNC_REPORT_SCREENSHOTS=<dir>`` the screenshots are also saved there as
``report-<modality>.png`` (``make report-screenshots`` writes docs/images/browser-test/)."""

import json
import os
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
import yaml

from genunc.cli import main
from genunc.errors import GenuncError
from genunc.report.browser import chromium

#: where the screenshots are also saved (``make report-screenshots``)
SCREENSHOTS = os.environ.get("GENUNC_REPORT_SCREENSHOTS")


def _has_chromium() -> bool:
    try:
        chromium()
    except GenuncError:
        return False
    return True


pytestmark = [
    pytest.mark.slow,
    # asked for screenshots, a missing Chromium is an error, not a skip
    pytest.mark.skipif(not SCREENSHOTS and not _has_chromium(),
                       reason="needs Chromium (Debian: apt-get install chromium; .ci/run "
                       "installs it) or GENUNC_CHROMIUM=<its path>"),
]


def _image_export(request, tmp_path):
    config = request.getfixturevalue("tiny_image_config")(fitted=True, n_samples=24,
                                                          chunk_size=8)
    out = tmp_path / "export"
    assert main(["generate", "-c", str(config), "--set", "quality=zoo:digits_judge"]) == 0
    return out, "judge_agrees"


def _molecule_export(request, tmp_path):
    model = request.getfixturevalue("tiny_molecule_folder")(tmp_path / "model")
    config = {"modality": "molecule", "model": str(model), "features": "descriptors",
              "quality": "edm_metrics",
              "posterior": {"data": str(tmp_path / "molecules.npz"), "max_samples": 20,
                            "repeats": 1, "batch_size": 10},
              "generate": {"n_samples": 12, "num_draws": 2, "steps": 3, "chunk_size": 6,
                           "scores": ["variability", "denoising_loss", "random"],
                           "out": str(tmp_path / "export")}}
    path = tmp_path / "molecule.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "-c", str(path)]) == 0
    assert main(["generate", "-c", str(path)]) == 0
    return tmp_path / "export", "valid"


def _text_export(request, tmp_path):
    config = {
        "modality": "text", "model": "zoo:arith_mdlm", "features": "answer", "quality": "checker",
        "posterior": {"dir": str(tmp_path / "posterior"), "data": "zoo:arith_train",
                      "max_samples": 60, "batch_size": 30, "repeats": 1},
        "generate": {"n_samples": 24, "candidates": 2, "num_draws": 2, "steps": None,
                     "temperature": 1.0, "chunk_size": 12, "sampler": "low_confidence",
                     "scores": ["mutual_information", "semantic", "random"],
                     "out": str(tmp_path / "export")}}
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "-c", str(path)]) == 0
    assert main(["generate", "-c", str(path)]) == 0
    return tmp_path / "export", "correct"


EXPORTS = {"image": _image_export, "molecule": _molecule_export, "text": _text_export}
#: what each modality's samples look like in the page
SAMPLE_MARKS = {"image": 'class="tile"', "molecule": 'class="molecule"', "text": "data-mi="}


class _Page(HTMLParser):
    """What a reader sees of the page's numbers: the stats table's cells (by score and column)
    and the retention chart's data attributes."""

    def __init__(self):
        super().__init__()
        self.cells: dict[str, dict[str, str]] = {}
        self.curves: dict[str, tuple[list[float], list[float]]] = {}
        self.baseline: float | None = None
        self.load_ms: str | None = None
        self._row: str | None = None
        self._cell: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.load_ms = a.get("data-load-ms")
        elif tag == "tr" and "data-score" in a:
            self._row = a["data-score"]
            self.cells[self._row] = {}
        elif tag == "td" and self._row and "num" in (a.get("class") or "").split():
            self._cell = a["class"].split()[-1]
        elif tag == "polyline" and "data-curve" in a:
            self.curves[a["data-curve"]] = (json.loads(a["data-x"]), json.loads(a["data-y"]))
        elif tag == "line" and "data-baseline" in a:
            self.baseline = float(a["data-baseline"])

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        elif tag == "td":
            self._cell = None

    def handle_data(self, data):
        if self._row and self._cell:
            self.cells[self._row][self._cell] = data.strip()


def _evaluate(export, quality, capsys):
    """``genunc evaluate``'s table as printed: score -> [Spearman, AUROC, AURC, q@80%], and the
    quality column's mean."""
    capsys.readouterr()
    assert main(["evaluate", str(export), "--quality", quality]) == 0
    out = capsys.readouterr().out
    mean = re.search(r"\(mean ([-\d.na]+)\)", out).group(1)
    rows = [line.split() for line in out.splitlines()[2:]]
    return {row[0]: row[1:] for row in rows if len(row) == 5}, mean


@pytest.mark.parametrize("modality", list(EXPORTS))
def test_the_report_of_each_modality_in_a_real_browser(modality, request, tmp_path, capsys):
    from PIL import Image

    from genunc.report.browser import load, screenshot

    export, quality = EXPORTS[modality](request, tmp_path)
    page = tmp_path / "report.html"
    assert main(["report", str(export), "--out", str(page), "--quality", quality]) == 0
    printed, mean = _evaluate(export, quality, capsys)

    loaded = load(page)
    assert loaded.console == [], loaded.console
    shown = _Page()
    shown.feed(loaded.dom)
    assert shown.load_ms and float(shown.load_ms) > 0  # the page's script ran
    assert set(shown.cells) == {n for n in printed if not n.endswith("_mc_error")}
    for name, cells in shown.cells.items():
        assert [cells["spearman"], cells["auroc"], cells["aurc"], cells["kept"]] == printed[name]
        x, y = shown.curves[name]
        assert f"{y[x.index(1.0)]:.3f}" == mean  # all kept: the quality's mean
        assert f"{y[int(np.argmin(np.abs(np.array(x) - 0.8)))]:.3f}" == cells["kept"]
    assert f"{shown.baseline:.3f}" == mean
    assert loaded.dom.count(SAMPLE_MARKS[modality]) >= 2 * len(shown.cells)  # samples drawn

    png = screenshot(page, tmp_path / f"report-{modality}.png")
    pixels = np.asarray(Image.open(png).convert("L"))
    assert pixels.std() > 5  # not a blank page
    if SCREENSHOTS:
        os.makedirs(SCREENSHOTS, exist_ok=True)
        shutil.copyfile(png, os.path.join(SCREENSHOTS, f"report-{modality}.png"))
