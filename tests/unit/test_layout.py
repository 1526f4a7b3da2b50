"""The package's import graph flows one way and has no cycle (docs/design.md, "Layers")."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: layer of each part of the package: a module may import only from its own layer or lower ones
LAYERS: dict[str, int] = {
    "hf_specssm._compat": 0,
    "hf_specssm.config": 0,
    "hf_specssm.tree": 0,
    "hf_specssm.stats": 0,
    # finds the shipped drafter folders: pathlib and importlib.metadata only
    "hf_specssm.shipped": 0,
    # which dtype the tools load models in (torch only)
    "hf_specssm.hardware": 0,
    "hf_specssm.kernels": 0,
    "hf_specssm.cache": 1,
    # the probes run the SSM paths they admit (ssm/, cache) against transformers' own steps
    "hf_specssm._compat.probes": 3,
    "hf_specssm.ssm": 2,
    "hf_specssm.policies": 2,
    "hf_specssm.drafters": 3,
    "hf_specssm.targets": 4,
    "hf_specssm.decoding": 5,
    "hf_specssm.inputs": 5,
    "hf_specssm.generation": 6,
    "hf_specssm": 7,  # the public API (`hf_specssm/__init__.py`)
    "hf_specssm.testing": 8,
    "hf_specssm.training": 9,
    "hf_specssm.tools": 9,
    "hf_specssm_demo": 10,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    best = max((name for name in LAYERS if module == name or module.startswith(name + ".")), key=len)
    return LAYERS[best]


@cache
def _modules() -> dict[str, Path]:
    files = [*ROOT.joinpath("hf_specssm").rglob("*.py"), *ROOT.joinpath("hf_specssm_demo").rglob("*.py")]
    return {_module_name(path): path for path in files}


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """First-party modules `module` imports anywhere in its file (lazy imports included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).strip(".")
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
            ]
        found |= {name for name in names if name in known}
    found.discard(module)
    return found


@cache
def _graph() -> dict[str, frozenset[str]]:
    modules = _modules()
    return {module: frozenset(_imports(path, module, set(modules))) for module, path in modules.items()}


def test_every_module_has_a_layer():
    assert all(_layer(module) >= 0 for module in _modules())


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_flow_down_the_layers(module):
    upward = [name for name in _graph()[module] if _layer(name) > _layer(module)]
    assert not upward, f"{module} (layer {_layer(module)}) imports higher layers: {upward}"


def test_no_import_cycle():
    graph = {module: set(targets) for module, targets in _graph().items()}
    # importing `a.b.c` runs `a/b/__init__.py` first: count that edge too, except from inside the package
    # (a package's own modules import each other while it initialises) and for the root package.
    for module, targets in graph.items():
        for target in list(targets):
            parts = target.split(".")
            for depth in range(2, len(parts)):
                parent = ".".join(parts[:depth])
                if parent in graph and parent != module and not module.startswith(parent + "."):
                    targets.add(parent)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = [*stack[stack.index(target) :], target]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_graph_sees_known_edges():
    """Negative control: the scan finds imports that exist, so an empty graph cannot pass the tests above."""
    graph = _graph()
    assert "hf_specssm.targets.base" in graph["hf_specssm.decoding.round"]
    assert "hf_specssm.cache" in graph["hf_specssm.targets.recurrent"]
