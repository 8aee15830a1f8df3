"""The package's layers: a module imports only from its own layer or the ones below it.

Read from the source (every import, including those inside functions), so a shortcut that
would tie a low layer to a high one fails here rather than in a later refactor.
"""

import ast

import pytest

#: lowest first; a module may import genunc modules of its own layer or any lower one
LAYERS = [
    {"errors", "_seed", "_io", "_version", "_compat", "config", "streams"},
    {"data", "tasks", "filtering", "risk", "labels", "metrics", "scores"},
    {"adapters"},
    {"posterior"},
    {"sampling"},
    {"zoo", "features"},
    {"export"},
    {"pipelines"},
    {"jobs", "demos"},
    {"cli", "__main__", "__init__"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _imports(path):
    """(line, module, inside `if TYPE_CHECKING:`) for every genunc import in a file."""
    tree = ast.parse(path.read_text())
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            typing_only |= {id(n) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("genunc."):
            yield node.lineno, node.module, id(node) in typing_only
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("genunc."):
                    yield node.lineno, alias.name, id(node) in typing_only


def _modules(repo):
    for path in sorted((repo / "genunc").rglob("*.py")):
        yield path, path.relative_to(repo / "genunc").parts[0].removesuffix(".py")


def test_every_top_level_module_has_a_layer(repo):
    unplaced = {top for _, top in _modules(repo)} - set(LEVEL)
    assert not unplaced, f"give these a layer in LAYERS: {sorted(unplaced)}"


def test_no_module_imports_a_higher_layer(repo):
    upward = [f"{path.relative_to(repo)}:{line} imports {module}"
              for path, top in _modules(repo)
              for line, module, _ in _imports(path)
              if LEVEL[module.split(".")[1]] > LEVEL[top]]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("low", ["posterior", "adapters", "scores", "sampling"])
def test_the_engine_never_imports_the_user_layers(repo, low):
    users = {"pipelines", "jobs", "zoo", "cli", "demos"}
    found = [f"{path.relative_to(repo)}:{line} imports {module}"
             for path, top in _modules(repo) if top == low
             for line, module, _ in _imports(path) if module.split(".")[1] in users]
    assert not found, "\n".join(found)


def test_sampling_sees_draws_not_the_posterior(repo):
    """Loops take draws that apply themselves; they name the draws' type for annotations only."""
    for path in (repo / "genunc" / "sampling").rglob("*.py"):
        for line, module, typing_only in _imports(path):
            if module.startswith("genunc.posterior"):
                assert module == "genunc.posterior.draws" and typing_only, \
                    f"{path.name}:{line} imports {module}"
