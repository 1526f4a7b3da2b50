"""A second device, simulated on the CPU: which tensors an accelerator run would hold on the host.

`HostTensorGuard` is a `TorchFunctionMode` that labels every tensor it sees as *device* (the models'
parameters and buffers, the prompt, anything created with an explicit `device=` or moved with `.to(device)`,
and every result computed from a device tensor) or *host* (a factory call without `device=` — `torch.tensor(
[...])`, `torch.arange(n)` — `.cpu()`, and results computed from host tensors only). An op that mixes a
device tensor with a host tensor of one or more dimensions is what raises "Expected all tensors to be on
the same device" on a GPU; the guard records it (with the caller's frame) instead of passing silently on
the CPU. Indexing a device tensor with host indices and copying across devices are allowed, as on CUDA;
0-dim host tensors mix freely, as CUDA allows for CPU scalars.
"""

from __future__ import annotations

import os
import traceback

import torch
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

DEVICE, HOST = "device", "host"

# ops whose operands may sit on different devices on CUDA too
_CROSS_DEVICE_OK = {torch.Tensor.copy_, torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda}
_TO_HOST = {torch.Tensor.cpu}
_MOVES = {torch.Tensor.to, torch.Tensor.cuda}


def _tensors(tree) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


def _names_a_device(args: tuple, kwargs: dict) -> bool:
    """Whether a `.to(...)` / `.cuda(...)` call names a target device (not only a dtype)."""
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(arg, (torch.device, str, torch.Tensor)) for arg in args[1:])


class HostTensorGuard(TorchFunctionMode):
    """Records every op that mixes a device tensor with a host tensor (see the module docstring).

    Args:
        *modules: models whose parameters and buffers live on the device.
        inputs: tensors the caller passes on the device (the prompt).

    Attributes:
        violations: one line per offending op: its name, the operands' shapes, and the calling frame.
    """

    def __init__(self, *modules: torch.nn.Module, inputs: tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__()
        self.labels = WeakIdKeyDictionary()
        self.violations: list[str] = []
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                self.labels[tensor] = DEVICE
        for tensor in inputs:
            self.labels[tensor] = DEVICE

    def mark(self, tensor: torch.Tensor, label: str) -> None:
        """Label a tensor created outside the guard."""
        self.labels[tensor] = label

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in _MOVES and result is args[0] and _names_a_device(args, kwargs):
            # on the CPU a move is a no-op returning its input; on a GPU it makes a new device tensor
            result = result.clone()
        operands = _tensors((args, kwargs))
        on_device = [t for t in operands if self.labels.get(t) == DEVICE]
        on_host = [t for t in operands if self.labels.get(t) == HOST and t.dim() > 0]
        if on_device and on_host and not self._allowed(func, args):
            self._record(func, on_device, on_host)
        label = self._label(func, args, kwargs, operands, on_device)
        if label is not None:
            in_place = operands and result is operands[0]
            for tensor in _tensors(result):
                if not (in_place and tensor is operands[0] and tensor in self.labels):
                    self.labels[tensor] = label
        return result

    def _allowed(self, func, args: tuple) -> bool:
        if func in _CROSS_DEVICE_OK:
            return True
        # a device tensor indexed (read or written) by host indices; a written value must be on the device
        if func is torch.Tensor.__getitem__:
            return self.labels.get(args[0]) == DEVICE
        if func is torch.Tensor.__setitem__:
            value = args[2]
            value_on_host = (
                isinstance(value, torch.Tensor) and self.labels.get(value) == HOST and value.dim() > 0
            )
            return self.labels.get(args[0]) == DEVICE and not value_on_host
        return False

    def _label(self, func, args: tuple, kwargs: dict, operands: list, on_device: list) -> str | None:
        if func in _TO_HOST:
            return HOST
        if func in _MOVES and _names_a_device(args, kwargs):
            return DEVICE
        if not operands:
            if func is torch.device or not callable(func):
                return None
            return DEVICE if kwargs.get("device") is not None else HOST
        if on_device:
            return DEVICE
        if any(self.labels.get(t) == HOST for t in operands):
            return HOST
        return None

    def _record(self, func, on_device: list, on_host: list) -> None:
        name = resolve_name(func) or repr(func)
        frame = next(
            (
                f"{entry.filename}:{entry.lineno} ({entry.name})"
                for entry in reversed(traceback.extract_stack()[:-2])
                if f"{os.sep}hf_specssm{os.sep}" in entry.filename
                and f"{os.sep}tests{os.sep}" not in entry.filename
            ),
            "outside hf_specssm",
        )
        shapes = f"device {[tuple(t.shape) for t in on_device]}, host {[tuple(t.shape) for t in on_host]}"
        self.violations.append(f"{name}: {shapes} at {frame}")
