"""Ragged batches: every row equals its own unpadded greedy output, for every target kind."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

import hf_specssm

from tests.helpers.models import VOCAB, align, build

TARGETS = [
    "llama",
    "qwen2",
    "gpt_neox",
    "mamba",
    "mamba2",
    "falcon_mamba",
    "jamba",
    "bamba",
    "falcon_h1",
    "zamba2",
]


def ragged(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Left-padded `[B, L]` ids and mask, and the unpadded rows (ids 3.. avoid pad/bos/eos ids)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows = []
    for b, length in enumerate(lengths):
        row = torch.randint(3, VOCAB, (length,), generator=generator)
        rows.append(row)
        ids[b, width - length :] = row
        mask[b, width - length :] = 1
    return ids, mask, rows


def assert_rows_match_single_runs(target, ids, output, rows, **options):
    for b, row in enumerate(rows):
        alone = type(target).generate(target, row[None], **options)[0]
        start = ids.shape[1] - row.shape[0]
        assert torch.equal(output[b, start : start + alone.shape[0]], alone), f"row {b}"
        # anything after the row's own output is padding
        assert (output[b, start + alone.shape[0] :] == target.generation_config.pad_token_id).all()


@pytest.mark.parametrize("drafter_kind", ["mamba2", "prompt_lookup"])
@pytest.mark.parametrize("target_kind", TARGETS)
def test_ragged_batch_greedy_parity(target_kind, drafter_kind):
    target = hf_specssm.enable(build(target_kind, seed=0))
    target.generation_config.eos_token_id = None
    target.generation_config.pad_token_id = 0
    ids, mask, rows = ragged([5, 1, 9], seed=TARGETS.index(target_kind))
    if drafter_kind == "prompt_lookup":
        extra = dict(prompt_lookup_num_tokens=4)
    else:
        drafter_model = build(drafter_kind, seed=1)
        align(target, drafter_model)
        extra = dict(
            assistant_model=hf_specssm.ModelDrafter(drafter_model, num_draft_tokens=3, schedule="constant")
        )
    output = target.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, **extra)
    assert output.shape == (3, ids.shape[1] + 20)
    assert_rows_match_single_runs(target, ids, output, rows, max_new_tokens=20, do_sample=False)
    stats = target.last_speculation_stats
    assert stats.forward_passes < stats.rounds  # rows shared forwards
    if drafter_kind == "mamba2":
        assert len(set(stats.accepted_lengths)) > 1  # rows accepted different amounts


@pytest.mark.parametrize("target_kind", ["llama", "mamba2", "bamba"])
def test_rows_finishing_early_leave_the_batch(target_kind):
    target = hf_specssm.enable(build(target_kind, seed=0))
    ids, mask, rows = ragged([4, 7, 2, 6], seed=5)
    # an EOS that some rows produce early and others late or never
    free = [
        type(target).generate(target, row[None], max_new_tokens=25, eos_token_id=None)[0, row.shape[0] :]
        for row in rows
    ]
    eos = int(free[0][3])
    options = dict(max_new_tokens=25, do_sample=False, eos_token_id=eos, pad_token_id=0)
    target.generation_config.pad_token_id = 0
    drafter = build("mamba", seed=1)
    align(target, drafter)
    output = target.generate(ids, attention_mask=mask, assistant_model=drafter, **options)
    assert_rows_match_single_runs(target, ids, output, rows, **options)
    ended_early = sum(int((free_row[:25] == eos).any()) for free_row in free)
    assert ended_early >= 1


def test_batch_of_one_row_matches_unbatched():
    target = hf_specssm.enable(build("bamba", seed=0))
    # (rows ending early are padded in a batch; that is tested above)
    target.generation_config.eos_token_id = None
    drafter = build("mamba2", seed=1)
    align(target, drafter)
    ids, mask, rows = ragged([6, 6], seed=3)
    output = target.generate(ids, attention_mask=mask, assistant_model=drafter, max_new_tokens=15)
    for b, row in enumerate(rows):
        assert torch.equal(
            output[b], target.generate(row[None], assistant_model=drafter, max_new_tokens=15)[0]
        )


def test_batch_errors():
    target = hf_specssm.enable(build("llama", seed=0))
    drafter = build("mamba", seed=1)
    ids, mask, _ = ragged([3, 5], seed=0)
    right_padded = mask.flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        target.generate(ids, attention_mask=right_padded, assistant_model=drafter, max_new_tokens=4)

    class Sink(BaseStreamer):
        def put(self, value):
            pass

        def end(self):
            pass

    with pytest.raises(ValueError, match="streamers take one sequence"):
        target.generate(ids, attention_mask=mask, assistant_model=drafter, max_new_tokens=4, streamer=Sink())
    with pytest.raises(ValueError, match="output_scores"):
        target.generate(
            ids, attention_mask=mask, assistant_model=drafter, max_new_tokens=4,
            return_dict_in_generate=True, output_scores=True,
        )  # fmt: skip
    with pytest.raises(ValueError, match="Activation Replay only"):
        target.generate(
            ids, attention_mask=mask, assistant_model=drafter, max_new_tokens=4, verification="refeed"
        )
    mistral = hf_specssm.enable(build("mistral", seed=0))
    with pytest.raises(ValueError, match="sliding-window"):
        mistral.generate(ids, attention_mask=mask, assistant_model=drafter, max_new_tokens=4)
    # and the models still work
    assert target.generate(ids, attention_mask=mask, assistant_model=drafter, max_new_tokens=4).shape[0] == 2


@pytest.mark.parametrize("target_kind", ["llama", "mamba2"])
def test_ragged_batch_with_repetition_penalty(target_kind):
    """`generate` sizes the repetition penalty's ignored prompt positions by the batch (each row's left
    padding); every row is scored on its own unpadded sequence, so each gets its own slice — and equals
    its own run with the penalty."""
    target = hf_specssm.enable(build(target_kind, seed=0))
    target.generation_config.eos_token_id = None
    target.generation_config.pad_token_id = 0
    ids, mask, rows = ragged([5, 2, 8], seed=4)
    drafter_model = build("mamba2", seed=1)
    align(target, drafter_model)
    drafter = hf_specssm.ModelDrafter(drafter_model, num_draft_tokens=3, schedule="constant")
    options = dict(max_new_tokens=16, do_sample=False, repetition_penalty=1.5)
    output = target.generate(ids, attention_mask=mask, assistant_model=drafter, **options)
    assert_rows_match_single_runs(target, ids, output, rows, **options)
