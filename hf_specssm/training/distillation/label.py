"""Soft labels and hidden states for chats that have none: one teacher-forced pass of the target.

A pack (`hf-specssm distill pack`) keeps token ids only, so chats unpacked into a store in a later session
(or on a user's machine) have no extras: no top-k soft labels and no last hidden states, which the
feature-conditioned drafter and ReDrafter heads train on. `label_store` computes them: the target reads
each chat's prompt and answer in one forward (right padding, no cache), and at every position whose
logits chose an answer token it keeps what generation would have captured there — the last hidden state
(the final norm's output) and the top-k log-probabilities (temperature 1) of the output head's logits.

The arrays are written batch by batch as `extras/l-<hash>.npz` files (atomically), then the store's
`labels.jsonl` names them (appended and fsynced), so a killed run loses at most its current batch and a
rerun continues with the chats still unlabelled.

Teacher forcing reads the same tokens generation produced, so the values equal generation's captures up to
the dtype's rounding (a full forward and a cached step sum in different orders; in bf16 a near-tie may
order two top-k entries the other way).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from hf_specssm.training.distillation.store import DistillStore


def unlabelled(store: DistillStore) -> list[dict[str, Any]]:
    """The store's records without extras, in store order."""
    return [record for record in store.records() if record.get("extras") is None]


def plan_label_batches(records: Sequence[dict[str, Any]], batch_tokens: int) -> list[list[dict[str, Any]]]:
    """Batches of records of similar length, each at most `batch_tokens` padded tokens (a longer record
    makes a batch of its own), in store order of their first record.

    Records are sorted by length inside windows of 64, so a run stopped early has labelled the first
    records of the store, and batches waste little padding.
    """
    batches: list[list[dict[str, Any]]] = []
    for start in range(0, len(records), 64):
        window = sorted(records[start : start + 64], key=lambda record: -len(record["input_ids"]))
        batch: list[dict[str, Any]] = []
        for record in window:
            # sorted longest first: the batch's width is its first record's length
            width = len(batch[0]["input_ids"]) if batch else len(record["input_ids"])
            if batch and width * (len(batch) + 1) > batch_tokens:
                batches.append(batch)
                batch = []
            batch.append(record)
        if batch:
            batches.append(batch)
    return batches


@torch.no_grad()
def label_batch(
    target: torch.nn.Module,
    records: Sequence[dict[str, Any]],
    store: DistillStore,
    top_k: int,
    hidden: bool = True,
    dtype_name: str = "fp32",
    logits_chunk: int = 512,
) -> int:
    """Compute and store the extras of `records` (one forward). Returns the answer tokens labelled.

    Args:
        target: the model that wrote the answers (its base model's output is the final norm's).
        records: store records without extras (`input_ids` = prompt then answer).
        store: where the extras file and the labels entries go.
        top_k: soft-label entries per answer token (the store's recipe `--top-k`).
        hidden: keep the `[A, H]` hidden states (fp16) beside the top-k ids `[A, k]` (int32) and
            log-probs `[A, k]` (fp16).
        dtype_name: the target's dtype, recorded per entry as `labels_dtype`.
        logits_chunk: answer positions sent through the output head at once (bounds the `[n, V]` logits).

    Raises:
        ValueError: a record without a prompt (no position chose its first answer token).
    """
    for record in records:
        if record["prompt_length"] < 1:
            raise ValueError(f"record {record['id']!r} has no prompt: its first answer token has no logits.")
    device = next(target.parameters()).device
    width = max(len(record["input_ids"]) for record in records)
    input_ids = torch.zeros((len(records), width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, record in enumerate(records):
        ids = record["input_ids"]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    base = getattr(target, target.base_model_prefix)
    states = base(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
    ).last_hidden_state  # [B, W, H]
    # the position whose logits chose answer token s is prompt_length - 1 + s
    rows = [
        states[row, record["prompt_length"] - 1 : len(record["input_ids"]) - 1]
        for row, record in enumerate(records)
    ]
    picked = torch.cat(rows)  # [A, H]
    head = target.get_output_embeddings()
    ids_parts, logp_parts = [], []
    for start in range(0, picked.shape[0], logits_chunk):
        logp = head(picked[start : start + logits_chunk]).float().log_softmax(-1)
        values, indices = logp.topk(top_k, dim=-1)
        ids_parts.append(indices.to(torch.int32).cpu())
        logp_parts.append(values.to(torch.float16).cpu())
    arrays = {"topk_ids": torch.cat(ids_parts).numpy(), "topk_logp": torch.cat(logp_parts).numpy()}
    if hidden:
        arrays["hidden"] = picked.to(torch.float16).cpu().numpy()
    name = f"l-{hashlib.sha1('|'.join(record['id'] for record in records).encode()).hexdigest()[:16]}.npz"

    def write(temporary) -> None:
        with open(temporary, "wb") as sink:
            np.savez(sink, **arrays)

    store.write_extras(name, write)
    entries, offset = [], 0
    for record in records:
        entries.append({"id": record["id"], "extras": name, "offset": offset, "labels_dtype": dtype_name})
        offset += len(record["input_ids"]) - record["prompt_length"]
    store.add_labels(entries)
    return offset


def label_store(
    target: torch.nn.Module,
    store: DistillStore,
    batch_tokens: int = 4096,
    hidden: bool = True,
    dtype_name: str = "fp32",
    limit: int | None = None,
    deadline: float | None = None,
    on_batch: Callable[[int, int, float], None] | None = None,
) -> tuple[int, int, float]:
    """Label the store's chats that have no extras, batch by batch, until done, `limit` chats or `deadline`
    (`time.monotonic()` seconds).

    Returns:
        `(chats, answer tokens, seconds)` of this call.

    Raises:
        ValueError: `batch_tokens` < 1, or the store's recipe names no `--top-k`.
    """
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens (--batch-tokens) must be >= 1, got {batch_tokens}.")
    top_k = store.recipe.get("--top-k")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"the store {store.root} records no --top-k in its recipe: cannot label it.")
    todo = unlabelled(store)
    if limit is not None:
        todo = todo[:limit]
    started = time.monotonic()
    chats = tokens = 0
    for batch in plan_label_batches(todo, batch_tokens):
        if deadline is not None and time.monotonic() >= deadline:
            break
        tokens += label_batch(target, batch, store, top_k, hidden=hidden, dtype_name=dtype_name)
        chats += len(batch)
        if on_batch is not None:
            on_batch(len(batch), tokens, time.monotonic() - started)
    return chats, tokens, time.monotonic() - started
