"""The layers of fedlora import downwards only: a lower layer never imports a higher one.

The order is the one docs/architecture.md draws: the foundation (errors, files, process), then
config, wire, model, data, privacy, train, run, eval, deploy, and above the library the
strategies, the two apps, the simulation runtime and the command line. An import from a lower
layer to a higher one (even inside a function) is how a flat package grows back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [
    ("errors", "files", "process"),
    ("config",),
    ("wire",),
    ("model",),
    ("data",),
    ("privacy",),
    ("train",),
    ("run",),
    ("eval",),
    ("deploy",),
    ("strategies",),
    ("client", "server"),
    ("simulations",),
    ("cli",),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
TOP_LEVEL = ("strategies", "client", "server", "simulations")  # repo folders installed as fedlora.*


def _layer_of(path: Path) -> str:
    parts = path.relative_to(ROOT).parts
    if parts[0] in TOP_LEVEL:
        return parts[0]
    return parts[1].removesuffix(".py")


def _imported(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return [n.split(".")[1] for n in names if n.startswith("fedlora.")]


def _modules() -> list[Path]:
    found = [p for p in (ROOT / "fedlora").rglob("*.py") if p.parent != ROOT / "fedlora" or p.name != "__init__.py"]
    return found + [p for folder in TOP_LEVEL for p in (ROOT / folder).rglob("*.py")]


def test_every_module_belongs_to_a_layer():
    assert {_layer_of(p) for p in _modules()} <= set(RANK)


def test_no_import_goes_up_a_layer():
    upward = []
    for path in _modules():
        mine = RANK[_layer_of(path)]
        for layer in _imported(ast.parse(path.read_text())):
            if RANK.get(layer, -1) > mine:
                upward.append(f"{path.relative_to(ROOT)} imports fedlora.{layer}")
    assert not upward, "\n".join(upward)
