"""`hf-specssm train-redrafter`: train a ReDrafter head for a target on a local corpus, offline.

With `--store` (a distillation store, `hf-specssm distill`) the head trains on the target's stored hidden
states and soft labels instead (`hf_specssm.training.redrafter.store_training`): no target forward, only
its token embedding; `--draft-vocab-size` gives it a reduced output vocabulary chosen from the stored
answers, and the held-out simulated τ is written after each checkpoint (`eval.jsonl`) and to the card.

`--target` is a local model folder (or Hub id) or one of the toy targets (tiny random models built from a
config, for trying things out without downloads). Without `--data`, a toy target trains on its own greedy
continuations of random prompts.

`--out` remembers what it was trained from (`run.json`: the target, the data file's content and the
settings). Running again with the same ones resumes; with others it refuses (naming each difference)
unless `--restart` is given, so checkpoints and cached data of another run are never silently reused.

It also trains data-parallel under `accelerate launch` or `torchrun`: the main process builds the data,
every process reads the hidden states of its share of each batch from its own copy of the target, and
the main process evaluates and saves the head.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from hf_specssm.drafters.redrafter.configuration import ReDrafterConfig
from hf_specssm.drafters.redrafter.modeling import ReDrafterHead
from hf_specssm.testing.tiny import TINY_HIDDEN, TINY_VOCAB, tiny_model
from hf_specssm.training.checkpoints import (
    RUN_FILE,
    atomic_save_pretrained,
    atomic_torch_save,
    check_steps,
    checkpoints,
    claim_output_dir,
    file_fingerprint,
    latest_checkpoint,
    model_fingerprint,
    replace_folder,
)
from hf_specssm.training.distributed import make_accelerator, training_device
from hf_specssm.training.redrafter.training import (
    TrainingConfig,
    TrainingData,
    blocks_from_documents,
    distill,
    mean_accepted_length,
    random_prompts,
    read_corpus,
    train_head,
)

TOY_VOCAB = TINY_VOCAB
TOY_HIDDEN = TINY_HIDDEN
TOY_TARGETS = ("toy-llama", "toy-mamba2", "toy-jamba")
DATA_FILE = "training_data.pt"
EVAL_FILE = "eval_prompts.pt"
TARGET_DIR = "target"
# the flags whose values decide the data, the head or the training trajectory (`--steps` may grow)
FINGERPRINT_FLAGS = (
    "seq_length", "distill", "prompt_length", "distill_samples", "distill_new_tokens", "eval_prompts",
    "beam_width", "beam_length", "num_draft_layers", "exit_dim", "no_rnn", "batch_size", "learning_rate",
    "warmup_steps", "seed",
)  # fmt: skip


def toy_target(name: str, seed: int = 0) -> PreTrainedModel:
    """A tiny random fp32 target (vocabulary 64, hidden size 32) without an end-of-sequence token.

    Args:
        name: `"toy-llama"` (2 attention layers), `"toy-mamba2"` (2 Mamba2 layers) or `"toy-jamba"`
            (Mamba, attention, Mamba).
        seed: seeds the random weights.
    """
    if name not in TOY_TARGETS:
        raise ValueError(f"unknown toy target {name!r}; choose one of {TOY_TARGETS}.")
    model = tiny_model(name.removeprefix("toy-"), seed=seed, vocab=TOY_VOCAB)
    # random models emit their end-of-sequence id by chance; toy continuations run to full length
    model.generation_config.eos_token_id = None
    return model.eval()


def _looks_like_a_path(spec: str) -> bool:
    """Whether `spec` names a folder rather than a Hub id (`name` or `org/name`)."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or (os.sep != "/" and os.sep in spec)


def load_target(spec: str, seed: int, device: str | torch.device):
    """`(target, tokenizer or None)` for a toy name or a model folder / Hub id."""
    if spec in TOY_TARGETS:
        return toy_target(spec, seed).to(device), None
    try:
        target = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32).to(device).eval()
    except OSError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"--target {spec}: cannot load it as a model ({reason})") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError):
        tokenizer = None
    return target, tokenizer


def build_data(
    args: argparse.Namespace, target: PreTrainedModel, tokenizer
) -> tuple[TrainingData, torch.Tensor]:
    """The training data and `[K, P]` evaluation prompts the arguments ask for."""
    vocab = target.config.get_text_config(decoder=True).vocab_size
    if args.data is None:
        if args.target not in TOY_TARGETS:
            raise ValueError(
                "--data is required for a real target (toy targets can distil from random prompts)."
            )
        prompts = random_prompts(vocab, args.distill_samples, args.prompt_length, seed=args.seed)
        evaluation = random_prompts(vocab, args.eval_prompts, args.prompt_length, seed=args.seed + 1)
        data = distill(
            target,
            prompts,
            args.distill_new_tokens,
            description=f"{args.distill_samples} random prompts of {args.prompt_length} tokens",
            progress=not args.quiet,
        )
        return data, evaluation
    documents = read_corpus(args.data, tokenizer, vocab_size=vocab)
    long_enough = [document for document in documents if len(document) >= args.prompt_length]
    # the last documents are held out: their openings are the evaluation prompts
    held_out = long_enough[len(long_enough) - args.eval_prompts :] if args.eval_prompts else []
    evaluation = torch.tensor([document[: args.prompt_length] for document in held_out], dtype=torch.long)
    training = documents[: len(documents) - len(held_out)] if held_out else documents
    name = Path(args.data).name
    if args.distill:
        openings = [
            document[: args.prompt_length] for document in training if len(document) >= args.prompt_length
        ]
        prompts = torch.tensor(openings[: args.distill_samples], dtype=torch.long)
        data = distill(
            target,
            prompts,
            args.distill_new_tokens,
            description=f"openings of {prompts.shape[0]} documents of {name}",
            progress=not args.quiet,
        )
    else:
        data = blocks_from_documents(
            training, args.seq_length, description=f"{name} ({len(training)} documents)"
        )
    return data, evaluation.reshape(-1, args.prompt_length)


def fingerprint(args: argparse.Namespace) -> dict[str, object]:
    """What a run in `--out` is trained from: target, data (by content) and settings, by flag name."""
    record: dict[str, object] = {
        "--target": model_fingerprint(args.target),
        "--data": file_fingerprint(args.data) if args.data is not None else None,
    }
    for name in FINGERPRINT_FLAGS:
        record["--" + name.replace("_", "-")] = getattr(args, name)
    return record


def _load_cached_data(out: Path) -> tuple[TrainingData, torch.Tensor] | None:
    """The data cached in `out`, or `None` when it is absent or does not load (then it is rebuilt)."""
    if not (out / DATA_FILE).exists() or not (out / EVAL_FILE).exists():
        return None
    try:
        return TrainingData.load(out / DATA_FILE), torch.load(out / EVAL_FILE, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError) as error:
        print(f"note: the cached training data in {out} does not load ({error}); rebuilding it")
        return None


def _check_vocabulary(data: TrainingData, evaluation: torch.Tensor, vocab: int, out: Path) -> None:
    for name, ids in (("training data", data.input_ids), ("evaluation prompts", evaluation)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
            raise ValueError(
                f"the {name} hold token id {bad}, outside the target's vocabulary (ids 0–{vocab - 1}); "
                f"were they made with another tokenizer? (cached in {out}: --restart rebuilds them)"
            )


STORE_FLAGS = (
    "beam_width", "beam_length", "num_draft_layers", "exit_dim", "no_rnn", "batch_size", "learning_rate",
    "warmup_steps", "seed", "draft_vocab_size", "soft_weight",
)  # fmt: skip
STORE_EVAL_LOG = "eval.jsonl"


def store_fingerprint(args: argparse.Namespace) -> dict[str, object]:
    """What a `--store` run in `--out` is trained from: target, store and settings, by flag name."""
    from hf_specssm.training.mamba_drafter.command import _target_fingerprint

    record: dict[str, object] = {
        "--target": _target_fingerprint(args.target),
        "--store": str(Path(args.store).resolve()),
    }
    for name in STORE_FLAGS:
        record["--" + name.replace("_", "-")] = getattr(args, name)
    # recorded only when set, so runs from before the flag existed still resume
    if getattr(args, "init_from_target", False):
        record["--init-from-target"] = True
    if getattr(args, "bf16", False):
        record["--bf16"] = True
    if getattr(args, "teacher_share", None) is not None:
        record["--teacher-share"] = args.teacher_share
    if getattr(args, "init", None):
        from hf_specssm.training.checkpoints import model_fingerprint

        record["--init"] = model_fingerprint(str(args.init))
    return record


def initial_head(args: argparse.Namespace, config: ReDrafterConfig) -> ReDrafterHead:
    """The trained head of `--init`, in fp32, checked against the settings of this run: it keeps its
    weights and draft vocabulary, so the architecture flags must name its own values.

    Raises:
        ValueError: `--init` is not a ReDrafter head, was trained for another hidden size or vocabulary,
            or differs from a flag (named, with its value) — or `--init-from-target` is set too.
    """
    if args.init_from_target:
        raise ValueError(
            "--init continues a trained head; --init-from-target starts a new one: pass one of them."
        )
    try:
        head = ReDrafterHead.from_pretrained(args.init, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ValueError(f"--init {args.init}: not a ReDrafter head folder ({error}).") from error
    own = head.config
    if (own.hidden_size, own.vocab_size) != (config.hidden_size, config.vocab_size):
        raise ValueError(
            f"--init {args.init} reads hidden size {own.hidden_size} and drafts over {own.vocab_size} tokens; "
            f"--target {args.target} has {config.hidden_size} and {config.vocab_size}."
        )
    flags = {
        "--draft-vocab-size": (config.draft_vocab_size, own.draft_vocab_size),
        "--exit-dim": (config.exit_dim, own.exit_dim),
        "--num-draft-layers": (config.num_draft_layers, own.num_draft_layers),
        "--no-rnn": (not config.rnn, not own.rnn),
    }
    for flag, (given, kept) in flags.items():
        if given != kept:
            raise ValueError(f"{flag} is {given}, but --init {args.init} has {kept}: pass its value.")
    head.config.beam_width, head.config.beam_length = config.beam_width, config.beam_length
    return head


def run_store(args: argparse.Namespace) -> int:
    """`--store`: train (or resume) a head on a distillation store's hidden states and soft labels; save it
    with its model card to `--out`.

    Raises:
        ValueError: no such store, a store without hidden states, `--out` holding a run with other inputs,
            `--steps` below the steps already trained, or a `--draft-vocab-size` the target cannot fill.
    """
    import json

    from hf_specssm.training.distillation.store import DistillStore, chat_kinds
    from hf_specssm.training.mamba_drafter.command import _resolve_model_path
    from hf_specssm.training.mamba_drafter.finetune import check_teacher_share, heldout_greedy, load_examples
    from hf_specssm.training.mamba_drafter.finetune_command import _shown
    from hf_specssm.training.redrafter.store_training import (
        HeadFinetuneConfig,
        evaluate_head,
        finetune_head,
        head_rows,
        init_output_from_target,
        store_vocabulary,
    )
    from hf_specssm.training.redrafter.training import _eos_ids

    if not (Path(args.store) / "manifest.json").is_file():
        raise ValueError(
            f"--store {args.store}: no distillation store there (run `hf-specssm distill` first)."
        )
    if args.data is not None or args.distill:
        raise ValueError("--store trains on the store's answers: leave out --data and --distill.")
    check_teacher_share(args.teacher_share)  # before --out is claimed and the target loads
    torch.set_num_threads(args.threads)
    if args.quiet:
        transformers.utils.logging.disable_progress_bar()
    say = (lambda *a: None) if args.quiet else print
    out = Path(args.out)
    _claim(args, out, store_fingerprint(args), [STORE_EVAL_LOG], "train-redrafter --store")
    checkpoint = latest_checkpoint(out)
    check_steps(args.steps, checkpoint)
    store = DistillStore(args.store)
    path = _resolve_model_path(args.target)
    # only the embedding is read (by the head's recurrence), in the head's fp32
    target = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device).eval()
    text_config = target.config.get_text_config(decoder=True)
    config = ReDrafterConfig(
        hidden_size=text_config.hidden_size,
        vocab_size=text_config.vocab_size,
        rnn=not args.no_rnn,
        num_draft_layers=args.num_draft_layers,
        exit_dim=args.exit_dim,
        draft_vocab_size=args.draft_vocab_size or None,
        beam_width=args.beam_width,
        beam_length=args.beam_length,
        target_name=args.target,
        target_model_type=target.config.model_type,
    )
    torch.manual_seed(args.seed)
    # --init's weights and draft vocabulary stay; a checkpoint of this run, when there is one, loads over them
    head = (initial_head(args, config) if args.init else ReDrafterHead(config)).to(args.device)
    head.attach(target)
    eos = _eos_ids(target)
    output = (
        target.get_output_embeddings().weight.detach() if args.init_from_target and not checkpoint else None
    )
    # the head keeps only the target's embedding module: the rest (~5 GB for 1.5B in fp32) goes before the
    # chats load, and the chats (2 bytes × hidden size a token) once the rows copy their hidden states
    del target
    train = load_examples(store, "train", need_hidden=True)
    heldout = heldout_greedy(store, need_hidden=True, limit=args.eval_records)
    summary = store.summary()
    head.config.training_data = (
        (f"continued from {_shown(args.init)} on " if args.init else "")
        + f"{len(train)} chats of the distillation store {_shown(store.root)} ("
        + chat_kinds(summary)
        + f", {summary['answer_tokens']:,} answer tokens in all) with its hidden states and top-k soft labels"
        + ("; output layer started from the target's output embedding rows" if args.init_from_target else "")
    )
    if config.draft_vocab_size is not None and not args.init:
        head.set_draft_vocabulary(
            store_vocabulary(train, config.vocab_size, config.draft_vocab_size - 1, always=eos)
        )
    if output is not None:
        init_output_from_target(head, output)
        del output
    rows = head_rows(train, args.beam_length)
    chats = len(train)
    del train
    say(f"{chats} training chats ({len(rows):,} round starts), {len(heldout)} held-out"
        + (f"; resuming from {checkpoint}" if checkpoint else ""))  # fmt: skip

    def on_checkpoint(step: int, loss: float) -> None:
        if not heldout:
            say(f"step {step}: loss {loss:.3f} (no held-out chat to simulate)")
            return
        estimate = evaluate_head(head, heldout, k=args.beam_length)
        with open(out / STORE_EVAL_LOG, "a") as sink:
            sink.write(json.dumps({"step": step, "loss": loss, **vars(estimate)}) + "\n")
        say(f"step {step}: loss {loss:.3f}, held-out τ {estimate.tau:.2f} (k={args.beam_length}), "
            f"top-1 {estimate.top1:.3f}")  # fmt: skip

    training = HeadFinetuneConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        soft_weight=args.soft_weight,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        progress=not args.quiet,
        bf16=args.bf16,
        teacher_share=args.teacher_share,
    )
    finetune_head(head, rows, out, training, on_checkpoint=on_checkpoint)
    estimate = evaluate_head(head, heldout, k=args.beam_length) if heldout else None
    head.config.simulated_tau = estimate.tau if estimate is not None else None
    atomic_save_pretrained(head.to(torch.bfloat16), out)
    measured = (
        f"held-out simulated τ {estimate.tau:.3f} (chains of {args.beam_length}), top-1 {estimate.top1:.3f}"
        if estimate is not None
        else "no held-out chat to simulate"
    )
    print(f"trained {head.config.training_steps} steps; {measured}; saved to {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Train (or resume training) a head as the arguments say; save it with its model card to `--out`.

    Under a launcher every process runs this; the main process prepares `--out` (run record, data cache,
    toy target) before the others read it, and alone evaluates, saves and prints.

    Raises:
        ValueError: bad input (a missing `--data` file, a corpus line that does not parse, token ids
            outside the vocabulary, `--out` holding a run with other inputs, `--steps` below the steps
            already trained).
    """
    if args.store is not None:
        args.batch_size = args.batch_size or 2048
        return run_store(args)
    args.batch_size = args.batch_size or 16
    if args.init_from_target:
        raise ValueError("--init-from-target starts a --store head; pass --store or leave it out.")
    if args.bf16:
        raise ValueError("--bf16 trains a --store head in bf16 autocast; pass --store or leave it out.")
    if args.init:
        raise ValueError("--init continues a head on a --store; pass --store or leave it out.")
    if args.teacher_share is not None:
        raise ValueError("--teacher-share mixes a --store's chats; pass --store or leave it out.")
    if args.data is not None and not Path(args.data).is_file():
        raise ValueError(f"--data {args.data}: no such file.")
    if args.target not in TOY_TARGETS and not Path(args.target).is_dir() and _looks_like_a_path(args.target):
        raise ValueError(
            f"--target {args.target}: no such model folder (or choose one of {', '.join(TOY_TARGETS)})."
        )
    torch.set_num_threads(args.threads)
    if args.quiet:
        # transformers' own bars (saving and loading checkpoints) too
        transformers.utils.logging.disable_progress_bar()
    accelerator = make_accelerator(args.device)
    main = accelerator.is_main_process
    say = accelerator.print
    device = training_device(accelerator, args.device)
    out = Path(args.out)
    # the main process settles --out (and builds the data) before the others read it
    with accelerator.main_process_first():
        if main:
            _claim(args, out)
        checkpoint = latest_checkpoint(out)
        check_steps(args.steps, checkpoint)
        target, tokenizer = load_target(args.target, args.seed, device)
        vocab = target.config.get_text_config(decoder=True).vocab_size
        if main and args.target in TOY_TARGETS and not (out / TARGET_DIR).exists():
            # the toy target is part of the result: the head drafts for exactly these weights
            replace_folder(out / TARGET_DIR, target.save_pretrained)
        cached = _load_cached_data(out)
        if cached is not None:
            data, evaluation = cached
            _check_vocabulary(data, evaluation, vocab, out)
        elif not main:
            raise RuntimeError(f"the main process left no training data in {out} (did it fail?).")
        else:
            data, evaluation = build_data(args, target, tokenizer)
            # before caching: data the target cannot read must not outlive the run that built it
            _check_vocabulary(data, evaluation, vocab, out)
            data.save(out / DATA_FILE)
            atomic_torch_save(evaluation, out / EVAL_FILE)
    text_config = target.config.get_text_config(decoder=True)
    config = ReDrafterConfig(
        hidden_size=text_config.hidden_size,
        vocab_size=text_config.vocab_size,
        rnn=not args.no_rnn,
        num_draft_layers=args.num_draft_layers,
        exit_dim=args.exit_dim,
        beam_width=args.beam_width,
        beam_length=args.beam_length,
        target_name=args.target,
        target_model_type=target.config.model_type,
        training_data=data.description,
    )
    torch.manual_seed(args.seed)
    head = ReDrafterHead(config).to(device)
    if checkpoint is not None:
        untrained = ReDrafterConfig.from_pretrained(checkpoint).untrained_mean_accepted_length
        say(f"resuming from {checkpoint}")
    elif evaluation.shape[0] and main:
        untrained = mean_accepted_length(target, head.attach(target), evaluation, args.eval_new_tokens)
    else:
        untrained = None
    head.config.untrained_mean_accepted_length = untrained
    training = TrainingConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        progress=not args.quiet,
    )
    losses = train_head(head, target, data, training, output_dir=out, accelerator=accelerator)
    accelerator.end_training()
    if not main:
        return 0
    if evaluation.shape[0]:
        head.config.mean_accepted_length = mean_accepted_length(
            target, head, evaluation, args.eval_new_tokens
        )
    atomic_save_pretrained(head, out)
    tail = losses[-min(20, len(losses)) :]
    print(f"trained {head.config.training_steps} steps on {data.description}")
    print(f"final loss (mean of the last {len(tail)} steps): {sum(tail) / max(1, len(tail)):.3f}")
    if untrained is not None:
        print(
            f"mean accepted length τ over {evaluation.shape[0]} prompts × {args.eval_new_tokens} tokens: "
            f"untrained {untrained:.3f} → trained {head.config.mean_accepted_length:.3f}"
        )
    print(f"saved to {out} (config.json, model.safetensors, README.md)")
    if args.push_to_hub:
        head.push_to_hub(args.push_to_hub)
        print(f"pushed to {args.push_to_hub}")
    return 0


def _claim(
    args: argparse.Namespace,
    out: Path,
    record: dict[str, object] | None = None,
    derived: list[str] | None = None,
    command: str = "train-redrafter",
) -> None:
    """Make `out` this run's (`--restart` first clears it); say when stale cached data will be rebuilt.

    Args:
        args: the parsed arguments.
        out: the output folder.
        record: what the run is trained from (default: `fingerprint(args)`, a corpus run).
        derived: files in `out` built from those inputs (default: a corpus run's data cache and toy target).
        command: the command named in messages.
    """
    record = record if record is not None else fingerprint(args)
    derived = derived if derived is not None else [DATA_FILE, EVAL_FILE, TARGET_DIR]
    out.mkdir(parents=True, exist_ok=True)
    if args.restart:
        for folder in checkpoints(out):
            shutil.rmtree(folder)
        for name in (RUN_FILE, *derived):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    changes = claim_output_dir(out, record, command, has_progress=bool(checkpoints(out)), derived=derived)
    if changes:
        print(
            f"note: the data cached in {out} was built from other inputs ({'; '.join(changes)}); rebuilding it"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `train-redrafter` options."""
    parser.add_argument(
        "--target", required=True, help=f"model folder or Hub id, or one of {', '.join(TOY_TARGETS)}"
    )
    parser.add_argument("--data", help="corpus: .jsonl (input_ids, text, messages or conversations) or text")
    parser.add_argument(
        "--store",
        help="train on a distillation store's stored hidden states and soft labels instead of --data "
        "(`hf-specssm distill`; --target may be a `hf-specssm fetch` name); --batch-size counts round starts",
    )
    parser.add_argument(
        "--draft-vocab-size",
        type=int,
        default=0,
        help="--store: a reduced output vocabulary of this size (the 'other' class and the most frequent "
        "answer tokens; 0: the target's whole vocabulary)",
    )
    parser.add_argument(
        "--init-from-target",
        action="store_true",
        help="--store: start the output layer from the target's output embedding rows of the draft "
        "vocabulary (projected to the head's width) instead of at random",
    )
    parser.add_argument(
        "--init",
        default=None,
        help="--store: continue this trained head (its weights and draft vocabulary; the architecture flags "
        "must name its values) instead of starting a new one",
    )
    parser.add_argument(
        "--teacher-share",
        type=float,
        default=None,
        help="--store: share of each batch's rows drawn from teacher-forced chats (`distill teach`), the rest "
        "from chats the target wrote (default: uniform over all rows)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="--store: forward in bf16 autocast (fp32 weights and optimizer): faster where the CPU has bf16 "
        "matrix units (AMX, AVX512-BF16), much slower where it emulates bf16 (AVX2 only)",
    )
    parser.add_argument(
        "--soft-weight", type=float, default=0.5, help="--store: weight of the soft-label term"
    )
    parser.add_argument("--eval-records", type=int, default=200, help="--store: held-out chats scored")
    parser.add_argument("--out", required=True, help="output folder (head, card, checkpoints)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequences per step (default 16); with --store, round starts per step (default 2048)",
    )
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument(
        "--restart",
        action="store_true",
        help="delete the checkpoints, cached data and run record already in --out and start over",
    )
    parser.add_argument("--seq-length", type=int, default=64, help="block length for corpus training")
    parser.add_argument(
        "--distill", action="store_true", help="train on the target's greedy continuations of corpus openings"
    )
    parser.add_argument(
        "--prompt-length", type=int, default=8, help="distillation and evaluation prompt length"
    )
    parser.add_argument("--distill-samples", type=int, default=256)
    parser.add_argument("--distill-new-tokens", type=int, default=40)
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--beam-length", type=int, default=4)
    parser.add_argument("--num-draft-layers", type=int, default=2)
    parser.add_argument("--exit-dim", type=int, default=None)
    parser.add_argument("--no-rnn", action="store_true", help="running-sum state instead of the RNN")
    parser.add_argument("--eval-prompts", type=int, default=8, help="prompts for measuring τ (0: skip)")
    parser.add_argument("--eval-new-tokens", type=int, default=40)
    parser.add_argument(
        "--push-to-hub", metavar="REPO_ID", help="upload the trained head to this Hub repository"
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to train; under accelerate launch or torchrun its type only: cpu (CPU processes) or cuda "
        "(one GPU per process)",
    )
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
