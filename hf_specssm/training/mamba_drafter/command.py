"""`hf-specssm train-mamba-drafter STAGE`: distil, tokenize, train and export a Mamba2 drafter, offline.

    distill   the target answers instructions built from this machine's Python source and docs
    data      tokenize the answers, Python source and docs into token streams
    train     train (resumes from the newest checkpoint in --out)
    export    the newest checkpoint → a Hub-format folder in bf16, with a model card

`train` also runs data-parallel under `accelerate launch` or `torchrun` (the other stages run alone).

Every stage resumes: run the same command again after an interruption. `distill` and `train` record what
they were run with (`<data>/distill-run.json`, `<out>/run.json`: the target, the data and the settings)
and refuse to resume with other ones, naming each difference, unless `--restart` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from hf_specssm import shipped_drafter_path
from hf_specssm.training.checkpoints import (
    RUN_FILE,
    check_steps,
    checkpoints,
    claim_output_dir,
    latest_checkpoint,
    model_fingerprint,
    replace_folder,
)
from hf_specssm.training.mamba_drafter.data import HELDOUT_FILENAME, META_FILENAME, SOURCES, Mixture

STAGES = ("distill", "data", "train", "export")
DISTILLED_FILENAME = "distilled.jsonl"
DISTILL_RUN_FILE = "distill-run.json"
EVAL_LOG = "eval.jsonl"


def _resolve_model_path(spec: str) -> str:
    """A fetcher name (`hf-specssm fetch --list`) → its converted folder; anything else is a path or id."""
    from hf_specssm.tools.fetch import MODELS, fetch_model

    if spec in MODELS:
        return str(fetch_model(spec, progress=True))
    return spec


def _target_fingerprint(spec: str) -> str:
    """A fetcher name by the bytes it stands for (without fetching), a folder by its content."""
    from hf_specssm.tools.fetch import MODELS

    if spec in MODELS:
        return f"{spec} (GGUF sha256 {MODELS[spec].sha256[:16]})"
    return model_fingerprint(spec)


def _data_fingerprint(data_dir: Path) -> str:
    """The token data of `data_dir`: its metadata's hash and the streams' sizes."""
    meta = data_dir / META_FILENAME
    if not meta.is_file():
        raise ValueError(
            f"--data {data_dir} holds no {META_FILENAME}: run `hf-specssm train-mamba-drafter data` first "
            "(with the same --data)."
        )
    sizes = [
        (data_dir / f"{source}.bin").stat().st_size if (data_dir / f"{source}.bin").is_file() else 0
        for source in SOURCES
    ]
    digest = hashlib.sha256(meta.read_bytes()).hexdigest()[:16]
    return f"{data_dir.resolve()} (meta sha256 {digest}, stream bytes {sizes})"


def _distill_fingerprint(args: argparse.Namespace) -> dict[str, object]:
    roots = sorted(str(Path(root).resolve()) for root in args.corpus_root) if args.corpus_root else None
    return {
        "--target": _target_fingerprint(args.target),
        "--max-new-tokens": args.max_new_tokens,
        "--dtype": args.dtype,
        "--seed": args.seed,
        "--corpus-root": roots,
    }


def _train_fingerprint(args: argparse.Namespace) -> dict[str, object]:
    return {
        "--target": _target_fingerprint(args.target),
        "--data": _data_fingerprint(Path(args.data)),
        "--architecture": args.architecture,
        "--draft-vocab": args.draft_vocab,
        "--tokenizer-reference": args.tokenizer_reference,
        "--batch-size": args.batch_size,
        "--block-length": args.block_length,
        "--learning-rate": args.learning_rate,
        "--warmup-steps": args.warmup_steps,
        "--final-fraction": args.final_fraction,
        "--mixture": list(args.mixture),
        "--final-mixture": list(args.final_mixture),
        "--seed": args.seed,
    }


def _threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def run_distill(args: argparse.Namespace) -> int:
    """Stage `distill`: the target's greedy answers to `--count` instructions → `<data>/distilled.jsonl`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_specssm.training.mamba_drafter.distill import distill_answers
    from hf_specssm.training.mamba_drafter.prompts import build_instructions

    _threads(args)
    data_dir = Path(args.data)
    distilled = data_dir / DISTILLED_FILENAME
    if args.restart:
        distilled.unlink(missing_ok=True)
        (data_dir / DISTILL_RUN_FILE).unlink(missing_ok=True)
    claim_output_dir(
        data_dir,
        _distill_fingerprint(args),
        "train-mamba-drafter distill",
        has_progress=distilled.is_file() and distilled.stat().st_size > 0,
        filename=DISTILL_RUN_FILE,
        folder_flag="--data",
    )
    path = _resolve_model_path(args.target)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    target = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    instructions = build_instructions(args.count, seed=args.seed, roots=args.corpus_root)
    out = distill_answers(
        target,
        tokenizer,
        instructions,
        distilled,
        batch_size=args.prompts_per_batch,
        max_new_tokens=args.max_new_tokens,
        progress=not args.quiet,
    )
    print(out)
    return 0


def run_data(args: argparse.Namespace) -> int:
    """Stage `data`: token streams and the held-out set in `--data`."""
    from transformers import AutoTokenizer

    from hf_specssm.training.mamba_drafter.data import build_token_data

    distilled = Path(args.distilled) if args.distilled else Path(args.data) / DISTILLED_FILENAME
    if not distilled.exists():
        raise ValueError(
            f"{distilled} does not exist: run `hf-specssm train-mamba-drafter distill` first, or pass "
            "--distilled with a store or pack of `hf-specssm distill`."
        )
    tokenizer = AutoTokenizer.from_pretrained(_resolve_model_path(args.target))
    meta = build_token_data(
        args.data,
        tokenizer,
        distilled,
        code_tokens=args.code_tokens,
        doc_tokens=args.doc_tokens,
        roots=args.corpus_root,
        progress=not args.quiet,
    )
    print(json.dumps(meta, indent=2))
    return 0


def _new_model(args: argparse.Namespace, say: Callable[..., None] = print):
    """A fresh drafter: vocabulary from the token counts, embeddings from the target's (`say` reports)."""
    from safetensors import safe_open

    from hf_specssm.training.mamba_drafter.data import SOURCES, load_stream, select_vocabulary, token_counts
    from hf_specssm.training.mamba_drafter.training import drafter_config, new_drafter

    meta = json.loads((Path(args.data) / META_FILENAME).read_text())
    target_path = _resolve_model_path(args.target)
    target_config = json.loads((Path(target_path) / "config.json").read_text())
    target_vocab = int(target_config["vocab_size"])
    streams = [load_stream(args.data, source) for source in SOURCES]
    first, final = Mixture(*args.mixture).weights(), Mixture(*args.final_mixture).weights()
    mixture = {
        name: (1 - args.final_fraction) * first[name] + args.final_fraction * final[name] for name in first
    }
    # weigh each stream by its share of training, per token
    weights = [mixture[source] / max(stream.size, 1) for source, stream in zip(SOURCES, streams)]
    counts = token_counts(streams, target_vocab, weights)
    # the end-of-turn and end-of-text tokens are always draftable, however rare
    eos = target_config.get("eos_token_id")
    specials = [int(token) for token in (eos if isinstance(eos, list) else [eos]) if token is not None]
    specials.append(int(meta["separator"]))
    vocabulary = select_vocabulary(counts, args.draft_vocab - 1, always=specials)
    coverage = counts[vocabulary.numpy()].sum() / counts.sum()
    say(f"draft vocabulary: {args.draft_vocab} entries cover {coverage:.2%} of the weighted training tokens")
    embeddings = None
    for file in sorted(Path(target_path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                if key.endswith("embed_tokens.weight"):
                    embeddings = handle.get_tensor(key)
    config = drafter_config(
        args.architecture, args.draft_vocab, target_vocab, tokenizer_reference=args.tokenizer_reference
    )
    return new_drafter(config, vocabulary, target_embeddings=embeddings, seed=args.seed)


def run_train(args: argparse.Namespace) -> int:
    """Stage `train`: train into `--out` (resuming from its newest checkpoint).

    Under a launcher every process runs this: the main process claims `--out` first, each trains on its
    share of every batch on its own device (its GPU, or the CPU when there is none), and only the main
    process writes and prints.
    """
    from hf_specssm.drafters.mamba import MambaDrafterForCausalLM
    from hf_specssm.training.distributed import make_accelerator
    from hf_specssm.training.mamba_drafter.data import read_distilled
    from hf_specssm.training.mamba_drafter.training import (
        DrafterTrainingConfig,
        estimate_acceptance,
        parameter_count,
        train_drafter,
    )

    _threads(args)
    accelerator = make_accelerator()
    main = accelerator.is_main_process
    say = accelerator.print
    out = Path(args.out)
    # the main process settles --out before the others look at its checkpoints
    with accelerator.main_process_first():
        if args.restart and main:
            for folder in checkpoints(out):
                shutil.rmtree(folder)
            for name in (RUN_FILE, EVAL_LOG):
                (out / name).unlink(missing_ok=True)
        if main:
            claim_output_dir(
                out,
                _train_fingerprint(args),
                "train-mamba-drafter train",
                has_progress=bool(checkpoints(out)),
                derived=[EVAL_LOG],
            )
    config = DrafterTrainingConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        block_length=args.block_length,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        checkpoint_every=args.checkpoint_every,
        final_fraction=args.final_fraction,
        mixture=Mixture(*args.mixture),
        final_mixture=Mixture(*args.final_mixture),
        seed=args.seed,
        compile=args.compile,
        progress=not args.quiet,
    )
    checkpoint = latest_checkpoint(out)
    check_steps(args.steps, checkpoint)
    if checkpoint is not None:
        say(f"resuming from {checkpoint}")
        model = MambaDrafterForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    else:
        model = _new_model(args, say)
    say(f"drafter: {parameter_count(model) / 1e6:.1f} M parameters")
    heldout = list(read_distilled(Path(args.data) / HELDOUT_FILENAME))[: args.eval_records]
    log = out / EVAL_LOG

    def evaluate(step: int, loss: float) -> None:
        # the held-out estimate at every checkpoint, to see over-fitting to the distilled answers
        if not main or not heldout or step % config.checkpoint_every:
            return
        estimate = estimate_acceptance(model, heldout, draft_length=5, bf16=config.bf16)
        model.train()
        with open(log, "a") as sink:
            sink.write(
                json.dumps({"step": step, "loss": loss, "top1": estimate.top1, "tau": estimate.tau}) + "\n"
            )
        if not args.quiet:
            print(
                f"step {step}: held-out top-1 {estimate.top1:.3f}, simulated τ {estimate.tau:.2f}", flush=True
            )

    losses = train_drafter(model, args.data, args.out, config, on_step=evaluate, accelerator=accelerator)
    tail = losses[-min(50, len(losses)) :]
    say(f"trained {len(losses)} steps; mean loss of the last {len(tail)}: {sum(tail) / len(tail):.3f}")
    accelerator.end_training()
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Stage `export`: newest checkpoint → `--export` in bf16, with the held-out estimate and a model card."""
    from hf_specssm.drafters.mamba import MambaDrafterForCausalLM
    from hf_specssm.training.checkpoints import load_trainer_state
    from hf_specssm.training.mamba_drafter.card import DrafterCardFacts, model_card
    from hf_specssm.training.mamba_drafter.data import read_distilled
    from hf_specssm.training.mamba_drafter.training import estimate_acceptance, parameter_count

    _threads(args)
    checkpoint = latest_checkpoint(args.out)
    if checkpoint is None:
        raise ValueError(f"no intact checkpoint in --out {args.out}: run the train stage first.")
    state = load_trainer_state(checkpoint)
    model = MambaDrafterForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    heldout = list(read_distilled(Path(args.data) / HELDOUT_FILENAME))
    estimate = estimate_acceptance(model, heldout, draft_length=5)
    print(
        f"held-out: top-1 {estimate.top1:.3f}, simulated τ {estimate.tau:.2f} (k=5, {estimate.tokens} tokens)"
    )
    export = Path(args.export)
    model.config.training_steps = int(state["step"])
    model.to(torch.bfloat16)
    meta = json.loads((Path(args.data) / META_FILENAME).read_text())
    tokens = meta["tokens"]
    records = meta["distilled_records"]

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        facts = DrafterCardFacts(
            target=args.target_reference,
            tokenizer=model.config.tokenizer_reference or args.target_reference,
            architecture=(
                f"Mamba2, {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
                f"{model.config.num_heads} heads × {model.config.head_dim}, state {model.config.state_size}, "
                "tied embeddings"
            ),
            parameters=parameter_count(model),
            size_bytes=(staging / "model.safetensors").stat().st_size,
            draft_vocab=(model.config.vocab_size, model.config.target_vocab_size),
            data=(
                f"{records['train']} answers of the target to instructions built offline ({meta['distilled_domains']}; "
                f"{tokens['chat'] / 1e6:.2f} M tokens), Python source of the standard library and installed packages "
                f"({tokens['code'] / 1e6:.1f} M tokens), documentation prose ({tokens['docs'] / 1e6:.1f} M tokens); "
                "no benchmark prompts"
            ),
            steps=int(state["step"]),
            tokens=int(state.get("tokens", 0)),
            compute=f"{float(state.get('seconds', 0)) / 3600:.1f} h on {_machine()}",
            heldout={"top1": estimate.top1, "tau": estimate.tau, "k": estimate.draft_length}
            if estimate
            else {},
            measured=list(args.measured or []),
        )
        (staging / "README.md").write_text(model_card(facts))

    # the whole folder is replaced at once: a killed export leaves the previous one
    replace_folder(export, write)
    print(export)
    return 0


def _machine() -> str:
    cores = os.cpu_count() or 0
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cores} CPU cores ({platform.processor() or platform.machine()})"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `train-mamba-drafter` options."""
    parser.add_argument("stage", choices=STAGES, help="which stage to run (each resumes)")
    parser.add_argument(
        "--target",
        default="qwen2.5-coder-1.5b-instruct",
        help="target model folder, or a name from `hf-specssm fetch --list` (fetched when missing)",
    )
    parser.add_argument("--data", default="artifacts/mamba-drafter/data", help="data folder (all stages)")
    parser.add_argument(
        "--out", default="artifacts/mamba-drafter/run", help="checkpoint folder (train, export)"
    )
    parser.add_argument("--export", default=str(shipped_drafter_path()), help="export folder (export)")
    parser.add_argument(
        "--corpus-root",
        type=Path,
        action="append",
        help="folder of Python source and docs to build data from (repeatable; default: the standard library, "
        "site-packages and /usr/share/doc)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--restart",
        action="store_true",
        help="distill: delete the answers in --data; train: delete the checkpoints in --out; then start over",
    )
    distill = parser.add_argument_group("distill")
    distill.add_argument("--count", type=int, default=2400, help="instructions to answer")
    distill.add_argument("--prompts-per-batch", type=int, default=64, help="prompts per generate call")
    distill.add_argument("--max-new-tokens", type=int, default=256)
    distill.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--distilled",
        default=None,
        help="the answers to tokenize: a JSONL file, or a store or pack folder of `hf-specssm distill` "
        "(default: <data>/distilled.jsonl from the distill stage)",
    )
    data.add_argument("--code-tokens", type=int, default=20_000_000)
    data.add_argument("--doc-tokens", type=int, default=3_000_000)
    train = parser.add_argument_group("train")
    train.add_argument("--architecture", default="mamba2-18m")
    train.add_argument(
        "--draft-vocab", type=int, default=16384, help="draft vocabulary entries ('other' included)"
    )
    train.add_argument("--tokenizer-reference", default="Qwen/Qwen2.5-Coder-1.5B-Instruct")
    train.add_argument("--steps", type=int, default=3000)
    train.add_argument("--batch-size", type=int, default=8, help="blocks per step")
    train.add_argument("--block-length", type=int, default=1024)
    train.add_argument("--learning-rate", type=float, default=2e-3)
    train.add_argument("--warmup-steps", type=int, default=100)
    train.add_argument("--final-fraction", type=float, default=0.3)
    from hf_specssm.training.mamba_drafter.training import DrafterTrainingConfig

    defaults = DrafterTrainingConfig()
    for flag, default, steps in (
        ("--mixture", defaults.mixture, "the first steps"),
        ("--final-mixture", defaults.final_mixture, "the last --final-fraction of the steps"),
    ):
        train.add_argument(
            flag, type=float, nargs=3, default=list(dataclasses.astuple(default)), metavar=("CHAT", "CODE", "DOCS"),
            help=f"source weights of {steps}",
        )  # fmt: skip
    train.add_argument("--checkpoint-every", type=int, default=50)
    train.add_argument(
        "--compile", action="store_true", help="torch.compile the training step (faster after ~80 s)"
    )
    train.add_argument(
        "--eval-records", type=int, default=40, help="held-out answers scored at each checkpoint"
    )
    export = parser.add_argument_group("export")
    export.add_argument("--target-reference", default="Qwen/Qwen2.5-Coder-1.5B-Instruct")
    export.add_argument("--measured", nargs="*", help="end-to-end results to record in the model card")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the parsed stage.

    Raises:
        ValueError: a stage other than `train` started by a launcher with several processes.
    """
    from hf_specssm.training.distributed import launched_processes

    if args.stage != "train" and (processes := launched_processes()) > 1:
        raise ValueError(
            f"the {args.stage} stage runs in one process, not {processes}: run it without `accelerate launch` "
            "or `torchrun` (only the train stage trains data-parallel)."
        )
    return {"distill": run_distill, "data": run_data, "train": run_train, "export": run_export}[args.stage](
        args
    )
