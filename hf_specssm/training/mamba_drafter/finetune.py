"""Fine-tune a Mamba drafter on the target's own answers, with soft labels and (optionally) its hidden states.

The data is a distillation store (`hf_specssm.training.distillation`): prompts and the target's answers,
the target's top-k log-probabilities at every answer token, and its last hidden state there. The drafter
reads the whole chat; the loss covers answer tokens only:

    loss = (1 - λ) · CE(drafter, answer token) + λ · CE(drafter, target's top-k distribution renormalised)

A **feature-conditioned** drafter (`config.feature_size`) is trained the way it drafts. A round starts after
the target committed token `x_t`, chosen by the target's hidden state `h_{t-1}`; the drafter has read `x_t`
and drafts `x_{t+1}` with feature `h_{t-1}` at depth 0, then `x_{t+2}` after its own `x_{t+1}` with the
same feature at depth 1, and so on. So position `t` is trained with the feature of a round that started
`j` tokens earlier (`h_{t-1-j}`, depth `j`), `j` drawn uniformly from the depths the answer allows; with
probability `feature_dropout` a position gets no feature at all, as in the first round of a call (no hidden
state exists before the first verification).

`evaluate_drafter` simulates greedy chains on held-out greedy answers exactly: a chain's draft `i` is fed
only if drafts `0 … i-1` equal the target's tokens, so teacher-forced predictions at depth `i` give what
the chain would have drafted. It reports the simulated τ, the acceptance rate by draft position and the
top-1 agreement.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hf_specssm.drafters.mamba import OTHER_INDEX, MambaDrafterForCausalLM
from hf_specssm.training.checkpoints import (
    check_counts,
    latest_checkpoint,
    load_trainer_state,
    save_checkpoint,
)
from hf_specssm.training.distillation.generate import load_extras
from hf_specssm.training.distillation.store import GREEDY, TEACHER, DistillStore
from hf_specssm.training.mamba_drafter.data import is_heldout
from hf_specssm.training.mamba_drafter.training import learning_rate_factor, resume_drafter


@dataclass(frozen=True)
class Example:
    """One distilled chat.

    Attributes:
        ids: `[L]` target ids, prompt then answer.
        prompt_length: `P`; the answer is `ids[P:]` (`A` tokens).
        mode: `greedy` or `t0.7` (written by the target), or `teacher` (text it read).
        topk_ids: `[A, k]` target ids of the target's top-k at each answer token.
        topk_logp: `[A, k]` their log-probabilities (temperature 1).
        hidden: `[A, F]` the target's last hidden state that chose each answer token, or None.
        domain: the instruction's domain (`code`, `math`, …).
    """

    ids: torch.Tensor
    prompt_length: int
    mode: str
    topk_ids: torch.Tensor
    topk_logp: torch.Tensor
    hidden: torch.Tensor | None
    domain: str = ""

    def answer_labels(self) -> torch.Tensor:
        """`[A]` the tokens a drafter learns to predict: the answer itself where the target wrote it
        (`greedy`, `t0.7`), the target's top-1 where it only read the text (`teacher`, see
        `hf_specssm.training.distillation.teacher`)."""
        if self.mode == TEACHER:
            return self.topk_ids[:, 0]
        return self.ids[self.prompt_length :]


def draw_indices(
    teacher: torch.Tensor, count: int, generator: torch.Generator, teacher_share: float | None = None
) -> torch.Tensor:
    """`[count]` indices into a pool of training items (chats or head rows), drawn with replacement.

    Args:
        teacher: `[N]` bool, which items come from teacher-forced chats (text the target only read).
        count: how many to draw.
        generator: the step's generator (the draw is a function of its seed, so resuming is exact).
        teacher_share: None draws uniformly over the pool (the draw of runs made before the option);
            otherwise `round(teacher_share * count)` items come uniformly from the teacher-forced ones and
            the rest from the chats the target wrote, whatever the pool's own mix.

    Raises:
        ValueError: a share outside [0, 1], or one that needs items of a kind the pool lacks.
    """
    if teacher_share is None:
        return torch.randint(teacher.numel(), (count,), generator=generator)
    check_teacher_share(teacher_share, teacher)
    taught = teacher.nonzero().flatten()
    written = (~teacher).nonzero().flatten()
    from_teacher = round(teacher_share * count)
    parts = [
        pool[torch.randint(pool.numel(), (size,), generator=generator)]
        for pool, size in ((taught, from_teacher), (written, count - from_teacher))
        if size > 0
    ]
    return torch.cat(parts)


def check_teacher_share(teacher_share: float | None, teacher: torch.Tensor | None = None) -> None:
    """Raise a `ValueError` naming `--teacher-share` when the share is outside [0, 1] or (given the
    pool's `[N]` teacher mask) asks for items of a kind the pool lacks."""
    if teacher_share is None:
        return
    if not 0 <= teacher_share <= 1:
        raise ValueError(f"--teacher-share must lie in [0, 1], got {teacher_share}.")
    if teacher is None:
        return
    if teacher_share > 0 and not bool(teacher.any()):
        raise ValueError(
            f"--teacher-share {teacher_share} draws teacher-forced chats, but the store holds no labelled one: "
            "add them with `hf-specssm distill teach` and `distill label`, or leave --teacher-share out."
        )
    if teacher_share < 1 and bool(teacher.all()):
        raise ValueError(
            f"--teacher-share {teacher_share} draws chats the target wrote, but the store holds only "
            "teacher-forced ones: pass --teacher-share 1 or leave it out."
        )


def heldout_greedy(store: DistillStore, need_hidden: bool = False, limit: int | None = None) -> list[Example]:
    """The held-out chats the target answered greedily (at most `limit`): what chains are simulated on,
    since sampled answers and teacher-forced text are not the target's greedy choices. Empty when the
    store holds none."""
    try:
        heldout = [e for e in load_examples(store, "heldout", need_hidden=need_hidden) if e.mode == GREEDY]
    except ValueError:
        # a small store may hold no held-out chat (one in 40 by a hash of its id)
        return []
    return heldout[:limit]


def load_examples(
    store: DistillStore,
    split: str = "train",
    heldout_every: int = 40,
    need_hidden: bool = False,
    limit: int | None = None,
) -> list[Example]:
    """The store's records of one split (`train`, `heldout` by a stable hash of the id, or `all`) with their extras.

    Records whose answer is shorter than two tokens, or (with `need_hidden`) that kept no hidden states,
    are skipped.

    Raises:
        ValueError: an unknown split, or no record left.
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}.")
    examples = []
    cache: dict = {}
    for record in store.records():
        if split != "all" and is_heldout(record["id"], heldout_every) != (split == "heldout"):
            continue
        extras = load_extras(store, record, cache)
        if len(record["input_ids"]) - record["prompt_length"] < 2 or (need_hidden and "hidden" not in extras):
            continue
        if record["mode"] == TEACHER and "topk_ids" not in extras:
            # text the target only read teaches nothing until `distill label` gives its predictions
            continue
        ids = torch.tensor(record["input_ids"], dtype=torch.long)
        if "topk_ids" in extras:
            topk_ids = torch.from_numpy(extras["topk_ids"].astype(np.int64))
            topk_logp = torch.from_numpy(extras["topk_logp"].astype(np.float32))
        else:
            # no soft labels kept (an unpacked chat): the answer token itself, with all the mass
            answer = ids[int(record["prompt_length"]) :]
            topk_ids = answer[:, None].expand(-1, store.recipe.get("--top-k", 8)).clone()
            topk_logp = torch.full(topk_ids.shape, -1e4)
            topk_logp[:, 0] = 0.0
        examples.append(
            Example(
                ids=ids,
                prompt_length=int(record["prompt_length"]),
                mode=record["mode"],
                topk_ids=topk_ids,
                topk_logp=topk_logp,
                hidden=torch.from_numpy(extras["hidden"]) if "hidden" in extras else None,
                domain=record.get("domain", ""),
            )
        )
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise ValueError(f"{store.root} holds no usable {split} records.")
    return examples


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of `finetune_drafter`.

    Attributes:
        steps: optimiser steps in total (a resumed run continues up to this count).
        batch_size: chats per step.
        max_length: longer chats lose the start of their prompt (never answer tokens).
        learning_rate: peak AdamW learning rate of the drafter's own weights (linear warm-up, cosine to 10%).
        feature_learning_rate: peak learning rate of the feature projection and depth offsets (new weights).
        warmup_steps: warm-up steps.
        max_grad_norm: gradient clipping norm.
        soft_weight: λ, the weight of the soft-label term.
        feature_dropout: share of positions trained without a feature (the first round has none).
        max_depth: depths `0 … max_depth - 1` are trained (the chain lengths used when drafting).
        use_features: train the feature path (needs a feature-conditioned model and stored hidden states).
        checkpoint_every: steps between checkpoints.
        keep_checkpoints: how many checkpoints to keep.
        seed: the batches and draws of step `s` are a function of `(seed, s)`, so resuming is exact.
        progress: show a tqdm bar.
        bf16: run the forward in bf16 autocast (fp32 weights, gradients and optimizer state): faster on
            CPUs with bf16 matrix units (AMX, AVX512-BF16).
        teacher_share: the share of each batch's chats drawn from teacher-forced ones (`draw_indices`);
            None draws uniformly over all chats.
    """

    steps: int = 600
    batch_size: int = 8
    max_length: int = 1024
    learning_rate: float = 5e-4
    feature_learning_rate: float = 2e-3
    warmup_steps: int = 30
    max_grad_norm: float = 1.0
    soft_weight: float = 0.5
    feature_dropout: float = 0.15
    max_depth: int = 6
    use_features: bool = True
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    progress: bool = True
    bf16: bool = False
    teacher_share: float | None = None

    def __post_init__(self) -> None:
        check_teacher_share(self.teacher_share)
        check_counts(
            self,
            (
                "steps",
                "batch_size",
                "max_length",
                "checkpoint_every",
                "keep_checkpoints",
                "max_depth",
            ),
        )
        if not (self.learning_rate > 0 and self.feature_learning_rate > 0 and self.max_grad_norm > 0):
            raise ValueError("learning rates and max_grad_norm must be > 0.")
        for name in ("soft_weight", "feature_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}.")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0.")


@dataclass
class Batch:
    """Padded chats and the answer positions to train.

    Attributes:
        ids: `[B, T]` target ids (right-padded with the last token).
        rows, positions: `[N]` the chat and position `t` of each trained prediction (of `ids[row, t + 1]`).
        labels: `[N]` target ids to predict.
        soft_ids, soft_probs: `[N, k]` the target's top-k and their renormalised probabilities.
        features: `[N, F]` the feature of each prediction (zeros where none), or None without features.
        depths: `[N]` draft depths (`-1`: no feature).
    """

    ids: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    soft_ids: torch.Tensor
    soft_probs: torch.Tensor
    features: torch.Tensor | None
    depths: torch.Tensor


def make_batch(
    examples: list[Example], config: FinetuneConfig, generator: torch.Generator, use_features: bool
) -> Batch:
    """The trained predictions of `examples` (see the module docstring), depths and dropout drawn from `generator`."""
    chats, rows, positions, labels, soft_ids, soft_logp, features, depths = [], [], [], [], [], [], [], []
    for row, example in enumerate(examples):
        cut = max(0, example.ids.numel() - config.max_length)
        cut = min(cut, example.prompt_length - 1) if example.prompt_length > 0 else 0
        ids = example.ids[cut:]
        prompt = example.prompt_length - cut
        answer = ids.numel() - prompt
        chats.append(ids)
        # position t reads x_t and predicts x_{t+1}: t = P … P + A - 2 (answer steps 1 … A - 1)
        t = torch.arange(prompt, prompt + answer - 1)
        steps = t + 1 - prompt
        rows.append(torch.full_like(t, row))
        positions.append(t)
        labels.append(example.answer_labels()[steps])
        soft_ids.append(example.topk_ids[steps])
        soft_logp.append(example.topk_logp[steps])
        if use_features:
            allowed = torch.clamp(t - prompt, max=config.max_depth - 1)
            depth = (torch.rand(t.numel(), generator=generator) * (allowed + 1)).long()
            dropped = torch.rand(t.numel(), generator=generator) < config.feature_dropout
            depth = torch.where(dropped, torch.full_like(depth, -1), depth)
            source = (t - depth.clamp(min=0) - prompt).clamp(min=0)
            chosen = example.hidden[source].float()
            chosen[dropped] = 0
            features.append(chosen)
            depths.append(depth)
        else:
            depths.append(torch.full_like(t, -1))
    width = max(chat.numel() for chat in chats)
    padded = torch.stack([torch.cat([chat, chat[-1:].expand(width - chat.numel())]) for chat in chats])
    logp = torch.cat(soft_logp)
    return Batch(
        ids=padded,
        rows=torch.cat(rows),
        positions=torch.cat(positions),
        labels=torch.cat(labels),
        soft_ids=torch.cat(soft_ids),
        soft_probs=torch.softmax(logp, dim=-1),
        features=torch.cat(features) if use_features else None,
        depths=torch.cat(depths),
    )


def batch_loss(model: MambaDrafterForCausalLM, batch: Batch, soft_weight: float) -> torch.Tensor:
    """`(1 - λ) · CE(hard) + λ · CE(soft)` over the batch's predictions, in the draft vocabulary (scalar)."""
    device = model.device
    hidden = model.draft_hidden(model.to_draft_ids(batch.ids.to(device)))
    selected = hidden[batch.rows.to(device), batch.positions.to(device)]  # [N, H]
    if batch.features is not None:
        depths = batch.depths.to(device)
        has_feature = (depths >= 0).to(selected.dtype)[:, None]
        bias = model.feature_bias(batch.features.to(device)[:, None], depths.clamp(min=0)[:, None])[:, 0]
        selected = selected + has_feature * bias
    logits = model.lm_head(model.fuse_head_input(selected)).float()  # [N, V_d]
    labels = model.to_draft_ids(batch.labels.to(device))
    soft_ids = model.to_draft_ids(batch.soft_ids.to(device))
    return mixed_loss(logits, labels, soft_ids, batch.soft_probs.to(device), soft_weight)


def mixed_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    soft_ids: torch.Tensor,
    soft_probs: torch.Tensor,
    soft_weight: float,
) -> torch.Tensor:
    """`(1 - λ) · CE(labels) + λ · CE(soft targets)`, each a mean over the rows (scalar).

    Args:
        logits: `[N, V_d]` draft-vocabulary logits.
        labels: `[N]` draft ids of the tokens to predict.
        soft_ids: `[N, k]` draft ids of the target's top-k.
        soft_probs: `[N, k]` their renormalised probabilities.
        soft_weight: λ.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    hard = -log_probs.gather(1, labels[:, None]).mean()
    soft = -(soft_probs * log_probs.gather(1, soft_ids)).sum(-1).mean()
    return (1 - soft_weight) * hard + soft_weight * soft


def _optimizer(model: MambaDrafterForCausalLM, config: FinetuneConfig) -> torch.optim.Optimizer:
    new = {
        "feature_proj.weight",
        "depth_embedding.weight",
        "feature_norm.weight",
        "feature_mlp_up.weight",
        "feature_mlp_down.weight",
    }
    named = dict(model.named_parameters())
    fresh = [parameter for name, parameter in named.items() if name in new]
    rest = [parameter for name, parameter in named.items() if name not in new]
    groups = [{"params": rest, "lr": config.learning_rate}]
    if fresh:
        groups.append({"params": fresh, "lr": config.feature_learning_rate})
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)


def finetune_drafter(
    model: MambaDrafterForCausalLM,
    examples: list[Example],
    output_dir: str | Path,
    config: FinetuneConfig,
    on_checkpoint: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Fine-tune `model` in place on `examples`; checkpoints go to `output_dir` (resumes from the newest).

    Returns:
        the loss of every step so far (a resumed run includes the steps before the interruption).

    Raises:
        ValueError: `use_features` with a token-only model or examples without hidden states, or hidden
            states whose size is not the model's `feature_size`; a `teacher_share` the examples cannot give.
    """
    if config.use_features:
        if not model.reads_target_hidden:
            raise ValueError("use_features needs a feature-conditioned drafter (config.feature_size set).")
        missing = sum(example.hidden is None for example in examples)
        if missing:
            raise ValueError(
                f"{missing} examples kept no hidden states: label them with `hf-specssm distill label` "
                "(or generate without --no-hidden)."
            )
        size = examples[0].hidden.shape[-1]
        if size != model.config.feature_size:
            raise ValueError(
                f"the stored hidden states have size {size}, the drafter reads {model.config.feature_size}."
            )
    taught = torch.tensor([example.mode == TEACHER for example in examples], dtype=torch.bool)
    check_teacher_share(config.teacher_share, taught)
    optimizer = _optimizer(model, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, config))
    step, losses, seconds = resume_drafter(model, optimizer, schedule, output_dir)
    latest = latest_checkpoint(output_dir)
    # answer positions trained so far (checkpoints written before this count existed: unknown, 0)
    positions = int(load_trainer_state(latest).get("positions", 0)) if latest is not None else 0
    model.train()
    bar = tqdm(total=config.steps, initial=step, desc="finetune-drafter", disable=not config.progress)
    try:
        while step < config.steps:
            started = time.perf_counter()
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            chosen = draw_indices(taught, config.batch_size, generator, config.teacher_share).tolist()
            batch = make_batch([examples[i] for i in chosen], config, generator, config.use_features)
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=config.bf16):
                loss = batch_loss(model, batch, config.soft_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            schedule.step()
            step += 1
            seconds += time.perf_counter() - started
            positions += int(batch.labels.numel())
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step % config.checkpoint_every == 0 or step == config.steps:
                state = {
                    "step": step,
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "losses": losses,
                    "seconds": seconds,
                    "positions": positions,
                }
                model.config.training_steps = step
                save_checkpoint(output_dir, step, model, state, config.keep_checkpoints)
                if on_checkpoint is not None:
                    on_checkpoint(
                        step,
                        sum(losses[-config.checkpoint_every :]) / min(len(losses), config.checkpoint_every),
                    )
                    model.train()
    finally:
        bar.close()
        model.eval()
    return losses


@dataclass(frozen=True)
class ChainEstimate:
    """Simulated greedy chains on held-out greedy answers.

    Attributes:
        tau: mean tokens per target forward (accepted drafts + 1) over every round start, chains of `k`.
        acceptance_by_position: `[k]` P(draft i accepted | drafts before it accepted).
        top1: share of answer tokens where the depth-0 draft equals the target's token.
        k: chain length.
        rounds: round starts simulated.
    """

    tau: float
    acceptance_by_position: list[float]
    top1: float
    k: int
    rounds: int


class ChainTally:
    """Counts of simulated greedy chains of `k` drafts, from per-depth correctness tables (`add`).

    A chain's draft `i` is fed only if drafts `0 … i−1` were right, so the prediction a teacher-forced pass
    makes at depth `i` is what the chain drafts there; a round starts at every answer position.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.accepted = self.rounds = self.top1_hits = self.top1_count = 0
        self.reached = np.zeros(k)
        self.kept = np.zeros(k)

    def add(self, correct: np.ndarray) -> None:
        """Add one answer's table: `correct[depth, i]` `[k, n]` is whether the drafter's prediction of the
        token after position `i` is right when its round started `depth` tokens earlier."""
        n = correct.shape[1]
        self.top1_hits += int(correct[0].sum())
        self.top1_count += n
        for start in range(n):
            run = 0
            while run < self.k and start + run < n and correct[run, start + run]:
                run += 1
            length = min(self.k, n - start)
            self.accepted += run
            self.rounds += 1
            for position in range(min(run + 1, length)):
                self.reached[position] += 1
                self.kept[position] += position < run

    def estimate(self) -> ChainEstimate:
        """τ, acceptance by position and top-1 agreement over everything added."""
        k = self.k
        return ChainEstimate(
            tau=1 + self.accepted / max(self.rounds, 1),
            acceptance_by_position=[
                float(self.kept[i] / self.reached[i]) if self.reached[i] else 0.0 for i in range(k)
            ],
            top1=self.top1_hits / max(self.top1_count, 1),
            k=k,
            rounds=self.rounds,
        )


@torch.no_grad()
def chain_predictions(
    model: MambaDrafterForCausalLM, example: Example, k: int, use_features: bool
) -> torch.Tensor:
    """`[k, A − 1]` draft ids: `[depth, i]` is what a chain drafts for answer token `i + 1` in a round that
    started `depth` tokens before it, given the true tokens up to it (`chain_table`).

    Args:
        model: the drafter (a feature-conditioned one reads `example.hidden` when `use_features`).
        example: an answer of at least 2 tokens.
        k: deepest round start considered (chain length).
        use_features: feed the stored hidden state of each round's start.
    """
    device = model.device
    ids, prompt = example.ids.to(device), example.prompt_length
    answer = ids.numel() - prompt
    hidden = model.draft_hidden(model.to_draft_ids(ids[None]))[0]  # [L, H]
    t = torch.arange(prompt, prompt + answer - 1, device=device)
    predicted = torch.zeros(k, t.numel(), dtype=torch.long, device=device)
    head_weight = getattr(model.lm_head, "weight", None)
    head_dtype = head_weight.dtype if head_weight is not None else hidden.dtype
    for depth in range(k):
        # as the model's forward: the final norm's output (fp32 in a bf16 Mamba2) cast to the head's dtype,
        # then the feature bias in that dtype
        states = hidden[t].to(head_dtype)
        if use_features:
            # the hidden state that chose the round's last committed token, `depth` tokens before t
            source = (t - depth - prompt).clamp(min=0)
            bias = model.feature_bias(example.hidden.to(device)[source][:, None], depth)[:, 0]
            states = states + bias.to(states.dtype)
        logits = model.lm_head(model.fuse_head_input(states))
        # a drafter never proposes the 'other' slot (its full-vocabulary logits put the dtype's lowest
        # value there), so neither does the simulation: the best in-vocabulary token is its draft
        logits[..., OTHER_INDEX] = torch.finfo(logits.dtype).min
        predicted[depth] = logits.argmax(-1)
    return predicted


def chain_table(model: MambaDrafterForCausalLM, example: Example, k: int, use_features: bool) -> np.ndarray:
    """`[k, A − 1]` bool: `table[depth, i]` is whether the drafter's prediction of answer token `i + 1`
    is the target's, in a round that started `depth` tokens before it (`ChainTally.add`; entries with
    `depth > i`, rounds started before the answer, are never read by a chain)."""
    ids = example.ids.to(model.device)
    truth = model.to_draft_ids(ids[example.prompt_length + 1 :])
    return (chain_predictions(model, example, k, use_features) == truth).cpu().numpy()


@torch.no_grad()
def evaluate_drafter(
    model: MambaDrafterForCausalLM, examples: Iterable[Example], k: int = 6, use_features: bool | None = None
) -> ChainEstimate:
    """Simulate greedy chains of `k` drafts at every round start of the greedy answers (module docstring).

    Args:
        model: the drafter.
        examples: held-out examples (sampled ones are skipped: their tokens are not the target's argmax).
        k: chain length.
        use_features: read the stored hidden states (default: when the model is feature-conditioned).
    """
    use_features = model.reads_target_hidden if use_features is None else use_features
    model.eval()
    tally = ChainTally(k)
    for example in examples:
        if example.mode != GREEDY or (use_features and example.hidden is None):
            continue
        if example.ids.numel() - example.prompt_length < 2:
            continue
        tally.add(chain_table(model, example, k, use_features))
    return tally.estimate()


def feature_model_from(
    token_only: MambaDrafterForCausalLM, feature_size: int, mlp_size: int | None = None, seed: int = 0
) -> MambaDrafterForCausalLM:
    """A feature-conditioned drafter with `token_only`'s weights and zero feature terms (drafts like it).

    Args:
        token_only: the drafter to start from.
        feature_size: the target's hidden size.
        mlp_size: the width of the head-input MLP (`config.feature_mlp_size`), or None for none.
        seed: seeds the MLP's random input weights.

    The new model is in fp32 on `token_only`'s device.
    """
    from hf_specssm.drafters.configuration_mamba_drafter import MambaDrafterConfig

    fields = {**token_only.config.to_dict(), "feature_size": feature_size, "feature_mlp_size": mlp_size}
    config = MambaDrafterConfig(**fields)
    model = MambaDrafterForCausalLM(config).to(token_only.device)
    result = model.load_state_dict(token_only.state_dict(), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"unexpected weights in the token-only drafter: {result.unexpected_keys}")
    model.zero_feature_terms(torch.Generator().manual_seed(seed))
    return model.float()
