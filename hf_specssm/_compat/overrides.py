"""Module-level functions of transformers replaced while a context needs them, shared by every patch.

A module global (`mamba2_chunk_scan`, `use_gqa_in_sdpa`, ...) is replaced while at least one context needs
it; a counter makes nested and concurrent contexts safe, and the last one out puts the original back. The
replacement is process-wide, so every wrapper must defer to the original for calls that are not its own
(other threads run other models meanwhile): wrappers act only on what a `ContextVar` of this thread says.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType

_lock = threading.Lock()
# (module, function name) -> [original function, installed wrapper, wrapper factory, number of open contexts]
_overrides: dict[tuple[ModuleType, str], list] = {}


@contextlib.contextmanager
def function_override(
    modules: Iterable[ModuleType], name: str, wrapper: Callable[[Callable], Callable]
) -> Iterator[None]:
    """Inside this context `modules` call `wrapper(original)` instead of their module-level function
    `name`. Modules without a callable `name` are left alone. `wrapper` must be the same object on every
    call for the same function (a module-level factory), so that nested contexts share one installed
    wrapper.

    Raises:
        RuntimeError: another wrapper already replaces `name` in one of the modules.
    """
    chosen = {module for module in modules if callable(getattr(module, name, None))}
    with _lock:
        for module in chosen:
            entry = _overrides.get((module, name))
            if entry is not None and entry[2] is not wrapper:
                raise RuntimeError(f"{module.__name__}.{name} is already replaced by another wrapper.")
        for module in chosen:
            entry = _overrides.get((module, name))
            if entry is None:
                original = getattr(module, name)
                entry = _overrides[(module, name)] = [original, wrapper(original), wrapper, 0]
                setattr(module, name, entry[1])
            entry[3] += 1
    try:
        yield
    finally:
        with _lock:
            for module in chosen:
                entry = _overrides[(module, name)]
                entry[3] -= 1
                if entry[3] == 0:
                    setattr(module, name, entry[0])
                    del _overrides[(module, name)]


def original_function(module: ModuleType, name: str) -> Callable | None:
    """The function `module.name` is when no context of ours replaces it (transformers' own), else `None`
    where the module has no such attribute."""
    function = getattr(module, name, None)
    entry = _overrides.get((module, name))
    if entry is not None and function is entry[1]:
        return entry[0]
    return function
