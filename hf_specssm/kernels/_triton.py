"""Whether the Triton kernels can run on a tensor: Triton is importable and the tensor lives on CUDA."""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.cache
def triton_installed() -> bool:
    """Whether the `triton` package can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(tensor: torch.Tensor) -> bool:
    """Dispatch rule shared by every op: Triton on CUDA tensors when installed, the reference elsewhere."""
    return tensor.is_cuda and triton_installed()
