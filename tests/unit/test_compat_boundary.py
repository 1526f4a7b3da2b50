"""transformers internals are reached only from `hf_specssm/_compat/`.

Walks every source file of the package outside `_compat/` with `ast` and fails on: imports of private
transformers names, attribute writes to transformers modules, `.forward` assignments (instance patches),
and reads or writes of the private cache-layer and mixer attributes `_compat` wraps (by attribute, or by
their names as strings).
"""

from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

import pytest

import hf_specssm

PACKAGE = Path(hf_specssm.__file__).parent
COMPAT = PACKAGE / "_compat"
# cache-layer state and mixer internals that only `_compat` may touch
PRIVATE_ATTRIBUTES = frozenset(
    {
        "conv_states",
        "recurrent_states",
        "is_conv_states_initialized",
        "is_recurrent_states_initialized",
        "has_previous_state",
        "record_past",
        "time_step_limit",
        "mamba_selective_scan",
    }
)
_ATTRIBUTE_FUNCTIONS = frozenset({"getattr", "setattr", "hasattr", "delattr"})
_MODULE_LOOKUPS = frozenset({"import_module", "modules"})


def _sources() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if COMPAT not in path.parents)


def _is_transformers(module: str | None) -> bool:
    return module is not None and (module == "transformers" or module.startswith("transformers."))


def _transformers_module_names(tree: ast.Module) -> set[str]:
    """Local names bound to transformers modules: `import transformers.x as y`, `from transformers.x import
    module`, `y = importlib.import_module(...)` / `sys.modules[...]`."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_transformers(alias.name):
                    names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and _is_transformers(node.module):
            for alias in node.names:
                try:
                    value = getattr(importlib.import_module(node.module), alias.name, None)
                except ImportError:
                    value = None
                if isinstance(value, types.ModuleType):
                    names.add(alias.asname or alias.name)
        elif isinstance(node, ast.Assign) and _looks_up_a_module(node.value):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names


def _looks_up_a_module(node: ast.AST) -> bool:
    call = node.func if isinstance(node, ast.Call) else None
    if isinstance(node, ast.Subscript):
        call = node.value
    if isinstance(call, ast.Attribute) and isinstance(call.value, ast.Name) and call.value.id == "sys":
        return call.attr == "modules"
    if isinstance(node, ast.Call) and isinstance(call, ast.Attribute) and call.attr == "get":
        return _looks_up_a_module(call.value)
    return isinstance(call, ast.Attribute | ast.Name) and getattr(call, "attr", getattr(call, "id", "")) in (
        _MODULE_LOOKUPS
    )


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _violations(source: str, label: str) -> list[str]:
    """`label:line: what` for each reach into transformers internals in `source`."""
    tree = ast.parse(source, filename=label)
    modules = _transformers_module_names(tree)
    found = []

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{label}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _is_transformers(node.module):
            if any(part.startswith("_") for part in node.module.split(".")):
                report(node, f"imports from private module {node.module}")
            for alias in node.names:
                if alias.name.startswith("_"):
                    report(node, f"imports private name {alias.name} from {node.module}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _is_transformers(alias.name) and any(p.startswith("_") for p in alias.name.split(".")):
                    report(node, f"imports private module {alias.name}")
        elif isinstance(node, ast.Attribute):
            if node.attr in PRIVATE_ATTRIBUTES:
                report(node, f"touches .{node.attr}")
            if isinstance(node.ctx, ast.Store | ast.Del):
                if node.attr == "forward":
                    report(node, "assigns .forward")
                if _root_name(node.value) in modules:
                    report(node, f"writes {ast.unparse(node)} on a transformers module")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value in PRIVATE_ATTRIBUTES
        ):
            # (also catches `getattr(layer, name)` with the name from a table of strings)
            report(node, f"names {node.value!r}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _ATTRIBUTE_FUNCTIONS
        ):
            name = node.args[1] if len(node.args) > 1 else None
            if node.func.id in ("setattr", "delattr") and node.args:
                if isinstance(name, ast.Constant) and name.value == "forward":
                    report(node, f"{node.func.id}(…, 'forward')")
                if _root_name(node.args[0]) in modules or _looks_up_a_module(node.args[0]):
                    report(node, f"{node.func.id} on a transformers module")
    return found


def test_no_transformers_internals_outside_compat():
    sources = _sources()
    assert len(sources) > 20, "the walk found too few sources"
    violations = [
        line
        for path in sources
        for line in _violations(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    ]
    assert violations == [], "transformers internals outside hf_specssm/_compat/:\n" + "\n".join(violations)


@pytest.mark.parametrize(
    "snippet",
    [
        pytest.param("from transformers.cache_utils import _private\n", id="private-import"),
        pytest.param("import transformers.models.mamba.modeling_mamba as m\nm.x = 1\n", id="module-write"),
        pytest.param(
            "import importlib\nm = importlib.import_module('x')\nm.y = 2\n", id="import-module-write"
        ),
        pytest.param(
            "import importlib\nsetattr(importlib.import_module('x'), 'y', 2)\n", id="setattr-module"
        ),
        pytest.param("mixer.forward = f\n", id="forward"),
        pytest.param("layer.conv_states[0] = t\n", id="conv-states"),
        pytest.param("x = getattr(layer, 'has_previous_state')\n", id="getattr"),
        pytest.param("for store in ('recurrent_states',):\n    getattr(layer, store)\n", id="string-table"),
        pytest.param("low = mixer.time_step_limit\n", id="time-step-limit"),
    ],
)
def test_the_walk_sees_each_kind_of_violation(snippet):
    assert _violations(snippet, "snippet.py")
