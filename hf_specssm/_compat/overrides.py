"""Module-level functions of transformers replaced while a context needs them, shared by every patch.

A module global (`mamba2_chunk_scan`, `use_gqa_in_sdpa`, ...) or a registry entry (the attention
function transformers keeps under "sdpa") is replaced while at least one context needs
it; a counter makes nested and concurrent contexts safe, and the last one out puts the original back. The
replacement is process-wide, so every wrapper must defer to the original for calls that are not its own
(other threads run other models meanwhile): wrappers act only on what a `ContextVar` of this thread says.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType

_lock = threading.Lock()
# (id of the module or registry, function name) -> [original function, installed wrapper, wrapper factory,
# number of open contexts]; modules and transformers' registries live as long as the process
_overrides: dict[tuple[int, str], list] = {}


@dataclass(frozen=True)
class _Slot:
    """One replaceable function: a module global, or an entry of a registry dict."""

    owner: object
    name: str

    @property
    def key(self) -> tuple[int, str]:
        return id(self.owner), self.name

    @property
    def label(self) -> str:
        if isinstance(self.owner, ModuleType):
            return f"{self.owner.__name__}.{self.name}"
        return f"{type(self.owner).__name__}[{self.name!r}]"

    def get(self) -> Callable | None:
        if isinstance(self.owner, dict):
            return self.owner.get(self.name)
        return getattr(self.owner, self.name, None)

    def set(self, function: Callable) -> None:
        if isinstance(self.owner, dict):
            self.owner[self.name] = function
        else:
            setattr(self.owner, self.name, function)


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
    with _slots_override([_Slot(module, name) for module in modules], wrapper):
        yield


@contextlib.contextmanager
def entry_override(mapping: dict, key: str, wrapper: Callable[[Callable], Callable]) -> Iterator[None]:
    """`function_override` for the function a registry dict holds under `key` (transformers'
    `AttentionInterface._global_mapping["sdpa"]`); a mapping without a callable entry is left alone."""
    with _slots_override([_Slot(mapping, key)], wrapper):
        yield


@contextlib.contextmanager
def _slots_override(slots: list[_Slot], wrapper: Callable[[Callable], Callable]) -> Iterator[None]:
    chosen = [slot for slot in slots if callable(slot.get())]
    with _lock:
        for slot in chosen:
            entry = _overrides.get(slot.key)
            if entry is not None and entry[2] is not wrapper:
                raise RuntimeError(f"{slot.label} is already replaced by another wrapper.")
        for slot in chosen:
            entry = _overrides.get(slot.key)
            if entry is None:
                original = slot.get()
                entry = _overrides[slot.key] = [original, wrapper(original), wrapper, 0]
                slot.set(entry[1])
            entry[3] += 1
    try:
        yield
    finally:
        with _lock:
            for slot in chosen:
                entry = _overrides[slot.key]
                entry[3] -= 1
                if entry[3] == 0:
                    slot.set(entry[0])
                    del _overrides[slot.key]


def original_function(module: ModuleType, name: str) -> Callable | None:
    """The function `module.name` is when no context of ours replaces it (transformers' own), else `None`
    where the module has no such attribute."""
    function = getattr(module, name, None)
    entry = _overrides.get(_Slot(module, name).key)
    if entry is not None and function is entry[1]:
        return entry[0]
    return function
