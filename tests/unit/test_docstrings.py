"""Every public symbol has a docstring: modules, classes, functions, and the public methods of classes.

Public means: in a module whose dotted name has no part starting with `_`, defined in that module (not
imported into it), and named without a leading `_`. A method that overrides a documented method of a
base class counts as documented (its base's docstring is what `help()` and the API reference show).
The API reference (`mkdocs.yml`) is generated from these docstrings.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
from types import ModuleType

import pytest

PACKAGES = ["hf_specssm", "hf_specssm.kernels"]
if importlib.util.find_spec("gradio") is not None:
    PACKAGES.append("hf_specssm_demo")


def _public_modules(package_name: str) -> list[ModuleType]:
    package = importlib.import_module(package_name)
    modules = [package]
    for info in pkgutil.walk_packages(package.__path__, package_name + "."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        modules.append(importlib.import_module(info.name))
    return modules


def _own_doc(obj: object) -> str | None:
    """`obj`'s own docstring; dataclasses' generated `Name(field: type, ...)` does not count."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if inspect.isclass(obj) and doc and doc.startswith(f"{obj.__name__}("):
        return None
    return doc.strip() if doc and doc.strip() else None


def _member_function(member: object) -> object | None:
    """The function behind a class attribute, or `None` for data attributes."""
    if isinstance(member, (staticmethod, classmethod)):
        return member.__func__
    if isinstance(member, property):
        return member.fget
    if hasattr(member, "func") and type(member).__name__ == "cached_property":
        return member.func
    return member if inspect.isfunction(member) else None


def _inherited_doc(cls: type, name: str) -> str | None:
    for base in cls.__mro__[1:]:
        if name in vars(base):
            function = _member_function(vars(base)[name])
            if function is not None and _own_doc(function):
                return _own_doc(function)
    return None


def _undocumented(module: ModuleType) -> list[str]:
    missing = [] if _own_doc(module) else [f"{module.__name__} (module)"]
    for name, obj in vars(module).items():
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if not _own_doc(obj):
            missing.append(f"{module.__name__}.{name}")
        if not inspect.isclass(obj):
            continue
        for member_name, member in vars(obj).items():
            function = _member_function(member)
            if member_name.startswith("_") or function is None:
                continue
            if not _own_doc(function) and not _inherited_doc(obj, member_name):
                missing.append(f"{module.__name__}.{name}.{member_name}")
    return missing


@pytest.mark.parametrize("package_name", PACKAGES)
def test_every_public_symbol_has_a_docstring(package_name):
    missing = [symbol for module in _public_modules(package_name) for symbol in _undocumented(module)]
    assert not missing, "public symbols without a docstring:\n" + "\n".join(missing)
