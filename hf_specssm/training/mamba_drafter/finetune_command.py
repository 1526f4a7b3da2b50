"""`hf-specssm finetune-drafter ACTION`: a Mamba drafter fine-tuned on a distillation store, and its measures.

    train     fine-tune the drafter of --init (default: the shipped one) on --store into --out; with
              --features, as a feature-conditioned drafter reading the target's hidden states (its
              feature terms start at zero, so it starts as the token-only drafter). Resumes.
    evaluate  simulated greedy chains on the store's held-out greedy answers: τ, acceptance by draft
              position, top-1 agreement, for each --drafter folder (and --init); a --drafter folder may
              hold a ReDrafter head (`train-redrafter --store`), simulated the same way on the same answers.
    export    the newest checkpoint of --out → --export in bf16, with a model card.

Token-only and feature-conditioned runs on the same store, init and steps are the ablation that says
what reading the target's hidden state buys.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hf_specssm import shipped_drafter_path
from hf_specssm.tools.bench.prompt_sets import PROMPT_SETS

ACTIONS = ("train", "evaluate", "export")
RUN_FILE = "finetune-run.json"
EVAL_LOG = "eval.jsonl"


def _config(args: argparse.Namespace):
    from hf_specssm.training.mamba_drafter.finetune import FinetuneConfig

    return FinetuneConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        learning_rate=args.learning_rate,
        feature_learning_rate=args.feature_learning_rate,
        warmup_steps=args.warmup_steps,
        soft_weight=args.soft_weight,
        feature_dropout=args.feature_dropout,
        max_depth=args.max_depth,
        use_features=args.features,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        progress=not args.quiet,
        bf16=args.bf16,
        teacher_share=args.teacher_share,
    )


def _fingerprint(args: argparse.Namespace) -> dict[str, object]:
    from hf_specssm.training.checkpoints import model_fingerprint

    # only when set, so the fingerprints of runs made before the option existed still match
    mlp = {"--feature-mlp-size": args.feature_mlp_size} if args.feature_mlp_size else {}
    return {
        "--store": str(Path(args.store).resolve()),
        "--init": model_fingerprint(str(args.init)),
        "--features": args.features,
        **mlp,
        **{
            f"--{key.replace('_', '-')}": value
            for key, value in vars(_config(args)).items()
            # bf16 and teacher_share only when set, like --feature-mlp-size
            if key != "progress" and not (key in ("bf16", "teacher_share") and value in (False, None))
        },
    }


def _load(folder: str | Path, device: str):
    from hf_specssm.drafters.mamba import MambaDrafterForCausalLM

    return MambaDrafterForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()


def _is_redrafter_head(folder: str | Path) -> bool:
    """Whether `folder` holds a ReDrafter head (its config's `model_type`)."""
    config = Path(folder) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "redrafter"


class _Evaluator:
    """Loads a drafter folder (a Mamba drafter, or a ReDrafter head attached to --target's embedding, loaded
    once) and simulates its chains with the matching function."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._target = None

    def load(self, folder: str | Path):
        if not _is_redrafter_head(folder):
            return _load(folder, self.args.device)
        from hf_specssm.drafters.redrafter.modeling import ReDrafterHead
        from hf_specssm.training.mamba_drafter.command import _resolve_model_path

        if self._target is None:
            from transformers import AutoModelForCausalLM

            path = _resolve_model_path(self.args.target)
            self._target = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        head = ReDrafterHead.from_pretrained(folder, dtype=torch.float32).to(self.args.device).eval()
        return head.attach(self._target)

    @staticmethod
    def reads_target_hidden(model) -> bool:
        return getattr(model, "reads_target_hidden", True)

    @staticmethod
    def estimate(model, examples, k: int):
        from hf_specssm.drafters.redrafter.modeling import ReDrafterHead
        from hf_specssm.training.mamba_drafter.finetune import evaluate_drafter
        from hf_specssm.training.redrafter.store_training import evaluate_head

        if isinstance(model, ReDrafterHead):
            return evaluate_head(model, examples, k=k)
        return evaluate_drafter(model, examples, k=k)


def run_train(args: argparse.Namespace) -> int:
    """Action `train`."""
    from hf_specssm.training.checkpoints import checkpoints, claim_output_dir, latest_checkpoint
    from hf_specssm.training.distillation.store import DistillStore
    from hf_specssm.training.mamba_drafter.finetune import (
        evaluate_drafter,
        feature_model_from,
        finetune_drafter,
        heldout_greedy,
        load_examples,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    config = _config(args)
    store = DistillStore(args.store)
    out = Path(args.out)
    claim_output_dir(out, _fingerprint(args), "finetune-drafter train", has_progress=bool(checkpoints(out)),
                     derived=[EVAL_LOG])  # fmt: skip
    init = _load(args.init, args.device)
    if args.features:
        feature_size = args.feature_size or _stored_feature_size(store)
        if init.reads_target_hidden:
            if args.feature_mlp_size:
                raise ValueError(
                    f"--feature-mlp-size applies to a new feature-conditioned drafter, but --init {args.init} "
                    "already is one: drop --feature-mlp-size (its own MLP, if any, is kept)."
                )
            model = init
        else:
            model = feature_model_from(init, feature_size, args.feature_mlp_size or None, seed=args.seed)
    else:
        if args.feature_mlp_size:
            raise ValueError("--feature-mlp-size needs --features (the MLP fuses the target's hidden state).")
        if init.reads_target_hidden:
            raise ValueError(f"--init {args.init} is feature-conditioned: train it with --features.")
        model = init
    model.to(args.device)
    if latest_checkpoint(out) is None:
        model.config.training_note = f"fine-tuned from {_shown(args.init)} on {_shown(store.root)}"
    train = load_examples(store, "train", need_hidden=args.features)
    heldout = heldout_greedy(store, need_hidden=args.features, limit=args.eval_records)
    say = (lambda *a: None) if args.quiet else print
    say(f"{len(train)} training chats, {len(heldout)} held-out; features: {args.features}")

    def on_checkpoint(step: int, loss: float) -> None:
        if not heldout:
            say(f"step {step}: loss {loss:.3f} (no held-out greedy chat to simulate)")
            return
        estimate = evaluate_drafter(model, heldout, k=args.k)
        with open(out / EVAL_LOG, "a") as sink:
            sink.write(json.dumps({"step": step, "loss": loss, **vars(estimate)}) + "\n")
        say(
            f"step {step}: loss {loss:.3f}, held-out τ {estimate.tau:.2f} (k={args.k}), top-1 {estimate.top1:.3f}"
        )

    finetune_drafter(model, train, out, config, on_checkpoint=on_checkpoint)
    return 0


def _shown(path: str | Path) -> str:
    """`path` as a model card or config may show it: a shipped drafter by its name, a folder under the working
    directory relative to it, anything else by its last part (no machine's absolute paths)."""
    from hf_specssm.shipped import SHIPPED_DRAFTERS, shipped_drafter_path

    resolved = Path(path).resolve()
    for name in SHIPPED_DRAFTERS:
        if resolved == shipped_drafter_path(name).resolve():
            return f"{name} (shipped)"
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return resolved.name


def _stored_feature_size(store) -> int:
    from hf_specssm.training.distillation.generate import load_extras

    for record in store.records():
        extras = load_extras(store, record)
        if "hidden" in extras:
            return int(extras["hidden"].shape[-1])
    raise ValueError(
        f"the store {store.root} kept no hidden states: run `hf-specssm distill label --store {store.root}` "
        "(or generate without --no-hidden)."
    )


def benchmark_answers(args: argparse.Namespace):
    """The target's greedy answers to the benchmark prompts (`--bench-sets`, `--bench-limit` each), with
    hidden states, in their own store (`--bench-store`; generated once, for evaluation only, never trained on)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_specssm.hardware import resolve_dtype
    from hf_specssm.tools.bench.prompt_sets import load_prompt_set
    from hf_specssm.training.distillation.generate import GREEDY, Task, render, run_tasks
    from hf_specssm.training.distillation.store import DistillStore
    from hf_specssm.training.mamba_drafter.command import _resolve_model_path, _target_fingerprint
    from hf_specssm.training.mamba_drafter.prompts import Instruction

    recipe = {
        "--target": _target_fingerprint(args.target),
        "--bench-tokens": args.bench_tokens,
        "use": "evaluation",
    }
    store = DistillStore(args.bench_store, recipe=recipe)
    done = store.done_ids()
    path = _resolve_model_path(args.target)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tasks = []
    for name in args.bench_sets:
        for prompt in load_prompt_set(name, limit=args.bench_limit):
            identifier = f"{name}:{prompt.id}"
            if identifier not in done:
                instruction = Instruction(identifier, name, [{"role": "user", "content": prompt.text}])
                tasks.append(Task(identifier, instruction, GREEDY, tuple(render(tokenizer, instruction))))
    if tasks:
        choice = resolve_dtype("fp32" if args.device == "cpu" else "auto", args.device)
        target = AutoModelForCausalLM.from_pretrained(path, dtype=choice.dtype).to(args.device).eval()
        run_tasks(target, tokenizer, tasks, store, batch_size=8, max_new_tokens=args.bench_tokens,
                  shard_records=10_000, dtype_name=choice.name)  # fmt: skip
        store.seal()
    return store


def _measured_on(store, need_hidden: bool, limit: int):
    """The held-out greedy chats `evaluate` and `export` simulate chains on.

    Raises:
        ValueError: the store holds none (all teacher-forced or sampled, or too small to hold one out).
    """
    from hf_specssm.training.mamba_drafter.finetune import heldout_greedy

    heldout = heldout_greedy(store, need_hidden=need_hidden, limit=limit)
    if not heldout:
        raise ValueError(
            f"the store {store.root} holds no held-out greedy answer of the target to simulate chains on "
            "(teacher-forced and sampled chats are not its greedy choices): pass --store with one that does."
        )
    return heldout


def run_evaluate(args: argparse.Namespace) -> int:
    """Action `evaluate`: one JSON line per drafter (and per benchmark set with --bench-sets)."""
    from hf_specssm.training.distillation.store import DistillStore
    from hf_specssm.training.mamba_drafter.finetune import load_examples

    if args.threads:
        torch.set_num_threads(args.threads)
    evaluator = _Evaluator(args)
    if args.bench_sets:
        answers = load_examples(benchmark_answers(args), "all", need_hidden=True)
        for folder in [args.init, *(args.drafter or [])]:
            model = evaluator.load(folder)
            for name in args.bench_sets:
                estimate = evaluator.estimate(model, [e for e in answers if e.domain == name], args.k)
                print(json.dumps({"drafter": str(folder), "set": name,
                                  "features": evaluator.reads_target_hidden(model), **vars(estimate)}))  # fmt: skip
        return 0
    store = DistillStore(args.store)
    heldout = _measured_on(store, need_hidden=False, limit=args.eval_records)
    for folder in [args.init, *(args.drafter or [])]:
        model = evaluator.load(folder)
        features = evaluator.reads_target_hidden(model)
        usable = [e for e in heldout if not features or e.hidden is not None]
        estimate = evaluator.estimate(model, usable, args.k)
        domains = {
            domain: round(evaluator.estimate(model, [e for e in usable if e.domain == domain], args.k).tau, 3)
            for domain in sorted({e.domain for e in usable})
        }
        print(
            json.dumps(
                {
                    "drafter": str(folder),
                    "features": features,
                    **vars(estimate),
                    "tau_by_domain": domains,
                }
            )
        )
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Action `export`: the newest checkpoint of --out → --export (bf16) with a model card."""
    from hf_specssm.training.checkpoints import latest_checkpoint, load_trainer_state, replace_folder
    from hf_specssm.training.distillation.store import DistillStore, chat_kinds
    from hf_specssm.training.mamba_drafter.card import DrafterCardFacts, model_card
    from hf_specssm.training.mamba_drafter.command import _machine
    from hf_specssm.training.mamba_drafter.finetune import evaluate_drafter
    from hf_specssm.training.mamba_drafter.training import parameter_count

    checkpoint = latest_checkpoint(args.out)
    if checkpoint is None:
        raise ValueError(f"no intact checkpoint in --out {args.out}: run `finetune-drafter train` first.")
    state = load_trainer_state(checkpoint)
    model = _load(checkpoint, "cpu")
    store = DistillStore(args.store)
    heldout = _measured_on(store, need_hidden=model.reads_target_hidden, limit=args.eval_records)
    estimate = evaluate_drafter(model, heldout, k=args.k)
    summary = store.summary()
    # a feature-conditioned drafter trains only on the chats that kept hidden states
    with_hidden = sum(record.get("extras") is not None for record in store.records())
    used = (
        f" (the {with_hidden} that kept hidden states were trained on)"
        if model.reads_target_hidden and with_hidden < summary["records"]
        else ""
    )
    model.config.training_note = f"fine-tuned from {_shown(args.init)} on {_shown(store.root)}"
    model.to(torch.bfloat16)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        config = model.config
        kind = (
            "feature-conditioned Mamba2 (reads the target's last hidden state)"
            if model.reads_target_hidden
            else "Mamba2"
        )
        facts = DrafterCardFacts(
            target=args.target_reference,
            tokenizer=config.tokenizer_reference or args.target_reference,
            architecture=f"{kind}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"{config.num_heads} heads × {config.head_dim}, state {config.state_size}, tied embeddings",
            parameters=parameter_count(model),
            size_bytes=(staging / "model.safetensors").stat().st_size,
            draft_vocab=(config.vocab_size, config.target_vocab_size),
            data=f"fine-tuned from `{_shown(args.init)}` on a store of {summary['records']} chats "
            f"({chat_kinds(summary)}){used} ({summary['answer_tokens']:,} answer tokens; domains {summary['domains']}; modes "
            f"{summary['modes']}) with its top-k soft labels"
            + (" and hidden states" if model.reads_target_hidden else "")
            + "; no benchmark prompts",
            steps=int(state["step"]),
            # answer positions trained (0 where the run predates the count: the card then leaves it out)
            tokens=int(state.get("positions", 0)),
            compute=f"{float(state.get('seconds', 0)) / 3600:.2f} h on {_machine()}",
            heldout={"top1": estimate.top1, "tau": estimate.tau, "k": estimate.k},
            measured=list(args.measured or []),
        )
        (staging / "README.md").write_text(model_card(facts))

    replace_folder(args.export, write)
    print(args.export)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `finetune-drafter` options."""
    from hf_specssm.training.distillation.command import DEFAULT_STORE

    parser.add_argument("action", choices=ACTIONS, help="what to do (train resumes)")
    parser.add_argument(
        "--store", default=DEFAULT_STORE, help="the distillation store (`hf-specssm distill`)"
    )
    parser.add_argument(
        "--init", default=str(shipped_drafter_path()), help="the drafter folder to start from"
    )
    parser.add_argument("--features", action="store_true", help="train a feature-conditioned drafter")
    parser.add_argument(
        "--feature-size", type=int, default=0, help="the target's hidden size (0: from the store)"
    )
    parser.add_argument(
        "--feature-mlp-size",
        type=int,
        default=0,
        help="with --features: width of a residual MLP on the LM head's input that fuses the target's hidden "
        "state with the drafter's own state non-linearly (0: none, the feature terms are added linearly)",
    )
    parser.add_argument("--out", default="artifacts/finetune/run", help="checkpoint folder")
    parser.add_argument("--export", default="artifacts/finetune/export", help="export folder (export)")
    parser.add_argument("--drafter", action="append", help="evaluate: more drafter folders (repeatable)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU exists")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8, help="chats per step")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--feature-learning-rate", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--soft-weight", type=float, default=0.5)
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="train: forward in bf16 autocast (fp32 weights and optimizer): faster where the CPU has bf16 "
        "matrix units (AMX, AVX512-BF16), much slower where it emulates bf16 (AVX2 only)",
    )
    parser.add_argument(
        "--teacher-share",
        type=float,
        default=None,
        help="train: share of each batch drawn from teacher-forced chats (`distill teach`), the rest from "
        "chats the target wrote (default: uniform over all chats)",
    )
    parser.add_argument("--feature-dropout", type=float, default=0.15)
    parser.add_argument("--max-depth", type=int, default=6)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--k", type=int, default=6, help="chain length of the simulated τ")
    parser.add_argument("--eval-records", type=int, default=200, help="held-out chats scored")
    parser.add_argument("--target-reference", default="Qwen/Qwen2.5-Coder-1.5B-Instruct")
    parser.add_argument(
        "--target",
        default="qwen2.5-coder-1.5b-instruct",
        help="evaluate --bench-sets: the target (fetch name or folder)",
    )
    parser.add_argument(
        "--bench-sets",
        nargs="*",
        choices=PROMPT_SETS,
        help="evaluate on the target's greedy answers to these benchmark prompts instead of held-out answers",
    )
    parser.add_argument("--bench-limit", type=int, default=8, help="prompts per benchmark set")
    parser.add_argument("--bench-tokens", type=int, default=128, help="answer tokens per benchmark prompt")
    parser.add_argument(
        "--bench-store",
        default="artifacts/finetune/bench-answers",
        help="where the benchmark answers are kept",
    )
    parser.add_argument("--measured", nargs="*", help="export: end-to-end results for the model card")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the parsed action."""
    return {"train": run_train, "evaluate": run_evaluate, "export": run_export}[args.action](args)
