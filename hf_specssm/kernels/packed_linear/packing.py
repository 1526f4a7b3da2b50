"""Packing a model's `nn.Linear` layers for oneDNN, measured first, undone by a handle (see README.md)."""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hf_specssm import _compat

__all__ = [
    "LAYOUT_ROWS",
    "PackedLinears",
    "PackingMeasurement",
    "choose_layout",
    "measure_packing",
    "pack_linears",
    "packed_linear_available",
]

#: weight dtypes oneDNN's CPU inner product serves here
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
#: how `pack_linears` decides: `"auto"` measures and packs where packed is faster, `"always"` packs
PACK_MODES = ("auto", "always")
#: row counts `"auto"` times: a decoding step, short and long verifications
DEFAULT_ROWS = (1, 2, 3, 5, 9, 17)
#: the row counts oneDNN's blocked layout can be chosen for (its batch-size hint): one row (a step), or
#: several (a verification); `"auto"` times both
LAYOUT_ROWS = (1, 16)
#: a layout for several rows is taken only where one row runs at most this much slower than with the
#: one-row layout (plain decoding must not pay for faster verifications beyond timing noise)
ONE_ROW_SLACK = 1.02
# the attribute a packed module carries its packed weight in
_ATTRIBUTE = "_hf_specssm_packed"
# outputs of packed and stock products must agree to this relative error (probe): fp32 rounding, bf16's
_PROBE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@dataclass
class _Packed:
    """A module's packed weight, the weight version it was packed from, the fewest input rows that take the
    packed product (fewer run `F.linear`, where the measurement found it faster), and the row count its
    layout was chosen for (kept to repack with)."""

    weight: torch.Tensor
    version: int
    data_ptr: int
    min_rows: int = 1
    layout_rows: int = 1


def _reorder(weight: torch.Tensor, rows: int = 1) -> torch.Tensor:
    """`weight [out, in]` in oneDNN's blocked layout (an opaque tensor), tuned for `rows` input rows. On an
    AMX Xeon the one-row layout ran fp32 products of 2–17 rows 1.3–1.6× slower than a layout for 16 rows,
    which runs one row as fast (docs/benchmarks.md)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def _packed_product(input: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`input [..., in] @ Wᵀ + bias` → `[..., out]` through oneDNN's inner product."""
    return torch.ops.mkldnn._linear_pointwise(input, packed, bias, "none", [], "")


def packed_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build prepacks CPU linears of `dtype` and computes them right (a small probe
    against `F.linear`)."""
    if dtype not in PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=generator).to(dtype)
    bias = torch.randn(24, generator=generator).to(dtype)
    input = torch.randn(3, 40, generator=generator).to(dtype)
    try:
        with torch.no_grad():
            packed = _packed_product(input, _reorder(weight, 3), bias).float()
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    expected = F.linear(input.float(), weight.float(), bias.float())
    error = ((packed - expected).abs().max() / expected.abs().max()).item()
    return error < _PROBE_TOLERANCE[dtype]


def _packed_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """`nn.Linear.forward` through the packed weight, or the stock product where packing does not apply
    (autograd on trainable inputs or weights, another device or dtype, an empty input)."""
    weight = self.weight
    if (
        input.device.type != "cpu"
        or weight.device.type != "cpu"
        or input.dtype != weight.dtype
        or input.numel() == 0
        or (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad))
    ):
        return F.linear(input, weight, self.bias)
    packed: _Packed = getattr(self, _ATTRIBUTE)
    if input.numel() < packed.min_rows * input.shape[-1]:
        return F.linear(input, weight, self.bias)
    if packed.version != weight._version or packed.data_ptr != weight.data_ptr():
        # changed in place (training, `load_state_dict`) or replaced since packing: pack the weight again
        packed = _pack(weight, packed.min_rows, packed.layout_rows)
        setattr(self, _ATTRIBUTE, packed)
    bias = None if self.bias is None else self.bias.detach()
    return _packed_product(input, packed.weight, bias)


def _pack(weight: torch.Tensor, min_rows: int = 1, layout_rows: int = 1) -> _Packed:
    return _Packed(_reorder(weight, layout_rows), weight._version, weight.data_ptr(), min_rows, layout_rows)


@dataclass(frozen=True)
class PackingMeasurement:
    """Seconds of one product through `F.linear` and through the packed weight, per row count.

    Attributes:
        shape: `(out, in)` of the measured weight.
        dtype: its dtype.
        rows: the input row counts timed.
        stock_s: per row count, the minimum seconds of `F.linear`.
        packed_s: per row count, the minimum seconds of the packed product in the chosen layout.
        layout_rows: the row count the chosen layout is for (`choose_layout`).
        layouts: `(layout rows, seconds per row count)` of every layout timed.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    rows: tuple[int, ...]
    stock_s: tuple[float, ...]
    packed_s: tuple[float, ...]
    layout_rows: int = 1
    layouts: tuple[tuple[int, tuple[float, ...]], ...] = ()

    @property
    def packed_from_rows(self) -> int | None:
        """The fewest measured rows from which packed is as fast as stock at every larger measured count
        (`None`: stock wins at the most rows measured)."""
        return _packed_from(self.stock_s, self.packed_s, self.rows)

    def describe(self) -> str:
        """One line: the shape and, per row count, stock → packed milliseconds (and the layout, when it is
        not the one-row layout)."""
        cells = ", ".join(
            f"{rows} row(s) {s * 1e3:.2f} → {p * 1e3:.2f} ms"
            for rows, s, p in zip(self.rows, self.stock_s, self.packed_s, strict=True)
        )
        layout = f"; layout for {self.layout_rows} rows" if self.layout_rows != 1 else ""
        return f"{self.shape[0]}×{self.shape[1]} {str(self.dtype).removeprefix('torch.')}: {cells}{layout}"


def _packed_from(stock_s: Sequence[float], packed_s: Sequence[float], rows: Sequence[int]) -> int | None:
    """The fewest of `rows` from which packed is as fast as stock at every larger count, or `None`."""
    start = None
    for count, stock, packed in reversed(list(zip(rows, stock_s, packed_s, strict=True))):
        if packed > stock:
            break
        start = count
    return start


def _effective_seconds(
    stock_s: Sequence[float], packed_s: Sequence[float], rows: Sequence[int]
) -> list[float]:
    """Per row count, the product a packed module would run: packed from `_packed_from` rows on, stock
    below (and everywhere where stock always wins)."""
    start = _packed_from(stock_s, packed_s, rows)
    return [
        packed if start is not None and count >= start else stock
        for count, stock, packed in zip(rows, stock_s, packed_s, strict=True)
    ]


def choose_layout(
    rows: Sequence[int], stock_s: Sequence[float], layouts: Sequence[tuple[int, Sequence[float]]]
) -> int:
    """The layout (its row count) whose module — packed products from the row count on where they beat
    stock, `F.linear` below — takes the least time summed over `rows`, among those that run the fewest
    rows (a decoding step) at most `ONE_ROW_SLACK` times slower than the best of them.

    Args:
        rows: the measured row counts, fewest first.
        stock_s: per row count, seconds of `F.linear`.
        layouts: `(layout rows, seconds of its packed product per row count)` per layout.
    """
    effective = [(layout, _effective_seconds(stock_s, seconds, rows)) for layout, seconds in layouts]
    fastest_step = min(seconds[0] for _, seconds in effective)
    allowed = [
        (layout, seconds) for layout, seconds in effective if seconds[0] <= ONE_ROW_SLACK * fastest_step
    ]
    return min(allowed, key=lambda layout: (sum(layout[1]), layout[0]))[0]


@torch.no_grad()
def measure_packing(
    module: nn.Linear,
    rows: Sequence[int] = DEFAULT_ROWS,
    repeats: int = 5,
    layout_rows: Sequence[int] = LAYOUT_ROWS,
) -> PackingMeasurement:
    """Time `module`'s product stock, and packed in the layout for each of `layout_rows`, for each row count
    in `rows` (minimum over `repeats`; the calls of one row count alternate between the variants, so a slow
    spell of the machine reaches all of them); the packed times are the `choose_layout` layout's.

    Raises:
        ValueError: `module` is not an `nn.Linear` with a packable CPU weight, or `rows` / `repeats` are
            not positive.
    """
    if not isinstance(module, nn.Linear):
        raise ValueError(f"measure_packing needs an nn.Linear, got {type(module).__name__}.")
    weight = module.weight.detach()
    if weight.device.type != "cpu" or weight.dtype not in PACKABLE_DTYPES:
        raise ValueError(
            f"measure_packing needs a CPU weight in one of {[str(d) for d in PACKABLE_DTYPES]}, got "
            f"{weight.dtype} on {weight.device}."
        )
    if not rows or min(rows) < 1 or list(rows) != sorted(set(rows)) or repeats < 1:
        raise ValueError(
            f"rows must be increasing positive row counts and repeats ≥ 1, got rows={rows}, repeats={repeats}."
        )
    if not layout_rows or min(layout_rows) < 1 or len(set(layout_rows)) != len(layout_rows):
        raise ValueError(f"layout_rows must be distinct positive row counts, got {layout_rows}.")
    bias = None if module.bias is None else module.bias.detach()
    packed = {layout: _reorder(weight, layout) for layout in layout_rows}
    generator = torch.Generator().manual_seed(0)
    stock_s: list[float] = []
    packed_s: dict[int, list[float]] = {layout: [] for layout in layout_rows}
    for count in rows:
        input = torch.randn(count, weight.shape[1], generator=generator).to(weight.dtype)
        calls = {"stock": lambda input=input: F.linear(input, weight, bias)}
        for layout, packed_weight in packed.items():
            calls[layout] = lambda input=input, w=packed_weight: _packed_product(input, w, bias)
        best = {name: float("inf") for name in calls}
        for call in calls.values():
            call()  # first calls allocate
        for _ in range(repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - start)
        stock_s.append(best["stock"])
        for layout in layout_rows:
            packed_s[layout].append(best[layout])
    layouts = tuple((layout, tuple(packed_s[layout])) for layout in layout_rows)
    chosen = choose_layout(rows, stock_s, layouts)
    return PackingMeasurement(
        tuple(weight.shape),
        weight.dtype,
        tuple(rows),
        tuple(stock_s),
        tuple(packed_s[chosen]),
        chosen,
        layouts,
    )


class PackedLinears:
    """What `pack_linears` did to a model: the packed modules, why (or why not), and `remove()`.

    Also a context manager: `with pack_linears(model): …` unpacks on exit.

    Attributes:
        modules: the `nn.Linear` modules this handle packed (empty when it packed nothing).
        reason: one line on the decision (the measurement, or why nothing was packed).
        measurement: the timing `"auto"` decided on, or `None`.
    """

    def __init__(self, modules: list[nn.Linear], reason: str, measurement: PackingMeasurement | None) -> None:
        self.modules = modules
        self.reason = reason
        self.measurement = measurement

    @property
    def packed(self) -> bool:
        """Whether any module is packed by this handle."""
        return bool(self.modules)

    @property
    def extra_bytes(self) -> int:
        """Memory held by the packed copies (the same as the packed weights: the originals stay)."""
        return sum(module.weight.numel() * module.weight.element_size() for module in self.modules)

    def remove(self) -> None:
        """Give the packed modules their stock `forward` back and drop the packed weights."""
        for module in self.modules:
            _compat.remove_forward(module)
            module.__dict__.pop(_ATTRIBUTE, None)
        self.modules = []

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Run the stock `nn.Linear` inside the block (a baseline in the same process), packed again after
        it without repacking."""
        for module in self.modules:
            _compat.remove_forward(module)  # the packed weight stays on the module
        try:
            yield
        finally:
            for module in self.modules:
                _compat.install_forward(module, types.MethodType(_packed_forward, module))

    def __enter__(self) -> PackedLinears:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"PackedLinears({len(self.modules)} modules: {self.reason})"


def _packable(module: nn.Module) -> bool:
    return (
        type(module) is nn.Linear
        and not _compat.has_instance_forward(module)  # already packed, or wrapped by accelerate's hooks
        and module.weight.device.type == "cpu"
        and module.weight.dtype in PACKABLE_DTYPES
    )


@torch.no_grad()
def pack_linears(
    model: nn.Module, mode: str = "auto", rows: Sequence[int] = DEFAULT_ROWS, repeats: int = 5
) -> PackedLinears:
    """Pack `model`'s CPU `nn.Linear` layers for oneDNN's inner product where that is faster.

    Every later forward of a packed layer (plain `generate`, a drafter's step, a verification of drafts)
    runs the packed product; outputs agree with `F.linear` to the dtype's rounding. The packed copies cost
    as much memory as the packed weights (`PackedLinears.extra_bytes`). Remove before copying or
    pickling the model (the packed weights are opaque tensors).

    Args:
        model: a CPU model in fp32 or bf16.
        mode: `"auto"` times one layer of the shape that holds the most weight bytes, stock and packed
            (in oneDNN's layouts for one row and for several, `LAYOUT_ROWS`), at each of `rows`, and packs
            when packed wins from some row count on, in the layout `choose_layout` picks; inputs with fewer
            rows keep `F.linear` (the decision and its numbers are in `PackedLinears.reason`). `"always"`
            packs every row count in the one-row layout without measuring.
        rows: the input row counts `"auto"` measures.
        repeats: timings per row count (their minimum counts).

    Returns:
        The `PackedLinears` handle (`.remove()` undoes it).

    Raises:
        ValueError: `mode` is not one of `PACK_MODES`.
    """
    if mode not in PACK_MODES:
        raise ValueError(f"mode must be one of {PACK_MODES}, got {mode!r}.")
    candidates = [module for module in model.modules() if _packable(module)]
    if not candidates:
        return PackedLinears([], "no unpacked CPU nn.Linear in fp32 or bf16", None)
    dtypes = {module.weight.dtype for module in candidates}
    unavailable = [dtype for dtype in dtypes if not packed_linear_available(dtype)]
    if unavailable:
        return PackedLinears([], f"this torch build cannot pack {unavailable[0]} linears (oneDNN)", None)
    measurement = None
    min_rows, layout_rows = 1, 1
    reason = "packed without measuring (mode='always', the one-row layout)"
    if mode == "auto":
        measurement = measure_packing(_representative(candidates), rows, repeats)
        if measurement.packed_from_rows is None:
            return PackedLinears([], f"stock is faster here ({measurement.describe()})", measurement)
        min_rows, layout_rows = measurement.packed_from_rows, measurement.layout_rows
        reason = f"packed from {min_rows} row(s) on ({measurement.describe()})"
    for module in candidates:
        setattr(module, _ATTRIBUTE, _pack(module.weight, min_rows, layout_rows))
        _compat.install_forward(module, types.MethodType(_packed_forward, module))
    return PackedLinears(candidates, reason, measurement)


def _representative(modules: list[nn.Linear]) -> nn.Linear:
    """A module of the (shape, dtype) that holds the most weight bytes: where decoding spends its time."""
    totals: dict[tuple, int] = {}
    first: dict[tuple, nn.Linear] = {}
    for module in modules:
        key = (tuple(module.weight.shape), module.weight.dtype, module.bias is None)
        totals[key] = totals.get(key, 0) + module.weight.numel() * module.weight.element_size()
        first.setdefault(key, module)
    return first[max(totals, key=totals.__getitem__)]
