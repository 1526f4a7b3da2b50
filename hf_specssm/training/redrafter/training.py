"""Training a ReDrafter head for a frozen target: data, distillation, the loop, checkpoints, evaluation.

The loss is ReDrafter's: from the target's hidden state at position `t` and the tokens after it, the head
predicts tokens `t + 2 … t + C + 1`; the loss sums the `C` cross-entropies. With distillation the training
sequences are the target's own greedy continuations, which is what the head has to predict at decoding
time.

Under `accelerate launch` (or `torchrun`) each process reads the target's hidden states over its share of
every step's sequences and DDP averages the head's gradients (`hf_specssm.training.distributed`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import PreTrainedModel, get_cosine_schedule_with_warmup

from hf_specssm import _compat
from hf_specssm.drafters.redrafter.drafter import ReDrafterDrafter
from hf_specssm.drafters.redrafter.modeling import ReDrafterHead
from hf_specssm.generation import generate
from hf_specssm.training.checkpoints import (
    TRAINER_STATE,
    atomic_torch_save,
    check_counts,
    latest_checkpoint,
    load_schedule,
    save_checkpoint,
)
from hf_specssm.training.distributed import (
    check_global_batch,
    loss_over_processes,
    make_accelerator,
    shard_rows,
    training_device,
)

IGNORE = -100


@dataclass(frozen=True)
class TrainingConfig:
    """Options of `train_head`.

    Attributes:
        steps: optimiser steps in total (a resumed run continues up to this count).
        batch_size: sequences per step, drawn with replacement from the training blocks (the global batch:
            split evenly over the processes of a launched run).
        learning_rate: peak AdamW learning rate (cosine decay after `warmup_steps`).
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping norm.
        checkpoint_every: save a checkpoint every this many steps (and at the end).
        keep_checkpoints: how many of the newest checkpoints to keep in the output folder.
        seed: seeds the batch order (the head's initialisation is seeded by its creator).
        progress: show a tqdm progress bar.
    """

    steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        check_counts(self, ("steps", "batch_size", "checkpoint_every", "keep_checkpoints"))
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}.")
        if self.warmup_steps < 0 or self.weight_decay < 0 or not self.max_grad_norm > 0:
            raise ValueError("warmup_steps and weight_decay must be >= 0 and max_grad_norm > 0.")


@dataclass(frozen=True)
class TrainingData:
    """Fixed-length training sequences.

    Attributes:
        input_ids: `[N, T]` token ids.
        labels: `[N, T]` tokens to predict, `-100` where a position carries no loss (distillation prompts,
            tokens after the target's end of sequence).
        description: what the data is, for the model card.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    description: str

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2 or self.labels.shape != self.input_ids.shape:
            raise ValueError(
                f"input_ids and labels must be [N, T] of equal shape, got {tuple(self.input_ids.shape)} and "
                f"{tuple(self.labels.shape)}."
            )
        if self.input_ids.shape[0] == 0:
            raise ValueError("the training data holds no sequence (is the corpus shorter than one block?).")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def save(self, path: str | Path) -> None:
        """Save to one file, crash-safe (so a resumed run trains on exactly the same data)."""
        atomic_torch_save(
            {"input_ids": self.input_ids, "labels": self.labels, "description": self.description}, path
        )

    @classmethod
    def load(cls, path: str | Path) -> TrainingData:
        """Load what `save` wrote."""
        state = torch.load(path, weights_only=True)
        return cls(input_ids=state["input_ids"], labels=state["labels"], description=state["description"])


def read_corpus(path: str | Path, tokenizer=None, vocab_size: int | None = None) -> list[list[int]]:
    """Token ids of every document of a local corpus.

    - `.jsonl`: one JSON object per line with `input_ids` (used as is), `text`, `messages` (chat, rendered
      with the tokenizer's chat template) or `conversations` (ShareGPT `from`/`value` turns).
    - any other file: plain text, documents separated by blank lines.

    Args:
        path: the corpus file.
        tokenizer: the target's tokenizer; needed for everything except `input_ids` records.
        vocab_size: the target's vocabulary size; token ids outside `[0, vocab_size)` are refused.

    Returns:
        one list of token ids per document.

    Raises:
        ValueError: naming `path:line` for a line that is not a JSON object, a record of unknown shape,
            or token ids that are not integers inside the vocabulary.
    """
    path = Path(path)

    def encode(text: str) -> list[int]:
        if tokenizer is None:
            raise ValueError(
                f"{path} holds text; a tokenizer is needed (targets without one, such as the toy targets, "
                "take JSONL records with input_ids)."
            )
        return tokenizer(text, add_special_tokens=True)["input_ids"]

    def render_chat(messages: list[dict]) -> list[int]:
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            return encode("\n".join(f"{m['role']}: {m['content']}" for m in messages))
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]

    def checked(ids: list, where: str) -> list[int]:
        if not all(isinstance(token, int) and not isinstance(token, bool) for token in ids):
            raise ValueError(f"{where}: input_ids must be a list of integer token ids.")
        bad = next(
            (token for token in ids if token < 0 or (vocab_size is not None and token >= vocab_size)), None
        )
        if bad is not None:
            allowed = f"0–{vocab_size - 1}" if vocab_size is not None else "non-negative ids"
            raise ValueError(
                f"{where}: token id {bad} is outside the target's vocabulary ({allowed}); were the ids made "
                "with another tokenizer?"
            )
        return ids

    def ids_of(record: dict, where: str) -> list[int]:
        if "input_ids" in record:
            ids = record["input_ids"]
            return checked(ids if isinstance(ids, list) else [ids], where)
        if "text" in record:
            return checked(encode(record["text"]), where)
        if "messages" in record:
            return checked(render_chat(record["messages"]), where)
        if "conversations" in record:
            roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
            turns = [
                {"role": roles.get(turn["from"], turn["from"]), "content": turn["value"]}
                for turn in record["conversations"]
            ]
            return checked(render_chat(turns), where)
        raise ValueError(
            f"{where}: expected input_ids, text, messages or conversations, got {sorted(record)}."
        )

    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}).") from None
    documents = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno}).") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
            try:
                documents.append(ids_of(record, where))
            except (KeyError, TypeError) as error:
                raise ValueError(f"{where}: malformed record ({type(error).__name__}: {error}).") from None
    else:
        documents = [
            checked(encode(block.strip()), f"{path}, paragraph {index}")
            for index, block in enumerate((b for b in content.split("\n\n") if b.strip()), start=1)
        ]
    return [document for document in documents if document]


def blocks_from_documents(documents: list[list[int]], length: int, description: str) -> TrainingData:
    """Concatenate the documents and cut them into `[N, length]` blocks (the remainder is dropped)."""
    stream = torch.tensor([token for document in documents for token in document], dtype=torch.long)
    count = stream.shape[0] // length
    blocks = stream[: count * length].reshape(count, length)
    return TrainingData(input_ids=blocks, labels=blocks.clone(), description=description)


def random_prompts(vocab_size: int, count: int, length: int, seed: int) -> torch.Tensor:
    """`[count, length]` uniformly random prompts (for targets without a corpus, such as toy targets)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, length), generator=generator)


def _eos_ids(target: PreTrainedModel) -> list[int]:
    eos = target.generation_config.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(token) for token in eos]


@torch.no_grad()
def distill(
    target: PreTrainedModel,
    prompts: torch.Tensor,
    new_tokens: int,
    batch_size: int = 32,
    description: str = "",
    progress: bool = True,
) -> TrainingData:
    """The target's greedy continuations of `prompts` as training data (ReDrafter's distillation).

    Args:
        target: the frozen target.
        prompts: `[N, P]` prompts (equal length, no padding).
        new_tokens: tokens generated per prompt.
        batch_size: prompts per `generate` call.
        description: what the prompts are, for the model card.
        progress: show a progress bar.

    Returns:
        `TrainingData` of `[N, P + new_tokens]` sequences; the prompts and everything after the target's
        end-of-sequence token carry no loss.
    """
    eos = _eos_ids(target)
    pad = target.generation_config.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    sequences, labels = [], []
    starts = range(0, prompts.shape[0], batch_size)
    for start in tqdm(starts, desc="distilling", disable=not progress):
        batch = prompts[start : start + batch_size].to(target.device)
        output = target.generate(
            batch,
            attention_mask=torch.ones_like(batch),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        ).cpu()
        output = torch.nn.functional.pad(
            output, (0, batch.shape[1] + new_tokens - output.shape[1]), value=pad
        )
        label = output.clone()
        label[:, : batch.shape[1]] = IGNORE
        continuation = output[:, batch.shape[1] :]
        if eos:
            # positions after the first end-of-sequence token are padding, not the target's choice
            is_eos = torch.isin(continuation, torch.tensor(eos))
            after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
            label[:, batch.shape[1] :][after_eos] = IGNORE
        sequences.append(output)
        labels.append(label)
    name = description or f"{prompts.shape[0]} prompts of {prompts.shape[1]} tokens"
    return TrainingData(
        input_ids=torch.cat(sequences),
        labels=torch.cat(labels),
        description=f"{name}, distilled: the target's greedy continuations of {new_tokens} tokens",
    )


@torch.no_grad()
def target_hidden_states(target: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """`[B, T, H]` the target's last hidden states over `input_ids` `[B, T]`: its LM head's inputs, the `h`
    the decoding loop hands a draft head."""
    captured: list[torch.Tensor] = []
    head = target.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    kwargs = {"logits_to_keep": 0} if _compat.forward_accepts(target, "logits_to_keep") else {}
    try:
        target(input_ids=input_ids.to(target.device), use_cache=False, **kwargs)
    finally:
        handle.remove()
    return captured[-1].detach()


def _save_checkpoint(
    output_dir: Path,
    step: int,
    head: ReDrafterHead,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    losses: list[float],
    keep: int,
    processes: int = 1,
) -> Path:
    head.config.training_steps = step
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        # the batch order: every process draws the same rows, so one state serves them all
        "generator": generator.get_state(),
        "losses": torch.tensor(losses, dtype=torch.float64),
        "processes": processes,
    }
    return save_checkpoint(output_dir, step, head, state, keep)


def _load_checkpoint(
    folder: Path,
    head: ReDrafterHead,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR,
    generator: torch.Generator,
) -> tuple[int, list[float]]:
    head.load_state_dict(load_file(folder / "model.safetensors", device=str(head.device)))
    state = torch.load(folder / TRAINER_STATE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    load_schedule(schedule, state["schedule"])
    generator.set_state(state["generator"])
    return int(state["step"]), state["losses"].tolist()


def train_head(
    head: ReDrafterHead,
    target: PreTrainedModel,
    data: TrainingData,
    config: TrainingConfig | None = None,
    output_dir: str | Path | None = None,
    resume: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    accelerator: Accelerator | None = None,
) -> list[float]:
    """Train `head` on `data` for the frozen `target` (in place).

    Each step draws `batch_size` sequences, reads the target's hidden states over them (no gradient), and
    takes one AdamW step on the summed cross-entropy of the head's `C` draft steps.

    Alone, the head trains on its device. Under a launcher every process calls this with the same head,
    data and arguments (and its own copy of the target, on its device): each reads the hidden states of
    its share of every step's sequences, and only the main process saves checkpoints and shows progress.

    Args:
        head: the head to train (attached to `target` here).
        target: the frozen target.
        data: training sequences of at least `beam_length + 2` tokens.
        config: training options (default `TrainingConfig()`).
        output_dir: where `checkpoint-<step>/` folders go (head, optimizer, schedule and batch-order state);
            `None` saves nothing.
        resume: continue from the newest checkpoint in `output_dir` if there is one.
        on_step: called with `(step, loss)` after every step, in every process (the loss is the mean over
            the processes).
        accelerator: this process's (default `make_accelerator()`).

    Returns:
        the loss of every step so far (resumed runs include the steps before the interruption).

    Raises:
        ValueError: the batch does not split evenly over the processes.
    """
    config = config if config is not None else TrainingConfig()
    accelerator = accelerator if accelerator is not None else make_accelerator()
    check_global_batch(config.batch_size, accelerator, "batch_size")
    head.to(training_device(accelerator, head.device))
    head.attach(target)
    target.eval()
    optimizer = torch.optim.AdamW(
        head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    step, losses = 0, []
    output_dir = Path(output_dir) if output_dir is not None else None
    if output_dir is not None and resume and (folder := latest_checkpoint(output_dir)) is not None:
        step, losses = _load_checkpoint(folder, head, optimizer, schedule, generator)
    head.train()
    # alone: the head and the optimizer as they are; launched: DDP and accelerate's optimizer wrapper
    model, optimizer = accelerator.prepare(head, optimizer)
    main = accelerator.is_main_process
    bar = tqdm(
        total=config.steps, initial=step, desc="train-redrafter", disable=not (config.progress and main)
    )
    try:
        while step < config.steps:
            # every process draws the whole batch (the same generator everywhere) and trains on its rows
            rows = shard_rows(
                torch.randint(len(data), (config.batch_size,), generator=generator), accelerator
            )
            input_ids = data.input_ids[rows]
            hidden = target_hidden_states(target, input_ids)
            output = model(input_ids.to(head.device), hidden, data.labels[rows].to(head.device))
            loss, with_loss = loss_over_processes(output.loss, accelerator)
            optimizer.zero_grad(set_to_none=True)
            if with_loss:
                # a process whose rows carry no label still joins the gradient average, with zeros
                accelerator.backward(output.loss if output.loss is not None else 0 * output.logits.sum())
                accelerator.clip_grad_norm_(head.parameters(), config.max_grad_norm)
                optimizer.step()
            schedule.step()
            step += 1
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
            saving = output_dir is not None and (step % config.checkpoint_every == 0 or step == config.steps)
            if saving and main:
                _save_checkpoint(
                    output_dir,
                    step,
                    head,
                    optimizer,
                    schedule,
                    generator,
                    losses,
                    config.keep_checkpoints,
                    accelerator.num_processes,
                )
            if on_step is not None:
                on_step(step, loss)
        # the last checkpoint is on disk before any process returns
        accelerator.wait_for_everyone()
    finally:
        bar.close()
        head.eval()
    head.config.training_steps = step
    return losses


def mean_accepted_length(
    target: PreTrainedModel,
    head: ReDrafterHead,
    prompts: torch.Tensor,
    max_new_tokens: int,
) -> float:
    """τ of greedy speculative decoding with `head`: tokens committed per target forward, pooled over the
    prompts `[N, P]` (tree rounds on Transformer targets, best-beam chains on SSM and hybrid targets)."""
    drafter = ReDrafterDrafter(head, target)
    committed = rounds = 0
    for prompt in prompts.to(target.device):
        # an explicit mask: a prompt may contain the pad id, which must not be read as padding
        generate(
            target,
            prompt[None],
            attention_mask=torch.ones_like(prompt[None]),
            drafter=drafter,
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        stats = target.last_speculation_stats
        committed += stats.new_tokens
        rounds += stats.rounds
    return committed / rounds if rounds else 0.0
