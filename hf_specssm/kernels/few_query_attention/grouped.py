"""Attention of a few queries over a KV cache as two grouped matrix products, and the per-shape choice
between it and torch's SDPA by a short measurement (README.md)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: most query tokens a call may have for the grouped path (a verification of up to 31 drafts; prefills and
#: longer calls keep SDPA, whose blocked kernel wins once the queries fill its tiles)
MAX_QUERIES = 32
#: the grouped path is chosen only where its measured time is below this fraction of SDPA's: a near tie
#: keeps transformers' path
WIN_MARGIN = 0.95
#: timed calls of each path per measurement (alternating; the fastest of each counts)
MEASURED_CALLS = 2
#: `HF_SPECSSM_FEW_QUERY_ATTENTION`: "auto" (measure), "grouped" or "sdpa" (always that path)
MODES = ("auto", "grouped", "sdpa")


def grouped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Softmax attention of each query head over its key/value head, as grouped matrix products.

    The query heads sharing a key/value head (`G = H // H_kv`, consecutive heads, as transformers'
    `repeat_kv` pairs them) are stacked as `G·T` rows against that head's keys, so no key or value is
    copied: `scores [B, H_kv, G·T, L] = q @ kᵀ`, scaled, masked and soft-maxed, then `@ v`, all in fp32
    (bf16 and fp16 inputs are widened; the output is rounded back to their dtype once).
    Query rows that the mask allows no key get zeros, as torch's SDPA gives them.

    Args:
        query: `[B, H, T, D]`.
        key: `[B, H_kv, L, D]`, `H` a multiple of `H_kv`.
        value: `[B, H_kv, L, Dv]`.
        mask: `None`, or `[B or 1, 1 or H, T, L]`, boolean (True attends) or additive (float).
        scale: the factor of `q · k` (transformers' `scaling`, usually `D ** -0.5`).

    Returns:
        `[B, T, H, Dv]` contiguous: the layout transformers' attention functions return.
    """
    batch, heads, queries, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = heads // kv_heads
    dtype = query.dtype
    # fp32 throughout, as SDPA's CPU kernels accumulate: torch has no CPU matrix product of bf16 inputs with
    # an fp32 output, and bf16 scores (transformers' eager rounding) erred ~9× SDPA's on large scores
    query, key, value = query.float(), key.float(), value.float()
    scores = torch.matmul(query.reshape(batch, kv_heads, group * queries, dim), key.transpose(-1, -2))
    scores = scores.view(batch, kv_heads, group, queries, length).mul_(scale)
    empty_rows = None
    if mask is not None:
        grouped_mask = (
            mask[:, :, None]
            if mask.shape[1] == 1
            else mask.reshape(mask.shape[0], kv_heads, group, queries, length)
        )
        if grouped_mask.dtype == torch.bool:
            scores.masked_fill_(~grouped_mask, float("-inf"))
            empty_rows = ~grouped_mask.any(-1, keepdim=True)
        else:
            scores.add_(grouped_mask)
    weights = torch.softmax(scores, dim=-1)
    if empty_rows is not None and bool(empty_rows.any()):
        weights = weights.masked_fill(empty_rows, 0.0)
    weights = weights.view(batch, kv_heads, group * queries, length)
    output = torch.matmul(weights, value).view(batch, heads, queries, value.shape[-1])
    return output.transpose(1, 2).to(dtype).contiguous()


@dataclass(frozen=True)
class Measurement:
    """Seconds of one call by each path, the fastest of `MEASURED_CALLS`, for one shape class."""

    sdpa_s: float
    grouped_s: float

    @property
    def grouped_wins(self) -> bool:
        """Whether the grouped products beat SDPA by more than the margin (`WIN_MARGIN`)."""
        return self.grouped_s < WIN_MARGIN * self.sdpa_s


def shape_class(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
) -> tuple:
    """What a measurement holds for: dtype, batch, heads, head sizes, the mask's kind and head count, and
    the query count and key length rounded up to powers of two (costs change smoothly within them)."""
    mask_kind = "none" if mask is None else ("bool" if mask.dtype == torch.bool else "additive")
    return (
        query.dtype,
        query.shape[0],
        query.shape[1],
        key.shape[1],
        query.shape[-1],
        value.shape[-1],
        mask_kind,
        1 if mask is None else mask.shape[1],
        (query.shape[2] - 1).bit_length(),
        (key.shape[2] - 1).bit_length(),
    )


class PathChoice:
    """Which path each shape class takes, measured on its first call's own tensors and kept for the
    process (both paths give the same attention; the choice is only about time)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.measurements: dict[tuple, Measurement] = {}
        self._lock = threading.Lock()

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
        sdpa: Callable[[], torch.Tensor],
        mode: str = "auto",
    ) -> torch.Tensor:
        """The attention `[B, T, H, Dv]` by the path `mode` names, or by the measured faster one.

        Args:
            query, key, value, mask, scale: as `grouped_attention` takes them.
            sdpa: computes the same attention through torch's SDPA (transformers' path), same layout.
            mode: one of `MODES`.
        """
        if mode == "sdpa":
            return sdpa()
        if mode == "grouped":
            return grouped_attention(query, key, value, mask, scale)
        shape = shape_class(query, key, value, mask)
        measurement = self.measurements.get(shape)
        if measurement is None:
            output, own = self._measure(query, key, value, mask, scale, sdpa)
            with self._lock:
                measurement = self.measurements.setdefault(shape, own)
            if measurement.grouped_wins == own.grouped_wins:
                return output
            # another thread measured this class first and chose the other path: follow it
        if measurement.grouped_wins:
            return grouped_attention(query, key, value, mask, scale)
        return sdpa()

    def _measure(self, query, key, value, mask, scale, sdpa) -> tuple[torch.Tensor, Measurement]:
        """Both paths timed alternately on the call's own tensors; returns the output of the path chosen,
        so that every call of a shape class, the first included, rounds the same way."""

        def grouped() -> torch.Tensor:
            return grouped_attention(query, key, value, mask, scale)

        paths = {"sdpa": sdpa, "grouped": grouped}
        times: dict[str, list[float]] = {"sdpa": [], "grouped": []}
        outputs = {name: path() for name, path in paths.items()}  # warms both up before timing
        for _ in range(MEASURED_CALLS):
            for name, path in paths.items():
                start = self.clock()
                outputs[name] = path()
                times[name].append(self.clock() - start)
        measurement = Measurement(min(times["sdpa"]), min(times["grouped"]))
        return outputs["grouped" if measurement.grouped_wins else "sdpa"], measurement

    def clear(self) -> None:
        """Forget every measurement (the next call of each shape class measures again)."""
        with self._lock:
            self.measurements.clear()
