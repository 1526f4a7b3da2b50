"""The target answers distillation instructions in batches; the answers become the drafter's data.

Output is one JSONL file, one record per instruction, appended as each batch finishes, so an interrupted
run loses at most one batch and the same call resumes where it stopped:

    {"id": "code-17", "domain": "code", "input_ids": [...prompt and answer...], "prompt_length": 41,
     "finished": true}

`input_ids` is the prompt rendered with the target's chat template followed by the target's greedy answer
(cut at `max_new_tokens`; `finished` says whether it ended with the end-of-turn token).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_specssm.training.mamba_drafter.prompts import Instruction


def done_ids(path: Path) -> set[str]:
    """Ids already answered in the JSONL file `path` (a torn last line is ignored)."""
    if not path.is_file():
        return set()
    ids = set()
    with open(path) as handle:
        for line in handle:
            try:
                ids.add(json.loads(line)["id"])
            except (ValueError, KeyError):
                continue
    return ids


def drop_torn_tail(path: Path) -> None:
    """Cut `path` after its last newline: a write interrupted mid-line must not glue onto the next record."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        if not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)


def _render(tokenizer, instruction: Instruction) -> list[int]:
    text = tokenizer.apply_chat_template(instruction.messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def distill_answers(
    target,
    tokenizer,
    instructions: Sequence[Instruction],
    out_path: str | Path,
    batch_size: int = 64,
    max_new_tokens: int = 256,
    max_prompt_tokens: int = 512,
    progress: bool = True,
) -> Path:
    """Append the target's greedy answers to `instructions` to `out_path` (JSONL), skipping answered ids.

    Prompts of similar length are batched together (left padding) to waste little compute on padding.

    Args:
        target: the causal LM to distil (any dtype; bf16 is fast on CPUs with AMX).
        tokenizer: its tokenizer, with a chat template.
        instructions: what to answer.
        out_path: the JSONL file to append to.
        batch_size: prompts per `generate` call.
        max_new_tokens: the longest answer kept.
        max_prompt_tokens: longer prompts are skipped.
        progress: show a tqdm bar (answers done out of all).
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1.")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    drop_torn_tail(out_path)
    answered = done_ids(out_path)
    pending = []
    for instruction in instructions:
        if instruction.id in answered:
            continue
        ids = _render(tokenizer, instruction)
        if len(ids) <= max_prompt_tokens:
            pending.append((instruction, ids))
    # Longest first: the memory peak comes at once, not hours into the run.
    pending.sort(key=lambda item: -len(item[1]))
    end_ids = target.generation_config.eos_token_id
    end_ids = set(end_ids if isinstance(end_ids, list) else [end_ids] if end_ids is not None else [])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(end_ids), 0)
    bar = tqdm(
        total=len(instructions),
        initial=len(instructions) - len(pending),
        disable=not progress,
        desc="distill",
    )
    started, produced = time.perf_counter(), 0
    with open(out_path, "a") as sink:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            width = max(len(ids) for _, ids in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, (_, ids) in enumerate(batch):
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            output = target.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
            for row, (instruction, ids) in enumerate(batch):
                answer = output[row, width:].tolist()
                finished = False
                for index, token in enumerate(answer):
                    if token in end_ids:
                        answer, finished = answer[: index + 1], True
                        break
                produced += len(answer)
                record = {
                    "id": instruction.id,
                    "domain": instruction.domain,
                    "input_ids": ids + answer,
                    "prompt_length": len(ids),
                    "finished": finished,
                }
                sink.write(json.dumps(record) + "\n")
            sink.flush()
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{produced / (time.perf_counter() - started):.0f}")
    bar.close()
    return out_path
