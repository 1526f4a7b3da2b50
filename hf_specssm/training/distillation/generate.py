"""The target answers instructions in batches; its answers, top-k log-probabilities and hidden states are kept.

One `generate` call per batch (left padding, KV cache): `distill generate --batching static`, and the
fallback for targets whose cache `refill.py` cannot edit (its refilling batch is the default). Two
forward hooks read what the target computes anyway, so the soft labels and features cost no second pass:

- on the output head: the top-k log-probabilities (temperature 1) of the distribution each answer token
  was chosen from — the soft labels of distillation;
- on the final norm: the last hidden state at the position whose logits chose each answer token — what a
  feature-conditioned drafter or a ReDrafter head reads from the target during decoding.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig

from hf_specssm.training.distillation.store import GREEDY, SAMPLED, DistillStore
from hf_specssm.training.mamba_drafter.prompts import Instruction

MODES = {GREEDY: None, SAMPLED: 0.7}


@dataclass(frozen=True)
class Task:
    """One answer to generate.

    Attributes:
        id: the record id (`<instruction id>` for greedy, `<instruction id>@t0.7` for a sample).
        instruction: what to answer.
        mode: `greedy` or `t0.7`.
        prompt_ids: the rendered chat prompt, `[P]` target ids.
    """

    id: str
    instruction: Instruction
    mode: str
    prompt_ids: tuple[int, ...]


def render(tokenizer, instruction: Instruction) -> list[int]:
    """The instruction's chat, rendered with the target's chat template and a generation prompt."""
    text = tokenizer.apply_chat_template(instruction.messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def task_id(instruction_id: str, mode: str) -> str:
    """The record id of `instruction_id` answered in `mode`."""
    return instruction_id if mode == GREEDY else f"{instruction_id}@{mode}"


def final_norm(target: torch.nn.Module) -> torch.nn.Module:
    """The target's last normalisation layer (its output is the last hidden state).

    Raises:
        ValueError: the model has no `<base>.norm` module (capture hidden states with another hook, or
            pass `hidden=False`).
    """
    base = getattr(target, getattr(target, "base_model_prefix", "model"), None)
    norm = getattr(base, "norm", None) or getattr(base, "final_layernorm", None)
    if not isinstance(norm, torch.nn.Module):
        raise ValueError(
            f"{type(target).__name__} has no final norm at `{target.base_model_prefix}.norm`: hidden states "
            "cannot be captured; pass hidden=False (--no-hidden)."
        )
    return norm


class _Capture:
    """Forward hooks collecting, per decoding step, `[B, k]` top-k log-probs and `[B, H]` hidden states."""

    def __init__(self, target: torch.nn.Module, top_k: int, hidden: bool) -> None:
        self.top_k = top_k
        self.ids: list[torch.Tensor] = []
        self.logp: list[torch.Tensor] = []
        self.hidden: list[torch.Tensor] = []
        self._handles = [target.get_output_embeddings().register_forward_hook(self._on_logits)]
        if hidden:
            self._handles.append(final_norm(target).register_forward_hook(self._on_hidden))

    def _on_logits(self, module, args, output) -> None:
        logp = output[:, -1].float().log_softmax(-1)
        values, indices = logp.topk(self.top_k, dim=-1)
        self.ids.append(indices.to(torch.int32).cpu())
        self.logp.append(values.to(torch.float16).cpu())

    def _on_hidden(self, module, args, output) -> None:
        self.hidden.append(output[:, -1].to(torch.float16).cpu())

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _end_ids(target, tokenizer) -> set[int]:
    ids = target.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _seed(ids: Sequence[str]) -> int:
    return int(hashlib.sha1("|".join(ids).encode()).hexdigest()[:8], 16)


@torch.no_grad()
def answer_batch(
    target: torch.nn.Module,
    tokenizer,
    tasks: Sequence[Task],
    store: DistillStore,
    max_new_tokens: int,
    top_k: int = 8,
    hidden: bool = True,
    dtype_name: str = "fp32",
) -> int:
    """Answer `tasks` (all of one mode) in one batch; store their records and extras. Returns answer tokens.

    A sampled batch is seeded by its tasks' ids, so a rerun of the same batch draws the same answers.
    """
    modes = {task.mode for task in tasks}
    if len(modes) != 1:
        raise ValueError(f"one batch holds one mode, got {sorted(modes)}.")
    (mode,) = modes
    device = next(target.parameters()).device
    end_ids = _end_ids(target, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(end_ids)
    width = max(len(task.prompt_ids) for task in tasks)
    input_ids = torch.full((len(tasks), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, task in enumerate(tasks):
        input_ids[row, width - len(task.prompt_ids) :] = torch.tensor(task.prompt_ids)
        attention_mask[row, width - len(task.prompt_ids) :] = 1
    temperature = MODES[mode]
    # a fresh config: none of the checkpoint's sampling defaults (top-p, repetition penalty) apply
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(end_ids), pad_token_id=pad_id
    )
    if temperature is not None:
        config.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        torch.manual_seed(_seed([task.id for task in tasks]))
    capture = _Capture(target, top_k, hidden)
    try:
        output = target.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
        )
    finally:
        capture.close()
    steps = output.shape[1] - width
    topk_ids = torch.stack(capture.ids[:steps], dim=1)  # [B, steps, k]
    topk_logp = torch.stack(capture.logp[:steps], dim=1)
    states = torch.stack(capture.hidden[:steps], dim=1) if hidden else None  # [B, steps, H]
    answers, finished, rows_ids, rows_logp, rows_hidden = [], [], [], [], []
    for row in range(len(tasks)):
        answer = output[row, width:].tolist()
        ended = False
        for index, token in enumerate(answer):
            if token in end_ids:
                answer, ended = answer[: index + 1], True
                break
        answers.append(answer)
        finished.append(ended)
        rows_ids.append(topk_ids[row, : len(answer)])
        rows_logp.append(topk_logp[row, : len(answer)])
        if states is not None:
            rows_hidden.append(states[row, : len(answer)])
    arrays = {"topk_ids": torch.cat(rows_ids).numpy(), "topk_logp": torch.cat(rows_logp).numpy()}
    if rows_hidden:
        arrays["hidden"] = torch.cat(rows_hidden).numpy()
    return store_answers(store, "b", tasks, answers, finished, arrays, dtype_name)


def store_answers(
    store: DistillStore,
    prefix: str,
    tasks: Sequence[Task],
    answers: Sequence[list[int]],
    finished: Sequence[bool],
    arrays: dict[str, np.ndarray],
    dtype_name: str,
) -> int:
    """Store a group of answers: their extras file (`arrays`, rows of every answer back to back) written
    atomically, then their records naming it. Returns the group's answer tokens.

    Args:
        prefix: the extras file's name prefix (`b` one `generate` batch, `r` a refilling batch's group).
        answers: each task's answer token ids (its end token included when it ended).
        finished: whether each answer ended with an end token (else it was cut at the length limit).
        arrays: `topk_ids` `[A, k]`, `topk_logp` `[A, k]` and optionally `hidden` `[A, H]`, `A` the
            group's answer tokens.
    """
    name = f"{prefix}-{hashlib.sha1('|'.join(task.id for task in tasks).encode()).hexdigest()[:16]}.npz"
    records, offset = [], 0
    for task, answer, ended in zip(tasks, answers, finished, strict=True):
        records.append(
            {
                "id": task.id,
                "domain": task.instruction.domain,
                "mode": task.mode,
                "input_ids": list(task.prompt_ids) + list(answer),
                "prompt_length": len(task.prompt_ids),
                "finished": ended,
                "dtype": dtype_name,
                "extras": name,
                "offset": offset,
            }
        )
        offset += len(answer)

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as sink:
            np.savez(sink, **arrays)

    store.write_extras(name, write)
    store.append(records)
    return offset


def load_extras(store: DistillStore, record: dict, cache: dict | None = None) -> dict[str, np.ndarray]:
    """The top-k ids `[A, k]`, log-probs `[A, k]` and (when kept) hidden states `[A, H]` of a record's answer.

    A record unpacked from a pack has no extras: `{}`. The arrays are copies, so they do not keep the whole
    batch's file alive.

    Args:
        store: the store.
        record: one of its records.
        cache: a dict the caller keeps across calls: the last extras file read is kept there, so reading
            the records of one batch in order decompresses their file once.

    Raises:
        FileNotFoundError: the record names an extras file that is missing.
    """
    length = len(record["input_ids"]) - record["prompt_length"]
    if record.get("extras") is None:
        # a chat unpacked from a compact pack: its extras were never copied
        return {}
    name = record["extras"]
    if cache is not None and cache.get("name") == name:
        arrays = cache["arrays"]
    else:
        with np.load(store.extras_path(name)) as loaded:
            arrays = {key: loaded[key] for key in loaded.files}
        if cache is not None:
            cache.clear()
            cache.update(name=name, arrays=arrays)
    start = record["offset"]
    return {key: array[start : start + length].copy() for key, array in arrays.items()}


def plan_batches(tasks: Sequence[Task], batch_size: int, window: int = 8) -> list[list[Task]]:
    """Batches of one mode and similar prompt length, in the order the tasks come.

    The tasks are cut into windows of `window` batches; inside a window they are grouped by mode and
    sorted by prompt length (little padding), so a run stopped early has answered the first tasks of the
    list, whatever their length.
    """
    batches = []
    span = batch_size * window
    for start in range(0, len(tasks), span):
        part = tasks[start : start + span]
        for mode in sorted({task.mode for task in part}):
            same = sorted(
                (task for task in part if task.mode == mode), key=lambda task: -len(task.prompt_ids)
            )
            batches += [same[index : index + batch_size] for index in range(0, len(same), batch_size)]
    return batches


def run_tasks(
    target,
    tokenizer,
    tasks: Sequence[Task],
    store: DistillStore,
    batch_size: int,
    max_new_tokens: int,
    shard_records: int,
    deadline: float | None = None,
    top_k: int = 8,
    hidden: bool = True,
    dtype_name: str = "fp32",
    on_batch: Callable[[int, int, float], None] | None = None,
) -> tuple[int, int, float]:
    """Answer `tasks` batch by batch until done or past `deadline` (`time.monotonic()` seconds).

    Returns:
        `(answers, answer tokens, seconds)` of this call.
    """
    started = time.monotonic()
    answers = produced = 0
    for batch in plan_batches(tasks, batch_size):
        if deadline is not None and time.monotonic() >= deadline:
            break
        produced += answer_batch(target, tokenizer, batch, store, max_new_tokens, top_k, hidden, dtype_name)
        answers += len(batch)
        store.seal(min_records=shard_records)
        if on_batch is not None:
            on_batch(len(batch), produced, time.monotonic() - started)
    return answers, produced, time.monotonic() - started
