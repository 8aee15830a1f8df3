"""genunc report: one self-contained page whose numbers are genunc evaluate's."""

import re

import numpy as np
import pytest

from genunc.cli import main
from genunc.errors import GenuncError
from genunc.export import ExportWriter
from genunc.report import write_report


def _text_export(directory, n, seed=0):
    """A text export with two scores, a boolean quality and per-token MI in each payload."""
    rng = np.random.default_rng(seed)
    with ExportWriter(directory, "json", metadata={"modality": "text", "model": "toy"}) as w:
        for i in range(n):
            mi = rng.random(3)
            w.add(i, {"prompt": "1*2=", "completion": "2<x>",
                      "token_mutual_information": [["2", mi[0]], ["<", mi[1]], ["x", mi[2]]]},
                  {"mutual_information": float(mi.mean()), "random": float(rng.random()),
                   "correct": bool(rng.random() > mi.mean())})
    return directory


def test_the_page_shows_the_numbers_genunc_evaluate_prints(tmp_path, capsys):
    export = _text_export(tmp_path / "export", 60)
    assert main(["evaluate", str(export), "--quality", "correct"]) == 0
    printed = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
               if line.split() and line.split()[0] in ("mutual_information", "random")}
    page = write_report(export, tmp_path / "r.html").read_text()
    for name, values in printed.items():
        row = re.search(rf'<tr data-score="{name}">(.*?)</tr>', page).group(1)
        assert re.findall(r'class="num \w+">([^<]+)<', row) == values
    assert "\">&lt;</span>" in page and "><</span>" not in page  # tokens are escaped


def test_the_page_is_self_contained_and_its_size_does_not_grow_with_the_export(tmp_path):
    small = write_report(_text_export(tmp_path / "a", 40), tmp_path / "a.html", extremes=4)
    large = write_report(_text_export(tmp_path / "b", 400), tmp_path / "b.html", extremes=4)
    for page in (small.read_text(), large.read_text()):
        assert page.count('data-sample=') == 2 * 2 * 4  # 2 scores x (least, most) x 4
        assert not re.search(r'(src|href)="(?!data:)', page) and "<link" not in page
    assert len(large.read_text()) < 1.3 * len(small.read_text())


def test_a_filtered_export_shows_its_risk_certificate(tmp_path, capsys):
    export = _text_export(tmp_path / "export", 50)
    calib = _text_export(tmp_path / "calib", 300, seed=1)
    assert main(["filter", str(export), "--out", str(tmp_path / "kept"), "--score",
                 "mutual_information", "--risk-alpha", "0.6", "--calibration", str(calib),
                 "--label", "correct"]) == 0
    page = write_report(tmp_path / "kept", tmp_path / "r.html").read_text()
    assert 'id="certificate"' in page and "calibration samples" in page


def test_bad_input_is_one_clear_error(tmp_path):
    export = _text_export(tmp_path / "export", 5)
    with pytest.raises(GenuncError, match="extremes must be at least 1"):
        write_report(export, tmp_path / "r.html", extremes=0)
    with pytest.raises(GenuncError, match="none of the score columns"):
        write_report(export, tmp_path / "r.html", scores=["variability"])



def test_tokens_without_mi_and_empty_completions_are_drawn(tmp_path):
    """A wrapped pipeline's token that genunc saw no commit of has MI None (no colour); an answer
    of special tokens only shows no token."""
    with ExportWriter(tmp_path / "export", "json", metadata={"modality": "text"}) as w:
        w.add(0, {"prompt": "1 + 2 =", "completion": "3 a",
                  "token_mutual_information": [["3", 0.5], [" a", None]]},
              {"mutual_information": 0.5})
        w.add(1, {"prompt": "2 + 2 =", "completion": "", "token_mutual_information": []},
              {"mutual_information": 0.1})
    page = write_report(tmp_path / "export", tmp_path / "r.html").read_text()
    assert 'title="never committed"> a</span>' in page and 'data-mi="0.5"' in page
    assert "(empty completion)" in page and "no per-token MI" not in page
