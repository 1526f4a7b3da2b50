"""transformers' RMSNorm modules in one compiled call during a verification forward on CPU.

A decoder layer's RMSNorm is ~8 small torch ops (`to`, `pow`, `mean`, `add`, `rsqrt`, `mul`, `to`, `mul`)
over a few rows. After the projections have streamed their weights through the caches, each of those ops
pays for its own cold reads and allocation: on a 2-core Xeon a 9-row norm of 1,024 values took ~50–70 µs
in place against ~12 µs in a loop, 3.4 ms of a Mamba2-370M verification (48 blocks). `kernels.cpu`
`rms_norm` does the same arithmetic in one pass with the rows and the weight prefetched first (~12 µs
in place).

A module is admitted (`lean_norm_problem`) when it looks like LlamaRMSNorm — one 1-D `weight`, an epsilon,
a forward of one tensor, no buffers or children — and, on its own weights, its forward and the kernel
agree on a seeded input (float32 to rounding; bf16 at most one unit in the last place apart, nearly all
identical): a norm of another form, such as Gemma's and Qwen3-Next's `(1 + weight)`, fails the check and
keeps its forward. Inside `lean_norms(norms)` the admitted modules call the kernel for float32 or bf16 CPU
inputs without autograd; calls from other threads and every other input run the module's own forward.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch

from hf_specssm import _compat
from hf_specssm.kernels.cpu import cpu_kernels

__all__ = ["LEAN_NORM_DTYPES", "lean_norm_modules", "lean_norm_problem", "lean_norms"]

#: dtypes of the norms the kernel serves (the module's weight and its input alike)
LEAN_NORM_DTYPES = (torch.float32, torch.bfloat16)
# set inside `lean_norms`: this context's calls of the admitted norms run the kernel
_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_specssm_lean_norms", default=False)
# module -> (its weight's version, storage, dtype and epsilon; the check's verdict)
_VERDICTS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str | None]] = weakref.WeakKeyDictionary()


def _epsilon(module: torch.nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _structure_problem(module: torch.nn.Module) -> str | None:
    """Why `module` does not look like LlamaRMSNorm, or `None`."""
    parameters = dict(module.named_parameters(recurse=False))
    weight = parameters.get("weight")
    if set(parameters) != {"weight"} or weight.dim() != 1 or weight.numel() == 0:
        return "not a norm with one 1-D weight"
    if list(module.buffers()) or list(module.children()):
        return "a norm with buffers or submodules"
    if _epsilon(module) is None:
        return "no variance_epsilon or eps"
    try:
        signature = inspect.signature(type(module).forward)
    except (TypeError, ValueError):
        return "a forward without a signature"
    if len(signature.parameters) != 2:  # (self, hidden_states): a gated norm takes the gate too
        return "a forward of more than one input"
    if weight.device.type != "cpu" or weight.dtype not in LEAN_NORM_DTYPES:
        return f"the kernel runs float32 or bf16 norms on the CPU, not {weight.dtype} on {weight.device.type}"
    return None


@torch.no_grad()
def _agreement_problem(module: torch.nn.Module, kernels) -> str | None:
    """Why the kernel does not reproduce `module`'s own forward on a seeded input, or `None`."""
    weight, eps = module.weight, _epsilon(module)
    generator = torch.Generator().manual_seed(0)
    width = weight.numel()
    # rows of different scales, as hidden states have
    scales = torch.tensor([0.05, 1.0, 7.0, 300.0])[:, None, None]
    inputs = (torch.randn(4, 3, width, generator=generator) * scales).to(weight.device, weight.dtype)
    expected = type(module).forward(module, inputs)
    if (
        not isinstance(expected, torch.Tensor)
        or expected.shape != inputs.shape
        or expected.dtype != weight.dtype
    ):
        return "its forward does not return a tensor of the input's shape and dtype"
    ours = kernels.rms_norm(inputs, weight, eps)
    difference = (ours.float() - expected.float()).abs()
    if weight.dtype == torch.float32:
        close = difference <= 1e-5 * expected.abs() + 1e-6 * expected.abs().max()
        return None if bool(close.all()) else "its forward is not weight · x / rms(x)"
    # bf16: the kernel rounds where the module rounds; sums in another order may move a last place
    within_one_place = difference <= expected.float().abs() * 2.0**-7 + 1e-30
    identical = float((difference == 0).float().mean())
    if bool(within_one_place.all()) and identical >= 0.99:
        return None
    return "its forward is not weight · x / rms(x) rounded as LlamaRMSNorm rounds"


def lean_norm_problem(module: torch.nn.Module) -> str | None:
    """Why `lean_norms` cannot run `module` through the compiled kernel, or `None`: it must look like
    LlamaRMSNorm (float32 or bf16 on the CPU) and agree with the kernel on a seeded input. The verdict is
    kept per module until its weight changes (in place or replaced)."""
    problem = _structure_problem(module)
    if problem is not None:
        return problem
    kernels = cpu_kernels()
    if kernels is None:
        return "the compiled CPU kernels are unavailable"
    weight = module.weight
    key = (weight._version, weight.data_ptr(), weight.dtype, _epsilon(module))
    kept = _VERDICTS.get(module)
    if kept is None or kept[0] != key:
        kept = _VERDICTS[module] = (key, _agreement_problem(module, kernels))
    return kept[1]


def lean_norm_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `model` that `lean_norms` serves (`lean_norm_problem` clear)."""
    return [module for module in model.modules() if lean_norm_problem(module) is None]


def _lean_forward(module: torch.nn.Module, original: Callable, kernels) -> Callable:
    eps = _epsilon(module)

    def forward(hidden_states, *args, **kwargs):
        weight = module.weight
        if (
            _ACTIVE.get()
            and not args
            and not kwargs
            and isinstance(hidden_states, torch.Tensor)
            and hidden_states.dtype == weight.dtype
            and hidden_states.device.type == "cpu"
            and weight.device.type == "cpu"
            and not (torch.is_grad_enabled() and (hidden_states.requires_grad or weight.requires_grad))
        ):
            return kernels.rms_norm(hidden_states, weight, eps)
        return original(hidden_states, *args, **kwargs)

    return forward


@contextlib.contextmanager
def lean_norms(norms: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Inside this context, calls of `norms` (admitted by `lean_norm_problem`) in this thread run the compiled
    `rms_norm` for float32 and bf16 CPU inputs without autograd; others run each module's forward.

    Args:
        norms: `lean_norm_modules(model)`, or a subset.
    """
    kernels = cpu_kernels()
    if kernels is None or not norms:
        yield
        return
    token = _ACTIVE.set(True)
    try:
        with _compat.replaced_forwards({norm: _lean_forward(norm, norm.forward, kernels) for norm in norms}):
            yield
    finally:
        _ACTIVE.reset(token)
