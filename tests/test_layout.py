"""The package's shape, checked: every module opens with a line saying its job, no function grows
past ~60 lines, and imports only go down the layers (README, Layout), lazy imports included.
    pytest -q tests/test_layout.py"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flux_lora"
# lowest first: a module may import its own layer and the layers before it, never a later one.
# The atomic writer is everybody's (a tiny model is written through it too), so it sits low.
LAYERS = ["errors", "config", "parallel", "outputs.files", "models", "fast", "outputs", "data", "training",
          "evaluation", "cli"]
MAX_FUNCTION_LINES = 60
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _layer(module: str) -> int | None:
    """Layer index of a dotted flux_lora module name (None for the package root and __main__)."""
    parts = module.split(".")[1:]
    for depth in (2, 1):  # the most specific entry wins: outputs.files before outputs
        if ".".join(parts[:depth]) in LAYERS:
            return LAYERS.index(".".join(parts[:depth]))
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(tree: ast.AST, module: str) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("flux_lora"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flux_lora"):
            for alias in node.names:  # `from flux_lora.outputs import files` imports the module files
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _is_module(sub) else node.module)
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_says_its_job_and_imports_go_down(path):
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree)
    assert doc and doc.strip().splitlines()[0].strip(), f"{path.name}: no docstring saying the module's job"
    module = _module_name(path)
    mine = _layer(module)
    if mine is None:
        return
    for target in _imports(tree, module):
        theirs = _layer(target)
        assert theirs is None or theirs <= mine, \
            f"{module} imports {target}: {LAYERS[theirs]} is above {LAYERS[mine]} in {LAYERS}"


def test_no_function_over_sixty_lines():
    long = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({length} lines)")
    assert not long, long


def test_layer_check_catches_an_upward_import():
    """The check itself: a fast module importing training would be reported."""
    tree = ast.parse("from flux_lora.training import train\n")
    targets = _imports(tree, "flux_lora.fast.memory")
    assert any(_layer(t) > _layer("flux_lora.fast.memory") for t in targets)
