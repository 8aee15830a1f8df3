"""Every fenced Python block of the README and of the documentation (docs/) runs as written, from
a fresh folder, on the shipped models: the documentation cannot drift from the code.  A block
that appears on several pages runs once."""

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _blocks() -> dict[str, str]:
    """``page:index`` -> code, each distinct block once (first page that shows it)."""
    found: dict[str, str] = {}
    for page in PAGES:
        name = page.relative_to(REPO).with_suffix("").as_posix()
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S)):
            if code not in found.values():
                found[f"{name}:{i}"] = code
    return found


BLOCKS = _blocks()


def test_the_documentation_has_code_to_check():
    readme = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert len(readme) >= 3 and len(BLOCKS) >= 8


def test_the_readme_is_a_landing_page():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_every_local_link_of_the_readme_and_docs_resolves():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_the_cli_reference_page_is_what_the_parsers_print():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_cli", REPO / "docs" / "gen_cli.py")
    gen_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_cli)
    assert gen_cli.PAGE.read_text() == gen_cli.render(), "run python docs/gen_cli.py"


@pytest.mark.slow
@pytest.mark.parametrize("code", list(BLOCKS.values()), ids=list(BLOCKS))
def test_documentation_block_runs(code, tmp_path, python_run):
    """As ``python -c code`` in an empty folder (forked with the imports done: conftest's
    python_run); QM9 comes from the user's cache, as it would for a reader."""
    run = python_run(["-c", code], cwd=tmp_path, env={**os.environ, "TQDM_DISABLE": "1"}, timeout=600)
    assert run.returncode == 0, f"{code}\n--- stderr ---\n{run.stderr[-3000:]}"
