"""`hf-specssm distill ACTION`: self-distillation data that grows across sessions, and its compact form.

    generate  the target answers a broad, built instruction set (greedy, and sampled at T = 0.7 for a
              share of it), then follow-up turns after its own answers; with top-k soft labels and
              last hidden states kept beside the answers; a refilling batch by default (`refill.py`).
              Stops cleanly at --hours; run it again (with the same or a larger --count) to continue.
    status    what the store holds (records by domain and mode, answer tokens, runs and their speed)
    pack      the store's token ids → a compact, committable dataset (`pack.py`)
    unpack    a pack's chats → the store (without extras), so a later session continues after them
    label     the soft labels and hidden states of chats that have none (unpacked ones): one
              teacher-forced pass of the target (`label.py`); stops at --hours, a rerun continues
    teach     add teacher-forced chats (`teacher.py`): documented functions and documentation prose of
              this machine as answers the target reads, labelled by `label` at ~6x generation's token rate

The store records its recipe (target, answer length, top-k, seed, corpus) and refuses another one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ACTIONS = ("generate", "status", "pack", "unpack", "label", "teach")
DEFAULT_STORE = "artifacts/distill/qwen2.5-coder-1.5b-instruct"
# batches per pass of `generate` (a pass rebuilds the task list, picking up new follow-ups)
PASS_BATCHES = 8


def _recipe(args: argparse.Namespace) -> dict[str, object]:
    from hf_specssm.training.mamba_drafter.command import _target_fingerprint

    roots = sorted(str(Path(root).resolve()) for root in args.corpus_root) if args.corpus_root else None
    return {
        "--target": _target_fingerprint(args.target),
        "--max-new-tokens": args.max_new_tokens,
        "--max-prompt-tokens": args.max_prompt_tokens,
        "--top-k": args.top_k,
        "--seed": args.seed,
        "--corpus-root": roots,
    }


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad values before anything loads.

    Raises:
        ValueError: naming the option and the accepted range.
    """
    positive = {
        "--count": args.count,
        "--batch-size": args.batch_size,
        "--max-new-tokens": args.max_new_tokens,
        "--max-prompt-tokens": args.max_prompt_tokens,
        "--shard-records": args.shard_records,
        "--top-k": args.top_k,
    }
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}.")
    shares = (
        ("--sample-share", args.sample_share),
        ("--followup-share", args.followup_share),
        ("--code-share", args.code_share),
    )
    for flag, value in shares:
        if not 0 <= value <= 1:
            raise ValueError(f"{flag} must lie in [0, 1], got {value}.")
    if args.hours is not None and args.hours <= 0:
        raise ValueError(f"--hours must be > 0, got {args.hours}.")
    if args.batch_tokens < 1:
        raise ValueError(f"--batch-tokens must be >= 1, got {args.batch_tokens}.")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}.")
    parse_mix(args.mix)


def _tasks(args, tokenizer, store, instructions):
    """What is left to answer: instructions built from the target's answers so far (follow-ups, digests of
    its articles), then first turns (greedy, and sampled for a share) — the requests of its brainstorm
    lists first among them."""
    import hashlib

    from hf_specssm.training.distillation.generate import GREEDY, SAMPLED, Task, render, task_id
    from hf_specssm.training.distillation.instructions import (
        digest_instructions,
        followup_instructions,
        selfinstruct_instructions,
    )

    done = store.done_ids()
    answers = {}
    for record in store.records():
        if record["mode"] == GREEDY and record["finished"]:
            answers[record["id"]] = record["input_ids"][record["prompt_length"] :]

    def finished(pool):
        return [
            (instruction, tokenizer.decode(answers[instruction.id], skip_special_tokens=True))
            for instruction in pool
            if instruction.id in answers
        ]

    # requests of the target's own brainstorm lists are first turns of their own
    selfinstruct = selfinstruct_instructions(finished(instructions))
    first = selfinstruct + list(instructions)
    wanted = []
    for instruction in first:
        wanted.append((instruction, GREEDY))
        share = int(hashlib.sha1(f"sample:{instruction.id}".encode()).hexdigest(), 16) % 10_000
        if share < args.sample_share * 10_000:
            wanted.append((instruction, SAMPLED))
    # second turns and digests after the target's own finished greedy first answers already in the store:
    # first, as they are few, and a run stopped by --hours should have some of every kind
    first_turns = finished(first)
    second = followup_instructions(first_turns, share=args.followup_share, seed=args.seed)
    second += digest_instructions(first_turns, seed=args.seed)
    wanted = [(instruction, GREEDY) for instruction in second] + wanted
    tasks, too_long = [], 0
    for instruction, mode in wanted:
        identifier = task_id(instruction.id, mode)
        if identifier in done:
            continue
        ids = render(tokenizer, instruction)
        if len(ids) > args.max_prompt_tokens:
            too_long += 1
            continue
        tasks.append(Task(identifier, instruction, mode, tuple(ids)))
    return tasks, too_long


def parse_mix(items: list[str] | None) -> dict[str, float] | None:
    """`--mix code=2 article=1 …` as a dict of shares (`None` when not given).

    Raises:
        ValueError: an item that is not `domain=share`, an unknown domain or a negative share.
    """
    from hf_specssm.training.distillation.instructions import DEFAULT_MIX

    if not items:
        return None
    mix = {}
    for item in items:
        domain, sep, value = item.partition("=")
        try:
            share = float(value)
        except ValueError:
            share = -1.0
        if not sep or domain not in DEFAULT_MIX or share < 0:
            raise ValueError(
                f"--mix takes domain=share items with domains from {tuple(DEFAULT_MIX)} and shares >= 0, "
                f"got {item!r}."
            )
        mix[domain] = share
    if sum(mix.values()) <= 0:
        raise ValueError(f"--mix needs a positive share somewhere, got {' '.join(items)!r}.")
    return mix


def run_generate(args: argparse.Namespace) -> int:
    """Action `generate`: answer what is left, in batches, until done or past --hours."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_specssm.hardware import resolve_dtype
    from hf_specssm.training.distillation.instructions import build_broad_instructions
    from hf_specssm.training.distillation.refill import refill_problem
    from hf_specssm.training.distillation.store import DistillStore
    from hf_specssm.training.mamba_drafter.command import _resolve_model_path

    check_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = time.monotonic() + args.hours * 3600 if args.hours is not None else None
    store = DistillStore(args.store, recipe=_recipe(args))
    path = _resolve_model_path(args.target)
    tokenizer = AutoTokenizer.from_pretrained(path)
    choice = resolve_dtype(args.dtype, args.device)
    target = AutoModelForCausalLM.from_pretrained(path, dtype=choice.dtype).to(args.device).eval()
    say = (lambda *a: None) if args.quiet else print
    say(f"target in {choice.name} ({choice.reason}); store {store.root}")
    instructions = build_broad_instructions(
        args.count, seed=args.seed, mix=parse_mix(args.mix), roots=args.corpus_root
    )
    started = time.monotonic()
    # counted per stored batch, so that an interrupted pass still records what it added
    added = {"answers": 0, "tokens": 0}
    bar = tqdm(desc="distill", unit="answer", disable=args.quiet)
    batching = args.batching
    if batching == "refill" and (problem := refill_problem(target)) is not None:
        say(f"--batching static: {type(target).__name__} cannot decode with a refilling batch ({problem})")
        batching = "static"
    try:
        if batching == "refill":
            _generate_refilling(
                args, target, tokenizer, store, instructions, choice.name, deadline, added, bar, say
            )
        else:
            _generate_static(
                args, target, tokenizer, store, instructions, choice.name, deadline, added, bar, say
            )
    finally:
        bar.close()
        seconds = time.monotonic() - started
        answers, tokens = added["answers"], added["tokens"]
        store.seal()
        # recorded also when interrupted: the speed of every run that added answers is in the manifest
        store.add_run(
            {
                "answers": answers,
                "answer_tokens": tokens,
                "seconds": round(seconds, 1),
                "tokens_per_hour": round(tokens / max(seconds, 1e-9) * 3600),
                "dtype": choice.name,
                "device": str(args.device),
                "batch_size": args.batch_size,
                "batching": batching,
                "threads": torch.get_num_threads(),
                "count": args.count,
            }
        )
    left, _ = _tasks(args, tokenizer, store, instructions)
    say(
        f"{answers} answers, {tokens} answer tokens in {seconds / 60:.1f} min "
        f"({tokens / max(seconds, 1e-9) * 3600:,.0f} tokens/hour); {len(left)} left"
        + (": run the same command again to continue" if left else "")
    )
    return 0


def _generate_static(
    args, target, tokenizer, store, instructions, dtype_name, deadline, added, bar, say
) -> None:
    """`--batching static`: one `generate` call per batch, in passes of `PASS_BATCHES` batches; each pass
    sees the follow-ups that the first turns answered so far allow."""
    from hf_specssm.training.distillation.generate import run_tasks

    started = time.monotonic()
    while deadline is None or time.monotonic() < deadline:
        tasks, too_long = _tasks(args, tokenizer, store, instructions)
        if not tasks:
            break
        _start_bar(bar, len(tasks), too_long, args, say)
        pass_started = time.monotonic()

        def on_batch(count: int, produced: int, seconds: float, before: int = added["tokens"]) -> None:
            added["answers"] += count
            added["tokens"] = before + produced
            bar.update(count)
            bar.set_postfix(tok_s=f"{added['tokens'] / max(time.monotonic() - started, 1e-9):.1f}")

        part = tasks[: args.batch_size * PASS_BATCHES]
        done, _, _ = run_tasks(
            target, tokenizer, part, store, on_batch=on_batch, **_run_options(args, deadline, dtype_name)
        )
        if done == 0 and time.monotonic() - pass_started < 1:
            break


def _generate_refilling(
    args, target, tokenizer, store, instructions, dtype_name, deadline, added, bar, say
) -> None:
    """`--batching refill`: one refilling batch (`refill.py`) for the whole run; whenever its queue runs dry
    the task list is rebuilt (new follow-ups included) and the next `PASS_BATCHES` batches' worth join."""
    from hf_specssm.training.distillation.refill import run_tasks_refill

    started = time.monotonic()

    def supply(busy: set[str]) -> list:
        tasks, too_long = _tasks(args, tokenizer, store, instructions)
        _start_bar(bar, len(tasks), too_long, args, say)
        return [task for task in tasks if task.id not in busy][: args.batch_size * PASS_BATCHES]

    def on_batch(count: int, produced: int, seconds: float) -> None:
        added["answers"] += count
        added["tokens"] = produced
        bar.update(count)
        bar.set_postfix(tok_s=f"{added['tokens'] / max(time.monotonic() - started, 1e-9):.1f}")

    run_tasks_refill(
        target, tokenizer, supply, store, on_batch=on_batch, **_run_options(args, deadline, dtype_name)
    )


def _run_options(args: argparse.Namespace, deadline: float | None, dtype_name: str) -> dict[str, object]:
    """The keyword arguments both batchings' runners take from the command line."""
    return {
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "shard_records": args.shard_records,
        "deadline": deadline,
        "top_k": args.top_k,
        "hidden": not args.no_hidden,
        "dtype_name": dtype_name,
    }


def _start_bar(bar, total: int, too_long: int, args, say) -> None:
    """Size the progress bar by the first task list (and say how many prompts were too long)."""
    if bar.total is not None:
        return
    bar.total = total
    if too_long:
        say(f"skipping {too_long} prompts longer than --max-prompt-tokens {args.max_prompt_tokens}")


def run_status(args: argparse.Namespace) -> int:
    """Action `status`: print what the store holds."""
    from hf_specssm.training.distillation.label import unlabelled
    from hf_specssm.training.distillation.store import DistillStore

    store = DistillStore(args.store)
    status = {
        **store.summary(),
        # chats without soft labels and hidden states (unpacked or teacher-forced): `label` gives them
        "unlabelled": len(unlabelled(store)),
        "shards": len(store.manifest["shards"]),
        "runs": store.manifest["runs"],
        "label_runs": store.manifest.get("label_runs", []),
    }
    print(json.dumps(status, indent=1))
    return 0


def run_pack(args: argparse.Namespace) -> int:
    """Action `pack`: write the compact dataset of the store's token ids to --pack-out."""
    from hf_specssm.training.distillation.pack import pack_store
    from hf_specssm.training.distillation.store import DistillStore

    path = pack_store(DistillStore(args.store), args.pack_out, max_bytes=int(args.max_pack_mb * 2**20))
    print(path)
    return 0


def run_unpack(args: argparse.Namespace) -> int:
    """Action `unpack`: add the chats of --pack-out to the store (created with this command's recipe)."""
    from hf_specssm.training.distillation.pack import unpack_into_store
    from hf_specssm.training.distillation.store import DistillStore

    recipe = json.loads((Path(args.pack_out) / "manifest.json").read_text())["recipe"]
    added = unpack_into_store(args.pack_out, DistillStore(args.store, recipe=recipe))
    print(f"{added} chats added to {args.store}")
    return 0


def run_teach(args: argparse.Namespace) -> int:
    """Action `teach`: add the first --count teacher-forced chats the store lacks (unlabelled; `label` next).

    An existing store keeps its recipe (answer and prompt lengths) and must name --target; a new one is
    created with this command's recipe.
    """
    from transformers import AutoTokenizer

    from hf_specssm.training.distillation.store import MANIFEST, DistillStore
    from hf_specssm.training.distillation.teacher import add_teacher_chats, end_of_turn_ids, teacher_chats
    from hf_specssm.training.mamba_drafter.command import _resolve_model_path, _target_fingerprint
    from hf_specssm.training.mamba_drafter.corpus import doc_paragraphs, python_functions

    check_arguments(args)
    exists = (Path(args.store) / MANIFEST).is_file()
    store = DistillStore(args.store, recipe=None if exists else _recipe(args))
    recorded = store.recipe.get("--target")
    if recorded != _target_fingerprint(args.target):
        raise ValueError(
            f"--target {args.target} is not the target the store {store.root} was made with ({recorded})."
        )
    say = (lambda *a: None) if args.quiet else print
    say("reading documented functions and documentation prose (a few minutes on a large site-packages)")
    functions = list(python_functions(args.corpus_root)) if args.code_share > 0 else []
    paragraphs = list(doc_paragraphs(args.corpus_root)) if args.code_share < 1 else []
    chats = teacher_chats(args.count, functions, paragraphs, code_share=args.code_share, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(_resolve_model_path(args.target))
    records, tokens = add_teacher_chats(
        store,
        tokenizer,
        chats,
        max_answer_tokens=int(store.recipe.get("--max-new-tokens", args.max_new_tokens)),
        max_prompt_tokens=int(store.recipe.get("--max-prompt-tokens", args.max_prompt_tokens)),
        end_ids=end_of_turn_ids(tokenizer),
    )
    store.seal()
    say(
        f"{records} teacher-forced chats ({tokens} answer tokens) added to {store.root} from "
        f"{len(functions)} functions and {len(paragraphs)} paragraphs; "
        f"give them labels with `hf-specssm distill label --store {store.root}`"
    )
    return 0


def run_label(args: argparse.Namespace) -> int:
    """Action `label`: the extras of the store's chats that have none, until done or past --hours."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from hf_specssm.hardware import resolve_dtype
    from hf_specssm.training.distillation.label import label_store, unlabelled
    from hf_specssm.training.distillation.store import DistillStore
    from hf_specssm.training.mamba_drafter.command import _resolve_model_path, _target_fingerprint

    check_arguments(args)
    store = DistillStore(args.store)
    recorded = store.recipe.get("--target")
    if recorded is not None and recorded != _target_fingerprint(args.target):
        raise ValueError(
            f"--target {args.target} is not the target the store {store.root} was made with "
            f"({recorded}): label it with that target."
        )
    todo = len(unlabelled(store))
    if args.limit is not None:
        todo = min(todo, args.limit)
    say = (lambda *a: None) if args.quiet else print
    if not todo:
        say(f"every chat of {store.root} has its extras: nothing to label")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = time.monotonic() + args.hours * 3600 if args.hours is not None else None
    choice = resolve_dtype(args.dtype, args.device)
    path = _resolve_model_path(args.target)
    target = AutoModelForCausalLM.from_pretrained(path, dtype=choice.dtype).to(args.device).eval()
    say(f"target in {choice.name} ({choice.reason}); labelling {todo} chats of {store.root}")
    bar = tqdm(desc="label", unit="chat", total=todo, disable=args.quiet)
    counted = {"chats": 0, "tokens": 0}
    started = time.monotonic()

    def on_batch(count: int, tokens: int, seconds: float) -> None:
        counted["chats"] += count
        counted["tokens"] = tokens
        bar.update(count)
        bar.set_postfix(tok_s=f"{tokens / max(seconds, 1e-9):.0f}")

    try:
        label_store(
            target,
            store,
            batch_tokens=args.batch_tokens,
            hidden=not args.no_hidden,
            dtype_name=choice.name,
            limit=args.limit,
            deadline=deadline,
            on_batch=on_batch,
        )
    finally:
        bar.close()
        seconds = time.monotonic() - started
        store.add_run(
            {
                "chats": counted["chats"],
                "answer_tokens": counted["tokens"],
                "seconds": round(seconds, 1),
                "tokens_per_hour": round(counted["tokens"] / max(seconds, 1e-9) * 3600),
                "dtype": choice.name,
                "device": str(args.device),
                "batch_tokens": args.batch_tokens,
                "threads": torch.get_num_threads(),
            },
            kind="label_runs",
        )
    left = len(unlabelled(store))
    say(
        f"{counted['chats']} chats, {counted['tokens']} answer tokens labelled in {seconds / 60:.1f} min; "
        f"{left} left" + (": run the same command again to continue" if left else "")
    )
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `distill` options."""
    parser.add_argument("action", choices=ACTIONS, help="what to do (generate resumes)")
    parser.add_argument(
        "--target",
        default="qwen2.5-coder-1.5b-instruct",
        help="target model folder, or a name from `hf-specssm fetch --list` (fetched when missing)",
    )
    parser.add_argument("--store", default=DEFAULT_STORE, help="the store folder (grows across runs)")
    parser.add_argument(
        "--count", type=int, default=6000, help="first-turn instructions (grow it to continue)"
    )
    parser.add_argument(
        "--mix",
        nargs="+",
        metavar="DOMAIN=SHARE",
        default=None,
        help="shares of the first-turn domains (default: instructions.DEFAULT_MIX), e.g. article=1 brainstorm=1",
    )
    parser.add_argument(
        "--sample-share", type=float, default=0.5, help="share of instructions also answered at T = 0.7"
    )
    parser.add_argument(
        "--followup-share",
        type=float,
        default=0.3,
        help="share of finished first answers given a second turn",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="rows decoded together (prompts per generate call when static)",
    )
    parser.add_argument(
        "--batching",
        choices=["refill", "static"],
        default="refill",
        help="refill: a finished answer's row takes the next task at once (plain-attention targets); static: "
        "one generate call per batch, which decodes until its longest answer ends",
    )
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-prompt-tokens", type=int, default=768, help="longer prompts are skipped")
    parser.add_argument("--shard-records", type=int, default=512, help="records per sealed shard")
    parser.add_argument("--top-k", type=int, default=8, help="soft-label entries kept per answer token")
    parser.add_argument("--no-hidden", action="store_true", help="do not keep the target's hidden states")
    parser.add_argument(
        "--code-share", type=float, default=0.6, help="teach: share of chats answered by a function's source"
    )
    parser.add_argument(
        "--batch-tokens", type=int, default=4096, help="label: padded tokens per teacher-forced forward"
    )
    parser.add_argument("--limit", type=int, default=None, help="label: at most this many chats")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU exists")
    parser.add_argument(
        "--hours",
        type=float,
        default=None,
        help="time budget: generate admits no task past it (answers in flight finish); label and static "
        "batches stop after the batch that crosses it",
    )
    parser.add_argument(
        "--corpus-root",
        type=Path,
        action="append",
        help="folder of Python source and docs to build instructions from (repeatable)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--pack-out",
        default="data/distilled/qwen2.5-coder-1.5b-instruct",
        help="pack, unpack: the compact dataset's folder",
    )
    parser.add_argument(
        "--max-pack-mb", type=float, default=25.0, help="pack: refuse to write more than this"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the parsed action."""
    actions = {
        "generate": run_generate,
        "status": run_status,
        "pack": run_pack,
        "unpack": run_unpack,
        "label": run_label,
        "teach": run_teach,
    }
    return actions[args.action](args)
