"""What the mixer probes found, kept where every layer can read it, and the continuation probe itself.

The probes of `_compat.probes` run the package's own SSM paths (`hf_specssm.ssm`, `hf_specssm.cache`), so
they sit above them; those paths must still know what was found. This module, below everything, keeps:

- the results, per (capability, mixer class, dtype, device), with the reason of each refusal, and the
  machinery that runs a probe once (`admit`): a lock, a guard so a path under test that asks about its
  own capability gets "yes" instead of a second probe, and one `MixerProbeWarning` per mixer class and
  capability that fails;
- values imposed by tests (`forced`);
- the continuation probe, which needs nothing above this layer (a mixer, a `DynamicCache` and the scan
  patch), so `ssm.mixers.exact_continuation` can probe on its own first use (`continuation_mode`).

Comparisons are relative (`max |found − expected| / max |expected|`) against one-token steps, the path
every transformers mixer gets right (notes: transformers-5-internals.md §3), within a tolerance for the
mixer's dtype. A probe that raises has failed.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from collections.abc import Callable, Iterator

import torch
from transformers.cache_utils import Cache, DynamicCache

from hf_specssm._compat.mixers import CONTINUATION_MODES, continuation, has_patchable_scan, ssm_mixers
from hf_specssm._compat.recurrent import linear_state_slots, recurrent_state

CAPABILITIES = ("continuation", "replay", "identity_steps", "tree_scan", "state_replay", "fused_verification")
# what a capability reads as while its own probe runs, and after a failure
OPTIMISTIC = {
    "continuation": "native",
    "replay": True,
    "identity_steps": True,
    "tree_scan": True,
    "state_replay": True,
    "fused_verification": True,
}
FAILED = {
    "continuation": "none",
    "replay": False,
    "identity_steps": False,
    "tree_scan": False,
    "state_replay": False,
    "fused_verification": False,
}
_FALLBACKS = {
    "continuation": "multi-token forwards from a cached state run one token at a time",
    "replay": "accepted tokens are re-fed instead of replayed",
    "identity_steps": "Joint Attainment and Advancement is not used (verification falls back to replay)",
    "tree_scan": "trees are not verified in one forward (chains are verified instead)",
    "state_replay": "chains are verified by transformers' padded chunk scan and committed by replaying the "
    "mixer inputs",
    "fused_verification": "frozen verifications run transformers' mixer forward with the single-chunk scan",
}
_IN_PROGRESS = object()

_lock = threading.RLock()
_local = threading.local()
# (capability, mixer class, dtype, device) -> (value, reason the fast path is refused, or None)
_results: dict[tuple, object] = {}
_warned: set[tuple[str, str]] = set()
_forced: dict[str, object] = {}


class MixerProbeWarning(UserWarning):
    """A mixer probe failed: a slower exact path replaces the fast one."""


def representatives(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The first SSM mixer module of each mixer class of `model`, in layer order."""
    seen: dict[type, torch.nn.Module] = {}
    for mixer in ssm_mixers(model):
        seen.setdefault(type(mixer), mixer)
    return list(seen.values())


def _key(capability: str, mixer: torch.nn.Module) -> tuple:
    parameter = next(mixer.parameters())
    return (capability, type(mixer), parameter.dtype, str(parameter.device))


def probing() -> bool:
    """Whether a probe is running on this thread (the paths it tests then see real values, not forced)."""
    return getattr(_local, "depth", 0) > 0


def admit(
    capability: str,
    mixer: torch.nn.Module,
    model: torch.nn.Module,
    probe: Callable[[torch.nn.Module, torch.nn.Module], tuple[object, str | None]],
) -> tuple[object, str | None]:
    """`(value, reason)` of one capability for one mixer: the kept result, else `probe(mixer, model)` run
    once (under `torch.no_grad`), kept, and a warning if it refused the fast path.

    Inside a running probe a capability not yet known reads as supported and is not probed: the paths
    under test ask about themselves, and probing from inside another probe would run under its patches.
    """
    if any(parameter.is_meta for parameter in mixer.parameters()):
        # a model on the meta device computes no values: there is nothing to probe, nothing to keep
        return OPTIMISTIC[capability], None
    key = _key(capability, mixer)
    with _lock:
        found = _results.get(key)
        if found is _IN_PROGRESS or (found is None and probing()):
            return OPTIMISTIC[capability], None
        if found is not None:
            return found
        _results[key] = _IN_PROGRESS
        _local.depth = getattr(_local, "depth", 0) + 1
        try:
            with torch.no_grad():
                found = probe(mixer, model)
        except Exception as error:  # a probe that raises is a failed probe
            found = (FAILED[capability], f"the probe raised {type(error).__name__}: {error}")
        finally:
            _local.depth -= 1
            _results[key] = found
        if found[1] is not None:
            _warn_once(type(mixer).__name__, capability, found[1])
        return found


def recorded(capability: str, mixer: torch.nn.Module) -> tuple[object, str | None] | None:
    """The kept `(value, reason)` of a capability for a mixer, or `None` before (or during) its probe."""
    with _lock:
        found = _results.get(_key(capability, mixer))
    return None if found is _IN_PROGRESS else found


def forced_value(capability: str) -> object | None:
    """The value `forced` imposes on `capability` right now (never inside a probe), else `None`."""
    if probing():
        return None
    return _forced.get(capability)


@contextlib.contextmanager
def forced(**capabilities: object) -> Iterator[None]:
    """Inside this context every model with SSM mixers reports the given capabilities.

    For tests of the fallbacks, e.g. `with forced(replay=False): ...` or `forced(continuation="none")`:
    `probes.mixer_support` reports them, `ssm.mixers.exact_continuation` follows a forced continuation, and
    `check_identity_steps` / `check_tree_scan` refuse what is forced off. Nested contexts stack; the
    previous values are back on exit. Forcing is silent (no warning) and never reaches the probes.
    """
    unknown = sorted(set(capabilities) - set(CAPABILITIES))
    if unknown:
        raise ValueError(f"unknown capabilities {unknown}; choose from {CAPABILITIES}.")
    for name, value in capabilities.items():
        valid = value in CONTINUATION_MODES if name == "continuation" else isinstance(value, bool)
        if not valid:
            raise ValueError(f"{name} cannot be forced to {value!r}.")
    with _lock:
        previous = dict(_forced)
        _forced.update(capabilities)
    try:
        yield
    finally:
        with _lock:
            _forced.clear()
            _forced.update(previous)


def clear_cache() -> None:
    """Forget every probe result and every warning given, so the next use probes (and warns) again."""
    with _lock:
        _results.clear()
        _warned.clear()


def _warn_once(mixer_name: str, capability: str, reason: str) -> None:
    if (mixer_name, capability) in _warned:
        return
    _warned.add((mixer_name, capability))
    warnings.warn(
        f"hf_specssm: the {capability} probe failed for {mixer_name} ({reason}); {_FALLBACKS[capability]}.",
        MixerProbeWarning,
        stacklevel=_caller_stacklevel(),
    )


def _caller_stacklevel() -> int:
    """The `stacklevel` that points a warning at the first frame outside hf_specssm."""
    package = __name__.split(".")[0]
    frame, level = inspect.currentframe(), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == package:
        frame, level = frame.f_back, level + 1
    # (this function's own frame is one level below `warnings.warn`'s caller)
    return max(level - 1, 1)


# ---------------------------------------------------------------- comparisons and inputs


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a probe comparison in the mixer's dtype (exact paths measure ~2e-7 in fp32,
    ~1e-3 in fp16 and ~8e-3 in bf16 on the tiny test models)."""
    if dtype == torch.bfloat16:
        return 3e-2
    if dtype == torch.float16:
        return 1e-2
    return 1e-4


def relative_error(found: torch.Tensor, expected: torch.Tensor) -> float:
    """`max |found − expected| / max |expected|`, in fp32."""
    scale = expected.float().abs().max().clamp_min(1e-12)
    return float((found.float() - expected.float()).abs().max() / scale)


def worst_error(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The largest `relative_error` over `(found, expected)` pairs."""
    if not pairs:
        raise RuntimeError("nothing to compare: the mixer kept no state in the cache")
    return max(relative_error(found, expected) for found, expected in pairs)


def probe_inputs(
    mixer: torch.nn.Module, model: torch.nn.Module, length: int, new_token_scale: float = 1.0
) -> torch.Tensor:
    """`[1, length, H]` seeded standard-normal hidden states in the mixer's dtype and device; positions
    after the two-token prefill are scaled by `new_token_scale`."""
    projection = getattr(mixer, "in_proj", None)
    if isinstance(projection, torch.nn.Linear):
        hidden = projection.in_features
    else:
        hidden = model.config.get_text_config(decoder=True).hidden_size
    parameter = next(mixer.parameters())
    generator = torch.Generator().manual_seed(0)
    hidden_states = torch.randn(1, length, hidden, generator=generator)
    hidden_states[:, 2:] *= new_token_scale
    return hidden_states.to(parameter.device, parameter.dtype)


def layer_states(cache: Cache, mixer: torch.nn.Module) -> list[torch.Tensor]:
    """Copies of the conv and SSM state of the mixer's cache layer (`[B, C, K]`, `[B, …, N]`)."""
    return [store[key].clone() for store, key in linear_state_slots(cache.layers[mixer.layer_idx])]


def prefilled(mixer: torch.nn.Module, hidden: torch.Tensor, new_cache: Callable[[], Cache]) -> Cache:
    """`new_cache()` after a two-token prefill of `hidden[:, :2]` through the mixer alone (exact: a
    forward from an empty state starts from zeros, as it should)."""
    cache = new_cache()
    mixer(hidden[:, :2], cache_params=cache)
    return cache


def stepped(
    mixer: torch.nn.Module, hidden: torch.Tensor, positions: list[int], new_cache: Callable[[], Cache]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference: after the prefill, one-token steps at `positions`; outputs `[1, len, H]` and states."""
    cache = prefilled(mixer, hidden, new_cache)
    outputs = [mixer(hidden[:, position : position + 1], cache_params=cache) for position in positions]
    return torch.cat(outputs, dim=1), layer_states(cache, mixer)


# ---------------------------------------------------------------- the continuation probe


def _continued(
    mixer: torch.nn.Module,
    hidden: torch.Tensor,
    mode: str,
    new_cache: Callable[[], Cache],
    forget: bool = False,
) -> list[torch.Tensor]:
    """Output `[1, 2, H]` and states of a two-token forward of `hidden[:, 2:4]` after the prefill, inside
    `continuation(mode)`; with `forget`, from a zeroed SSM state (the conv window kept)."""
    cache = prefilled(mixer, hidden, new_cache)
    if forget:
        recurrent_state(cache.layers[mixer.layer_idx]).zero_()
    with continuation([mixer], mode):
        output = mixer(hidden[:, 2:4], cache_params=cache)
    return [output, *layer_states(cache, mixer)]


def _continuation_error(
    found: list[torch.Tensor], expected: list[torch.Tensor], forgetful: list[torch.Tensor], limit: float
) -> float:
    """Worst relative error of a continuation, or `inf` when it is not clearly nearer the reference than a
    forward that forgot the cached SSM state (`forgetful`).

    A tiny model may forget fast, and half precision may then not tell the two apart within its tolerance
    alone. A path that drops the carried state, or adds it twice, is off by exactly what forgetting costs,
    so wherever forgetting shows (beyond `limit`, and at least in the tensor where it shows most) the
    continuation must be off by less than half of that.
    """
    errors = [relative_error(tensor, reference) for tensor, reference in zip(found, expected, strict=True)]
    costs = [relative_error(forgot, reference) for forgot, reference in zip(forgetful, expected, strict=True)]
    most = max(range(len(costs)), key=costs.__getitem__)
    for index, (error, cost) in enumerate(zip(errors, costs, strict=True)):
        if (cost > limit or index == most) and error >= 0.5 * cost:
            return float("inf")
    return max(errors)


def probe_continuation(mixer: torch.nn.Module, model: torch.nn.Module) -> tuple[str, str | None]:
    """`"native"` when a two-token forward from a cached state matches one-token steps as transformers
    runs it, `"patched"` when it does inside the carried-state scan patch, else `"none"`."""
    limit = tolerance(next(mixer.parameters()).dtype)
    # smaller new tokens: the carried state then weighs more in what the continuation computes
    hidden = probe_inputs(mixer, model, 4, new_token_scale=0.3)

    def new_cache() -> Cache:
        return DynamicCache(config=model.config)

    expected_output, expected_states = stepped(mixer, hidden, [2, 3], new_cache)
    expected = [expected_output, *expected_states]
    forgetful = _continued(mixer, hidden, "native", new_cache, forget=True)
    found = _continued(mixer, hidden, "native", new_cache)
    if _continuation_error(found, expected, forgetful, limit) <= limit:
        return "native", None
    native = worst_error(list(zip(found, expected, strict=True)))
    forgetting = worst_error(list(zip(forgetful, expected, strict=True)))
    detail = f"forgetting the cached SSM state is off by {forgetting:.1e}"
    if not has_patchable_scan(mixer):
        return "none", f"a two-token forward from a cached state is off by {native:.1e} ({detail})"
    found = _continued(mixer, hidden, "patched", new_cache)
    if _continuation_error(found, expected, forgetful, limit) <= limit:
        return "patched", None
    patched = worst_error(list(zip(found, expected, strict=True)))
    return "none", (
        f"a two-token forward from a cached state is off by {native:.1e} as transformers runs it and by "
        f"{patched:.1e} with the carried-state scan ({detail})"
    )


def continuation_mode(model: torch.nn.Module) -> str:
    """How multi-token forwards of `model` from a cached state are made exact (`CONTINUATION_MODES`):
    forced, else the weakest mode over its mixer classes, probed on first use. `"native"` without mixers."""
    mode = forced_value("continuation")
    if mode is not None:
        return mode
    found = [admit("continuation", mixer, model, probe_continuation)[0] for mixer in representatives(model)]
    return max(found, key=CONTINUATION_MODES.index, default="native")
