"""`hf-specssm bench`: methods × prompt sets × modes on real models, in one process, with a report.

Writes into `--out`: `results.jsonl` (one row per prompt, method and mode; resumed), `summary.md` (tables),
`speedups.png`, and with `--long-context`: `long_context.jsonl`, `long_context.md`, `long_context.png`.
`--toy` runs the same harness on random-weight demo models, offline.

The dtype is this machine's fastest for the target alone unless `--dtype` says otherwise
(`hf_specssm.hardware.fastest_dtype`); when it is another one, the target alone also runs in the fastest
dtype (`target-fastest`), so that speed-ups can be read against an unslowed baseline. Every argument is
checked before a model is loaded (`check_arguments`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from hf_specssm import shipped_drafter_path
from hf_specssm.hardware import DTYPE_CHOICES, DtypeChoice, cpu_flags, fastest_dtype, resolve_dtype
from hf_specssm.tools.bench.methods import (
    FASTEST_TARGET,
    MAMBA_DRAFTER_METHODS,
    REDRAFTER_METHODS,
    SMALL_DRAFTER_METHODS,
    TREE_METHODS,
)
from hf_specssm.tools.bench.prompt_sets import PROMPT_SETS, PUBLIC_SETS

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_MAMBA_DRAFTER = str(shipped_drafter_path())
METHOD_ORDER = (
    "target",
    "hf-assisted-0.5b",
    "hf-prompt-lookup",
    "ours-0.5b",
    "ours-mamba",
    "ours-mamba-tree",
    "ours-mamba-copy",
    "ours-mamba-copy-tree",
    "ours-mamba-copy-bandit",
    "ours-redrafter",
    "ours-redrafter-chain",
    "ours-redrafter-copy",
    "ours-redrafter-copy-both",
    "ours-prompt-lookup",
)
#: the order of the report's rows
REPORT_ORDER = (METHOD_ORDER[0], FASTEST_TARGET, *METHOD_ORDER[1:])
#: options that name the real models (meaningless with --toy)
REAL_MODEL_OPTIONS = ("target", "small_drafter", "mamba_drafter", "mamba_dtype", "redrafter_head")
#: options that shape the prompt-set runs (meaningless with --long-context-only)
PROMPT_SET_OPTIONS = (
    "sets",
    "limit",
    "offset",
    "methods",
    "modes",
    "temperature",
    "max_new_tokens",
    "tree_shape",
)


def device_label(device: torch.device) -> str:
    """`"cpu (2 threads, amx_bf16,…)"` or the GPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, {cpu_flags()})"


def resolve_drafter_path(spec: str) -> Path | None:
    """A Mamba drafter folder: as given, else relative to the repository; `None` for `"none"`."""
    if spec.lower() == "none":
        return None
    for candidate in (Path(spec), REPO_ROOT / spec):
        if (candidate / "config.json").is_file():
            return candidate
    raise ValueError(
        f"no Mamba drafter at {spec!r} (looked in the working folder and in {REPO_ROOT}); train one with "
        "`hf-specssm train-mamba-drafter`, or pass --mamba-drafter none"
    )


@dataclass
class BenchModels:
    """What a benchmark run works with.

    Attributes:
        target: the target model.
        tokenizer: its tokenizer (`None` for the toy models).
        tokenize: `BenchPrompt → input_ids [1, P]` on the target's device.
        small: the small Transformer drafter, or `None`.
        mamba: the Mamba drafter, or `None`.
        name: the target's name for the report.
        reference: the target in this machine's fastest dtype when the run's dtype is another, else `None`.
        redrafter: a ReDrafter head attached to the target (`--redrafter-head`), or `None`.
    """

    target: Any
    tokenizer: Any
    tokenize: Callable
    small: Any
    mamba: Any
    name: str
    reference: Any = None
    redrafter: Any = None


def _defaults() -> dict[str, Any]:
    return vars(add_arguments(argparse.ArgumentParser()).parse_args([]))


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _is_fetch_name_or_folder(spec: str) -> bool:
    from hf_specssm.tools.fetch import MODELS

    return spec in MODELS or (Path(spec).expanduser() / "config.json").is_file()


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse, before any model is loaded, what the run could not do or would silently ignore.

    Raises:
        ValueError: naming the option and the way out: an unknown or unavailable method, a model that is
            neither a fetch name nor a folder, an unusable device, a number out of range, or an option
            that does not apply to this run (e.g. `--target` with `--toy`, `--temperature` without
            sampling).
    """
    from hf_specssm.tools.fetch import MODELS

    changed = {dest for dest, default in _defaults().items() if getattr(args, dest) != default}
    if args.report_only:
        extra = sorted(changed - {"report_only", "out", "quiet"})
        if extra:
            raise ValueError(
                f"--report-only only rebuilds the report from --out; {_flag(extra[0])} would be ignored: drop it."
            )
        return
    for dest, low in (("limit", 1), ("max_new_tokens", 1), ("offset", 0), ("threads", 0)):
        if getattr(args, dest) < low:
            raise ValueError(f"{_flag(dest)} must be at least {low}; got {getattr(args, dest)}.")
    if args.time_budget is not None:
        if not args.time_budget > 0:
            raise ValueError(f"--time-budget must be a positive number of seconds; got {args.time_budget}.")
        if args.no_warmup:
            raise ValueError("--time-budget sizes the run from the warm-up's timings: drop --no-warmup.")
        if args.long_context_only:
            raise ValueError("--time-budget applies to the prompt sets, not to --long-context-only: drop it.")
    if args.dtype not in DTYPE_CHOICES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}; got {args.dtype!r}.")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(
            f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: torch sees no CUDA GPU here; use --device cpu.")
    unknown = [name for name in args.methods or () if name not in METHOD_ORDER]
    if unknown:
        raise ValueError(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(METHOD_ORDER)}.")
    if args.toy:
        real = [dest for dest in REAL_MODEL_OPTIONS if dest in changed]
        if real:
            raise ValueError(
                f"{_flag(real[0])} does not apply with --toy (the toy pair is built offline): drop one of them."
            )
        if args.long_context:
            raise ValueError("--long-context needs a tokenizer, which the toy models lack: drop --toy or it.")
    else:
        if "toy_prompt_bytes" in changed:
            raise ValueError("--toy-prompt-bytes applies only with --toy.")
        if not _is_fetch_name_or_folder(args.target):
            raise ValueError(
                f"--target {args.target!r} is neither a model folder (with config.json) nor a fetch name "
                f"({', '.join(MODELS)})."
            )
        if args.small_drafter.lower() != "none" and not _is_fetch_name_or_folder(args.small_drafter):
            raise ValueError(
                f"--small-drafter {args.small_drafter!r} is neither a model folder (with config.json) nor a "
                f"fetch name ({', '.join(MODELS)}); pass none to run without it."
            )
        resolve_drafter_path(args.mamba_drafter)
        wanted = set(args.methods or ())
        if args.small_drafter.lower() == "none" and wanted & set(SMALL_DRAFTER_METHODS):
            name = sorted(wanted & set(SMALL_DRAFTER_METHODS))[0]
            raise ValueError(f"--methods {name} drafts with the small drafter, but --small-drafter is none.")
        if args.mamba_drafter.lower() == "none" and wanted & set(MAMBA_DRAFTER_METHODS):
            name = sorted(wanted & set(MAMBA_DRAFTER_METHODS))[0]
            raise ValueError(f"--methods {name} drafts with the Mamba drafter, but --mamba-drafter is none.")
        if args.redrafter_head is None and wanted & set(REDRAFTER_METHODS):
            name = sorted(wanted & set(REDRAFTER_METHODS))[0]
            raise ValueError(f"--methods {name} drafts with a ReDrafter head: pass --redrafter-head FOLDER.")
        if args.redrafter_head is not None and not (Path(args.redrafter_head) / "config.json").is_file():
            raise ValueError(
                f"--redrafter-head {args.redrafter_head}: no head folder there (config.json missing); train one "
                "with `hf-specssm train-redrafter`."
            )
    if not args.long_context:
        orphans = [
            d for d in ("long_context_only", "long_context_tokens", "long_context_prompts") if d in changed
        ]
        if orphans:
            raise ValueError(
                f"{_flag(orphans[0])} applies only with --long-context LENGTH…: add it or drop this."
            )
    elif args.long_context_only:
        shaping = [dest for dest in PROMPT_SET_OPTIONS if dest in changed]
        if shaping:
            raise ValueError(
                f"{_flag(shaping[0])} shapes the prompt-set runs, which --long-context-only skips: drop one of them."
            )
    if "temperature" in changed and "sample" not in args.modes:
        raise ValueError("--temperature applies only to sampling: add --modes sample (or greedy sample).")
    if "tree_shape" in changed and args.methods and not set(args.methods) & set(TREE_METHODS):
        raise ValueError(
            f"--tree-shape applies only to the tree methods ({', '.join(TREE_METHODS)}), and --methods has none."
        )


def _say(message: str) -> None:
    """A progress line, flushed at once (the next step may take minutes)."""
    print(message, flush=True)


def load_models(args: argparse.Namespace, choice: DtypeChoice | None = None) -> BenchModels:
    """Load (fetching when needed) the models the arguments name, saying what it loads as it goes.

    Args:
        args: the parsed `bench` arguments (checked by `check_arguments`).
        choice: the dtype of the target and the small drafter (default: `--dtype` resolved); when it is
            not this machine's fastest, a copy of the target in the fastest dtype comes along as
            `reference`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_specssm  # noqa: F401 - registers the Mamba drafter with the Auto classes
    from hf_specssm.tools.bench.prompt_sets import render
    from hf_specssm.training.mamba_drafter.command import _resolve_model_path

    device = torch.device(args.device)
    fastest = fastest_dtype(device)
    choice = choice or _run_dtype(args, device)
    wanted = set(args.methods or METHOD_ORDER)
    if args.toy:
        from hf_specssm.testing.toy import demo_pair, demo_transformer_drafter

        _say("Building the random-weight toy pair (offline)…")
        target, mamba = demo_pair(seed=args.seed)
        small = demo_transformer_drafter(target)
        vocab = target.config.vocab_size

        def tokenize_toy(prompt):
            ids = [1 + byte % (vocab - 1) for byte in prompt.text.encode("utf-8")[: args.toy_prompt_bytes]]
            return torch.tensor([ids], device=device)

        reference = None
        if fastest.name != choice.name:
            reference = copy.deepcopy(target).to(device=device, dtype=fastest.dtype)
        return BenchModels(
            target.to(device=device, dtype=choice.dtype),
            None,
            tokenize_toy,
            small.to(device=device, dtype=choice.dtype),
            mamba.to(device),
            "toy Llama 110M (random)",
            reference,
        )
    _say(f"Target {args.target}: fetching it if it is not cached yet (see `hf-specssm fetch --list`)…")
    target_path = _resolve_model_path(args.target)
    _say(f"Loading the target from {target_path} in {choice.name}…")
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=choice.dtype).to(device).eval()
    reference = None
    if fastest.name != choice.name:
        _say(
            f"Loading the target again in {fastest.name}, this machine's fastest dtype, for `{FASTEST_TARGET}`…"
        )
        reference = AutoModelForCausalLM.from_pretrained(target_path, dtype=fastest.dtype).to(device).eval()
    small = None
    if args.small_drafter.lower() != "none" and wanted & set(SMALL_DRAFTER_METHODS):
        _say(f"Small drafter {args.small_drafter}: fetching it if needed, then loading it in {choice.name}…")
        small_path = _resolve_model_path(args.small_drafter)
        small = AutoModelForCausalLM.from_pretrained(small_path, dtype=choice.dtype).to(device).eval()
    mamba = None
    mamba_path = resolve_drafter_path(args.mamba_drafter)
    if mamba_path is not None and wanted & set(MAMBA_DRAFTER_METHODS):
        _say(f"Loading the Mamba drafter from {mamba_path} in {args.mamba_dtype}…")
        mamba_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.mamba_dtype]
        mamba = AutoModelForCausalLM.from_pretrained(mamba_path, dtype=mamba_dtype).to(device).eval()

    redrafter = None
    if args.redrafter_head is not None and wanted & set(REDRAFTER_METHODS):
        from hf_specssm.drafters.redrafter import ReDrafterHead

        _say(f"Loading the ReDrafter head from {args.redrafter_head} in {args.mamba_dtype}…")
        head_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.mamba_dtype]
        head = ReDrafterHead.from_pretrained(args.redrafter_head, dtype=head_dtype).to(device).eval()
        redrafter = head.attach(target)  # ValueError for a head of another target

    def tokenize(prompt):
        return torch.tensor([render(tokenizer, prompt)], device=device)

    return BenchModels(
        target,
        tokenizer,
        tokenize,
        small,
        mamba,
        Path(str(target_path)).parent.name or args.target,
        reference,
        redrafter,
    )


def _run_dtype(args: argparse.Namespace, device: torch.device) -> DtypeChoice:
    """The run's dtype: `--dtype`, with `auto` meaning the fastest here (fp32 for the toy pair, which is
    the offline parity check)."""
    if args.toy and args.dtype == "auto":
        return DtypeChoice("fp32", "the toy pair runs in fp32 unless --dtype says otherwise (exact parity)")
    return resolve_dtype(args.dtype, device)


def run(args: argparse.Namespace) -> int:
    """Carry out a parsed `bench` command line (checked first: nothing loads for a bad one)."""
    from hf_specssm.tools.bench.harness import BenchContext, TimeBudget, read_rows, run_benchmark
    from hf_specssm.tools.bench.long_context import long_context_table, run_long_context
    from hf_specssm.tools.bench.methods import GenerationSettings, fastest_target_alone, standard_methods
    from hf_specssm.tools.bench.prompt_sets import load_prompt_set
    from hf_specssm.tools.bench.report import markdown_tables, plot_long_context, plot_speedups, summarize

    started = time.perf_counter()
    check_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, long_results = out / "results.jsonl", out / "long_context.jsonl"
    if not args.report_only:
        if args.quiet:
            transformers.utils.logging.disable_progress_bar()
        device = torch.device(args.device)
        choice, fastest = _run_dtype(args, device), fastest_dtype(device)
        _say(f"dtype: {choice.describe()}")
        if fastest.name != choice.name:
            _say(
                f"this machine's fastest dtype for the target alone is {fastest.describe()}: the target alone "
                f"also runs in it (`{FASTEST_TARGET}`), and the report gives speed-ups over it too"
            )
        models = load_models(args, choice)
        target, small, mamba = models.target, models.small, models.mamba
        context = BenchContext(target=models.name, dtype=choice.name, device=device_label(target.device))
        _say(
            f"hf_specssm bench · {models.name} · {context.dtype} · {context.device} · torch {torch.__version__}"
        )
        methods = standard_methods(
            target, small, mamba, tree_shape=tuple(args.tree_shape), redrafter_head=models.redrafter
        )
        if args.methods:
            methods = [m for m in methods if m.name in args.methods or m.name == "target"]
        if models.reference is not None:
            methods.insert(1, fastest_target_alone(models.reference, fastest.name))
        if not args.long_context_only:
            prompts = [
                p for name in args.sets for p in load_prompt_set(name, limit=args.limit, offset=args.offset)
            ]
            settings = [
                GenerationSettings(
                    args.max_new_tokens, do_sample=(mode == "sample"), temperature=args.temperature
                )
                for mode in args.modes
            ]
            _say(
                f"{len(prompts)} prompts × {len(methods)} methods × {len(settings)} modes, up to "
                f"{args.max_new_tokens} new tokens each; rows go to {results} as they finish"
            )
            run_benchmark(
                target,
                models.tokenize,
                methods,
                prompts,
                settings,
                results,
                context,
                warmup=not args.no_warmup,
                seed=args.seed,
                progress=not args.quiet,
                budget=TimeBudget(started + args.time_budget) if args.time_budget is not None else None,
                say=_say,
            )
            drafters = {
                label: model
                for label, model, used in (
                    ("0.5b", small, SMALL_DRAFTER_METHODS),
                    ("mamba", mamba, MAMBA_DRAFTER_METHODS),
                )
                if model is not None and any(method.name in used for method in methods)
            }
            if drafters and not args.no_agreement:
                _agreement(out, target, models.tokenize, prompts, drafters, read_rows(results))
        if args.long_context:
            import hf_specssm
            from hf_specssm.tools.bench.methods import ours

            # constant draft length: τ then compares the drafters, not their schedules
            drafters = [
                (name, model) for name, model in (("0.5b", small), ("mamba", mamba)) if model is not None
            ]
            long_methods = [
                ours(
                    target,
                    f"ours-{name}-k5",
                    f"hf_specssm, {name} drafter, constant k=5",
                    hf_specssm.ModelDrafter(model, num_draft_tokens=5, schedule="constant"),
                    model,
                )
                for name, model in drafters
            ]
            run_long_context(
                target,
                models.tokenizer,
                long_methods,
                args.long_context,
                long_results,
                context,
                max_new_tokens=args.long_context_tokens,
                count=args.long_context_prompts,
                progress=not args.quiet,
            )
    rows = read_rows(results)
    if rows:
        summaries = summarize(rows)
        _report(out / "summary.md", markdown_tables(summaries, REPORT_ORDER), plot_speedups, summaries,
                out / "speedups.png", REPORT_ORDER)  # fmt: skip
    long_rows = read_rows(long_results)
    if long_rows:
        _report(out / "long_context.md", long_context_table(long_rows), plot_long_context, long_rows,
                out / "long_context.png")  # fmt: skip
    return 0


def _agreement(
    out: Path,
    target: torch.nn.Module,
    tokenize: Callable,
    prompts: list,
    drafters: dict[str, torch.nn.Module],
    rows: list[dict],
) -> None:
    """Write `agreement.md` and `agreement.jsonl` (atomically): each drafter's teacher-forced agreement
    with the target alone's greedy answers to this run's prompts (`agreement.drafter_agreements`)."""
    from hf_specssm.tools.bench.agreement import agreement_table, drafter_agreements

    # the last greedy answer of the target alone per prompt (a later run of the folder may ask for more tokens)
    greedy = {
        (row["set"], row["prompt_id"]): row["output_ids"]
        for row in rows
        if row["method"] == "target" and row["mode"] == "greedy"
    }
    answers = [
        (prompt.set, tokenize(prompt), greedy[(prompt.set, prompt.id)])
        for prompt in prompts
        if (prompt.set, prompt.id) in greedy
    ]
    if not answers:
        _say("no greedy answers of the target alone in this run: no agreement table")
        return
    _say(f"teacher-forced agreement of {', '.join(drafters)} on {len(answers)} greedy answers…")
    agreements = drafter_agreements(target, drafters, answers)
    lines = "".join(
        json.dumps({"set": a.set, "drafter": a.drafter, "prompts": a.prompts, **vars(a.estimate)}) + "\n"
        for a in agreements
    )
    for name, text in (("agreement.jsonl", lines), ("agreement.md", agreement_table(agreements))):
        partial = out / (name + ".partial")
        partial.write_text(text)
        partial.replace(out / name)
    print(agreement_table(agreements))


def _report(table_path: Path, table: str, plot: Callable, data, plot_path: Path, *plot_args) -> None:
    """Write (atomically) and print a Markdown table, then its plot (skipped, and said, without matplotlib)."""
    partial = table_path.with_name(table_path.name + ".partial")
    partial.write_text(table)
    partial.replace(table_path)
    print(table)
    try:
        print(f"plot: {plot(data, plot_path, *plot_args)}")
    except ImportError:
        print("matplotlib is not installed (extra [bench]): no plot")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `bench` options (each with its help; `hf-specssm bench --help` shows the defaults)."""
    parser.add_argument("--toy", action="store_true", help="random-weight demo models, offline")
    parser.add_argument("--toy-prompt-bytes", type=int, default=96, help=argparse.SUPPRESS)
    parser.add_argument("--target", default="qwen2.5-coder-1.5b-instruct", help="fetch name or model folder")
    parser.add_argument(
        "--small-drafter",
        default="qwen2.5-coder-0.5b-instruct",
        help="Transformer drafter (fetch name, folder, or none)",
    )
    parser.add_argument(
        "--mamba-drafter", default=DEFAULT_MAMBA_DRAFTER, help="Mamba drafter folder, or none"
    )
    parser.add_argument(
        "--mamba-dtype",
        choices=["bf16", "fp32"],
        default="fp32",
        help="dtype of the Mamba drafter (18M) and of a ReDrafter head",
    )
    parser.add_argument(
        "--redrafter-head",
        default=None,
        help="a ReDrafter head folder for the target (`hf-specssm train-redrafter`): adds ours-redrafter "
        "(beam trees), ours-redrafter-chain (one beam), ours-redrafter-copy (one beam plus prompt-lookup copies) and ours-redrafter-copy-both (the beam and the copy as one tree)",
    )
    parser.add_argument(
        "--sets",
        nargs="+",
        choices=PROMPT_SETS,
        default=list(PUBLIC_SETS),
        help="prompt sets (outside: our own prompts in categories the four public sets do not cover)",
    )
    parser.add_argument("--limit", type=int, default=4, help="prompts per set")
    parser.add_argument("--offset", type=int, default=0, help="skip this many prompts of each set")
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help=f"run only these (the target alone always runs; default: all the loaded models allow): "
        f"{', '.join(METHOD_ORDER)}",
    )
    parser.add_argument(
        "--modes", nargs="+", choices=["greedy", "sample"], default=["greedy"], help="decoding modes"
    )
    parser.add_argument(
        "--temperature", type=float, default=0.7, help="sampling temperature (--modes sample)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt")
    parser.add_argument(
        "--tree-shape",
        type=int,
        nargs="+",
        default=[3, 2, 1, 1, 1],
        help=f"children per node at each depth, for {' and '.join(TREE_METHODS)}",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="dtype of the target and the small drafter; auto: this machine's fastest for the target alone "
        "(bf16 on GPUs and on CPUs with AMX or AVX512-BF16, fp32 on AVX2-only CPUs; fp32 for --toy)",
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device of the models"
    )
    parser.add_argument(
        "--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads (0: torch's own)"
    )
    parser.add_argument("--out", default="artifacts/bench", help="results folder (resumed when it has rows)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (prompt i runs with seed + i)")
    parser.add_argument("--no-warmup", action="store_true", help="time the first calls too (no warm-up)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="finish within this many seconds from the start (model loading included) by choosing fewer "
        "new tokens than --max-new-tokens where the warm-up says the asked number would not fit (at "
        "least 16); default: no budget",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from --out")
    parser.add_argument(
        "--no-agreement",
        action="store_true",
        help="skip the drafters' teacher-forced agreement with the target's greedy answers (agreement.md)",
    )
    parser.add_argument(
        "--long-context", type=int, nargs="*", default=[], help="input lengths, e.g. 1024 2048 4096 8192"
    )
    parser.add_argument("--long-context-only", action="store_true", help="run only the --long-context check")
    parser.add_argument(
        "--long-context-tokens", type=int, default=96, help="new tokens per long-context input"
    )
    parser.add_argument("--long-context-prompts", type=int, default=2, help="inputs per long-context length")
    return parser
