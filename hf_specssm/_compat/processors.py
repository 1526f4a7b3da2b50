"""transformers' logits processors, one row at a time.

`generate` builds its processors for the whole batch; some keep per-row state sized by the batch. Our loop
scores each row on its own sequence (`[1, L]`, the caller's left padding removed), so a batched call needs a
per-row copy of such processors. Known today: `RepetitionPenaltyLogitsProcessor.prompt_ignore_length`, a
`[B]` tensor of positions to ignore that `generate` fills with each row's left-padding length.
"""

from __future__ import annotations

import copy

import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor


def row_processors(
    processors: LogitsProcessorList | None, row: int, num_rows: int, left_padding: int
) -> LogitsProcessorList | None:
    """Processors for row `row` of a batch of `num_rows`, applied to that row's unpadded sequence.

    A processor with per-row tensors sized by the batch gets a shallow copy holding row `row`'s slice;
    `prompt_ignore_length` also loses the row's `left_padding` (those positions are not in the sequence).
    Other processors are shared as they are.
    """
    if not processors or num_rows == 1:
        return processors
    rows = LogitsProcessorList()
    for processor in processors:
        per_row = {
            name: value
            for name, value in vars(processor).items()
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == num_rows
        }
        if not per_row:
            rows.append(processor)
            continue
        processor = copy.copy(processor)
        for name, value in per_row.items():
            sliced = value[row : row + 1]
            if isinstance(processor, RepetitionPenaltyLogitsProcessor) and name == "prompt_ignore_length":
                sliced = (sliced - left_padding).clamp_min(0)
            setattr(processor, name, sliced)
        rows.append(processor)
    return rows
