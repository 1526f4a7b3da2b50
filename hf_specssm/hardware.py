"""Which dtype runs a target alone fastest on this machine, and why.

bf16 halves the bytes every weight read moves, so where the hardware multiplies bf16 natively it is the
faster dtype for decoding: GPUs with bf16 support, Intel CPUs with AMX (`amx_bf16`) and CPUs with
AVX512-BF16 (`avx512_bf16`). On a CPU with AVX2 only, torch emulates bf16 (each value is widened to fp32
and back), so fp32 is faster there. Measured on an AVX512-BF16 EPYC, Qwen2.5-Coder-1.5B: fp32 1.83 ms for
one token and 4.15 ms for eight; bf16 0.74 and 0.81 ms.

fp32 is also the dtype in which speculative decoding is token-for-token identical to plain greedy
decoding; in bf16 a multi-token verification forward can round differently from a one-token step, so a
near-tie can flip (see the README's limits).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: the `--dtype` choices of the command-line tools: `auto` asks `fastest_dtype`
DTYPE_CHOICES = ("auto", *DTYPES)
#: CPU flags (as /proc/cpuinfo spells them) under which bf16 matrix products run natively
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
_REPORTED_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


@dataclass(frozen=True)
class DtypeChoice:
    """A dtype for the target and the reason it was chosen.

    Attributes:
        name: `"bf16"` or `"fp32"` (the `--dtype` spelling).
        reason: one sentence for the user, naming the hardware fact behind the choice.
    """

    name: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype (`torch.bfloat16` or `torch.float32`)."""
        return DTYPES[self.name]

    def describe(self) -> str:
        """`"bf16 (reason)"`: what the tools print."""
        return f"{self.name} ({self.reason})"


def read_cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags from `path` (Linux), or `None` where the file cannot be read."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return frozenset()


def cpu_flags(flags: frozenset[str] | None = None) -> str:
    """The CPU features that decide the dtype and how verification cost scales, e.g. `"avx512f,avx2"`."""
    flags = read_cpu_flags() if flags is None else flags
    if flags is None:
        return platform.processor() or platform.machine() or "unknown"
    present = ",".join(flag for flag in _REPORTED_FLAGS if flag in flags)
    return present or "none of " + "/".join(_REPORTED_FLAGS)


def fastest_dtype(
    device: str | torch.device = "cpu",
    flags: frozenset[str] | None = None,
    capability: str | None = None,
) -> DtypeChoice:
    """The dtype in which the target alone decodes fastest on `device`, with the reason.

    Args:
        device: where the target runs (`"cpu"`, `"cuda"`, `"cuda:1"`, …).
        flags: the CPU's flags (default: read from /proc/cpuinfo); tests pass their own.
        capability: torch's CPU capability (default: `torch.backends.cpu.get_cpu_capability()`, e.g.
            `"AVX2"`, `"AVX512"`), used where no flags can be read.

    Returns:
        bf16 on GPUs that support it and on CPUs with AMX or AVX512-BF16; fp32 elsewhere (AVX2-only CPUs,
        GPUs without bf16, CPUs whose features cannot be read).
    """
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return DtypeChoice("bf16", f"{torch.cuda.get_device_name(device)} computes in bf16 natively")
        return DtypeChoice("fp32", "this GPU has no native bf16")
    if device.type != "cpu":
        return DtypeChoice("fp32", f"no bf16 rule for {device.type} devices; fp32 is exact everywhere")
    flags = read_cpu_flags() if flags is None else flags
    if flags:
        native = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
        if native:
            return DtypeChoice("bf16", f"the CPU has {native[0]}: bf16 matrix products run natively")
        return DtypeChoice(
            "fp32",
            f"the CPU has {cpu_flags(flags)} but neither amx_bf16 nor avx512_bf16: bf16 would be emulated",
        )
    capability = capability if capability is not None else torch.backends.cpu.get_cpu_capability()
    return DtypeChoice(
        "fp32", f"the CPU's bf16 support cannot be read (torch reports {capability}); fp32 is never emulated"
    )


def resolve_dtype(requested: str, device: str | torch.device = "cpu") -> DtypeChoice:
    """`requested` (`"auto"`, `"bf16"` or `"fp32"`) as a `DtypeChoice`; `auto` asks `fastest_dtype`.

    Raises:
        ValueError: `requested` is none of `DTYPE_CHOICES`.
    """
    if requested == "auto":
        return fastest_dtype(device)
    if requested not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}; got {requested!r}.")
    return DtypeChoice(requested, "as asked (--dtype)")
