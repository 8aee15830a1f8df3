"""conftest's python_run: a forked process behaves as ``python *argv`` would (argv, folder,
environment, stdout / stderr, exit status, ``__main__``), and a run past its timeout is killed."""

import os
import subprocess

import pytest

pytestmark = pytest.mark.slow  # starts the server (~5 s of imports), as the example tests do


def test_code_runs_in_its_folder_and_environment(python_run, tmp_path):
    code = ("import os, sys; print(sys.argv, os.getcwd(), os.environ['GENUNC_PROBE'], __name__); "
            "sys.stderr.write('to stderr\\n'); raise SystemExit(3)")
    run = python_run(["-c", code, "a"], cwd=tmp_path, env={**os.environ, "GENUNC_PROBE": "yes"})
    assert run.returncode == 3 and run.stderr == "to stderr\n"
    assert run.stdout.split() == ["['-c',", "'a']", str(tmp_path), "yes", "__main__"]


def test_a_script_gets_its_argv_and_its_folder_on_the_path(python_run, tmp_path):
    (tmp_path / "helper_mod.py").write_text("VALUE = 7\n")
    script = tmp_path / "main.py"
    script.write_text("import sys, helper_mod\nif __name__ == '__main__':\n"
                      "    print(sys.argv[1:], helper_mod.VALUE)\n    1 / 0\n")
    run = python_run([script, "--flag", "x"])
    assert run.stdout.strip() == "['--flag', 'x'] 7"
    assert run.returncode == 1 and "ZeroDivisionError" in run.stderr


def test_a_run_past_its_timeout_is_killed(python_run):
    with pytest.raises(subprocess.TimeoutExpired):
        python_run(["-c", "import time; time.sleep(30)"], timeout=1)
    assert python_run(["-c", "print('next')"]).stdout == "next\n"  # the server lives on
