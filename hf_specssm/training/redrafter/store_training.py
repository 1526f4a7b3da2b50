"""A ReDrafter head trained on a distillation store: the target's stored hidden states, no target forward.

A store (`hf-specssm distill`) keeps, for every answer token of the target's own answers, the last hidden
state that chose it and the target's top-k log-probabilities there. That is everything a ReDrafter head
reads and predicts, so training needs only the target's token embedding (shared by the head's recurrence),
never a forward of the target: every answer position is one independent training row.

A round of decoding starts after the target committed answer token `a_j`, chosen by hidden state `h_j`: the
head reads `h_j`, feeds `g_0 = a_j` and drafts `a_{j+1}`, then feeds its own draft and drafts `a_{j+2}`, and so
on for `C` tokens. Row `j` holds `h_j` and `a_j … a_{j+C}`; the loss of each of its `C` steps is

    (1 - λ) · CE(head, a_{j+s}) + λ · CE(head, the target's top-k at a_{j+s}, renormalised)

summed over the steps (ReDrafter's sum of per-step losses), averaged over the rows. In a teacher-forced
chat (`hf_specssm.training.distillation.teacher`: text the target read, not wrote) the head still reads the
text's tokens, but each step learns the target's top-1 there (`Example.answer_labels`), so both terms say
what the target would have drafted after that prefix.

`evaluate_head` simulates greedy chains on held-out greedy answers exactly as
`hf_specssm.training.mamba_drafter.finetune.evaluate_drafter` does for Mamba drafters (the same
`ChainTally`), so the two kinds of drafter are compared on the same answers by the same count.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hf_specssm.drafters.redrafter.modeling import ReDrafterHead
from hf_specssm.training.checkpoints import (
    check_counts,
    latest_checkpoint,
    load_trainer_state,
    save_checkpoint,
)
from hf_specssm.training.distillation.store import GREEDY, TEACHER
from hf_specssm.training.mamba_drafter.data import select_vocabulary
from hf_specssm.training.mamba_drafter.finetune import (
    ChainEstimate,
    ChainTally,
    Example,
    check_teacher_share,
    draw_indices,
    mixed_loss,
)
from hf_specssm.training.mamba_drafter.training import learning_rate_factor, principal_rows, resume_drafter

IGNORE = -100


@dataclass(frozen=True)
class HeadRows:
    """Training rows from distilled answers: one per round start.

    Attributes:
        hidden: `[N, H]` the target's hidden state that chose each row's `g_0` (fp16 as stored).
        tokens: `[N, C + 1]` target ids `g_0 … g_C` the head reads (`-100` past the end of the answer).
        labels: `[N, C]` what each step learns to draft (`-100` past the end): `g_1 … g_C` where the target
            wrote the answer, its top-1 there where it only read the text (`Example.answer_labels`).
        soft_ids: `[N, C, k]` the target's top-k ids at each predicted token `g_1 … g_C`.
        soft_logp: `[N, C, k]` their log-probabilities (temperature 1).
        teacher: `[N]` bool, rows of teacher-forced chats (what `--teacher-share` draws from).
    """

    hidden: torch.Tensor
    tokens: torch.Tensor
    labels: torch.Tensor
    soft_ids: torch.Tensor
    soft_logp: torch.Tensor
    teacher: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]


def head_rows(examples: Sequence[Example], steps: int) -> HeadRows:
    """Every round start of every answer as a row (`HeadRows`); answers need stored hidden states.

    Args:
        examples: distilled chats (greedy and sampled: both are the target's own tokens).
        steps: `C`, the tokens each row drafts (the head's `beam_length`).

    Raises:
        ValueError: an example without hidden states, or no answer of two tokens or more.
    """
    hidden, tokens, labels, soft_ids, soft_logp, teacher = [], [], [], [], [], []
    for example in examples:
        if example.hidden is None:
            raise ValueError(
                "an example kept no hidden states: label the store with `hf-specssm distill label` first."
            )
        answer = example.ids[example.prompt_length :]
        length = answer.numel()
        if length < 2:
            continue
        starts = torch.arange(length - 1)
        offsets = starts[:, None] + torch.arange(steps + 1)[None]  # [A - 1, C + 1]
        inside = offsets < length
        clamped = offsets.clamp(max=length - 1)
        tokens.append(torch.where(inside, answer[clamped], torch.full_like(clamped, IGNORE)))
        wanted = example.answer_labels()[clamped[:, 1:]]
        labels.append(torch.where(inside[:, 1:], wanted, torch.full_like(wanted, IGNORE)))
        hidden.append(example.hidden[: length - 1])  # a view: torch.cat makes the only copy
        soft_ids.append(example.topk_ids[clamped[:, 1:]])
        soft_logp.append(example.topk_logp[clamped[:, 1:]])
        teacher.append(torch.full((length - 1,), example.mode == TEACHER, dtype=torch.bool))
    if not tokens:
        raise ValueError("no answer of two tokens or more to train on.")
    return HeadRows(
        hidden=torch.cat(hidden),
        tokens=torch.cat(tokens),
        labels=torch.cat(labels),
        soft_ids=torch.cat(soft_ids),
        soft_logp=torch.cat(soft_logp),
        teacher=torch.cat(teacher),
    )


def store_vocabulary(
    examples: Iterable[Example], vocab_size: int, size: int, always: Iterable[int] = ()
) -> torch.Tensor:
    """The `size` target ids a reduced head drafts over: `always` (end-of-sequence ids) first, then the
    tokens the answers of `examples` teach (`Example.answer_labels`) by descending count (ties, and ids never seen, by id).

    Returns:
        `[size]` distinct target ids.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for example in examples:
        np.add.at(counts, example.answer_labels().numpy(), 1)
    return select_vocabulary(counts, size, always)


@torch.no_grad()
def init_output_from_target(head: ReDrafterHead, target_output: torch.Tensor) -> None:
    """Start the head's output layer from the target's own output embedding: the draft tokens' rows of
    `target_output` `[V, H]`, projected onto their top `head_width` principal directions and scaled to the
    initialiser's spread, so that tokens the target scores alike start alike — also tokens the training
    answers hold rarely. Row 0 of a reduced vocabulary (the 'other' slot) and the biases start at zero.

    Call it after `set_draft_vocabulary` and before training.

    Raises:
        ValueError: `target_output` is not `[vocab_size, hidden_size]` of the head's target.
    """
    config = head.config
    if tuple(target_output.shape) != (config.vocab_size, config.hidden_size):
        raise ValueError(
            f"target_output must be the target's [vocab_size, hidden_size] = [{config.vocab_size}, "
            f"{config.hidden_size}] output embedding, got {list(target_output.shape)}."
        )
    weight = head.lm_head.weight
    ids = head.draft_to_target[1:] if head.reduced_vocabulary else torch.arange(config.vocab_size)
    projected = principal_rows(
        target_output[ids.to(target_output.device)], weight.shape[1], config.initializer_range
    )
    width = projected.shape[1]
    first = 1 if head.reduced_vocabulary else 0
    weight.zero_()
    weight[first:, :width] = projected.to(weight)
    if head.lm_head.bias is not None:
        head.lm_head.bias.zero_()


@dataclass(frozen=True)
class HeadFinetuneConfig:
    """Options of `finetune_head`.

    Attributes:
        steps: optimiser steps in total (a resumed run continues up to this count).
        batch_size: rows (round starts) per step.
        learning_rate: peak AdamW learning rate (linear warm-up, cosine to 10%).
        warmup_steps: warm-up steps.
        max_grad_norm: gradient clipping norm.
        soft_weight: λ, the weight of the soft-label term.
        checkpoint_every: steps between checkpoints.
        keep_checkpoints: how many checkpoints to keep.
        seed: the rows of step `s` are a function of `(seed, s)`, so resuming is exact.
        progress: show a tqdm bar.
        bf16: run the forward in bf16 autocast (fp32 weights, gradients and optimizer state): the head's
            products run on the CPU's bf16 matrix units where it has them (AMX, AVX512-BF16).
        teacher_share: the share of each batch's rows drawn from teacher-forced chats
            (`finetune.draw_indices`); None draws uniformly over all rows.
    """

    steps: int = 400
    batch_size: int = 2048
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    soft_weight: float = 0.5
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    progress: bool = True
    bf16: bool = False
    teacher_share: float | None = None

    def __post_init__(self) -> None:
        check_teacher_share(self.teacher_share)
        check_counts(self, ("steps", "batch_size", "checkpoint_every", "keep_checkpoints"))
        if not (self.learning_rate > 0 and self.max_grad_norm > 0):
            raise ValueError("learning_rate and max_grad_norm must be > 0.")
        if not 0 <= self.soft_weight <= 1:
            raise ValueError(f"soft_weight must lie in [0, 1], got {self.soft_weight}.")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0.")


def rows_loss(head: ReDrafterHead, rows: HeadRows, index: torch.Tensor, soft_weight: float) -> torch.Tensor:
    """The loss of the rows `index` `[R]` (module docstring): summed over the `C` steps, mean over rows."""
    device = head.device
    tokens = rows.tokens[index].to(device)  # [R, C + 1]
    labels = head.to_draft_ids(rows.labels[index].to(device))  # [R, C]; -100 stays -100
    soft_ids = head.to_draft_ids(rows.soft_ids[index].to(device))  # [R, C, k]
    soft_probs = torch.softmax(rows.soft_logp[index].to(device), dim=-1)
    hidden = rows.hidden[index].to(device=device, dtype=head.dtype)
    state = head.initial_state(tokens.shape[0])
    total = None
    for step in range(1, tokens.shape[1]):
        state = head.next_state(state, tokens[:, step - 1].clamp(min=0))
        kept = labels[:, step - 1] != IGNORE
        if not bool(kept.any()):
            break
        logits = head.output_logits(hidden[kept], state[kept])
        term = mixed_loss(
            logits, labels[kept, step - 1], soft_ids[kept, step - 1], soft_probs[kept, step - 1], soft_weight
        )
        total = term if total is None else total + term
    assert total is not None  # every row has a label at step 1 (answers of two tokens or more)
    return total


def finetune_head(
    head: ReDrafterHead,
    rows: HeadRows,
    output_dir: str | Path,
    config: HeadFinetuneConfig,
    on_checkpoint: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train `head` (attached to its target) in place on `rows`; checkpoints go to `output_dir` (resumes
    from the newest).

    Returns:
        the loss of every step so far (a resumed run includes the steps before the interruption).

    Raises:
        ValueError: the head is not attached, the rows' hidden size or draft length is not the head's, or a
            checkpoint does not fit the head; a `teacher_share` the rows cannot give.
    """
    check_teacher_share(config.teacher_share, rows.teacher)
    if not head.is_attached:
        raise ValueError("attach the target first (head.attach(target)): the recurrence reads its embedding.")
    if rows.hidden.shape[-1] != head.config.hidden_size:
        raise ValueError(
            f"the stored hidden states have size {rows.hidden.shape[-1]}, the head reads {head.config.hidden_size}."
        )
    if rows.tokens.shape[1] != head.config.beam_length + 1:
        raise ValueError(
            f"the rows draft {rows.tokens.shape[1] - 1} tokens, the head's beam_length is {head.config.beam_length}."
        )
    optimizer = torch.optim.AdamW(
        head.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=0.0
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, config))
    step, losses, seconds = resume_drafter(head, optimizer, schedule, output_dir)
    latest = latest_checkpoint(output_dir)
    positions = int(load_trainer_state(latest).get("positions", 0)) if latest is not None else 0
    head.train()
    bar = tqdm(total=config.steps, initial=step, desc="train-redrafter", disable=not config.progress)
    try:
        while step < config.steps:
            started = time.perf_counter()
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            index = draw_indices(rows.teacher, config.batch_size, generator, config.teacher_share)
            with torch.autocast(head.device.type, dtype=torch.bfloat16, enabled=config.bf16):
                loss = rows_loss(head, rows, index, config.soft_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), config.max_grad_norm)
            optimizer.step()
            schedule.step()
            step += 1
            seconds += time.perf_counter() - started
            positions += config.batch_size
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step % config.checkpoint_every == 0 or step == config.steps:
                head.config.training_steps = step
                state = {
                    "step": step,
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "losses": losses,
                    "seconds": seconds,
                    "positions": positions,
                }
                save_checkpoint(output_dir, step, head, state, config.keep_checkpoints)
                if on_checkpoint is not None:
                    window = losses[-config.checkpoint_every :]
                    on_checkpoint(step, sum(window) / len(window))
                    head.train()
    finally:
        bar.close()
        head.eval()
    head.config.training_steps = step
    return losses


@torch.no_grad()
def head_chain_table(head: ReDrafterHead, example: Example, k: int) -> np.ndarray:
    """`[k, A − 1]` bool: `table[depth, i]` is whether the head's greedy draft of answer token `i + 1` is the
    target's, in a round that started `depth` tokens before it (after answer token `i − depth`, with that
    token's hidden state, feeding the true tokens up to `i`); entries with `depth > i` stay false (a chain
    never reads them). The best draftable token is the draft: never the 'other' slot."""
    device = head.device
    answer = example.ids[example.prompt_length :].to(device)
    hidden = example.hidden.to(device=device, dtype=head.dtype)
    count = answer.numel() - 1
    table = np.zeros((k, count), dtype=bool)
    truth = head.to_draft_ids(answer)
    for depth in range(min(k, count)):
        starts = torch.arange(count - depth, device=device)
        state = head.initial_state(starts.numel())
        for offset in range(depth + 1):
            state = head.next_state(state, answer[starts + offset])
        logits = head.output_logits(hidden[starts], state).float()
        if head.reduced_vocabulary:
            logits[..., 0] = torch.finfo(logits.dtype).min
        table[depth, depth:] = (logits.argmax(-1) == truth[starts + depth + 1]).cpu().numpy()
    return table


@torch.no_grad()
def evaluate_head(head: ReDrafterHead, examples: Iterable[Example], k: int = 6) -> ChainEstimate:
    """Simulated greedy chains of `k` drafts at every round start of the greedy answers (module docstring);
    sampled answers and answers without hidden states are skipped."""
    head.eval()
    tally = ChainTally(k)
    for example in examples:
        if (
            example.mode != GREEDY
            or example.hidden is None
            or example.ids.numel() - example.prompt_length < 2
        ):
            continue
        tally.add(head_chain_table(head, example, k))
    return tally.estimate()
