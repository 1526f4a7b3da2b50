"""Speculative decoding of a ragged batch: every row accepts its own number of tokens per round.

Layout of the target cache: recurrent states are per row (fixed size); attention keys are left-padded, each
row's tokens right-aligned, masked by a `[B, S]` attention mask. A round:

1. each active row drafts with its own drafter state (`Drafter.spawn`);
2. one target forward over `[B, T]` = each row's uncached committed tokens + drafts, right-padded (the
   padding comes after every real token, so causality keeps it out of the real positions' logits);
3. each row accepts its own prefix and commits token by token under the stopping criteria;
4. recurrent states are rewound to the round's checkpoint and the SSM mixers replay each row's kept
   positions (`MixerInputRecorder.replay_rows`); attention keys are re-aligned per row
   (`ForkableCache.realign_rows`); finished rows leave the batch (`ForkableCache.select`).

Rows are prefilled one by one, because left padding would run pad tokens through an SSM state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel, StoppingCriteriaList

from hf_specssm import _compat
from hf_specssm.cache import ForkableCache
from hf_specssm.drafters import Draft, Drafter, DraftSampler
from hf_specssm.ssm.mixers import MixerInputRecorder, exact_continuation
from hf_specssm.stats import SpeculationStats


@dataclass
class _Row:
    index: int  # position in the caller's batch
    left_pad: torch.Tensor  # [P] the caller's padding, re-attached for stopping criteria and the output
    sequence: torch.Tensor  # [L] committed tokens
    cached: int  # tokens held by the target cache for this row
    drafter: Drafter
    finished: bool = False


def split_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`(left padding, prompt)` per row; raises `ValueError` for right or inner padding."""
    rows = []
    for b in range(input_ids.shape[0]):
        if attention_mask is None:
            rows.append((input_ids[b, :0], input_ids[b]))
            continue
        mask = attention_mask[b].bool()
        start = int(mask.float().argmax()) if mask.any() else input_ids.shape[1]
        if not mask[start:].all() or start == input_ids.shape[1]:
            raise ValueError(
                "batched prompts must be left-padded (attention_mask zeros only before each prompt, and every "
                "prompt non-empty)."
            )
        rows.append((input_ids[b, :start], input_ids[b, start:]))
    return rows


class BatchTarget:
    """The target side of a ragged batch (any target: attention, SSM or hybrid)."""

    def __init__(self, model: PreTrainedModel, pad_token_id: int) -> None:
        layers = ForkableCache(model.config).layers
        for layer in layers:
            if _compat.is_sliding_attention_layer(layer):
                raise ValueError(
                    "batched speculative decoding does not support sliding-window attention targets yet; "
                    "pass one prompt per call."
                )
        self.model = model
        self.cache_name = _compat.cache_kwarg_name(model)
        self.pad_token_id = pad_token_id
        self.recorder = MixerInputRecorder(model)
        self._pass_positions = _compat.forward_accepts(model, "position_ids")
        self._has_attention = any(_compat.is_attention_layer(layer) for layer in layers)
        self.cache: ForkableCache | None = None
        self.peak_verification_bytes = 0

    def _forward(self, cache: ForkableCache, tokens: torch.Tensor, cached: torch.Tensor, mask_width: int):
        """Forward `tokens` `[B, T]` from `cache`; `cached[b]` real tokens per row, right-aligned in `mask_width`."""
        batch, width = tokens.shape
        kwargs = {self.cache_name: cache, "use_cache": True, "logits_to_keep": width}
        if self._pass_positions:
            kwargs["position_ids"] = cached[:, None] + torch.arange(width, device=tokens.device)[None]
        if self._has_attention:
            slots = torch.arange(mask_width, device=tokens.device)[None]
            history = (slots >= mask_width - cached[:, None]).long()
            kwargs["attention_mask"] = torch.cat([history, tokens.new_ones((batch, width))], dim=1)
        with exact_continuation(self.model):
            return self.model(input_ids=tokens, **kwargs).logits.float()

    def prefill(self, rows: list[_Row]) -> None:
        """Run every row's prompt but its last token through the model, one row at a time, then stack."""
        caches = []
        for row in rows:
            cache = ForkableCache(self.model.config)
            prefix = row.sequence[None, :-1]
            if prefix.shape[1] > 0:
                self._forward(cache, prefix, prefix.new_zeros(1), 0)
                cache.advance(prefix.shape[1])
            row.cached = prefix.shape[1]
            caches.append(cache)
        self.cache = ForkableCache.stack(self.model.config, caches)

    def score(self, rows: list[_Row], drafts: list[Draft]) -> tuple[torch.Tensor, list[int]]:
        """One forward for every row; returns logits `[B, T, V]` and each row's first scored position."""
        pending = [row.sequence[row.cached :] for row in rows]
        width = max(p.shape[0] + d.length for p, d in zip(pending, drafts))
        tokens = torch.full(
            (len(rows), width), self.pad_token_id, dtype=torch.long, device=rows[0].sequence.device
        )
        for b, (p, d) in enumerate(zip(pending, drafts)):
            tokens[b, : p.shape[0]] = p
            tokens[b, p.shape[0] : p.shape[0] + d.length] = d.tokens[0]
        cached = torch.tensor([row.cached for row in rows], device=tokens.device)
        mask_width = self._attention_length()
        self.cache.clear_checkpoints()
        self.cache.checkpoint()
        with self.recorder.recording():
            logits = self._forward(self.cache, tokens, cached, mask_width)
        extra = self.cache.checkpoint_bytes() + self.recorder.recorded_bytes
        self.peak_verification_bytes = max(self.peak_verification_bytes, extra)
        self._round = (mask_width, cached, [p.shape[0] for p in pending])
        return logits, [p.shape[0] - 1 for p in pending]

    def _attention_length(self) -> int:
        layers = self.cache.attention_tensors()
        return layers[0][0].shape[2] if layers else 0

    def keep(self, rows: list[_Row], kept: list[int]) -> None:
        """Row `b` keeps `kept[b]` of the tokens it fed this round."""
        mask_width, cached, _ = self._round
        lengths = torch.tensor(kept, device=cached.device)
        self.cache.rewind_recurrent(self.cache.checkpoint_lengths[0])
        self.recorder.replay_rows(self.cache, lengths)
        self.recorder.clear()
        self.cache.clear_checkpoints()
        if self.cache.attention_tensors():
            self.cache.realign_rows(mask_width - cached, mask_width + lengths)
        for row, count in zip(rows, kept):
            row.cached += count

    def drop(self, keep_rows: list[int]) -> None:
        """Keep only batch positions `keep_rows` of the cache."""
        self.cache.select(torch.tensor(keep_rows, dtype=torch.long))


def batched_speculative_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    drafter: Drafter,
    select_next,
    process_scores,
) -> tuple[torch.Tensor, SpeculationStats, ForkableCache]:
    """The loop for `B > 1` prompts; returns `[B, L]` sequences padded like transformers' batched output."""
    pad_token_id = generation_config.pad_token_id
    if pad_token_id is None:
        eos = generation_config.eos_token_id
        pad_token_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    max_length = generation_config.max_length
    target = BatchTarget(model, pad_token_id)
    sampler = DraftSampler(logits_processor, generation_config.do_sample)
    stats = SpeculationStats()
    rows = [
        _Row(index=b, left_pad=pad, sequence=prompt, cached=0, drafter=drafter.spawn())
        for b, (pad, prompt) in enumerate(split_rows(input_ids, attention_mask))
    ]
    loop_start = time.perf_counter()
    for row in rows:
        row.drafter.begin(row.sequence[None])
    try:
        target.prefill(rows)
        active = [row for row in rows if row.left_pad.shape[0] + row.sequence.shape[0] < max_length]
        for row in rows:
            row.finished = row not in active
        if len(active) < len(rows):
            target.drop([rows.index(row) for row in active])
        while active:
            t0 = time.perf_counter()
            drafts = []
            for row in active:
                room = max_length - row.left_pad.shape[0] - row.sequence.shape[0]
                num_draft = max(0, min(row.drafter.length_policy.next_length(), room - 1))
                drafts.append(
                    row.drafter.draft(row.sequence[None], num_draft, sampler)
                    if num_draft
                    else Draft(tokens=row.sequence.new_empty((1, 0)))
                )
            t1 = time.perf_counter()
            logits, first = target.score(active, drafts)
            t2 = time.perf_counter()
            kept = []
            for b, (row, draft) in enumerate(zip(active, drafts)):
                row_logits = logits[b : b + 1, first[b] : first[b] + draft.length + 1]
                prefix = row.sequence[None]
                scores = process_scores(logits_processor, prefix, draft.tokens, row_logits)
                num_accepted, next_token = select_next(draft, scores, generation_config.do_sample)
                committed = 0
                for token in [*draft.tokens[0, :num_accepted].tolist(), next_token]:
                    row.sequence = torch.cat([row.sequence, row.sequence.new_tensor([token])])
                    committed += 1
                    padded = torch.cat([row.left_pad, row.sequence])[None]
                    if bool(stopping_criteria(padded, None).all()):
                        row.finished = True
                        break
                pending = row.sequence.shape[0] - committed - row.cached
                kept.append(pending + min(num_accepted, committed))
                row.drafter.commit(row.sequence[None], min(num_accepted, committed))
                row.drafter.length_policy.update(draft.length, num_accepted, (t1 - t0) / len(active), t2 - t1)
                stats.record_round(draft.length, num_accepted, committed)
            target.keep(active, kept)
            stats.draft_time_s += t1 - t0
            stats.verify_time_s += time.perf_counter() - t1
            stats.forward_passes += 1
            still = [b for b, row in enumerate(active) if not row.finished]
            if len(still) < len(active):
                if still:
                    target.drop(still)
                active = [active[b] for b in still]
    finally:
        for row in rows:
            row.drafter.end()
    stats.total_time_s = time.perf_counter() - loop_start
    stats.peak_verification_bytes = target.peak_verification_bytes

    total = max(row.left_pad.shape[0] + row.sequence.shape[0] for row in rows)
    output = input_ids.new_full((len(rows), total), pad_token_id)
    for row in rows:
        full = torch.cat([row.left_pad, row.sequence])
        output[row.index, : full.shape[0]] = full
    return output, stats, target.cache
