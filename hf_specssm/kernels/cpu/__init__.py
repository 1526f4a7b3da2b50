"""CPU kernels for short SSM verifications, compiled once per machine (see README.md in this folder).

`cpu_kernels()` returns the compiled extension, or `None` where it cannot be had (no C++ compiler, a build
error, `HF_SPECSSM_CPU_KERNELS=0`); every caller then runs the op's torch reference. The build takes
~25 s on 2 cores and is cached under `~/.cache/hf_specssm/cpu_kernels/` (or `$HF_SPECSSM_CACHE`), keyed by
the source, the compiler flags, the torch version and install, Python and this CPU's instruction sets, so
a cache moved to another machine is rebuilt rather than run with instructions that CPU lacks, and two
environments do not rebuild over each other.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers.activations import ACT2FN

__all__ = [
    "build_cpu_kernels",
    "cpu_kernels",
    "cpu_kernels_disabled",
    "cpu_kernels_failure",
    "depthwise_conv",
    "kernel_inputs",
    "timed_kernels",
    "use_cpu_kernels",
]

logger = logging.getLogger(__name__)

#: set to `0` to keep the torch references everywhere
ENVIRONMENT_SWITCH = "HF_SPECSSM_CPU_KERNELS"
SOURCE = Path(__file__).with_name("ssm_kernels.cpp")
#: `cpu_kernels_failure()` where no compiler was found (the one failure that is not a defect)
NO_COMPILER = "no C++ compiler on PATH"
_LOCK = threading.Lock()
_FAILURE: list[str] = []


def cpu_kernels_disabled() -> bool:
    """Whether `HF_SPECSSM_CPU_KERNELS=0` (or `false`, `off`) turned the kernels off."""
    return os.environ.get(ENVIRONMENT_SWITCH, "1").strip().lower() in ("0", "false", "off", "no")


def _cpu_signature() -> str:
    """The machine and the instruction-set flags of this CPU (`/proc/cpuinfo`), for the cache key."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    flags = line.split(":", 1)[1].strip()
                    break
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


def _cache_root() -> Path:
    root = os.environ.get("HF_SPECSSM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_specssm")
    return Path(root) / "cpu_kernels"


def _compiler_flags() -> list[str]:
    """`-fopenmp` for torch's `at::parallel_for` (its OpenMP backend is inline in the headers) and the
    `omp simd` loops; `-march=native` on x86, where the cache key carries this CPU's flags."""
    native = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else []
    return ["-O3", "-fopenmp", *native]


def _build_name() -> str:
    key = hashlib.sha256()
    key.update(" ".join(_compiler_flags()).encode())
    key.update(SOURCE.read_bytes())
    key.update(torch.__version__.encode())
    # this torch's install (its headers and libraries): two environments never rebuild over each other
    key.update(os.path.dirname(torch.__file__).encode())
    key.update(sys.version.encode())
    key.update(_cpu_signature().encode())
    return f"hf_specssm_cpu_{key.hexdigest()[:16]}"


def _ninja_on_path() -> dict[str, str]:
    """`PATH` with this interpreter's scripts folder and the `ninja` package's binary first (torch's
    extension builder runs `ninja` from `PATH`; a virtual environment that was not activated lacks it)."""
    folders = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI package ships the binary

        folders.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    return {"PATH": os.pathsep.join([*folders, os.environ.get("PATH", "")])}


def build_cpu_kernels(verbose: bool = False):
    """Compile (or load the cached build of) the CPU kernels; raises what the build raised.

    Returns:
        The extension module (`masked_chunk_scan`, `tree_scan_diagonal`, `window_conv`,
        `mamba2_verification_mixer`, `rms_norm`).
    """
    from torch.utils import cpp_extension

    name = _build_name()
    directory = _cache_root() / name
    directory.mkdir(parents=True, exist_ok=True)
    flags = _compiler_flags()
    saved = os.environ.get("PATH")
    os.environ.update(_ninja_on_path())
    try:
        if not any(directory.glob("*.so")):
            logger.warning("hf_specssm: compiling the CPU kernels once for this machine (~25 s)")
        return cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=verbose,
        )
    finally:
        if saved is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = saved


@functools.cache
def _loaded():
    with _LOCK:
        if shutil.which("c++", path=_ninja_on_path()["PATH"]) is None and shutil.which("g++") is None:
            _FAILURE.append(NO_COMPILER)
            return None
        try:
            return build_cpu_kernels()
        except Exception as error:
            _FAILURE.append(
                f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error) else ''}"
            )
            logger.warning(
                "hf_specssm: the CPU kernels could not be built (%s); the torch references run instead",
                _FAILURE[-1],
            )
            return None


# the seconds per kernel name that `timed_kernels` collects for this thread, or None outside it
_TIMINGS: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "hf_specssm_kernel_timings", default=None
)


class _TimedKernels:
    """The extension seen through a stopwatch: each call adds its wall seconds to `timings[name]`."""

    def __init__(self, kernels, timings: dict[str, float]) -> None:
        self._kernels, self._timings = kernels, timings

    def __getattr__(self, name: str):
        function = getattr(self._kernels, name)
        if not callable(function):
            return function

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._timings[name] = self._timings.get(name, 0.0) + time.perf_counter() - start

        return timed


@contextlib.contextmanager
def timed_kernels() -> Iterator[dict[str, float]]:
    """Inside this context this thread's `cpu_kernels()` hands out the kernels behind a stopwatch: the
    yielded dict maps each kernel's name to the seconds spent in its calls (wall clock; the kernels run
    synchronously). For benchmarks: the profiler does not see these calls (they are not dispatcher ops).
    Kernels fetched before the context began are not timed."""
    timings: dict[str, float] = {}
    token = _TIMINGS.set(timings)
    try:
        yield timings
    finally:
        _TIMINGS.reset(token)


def cpu_kernels():
    """The compiled CPU kernels, or `None` (disabled, or the build failed: `cpu_kernels_failure()`); inside
    `timed_kernels()`, the same kernels timed."""
    if cpu_kernels_disabled():
        return None
    kernels = _loaded()
    timings = _TIMINGS.get()
    return kernels if timings is None or kernels is None else _TimedKernels(kernels, timings)


def cpu_kernels_failure() -> str | None:
    """Why the last build attempt failed, or `None`."""
    return _FAILURE[-1] if _FAILURE else None


def use_cpu_kernels(*tensors: torch.Tensor) -> bool:
    """Whether the CPU kernels serve these tensors: all on the CPU, no autograd needed, kernels available."""
    if not all(t.device.type == "cpu" for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return cpu_kernels() is not None


_NO_TENSOR = torch.empty(0)


def kernel_inputs(*tensors: torch.Tensor | None) -> list[torch.Tensor]:
    """The compiled kernels' tensor arguments: float32, and an empty tensor for `None` (an absent state,
    skip term or bias)."""
    # a float32 tensor passes as it is (`.float()` would still cost a dispatcher call per tensor and layer)
    return [
        _NO_TENSOR if tensor is None else tensor if tensor.dtype == torch.float32 else tensor.float()
        for tensor in tensors
    ]


def depthwise_conv(
    inputs: torch.Tensor,
    windows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
) -> torch.Tensor:
    """Depthwise conv of each output over its own window of input columns, through `window_conv`.

    Sums and bias in float32, rounded to `weight.dtype` once, then the activation (fused into the kernel
    for float32 SiLU). Callers check `use_cpu_kernels` first.

    Args:
        inputs: `[B, C, L]` conv inputs (channels-last memory is read without a copy).
        windows: `[T, K]` int64 column indices per output, oldest first; `-1` reads zeros.
        weight: `[C, K]`; bias: `[C]` or `None`; activation: transformers' `ACT2FN` name or `None`.

    Returns:
        `[B, C, T]` in `weight.dtype` (channels last in memory).
    """
    dtype = weight.dtype
    fused = dtype == torch.float32 and activation in ("silu", "swish")
    out = cpu_kernels().window_conv(*kernel_inputs(inputs), windows, *kernel_inputs(weight, bias), fused)
    if fused:
        return out
    out = out.to(dtype)
    return out if activation is None else ACT2FN[activation](out)
