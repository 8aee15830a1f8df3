"""The package's layers: a module imports only from its own layer or the ones below it.

Read from the source (every import, including those inside functions), so a shortcut that
would tie a low layer to a high one fails here rather than in a later refactor.

And the library never imports the lab: ``genunc.research`` (training recipes, GRPO, judges)
sits in the top layer but nothing outside it imports it; the library reaches it only through
registration (entry points, ``genunc.plugins``), and works without it.
"""

import ast
import json
import subprocess
import sys

import pytest

#: lowest first; a module may import genunc modules of its own layer or any lower one
LAYERS = [
    {"errors", "_seed", "_io", "_version", "_compat", "config", "streams", "plugins"},
    {"data", "tasks", "filtering", "risk", "labels", "metrics", "scores"},
    {"adapters"},
    {"posterior"},
    {"sampling"},
    {"zoo", "features"},
    {"export"},
    {"pipelines"},
    {"jobs", "demos", "report", "rl"},  # rl: DUAL and its environments and offline data
    {"cli", "__main__", "__init__", "research"},  # research: the lab, imported by none of these
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _imports(path, package="genunc"):
    """(line, module, inside `if TYPE_CHECKING:`) for every genunc import in a file, in every
    form: ``import genunc.x``, ``from genunc.x import y``, ``from genunc import x`` (the module
    ``genunc.x``) and relative imports; ``module`` is the dotted name imported from."""
    tree = ast.parse(path.read_text()) if hasattr(path, "read_text") else ast.parse(path)
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            typing_only |= {id(n) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's own package upwards
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base == "genunc":  # from genunc import streams -> genunc.streams
                for alias in node.names:
                    yield node.lineno, f"genunc.{alias.name}", id(node) in typing_only
            elif base.startswith("genunc."):
                yield node.lineno, base, id(node) in typing_only
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "genunc" or alias.name.startswith("genunc."):
                    yield node.lineno, alias.name, id(node) in typing_only


def _top_level_imports(path):
    """The genunc imports a module runs when it is imported (not those inside functions)."""
    tree = ast.parse(path.read_text())
    module = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))],
                        type_ignores=[])
    return list(_imports(ast.unparse(module)))


def _top(module):
    """The top-level part of genunc a dotted import names (``__init__`` for ``genunc``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules(repo):
    for path in sorted((repo / "genunc").rglob("*.py")):
        yield path, path.relative_to(repo / "genunc").parts[0].removesuffix(".py")


def _package(repo, path):
    """The dotted package a file's relative imports start from."""
    parts = path.relative_to(repo).with_suffix("").parts
    return ".".join(parts if path.name == "__init__.py" else parts[:-1])


def test_every_top_level_module_has_a_layer(repo):
    unplaced = {top for _, top in _modules(repo)} - set(LEVEL)
    assert not unplaced, f"give these a layer in LAYERS: {sorted(unplaced)}"


def test_no_module_imports_a_higher_layer(repo):
    upward = [f"{path.relative_to(repo)}:{line} imports {module}"
              for path, top in _modules(repo)
              for line, module, _ in _imports(path, _package(repo, path))
              if top != "__init__" and LEVEL[_top(module)] > LEVEL[top]]
    assert not upward, "\n".join(upward)


def _reaches_the_lab(path, package):
    """``file:line`` of every way a file imports genunc.research: an import statement in any
    form, or ``import_module`` / ``__import__`` of a name spelled out in the source."""
    tree = ast.parse(path.read_text()) if hasattr(path, "read_text") else ast.parse(path)
    found = [line for line, module, _ in _imports(path, package)
             if module == "genunc.research" or module.startswith("genunc.research.")]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) \
                in ("import_module", "__import__") and node.args \
                and isinstance(node.args[0], ast.Constant) \
                and str(node.args[0].value).startswith("genunc.research"):
            found.append(node.lineno)
    return sorted(found)


def test_the_library_never_imports_the_lab(repo):
    """No module outside genunc/research imports it, in any form (the lab is found through
    entry points, genunc.plugins, so a library without the lab still works)."""
    lab = repo / "genunc" / "research"
    reached = [f"{path.relative_to(repo)}:{line} imports genunc.research"
               for path, _ in _modules(repo) if lab not in path.parents
               for line in _reaches_the_lab(path, _package(repo, path))]
    assert not reached, "\n".join(reached)


@pytest.mark.parametrize("source", [
    "import genunc.research",
    "from genunc import research",
    "from genunc.research import judges",
    "from genunc.research.recipes.digits import train_ddpm",
    "def f():\n    import genunc.research.cli as c",
    "from ..research import training",
    "import importlib\nimportlib.import_module('genunc.research.judges')",
    "__import__('genunc.research')",
])
def test_the_lab_check_sees_every_way_in(source):
    assert _reaches_the_lab(source, "genunc.jobs")


#: imports every library module (all of genunc but the lab and ``python -m genunc``) with the
#: lab made unimportable, builds the parser, and reports what it saw
_WITHOUT_THE_LAB = """
import argparse, importlib, json, pkgutil, sys, warnings
sys.modules["genunc.research"] = None  # as if the lab were not installed
import genunc
names = [m.name for m in pkgutil.walk_packages(genunc.__path__, "genunc.")
         if m.name.split(".")[1] not in ("research", "__main__")]
for name in names:
    importlib.import_module(name)
from genunc import plugins
from genunc.cli import build_parser
from genunc.errors import ConfigError
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    parser = build_parser()
commands = [sorted(a.choices) for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
try:
    plugins.judge("digits_judge")
    judge = None
except ConfigError as err:
    judge = str(err)
print(json.dumps({"modules": names, "commands": commands[0], "judge": judge,
                  "warnings": [str(w.message) for w in caught],
                  "lab": [m for m in sys.modules if m.startswith("genunc.research.")]}))
"""


def test_the_library_works_without_the_lab():
    """With genunc.research unimportable, every library module imports (genunc, the CLI, all
    jobs, every pipeline, posterior, export, filtering, risk, zoo ...), ``genunc`` builds its
    parser without the lab's ``zoo`` command, and asking for the lab's judge is a one-line
    ConfigError."""
    out = subprocess.run([sys.executable, "-c", _WITHOUT_THE_LAB], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    for module in ("genunc.cli", "genunc.jobs.image", "genunc.jobs.molecule", "genunc.jobs.text",
                   "genunc.pipelines.image", "genunc.pipelines.text", "genunc.posterior",
                   "genunc.export", "genunc.filtering", "genunc.risk", "genunc.zoo.shipped"):
        assert module in seen["modules"]
    assert {"demo", "fit", "generate", "filter", "evaluate"} <= set(seen["commands"])
    assert "zoo" not in seen["commands"]
    assert [w for w in seen["warnings"] if "'zoo'" in w], "a registered command that is gone says so"
    assert "digits_judge" in seen["judge"] and "\n" not in seen["judge"]
    assert seen["lab"] == []


def test_the_lab_is_registered_and_found():
    """Installed, the lab is reached through its entry points: the ``zoo`` command and the
    ``digits_judge`` judge (pyproject.toml; ``pip install -e .`` re-reads them)."""
    from genunc import plugins

    assert plugins.registered(plugins.COMMANDS)["zoo"].value == "genunc.research.cli:add_parser"
    assert plugins.registered(plugins.JUDGES)["digits_judge"].value == \
        "genunc.research.judges:DigitsJudgeEvaluator"


@pytest.mark.parametrize("source, package, found", [
    ("from genunc import pipelines", "genunc.posterior", ["genunc.pipelines"]),
    ("import genunc.jobs.base as b", "genunc.posterior", ["genunc.jobs.base"]),
    ("from ..pipelines.base import X", "genunc.posterior", ["genunc.pipelines.base"]),
    ("from . import heads", "genunc.posterior", ["genunc.posterior"]),
    ("def f():\n    from genunc.cli import main", "genunc.posterior", ["genunc.cli"]),
    ("import numpy\nfrom torch import nn", "genunc.posterior", []),
])
def test_the_layering_check_sees_every_import_form(source, package, found):
    """The checker itself: each form of import a module can use is found and resolved."""
    assert [module for _, module, _ in _imports(source, package)] == found


#: the one kind of lazy import allowed to close a loop: a family root's factory returning its
#: member defined in a module that subclasses the root (``from_pipe`` of a pipeline family);
#: (importer, imported) -> why
FAMILY_FACTORIES = {
    ("genunc.pipelines.image", "genunc.pipelines.wrapped"):
        "ImageUncertaintyPipeline.from_pipe returns WrappedImagePipeline, its subclass",
    ("genunc.pipelines.text", "genunc.pipelines.text_wrapped"):
        "TextUncertaintyPipeline.from_pipe returns WrappedTextPipeline, its subclass",
}


def test_no_import_cycles(repo):
    """No two genunc modules import each other, directly or around a loop, at any depth of a
    function (a cycle that only a lazy import keeps working is a layout to fix, not hide), but
    for FAMILY_FACTORIES, each lazy and inside the factory."""
    import graphlib

    modules = {}
    for path, _ in _modules(repo):
        parts = path.relative_to(repo).with_suffix("").parts
        modules[".".join(parts[:-1] if path.name == "__init__.py" else parts)] = path

    def resolve(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {name: {resolve(m) for _, m, typing_only in _imports(path, _package(repo, path))
                    if not typing_only} - {name, "genunc"}
             for name, path in modules.items()}
    for importer, imported in FAMILY_FACTORIES:
        assert imported in graph[importer], f"{importer} no longer imports {imported}: drop it"
        graph[importer].discard(imported)
        top_level = {m for _, m, _ in _top_level_imports(modules[importer])}
        assert imported not in top_level, f"{importer} must import {imported} lazily"
    packages = {name for name, path in modules.items() if path.name == "__init__.py"}
    for name in graph:  # a package's __init__ re-exporting its modules is not a cycle
        graph[name] -= {p for p in packages if name.startswith(p + ".")}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


def test_sampling_sees_draws_not_the_posterior(repo):
    """Loops take draws that apply themselves; they name the draws' type for annotations only."""
    for path in (repo / "genunc" / "sampling").rglob("*.py"):
        for line, module, typing_only in _imports(path, _package(repo, path)):
            if module.startswith("genunc.posterior"):
                assert module == "genunc.posterior.draws" and typing_only, \
                    f"{path.name}:{line} imports {module}"


def test_no_module_borrows_another_modules_private_names(repo):
    """A leading underscore means "this module's own": another module that needs it gets a
    public name (``from genunc.x import _helper`` is how two copies of logic start to drift)."""
    modules = {p.stem for p in (repo / "genunc").rglob("*.py")} | \
        {p.name for p in (repo / "genunc").rglob("*") if p.is_dir()}
    borrowed = []
    for path, _ in _modules(repo):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("genunc"):
                borrowed += [f"{path.relative_to(repo)}:{node.lineno} imports {alias.name} "
                             f"from {node.module}" for alias in node.names
                             if alias.name.startswith("_") and not alias.name.startswith("__")
                             and alias.name not in modules]
    assert not borrowed, "\n".join(borrowed)
