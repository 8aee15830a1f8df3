"""Every fenced Python block of the README runs as written, from a fresh folder, on the shipped
models: the documentation cannot drift from the code."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_the_readme_has_code_to_check():
    assert len(BLOCKS) >= 5


@pytest.mark.slow
@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(code, tmp_path, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "genunc_cache"  # QM9 converted once per session
    env = {**os.environ, "GENUNC_CACHE": str(cache), "TQDM_DISABLE": "1"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{code}\n--- stderr ---\n{run.stderr[-3000:]}"
