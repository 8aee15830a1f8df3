import csv

import pytest

from genunc.cli import main


@pytest.mark.slow
def test_demo_writes_sheet_csv_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--samples", "12", "--draws", "2", "--steps", "4", "--out", str(out)]) == 0
    for name in ("contact_sheet.png", "retention.png", "scores.csv", "summary.json"):
        assert (out / name).stat().st_size > 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 12 and {"semantic", "variability", "pixel_variance", "random"} <= set(rows[0])
    printed = capsys.readouterr().out
    assert "AUROC(wrong)" in printed
    # the second run reuses the saved posterior instead of refitting: a refit would rewrite
    # (atomically replace) both files, even with identical contents
    saved = [out / "posterior" / name for name in ("genunc_posterior.json",
                                                  "genunc_posterior.safetensors")]
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in saved]
    assert main(["demo", "--samples", "4", "--draws", "2", "--steps", "2", "--out", str(out)]) == 0
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in saved] == before


def test_help_lists_examples(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "example: genunc demo" in capsys.readouterr().out
