import pytest

from genunc.cli import main


def test_demo_runs_and_round_trips(capsys):
    assert main(["demo", "--draws", "3"]) == 0
    out = capsys.readouterr().out
    assert "round trip reproduces the draws: True" in out
    assert "relative_perturbation" in out


def test_help_lists_examples(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "example: genunc demo" in capsys.readouterr().out
