"""The package's import graph: no cycles, and each layer imports only the layers below it.

The graph is read from the source with :mod:`ast` (nothing is imported): every ``import`` and
``from ... import`` of a ``cellseg`` module counts, at module level or inside a function (a lazy
import still runs, and still ties the two modules together). Importing ``cellseg.a.b`` also runs the
package ``cellseg.a`` (its ``__init__``), so that edge counts too.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "cellseg"

#: modules every layer may use: the package root and the stage-free helpers
BASE = {"cellseg", "cellseg.errors", "cellseg.io", "cellseg.paths", "cellseg.progress"}


def _module_names(src: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under ``src/cellseg`` (a package by its ``__init__``)."""
    out = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``[a, a.b, a.b.c]``: importing a module runs every package above it."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The ``cellseg`` modules that module ``name`` (file ``path``) imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` only mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                found.update(t for t in _with_parents(target) if t in modules)
    for parent in _with_parents(name)[:-1]:  # a module's own packages run first
        if parent in modules:
            found.add(parent)
    found.discard(name)
    return found


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """module -> the ``cellseg`` modules it imports (directly)."""
    modules = _module_names(src)
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]`` of ``graph``, or None when it is acyclic (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module importing ``start`` runs (transitively), ``start`` excluded."""
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return module in BASE or any(module == p or module.startswith(p + ".") for p in packages)


def test_find_cycle_sees_a_lazy_import(tmp_path: Path) -> None:
    """The checker itself: a cycle closed only by an import inside a function is found."""
    pkg = tmp_path / PACKAGE / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cellseg.sub import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    graph = import_graph(tmp_path)
    assert graph["cellseg.sub.a"] == {"cellseg", "cellseg.sub", "cellseg.sub.b"}
    assert find_cycle(graph) in (
        ["cellseg.sub.a", "cellseg.sub.b", "cellseg.sub.a"],
        ["cellseg.sub.b", "cellseg.sub.a", "cellseg.sub.b"],
    )
    (pkg / "b.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(tmp_path)) is None


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 50  # the whole package was read
    assert find_cycle(graph) is None


@pytest.mark.parametrize(
    ("layer", "allowed"),
    [
        ("cellseg.config", ("cellseg.config",)),
        ("cellseg.data", ("cellseg.config", "cellseg.data")),
    ],
)
def test_layer_imports_no_later_stage(layer: str, allowed: tuple[str, ...]) -> None:
    """config needs only the base modules; data only config and the base; directly or through others."""
    graph = import_graph()
    for module in sorted(m for m in graph if m == layer or m.startswith(layer + ".")):
        later = sorted(m for m in reachable(graph, module) if not _in(m, allowed))
        assert not later, f"{module} imports later stages: {later}"


@pytest.mark.slow
def test_inference_does_not_import_training_losses(tmp_path: Path) -> None:
    """Loading an ensemble and predicting (checkpoint -> build -> forward) never runs the training-target
    code of ``cellseg.model.targets``, while building a model for training does."""
    from inference_helpers import make_manifest

    manifest = make_manifest(tmp_path / "weights", n_models=1, tta=("identity", "hflip"))
    probe = f"""
import sys
import numpy as np
import torch
from cellseg.config.manifest import load_manifest
from cellseg.inference.forward import load_ensemble, predict_views
models = load_ensemble(load_manifest({str(manifest)!r}), torch.device("cpu"))
raw = predict_views(models, np.full((48, 64), 128, np.uint8), ["identity", "hflip"], torch.device("cpu"))
print(len(raw), "cellseg.model.targets" in sys.modules)
from cellseg.config.experiment import ModelConfig
from cellseg.model.build import build_model
build_model(ModelConfig(backbone="resnet18", fpn_channels=16))
print("cellseg.model.targets" in sys.modules)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["2", "False", "True"]
