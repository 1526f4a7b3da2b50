"""Building and training a reduced-vocabulary Mamba2 drafter; the acceptance estimate on held-out answers.

The loop is plain next-token training over packed blocks (`data.sample_blocks`), in bf16 autocast on CPU
(AMX) or CUDA, with AdamW and a cosine schedule. Two mixtures: most steps use `mixture`, the last
`final_fraction` use `final_mixture` (mostly the target's own answers: that is what drafting predicts).
Every `checkpoint_every` steps the model and the trainer state go to `checkpoint-<step>/`; the same call
resumes from the newest one, and since each batch is a pure function of `(seed, step)` a resumed run
trains on exactly the data an uninterrupted one would.

Under `accelerate launch` (or `torchrun`) each process trains on its share of every step's batch and
DDP averages the gradients (`hf_specssm.training.distributed`): the same steps as one process, faster.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from tqdm.auto import tqdm

from hf_specssm.drafters.mamba import OTHER_INDEX, MambaDrafterConfig, MambaDrafterForCausalLM
from hf_specssm.training.checkpoints import (
    check_counts,
    latest_checkpoint,
    load_schedule,
    load_trainer_state,
    save_checkpoint,
)
from hf_specssm.training.distributed import (
    check_global_batch,
    loss_over_processes,
    make_accelerator,
    shard_rows,
    training_device,
)
from hf_specssm.training.mamba_drafter.data import SOURCES, Mixture, load_stream, sample_blocks

# Named shapes: (hidden size, layers, head_dim, state size). Heads = 2 · hidden / head_dim (expand 2).
ARCHITECTURES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "head_dim": 16, "state_size": 16},
    "mamba2-18m": {"hidden_size": 512, "num_hidden_layers": 6, "head_dim": 64, "state_size": 64},
    "mamba2-130m": {"hidden_size": 768, "num_hidden_layers": 24, "head_dim": 64, "state_size": 128},
}


def drafter_config(
    architecture: str,
    draft_vocab_size: int,
    target_vocab_size: int,
    tokenizer_reference: str | None = None,
    feature_size: int | None = None,
    feature_mlp_size: int | None = None,
) -> MambaDrafterConfig:
    """The config of a named architecture (`ARCHITECTURES`) over `draft_vocab_size` entries ('other' included);
    with `feature_size` (the target's hidden size), a feature-conditioned drafter, and with `feature_mlp_size`
    one whose LM head input passes a residual MLP of that width."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}.")
    shape = ARCHITECTURES[architecture]
    hidden, head_dim = shape["hidden_size"], shape["head_dim"]
    return MambaDrafterConfig(
        target_vocab_size=target_vocab_size,
        tokenizer_reference=tokenizer_reference,
        feature_size=feature_size,
        feature_mlp_size=feature_mlp_size,
        vocab_size=draft_vocab_size,
        hidden_size=hidden,
        num_hidden_layers=shape["num_hidden_layers"],
        expand=2,
        head_dim=head_dim,
        num_heads=2 * hidden // head_dim,
        n_groups=1,
        state_size=shape["state_size"],
        # small chunks: verification-sized multi-token forwards are padded to a multiple of this
        chunk_size=64,
        tie_word_embeddings=True,
        use_cache=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def principal_rows(rows: torch.Tensor, width: int, spread: float) -> torch.Tensor:
    """`rows` `[N, H]` centred and projected onto their top `width` principal directions, scaled to standard
    deviation `spread`: `[N, min(width, N, H)]` fp32 on the CPU, related rows still close together (the
    start of a drafter's embeddings or output layer from the target's rows)."""
    centred = rows.float().cpu()
    centred = centred - centred.mean(0, keepdim=True)
    _, _, basis = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ basis[:width].T
    return projected / projected.std() * spread


def new_drafter(
    config: MambaDrafterConfig,
    draft_token_ids: torch.Tensor,
    target_embeddings: torch.Tensor | None = None,
    seed: int = 0,
) -> MambaDrafterForCausalLM:
    """A freshly initialised drafter over `draft_token_ids` `[V_d - 1]` (target ids, draft-id order from 1).

    Args:
        config: from `drafter_config`.
        draft_token_ids: the draft vocabulary.
        target_embeddings: the target's input embedding matrix `[V, H_t]`; when given, the drafter's
            embeddings start as the top principal components of the draft tokens' rows (scaled to the
            initialiser's spread), so related tokens start close together.
        seed: seeds the initialisation.
    """
    torch.manual_seed(seed)
    model = MambaDrafterForCausalLM(config)
    model.set_draft_vocabulary(draft_token_ids)
    if target_embeddings is not None:
        projected = principal_rows(
            target_embeddings[draft_token_ids], config.hidden_size, config.initializer_range
        )
        with torch.no_grad():
            weight = model.get_input_embeddings().weight
            # fewer components than dimensions (tiny vocabularies): the rest keep their random init
            weight[1:, : projected.shape[1]] = projected
    return model


@dataclass(frozen=True)
class DrafterTrainingConfig:
    """Options of `train_drafter`.

    Attributes:
        steps: optimiser steps in total (a resumed run continues up to this count).
        batch_size: blocks per step (the global batch: split evenly over the processes of a launched run).
        block_length: tokens per block.
        learning_rate: peak AdamW learning rate (linear warm-up, cosine decay to 10%).
        warmup_steps: warm-up steps.
        weight_decay: AdamW weight decay (not on norms, biases, A, D, dt).
        max_grad_norm: gradient clipping norm.
        mixture: source weights for the first `1 - final_fraction` of the steps.
        final_mixture: source weights for the rest.
        final_fraction: share of the steps that use `final_mixture`.
        bf16: bf16 autocast (fp32 weights and optimizer state).
        compile: run the loss through `torch.compile` (about 1.7× faster on this CPU after a ~80 s
            compilation; needs a C++ compiler on CPU).
        checkpoint_every: save every this many steps (and at the end).
        keep_checkpoints: newest checkpoints kept.
        seed: seeds the batches.
        progress: show a tqdm bar.
    """

    steps: int = 3000
    batch_size: int = 8
    block_length: int = 1024
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    mixture: Mixture = field(default_factory=Mixture)
    final_mixture: Mixture = field(default_factory=lambda: Mixture(chat=0.7, code=0.25, docs=0.05))
    final_fraction: float = 0.3
    bf16: bool = True
    compile: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        check_counts(self, ("steps", "batch_size", "block_length", "checkpoint_every", "keep_checkpoints"))
        if not self.learning_rate > 0 or not self.max_grad_norm > 0:
            raise ValueError("learning_rate and max_grad_norm must be > 0.")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps and weight_decay must be >= 0.")
        if not 0 <= self.final_fraction <= 1:
            raise ValueError(f"final_fraction must lie in [0, 1], got {self.final_fraction}.")
        self.mixture.weights()
        self.final_mixture.weights()

    def mixture_at(self, step: int) -> Mixture:
        """The mixture used at step `step` (0-based)."""
        return self.final_mixture if step >= round(self.steps * (1 - self.final_fraction)) else self.mixture


def learning_rate_factor(step: int, config: DrafterTrainingConfig, floor: float = 0.1) -> float:
    """Linear warm-up to 1, then cosine decay to `floor` at the last step (reads only `config.steps` and
    `config.warmup_steps`, so `finetune.FinetuneConfig` and the ReDrafter store training use it too)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        # matrices decay; norms, biases and the SSM's A_log / D / dt_bias do not
        (decay if parameter.ndim >= 2 and "norm" not in name else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _autocast(model: torch.nn.Module, enabled: bool):
    device_type = "cuda" if next(model.parameters()).is_cuda else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled)


def _draft_loss(model: MambaDrafterForCausalLM, draft_ids: torch.Tensor, bf16: bool) -> torch.Tensor:
    with _autocast(model, bf16):
        logits = model.draft_logits(draft_ids[:, :-1], use_cache=False)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), draft_ids[:, 1:].flatten())


def batch_loss(
    model: MambaDrafterForCausalLM, blocks: torch.Tensor, bf16: bool, loss_fn: Callable | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy over the draft vocabulary for target-id blocks `[B, T + 1]`.

    `loss_fn` replaces the plain computation (`train_drafter` passes its compiled version).
    """
    draft_ids = model.to_draft_ids(blocks.to(model.device))
    return (loss_fn or _draft_loss)(model, draft_ids, bf16)


class _BatchLoss(torch.nn.Module):
    """`batch_loss` as a module's forward: DDP synchronises the gradients of what runs through the forward
    of the module it wraps, and a drafter's training loss runs through `draft_logits`, not its forward."""

    def __init__(self, model: MambaDrafterForCausalLM, bf16: bool, loss_fn: Callable | None) -> None:
        super().__init__()
        self.model = model
        self.bf16 = bf16
        self.loss_fn = loss_fn

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        """The mean loss over blocks `[B, T + 1]` (scalar)."""
        return batch_loss(self.model, blocks, self.bf16, self.loss_fn)


def resume_drafter(
    model: MambaDrafterForCausalLM,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR,
    output_dir: str | Path,
) -> tuple[int, list[float], float]:
    """Load the newest intact checkpoint of `output_dir` into the model, optimizer and schedule.

    Returns:
        `(step, losses, seconds)` of that checkpoint, or `(0, [], 0.0)` when there is none.

    Raises:
        ValueError: the checkpoint's weights do not fit the model.
    """
    folder = latest_checkpoint(output_dir)
    if folder is None:
        return 0, [], 0.0
    result = model.load_state_dict(
        load_file(folder / "model.safetensors", device=str(model.device)), strict=False
    )
    # the LM head is tied to the embeddings and saved once
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise ValueError(f"{folder} does not match the model: {result}")
    state = load_trainer_state(folder)
    optimizer.load_state_dict(state["optimizer"])
    load_schedule(schedule, state["schedule"])
    return int(state["step"]), list(state["losses"]), float(state.get("seconds", 0.0))


def train_drafter(
    model: MambaDrafterForCausalLM,
    data_dir: str | Path,
    output_dir: str | Path,
    config: DrafterTrainingConfig | None = None,
    resume: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    accelerator: Accelerator | None = None,
) -> list[float]:
    """Train `model` in place on the token streams of `data_dir`; checkpoints go to `output_dir`.

    Alone, the model trains where it is. Under a launcher every process calls this with the same model
    and arguments: each trains on its share of every step's blocks on its own device, and only the main
    process saves checkpoints and shows progress.

    Args:
        model: the drafter.
        data_dir: the token streams (`<source>.bin`).
        output_dir: where `checkpoint-<step>/` folders go.
        config: training options (default `DrafterTrainingConfig()`).
        resume: continue from the newest checkpoint in `output_dir` if there is one.
        on_step: called with `(step, loss)` after every step, in every process (the loss is the mean over
            the processes).
        accelerator: this process's (default `make_accelerator()`).

    Returns:
        the loss of every step so far (a resumed run includes the steps before the interruption).

    Raises:
        ValueError: a stream holds token ids outside the model's target vocabulary, or the batch does not
            split evenly over the processes.
    """
    config = config if config is not None else DrafterTrainingConfig()
    accelerator = accelerator if accelerator is not None else make_accelerator()
    check_global_batch(config.batch_size, accelerator, "batch_size")
    model.to(training_device(accelerator, model.device))
    streams = {}
    for source in SOURCES:
        path = Path(data_dir) / f"{source}.bin"
        streams[source] = load_stream(data_dir, source) if path.is_file() and path.stat().st_size else None
        vocab = model.config.target_vocab_size
        if streams[source] is not None and int(streams[source].max()) >= vocab:
            raise ValueError(
                f"{path} holds token id {int(streams[source].max())}, outside the drafter's target vocabulary "
                f"({vocab} ids): rebuild the data with the target's tokenizer (the data stage)."
            )
    optimizer = torch.optim.AdamW(
        _parameter_groups(model, config.weight_decay), lr=config.learning_rate, betas=(0.9, 0.95)
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, config))
    step, losses, seconds = resume_drafter(model, optimizer, schedule, output_dir) if resume else (0, [], 0.0)
    model.train()
    # compiling the function, not the module, keeps the module's parameter names (and checkpoints) as they are
    loss_fn = torch.compile(_draft_loss) if config.compile else None
    # alone: the module and the optimizer as they are; launched: DDP and accelerate's optimizer wrapper
    loss_module, optimizer = accelerator.prepare(_BatchLoss(model, config.bf16, loss_fn), optimizer)
    main = accelerator.is_main_process
    bar = tqdm(
        total=config.steps, initial=step, desc="train-mamba-drafter", disable=not (config.progress and main)
    )
    try:
        while step < config.steps:
            started = time.perf_counter()
            # every process draws the whole batch (a pure function of seed and step) and trains on its rows
            blocks = sample_blocks(
                streams, config.mixture_at(step), config.batch_size, config.block_length, step, config.seed
            )
            loss = loss_module(shard_rows(blocks, accelerator))
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            schedule.step()
            step += 1
            seconds += time.perf_counter() - started
            losses.append(loss_over_processes(loss, accelerator)[0])
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{schedule.get_last_lr()[0]:.1e}")
            if step % config.checkpoint_every == 0 or step == config.steps:
                model.config.training_steps = step
                state = {
                    "step": step,
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "losses": losses,
                    "seconds": seconds,
                    "tokens": step * config.batch_size * config.block_length,
                    "processes": accelerator.num_processes,
                }
                if main:
                    save_checkpoint(output_dir, step, model, state, config.keep_checkpoints)
            if on_step is not None:
                on_step(step, losses[-1])
        # the last checkpoint is on disk before any process returns
        accelerator.wait_for_everyone()
    finally:
        bar.close()
        model.eval()
    return losses


@dataclass(frozen=True)
class AcceptanceEstimate:
    """Teacher-forced agreement with the target's greedy answers.

    Attributes:
        top1: share of answer tokens where the drafter's argmax equals the target's token: the chance a
            greedy draft token is accepted given a correct prefix.
        tau: expected tokens per target forward for chains of `draft_length` drafts, simulated on the
            answers (accepted run of agreeing tokens, capped at `draft_length`, plus one).
        draft_length: the chain length `tau` assumes.
        tokens: answer tokens scored.
    """

    top1: float
    tau: float
    draft_length: int
    tokens: int


def simulated_tau(hits: Iterable[np.ndarray], draft_length: int) -> float:
    """Tokens per round of greedy chains of `draft_length` drafts over answers, given per-token agreement.

    `hits[i][t]` says whether the drafter's argmax equals answer token `t` given the true prefix. Each
    round accepts the agreeing run (at most `draft_length` tokens) and adds the target's own token.
    """
    committed = rounds = 0
    for hit in hits:
        start = 0
        while start < hit.size:
            run = 0
            while run < draft_length and start + run < hit.size and hit[start + run]:
                run += 1
            # plus the target's token (a correction, or the bonus after a fully accepted chain), if the
            # answer goes on
            step = min(run + 1, hit.size - start)
            committed += step
            rounds += 1
            start += step
    return committed / rounds if rounds else 0.0


@torch.no_grad()
def estimate_acceptance(
    model: MambaDrafterForCausalLM, records: Iterable[dict], draft_length: int = 5, bf16: bool = True
) -> AcceptanceEstimate:
    """Score `model` on distilled records (`input_ids`, `prompt_length`) without running the target.

    For greedy verification this is exact up to numerics: the target's answer *is* its greedy output, so
    a draft token is accepted iff it equals the next answer token given the true prefix.
    """
    model.eval()
    hits: list[np.ndarray] = []
    for record in records:
        ids = torch.tensor(record["input_ids"], dtype=torch.long)[None]
        if ids.shape[1] - record["prompt_length"] < 2:
            continue
        with _autocast(model, bf16):
            logits = model.draft_logits(model.to_draft_ids(ids.to(model.device)), use_cache=False)
        # the drafter never proposes the 'other' slot: its draft is the best token inside the vocabulary
        logits[..., OTHER_INDEX] = torch.finfo(logits.dtype).min
        predicted = model.draft_to_target[logits[0, :-1].argmax(-1)].cpu()
        actual = ids[0, 1:]
        hit = (predicted == actual).numpy()[record["prompt_length"] - 1 :]
        hits.append(hit)
    if not hits:
        raise ValueError("no record has an answer of at least two tokens.")
    tokens = sum(hit.size for hit in hits)
    top1 = float(sum(hit.sum() for hit in hits) / tokens)
    return AcceptanceEstimate(
        top1=top1, tau=simulated_tau(hits, draft_length), draft_length=draft_length, tokens=tokens
    )


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of `model`, tied weights counted once."""
    return sum(parameter.numel() for parameter in {id(p): p for p in model.parameters()}.values())


def approx_bytes(model: torch.nn.Module, bytes_per_parameter: int = 2) -> int:
    """Size of the weights saved at `bytes_per_parameter` (2: fp16/bf16)."""
    return parameter_count(model) * bytes_per_parameter + math.ceil(model.draft_to_target.numel() * 8)
