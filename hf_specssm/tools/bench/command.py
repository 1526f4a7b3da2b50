"""`hf-specssm bench`: methods × prompt sets × modes on real models, in one process, with a report.

Writes into `--out`: `results.jsonl` (one row per prompt, method and mode; resumed), `summary.md` (tables),
`speedups.png`, and with `--long-context`: `long_context.jsonl`, `long_context.md`, `long_context.png`.
`--toy` runs the same harness on random-weight demo models, offline.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from hf_specssm.tools.bench.prompt_sets import PROMPT_SETS

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MAMBA_DRAFTER = "checkpoints/mamba2-qwen2.5-coder"
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
    "ours-prompt-lookup",
)


def cpu_flags() -> str:
    """The CPU features that decide how verification cost scales with the number of tokens."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return platform.processor() or "unknown"
    wanted = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")
    return ",".join(flag for flag in wanted if flag in flags) or "none of " + "/".join(wanted)


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
    """

    target: Any
    tokenizer: Any
    tokenize: Callable
    small: Any
    mamba: Any
    name: str


def load_models(args: argparse.Namespace) -> BenchModels:
    """Load (fetching when needed) the models the arguments name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_specssm  # noqa: F401 - registers the Mamba drafter with the Auto classes
    from hf_specssm.tools.bench.prompt_sets import render
    from hf_specssm.training.mamba_drafter.command import _resolve_model_path

    device = torch.device(args.device)
    if args.toy:
        from hf_specssm.testing.toy import demo_pair, demo_transformer_drafter

        target, mamba = demo_pair(seed=args.seed)
        small = demo_transformer_drafter(target)
        vocab = target.config.vocab_size

        def tokenize_toy(prompt):
            ids = [1 + byte % (vocab - 1) for byte in prompt.text.encode("utf-8")[: args.toy_prompt_bytes]]
            return torch.tensor([ids], device=device)

        return BenchModels(
            target.to(device),
            None,
            tokenize_toy,
            small.to(device),
            mamba.to(device),
            "toy Llama 110M (random)",
        )
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    target_path = _resolve_model_path(args.target)
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=dtype).to(device).eval()
    small = None
    if args.small_drafter.lower() != "none":
        small_path = _resolve_model_path(args.small_drafter)
        small = AutoModelForCausalLM.from_pretrained(small_path, dtype=dtype).to(device).eval()
    mamba = None
    mamba_path = resolve_drafter_path(args.mamba_drafter)
    if mamba_path is not None:
        mamba_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.mamba_dtype]
        mamba = AutoModelForCausalLM.from_pretrained(mamba_path, dtype=mamba_dtype).to(device).eval()

    def tokenize(prompt):
        return torch.tensor([render(tokenizer, prompt)], device=device)

    return BenchModels(
        target, tokenizer, tokenize, small, mamba, Path(str(target_path)).parent.name or args.target
    )


def run(args: argparse.Namespace) -> int:
    """Carry out a parsed `bench` command line."""
    from hf_specssm.tools.bench.harness import BenchContext, read_rows, run_benchmark
    from hf_specssm.tools.bench.long_context import long_context_table, run_long_context
    from hf_specssm.tools.bench.methods import GenerationSettings, standard_methods
    from hf_specssm.tools.bench.prompt_sets import load_prompt_set
    from hf_specssm.tools.bench.report import markdown_tables, plot_long_context, plot_speedups, summarize

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, long_results = out / "results.jsonl", out / "long_context.jsonl"
    if not args.report_only:
        if args.quiet:
            transformers.utils.logging.disable_progress_bar()
        models = load_models(args)
        target, small, mamba = models.target, models.small, models.mamba
        context = BenchContext(
            target=models.name, dtype="fp32" if args.toy else args.dtype, device=device_label(target.device)
        )
        print(
            f"hf_specssm bench · {models.name} · {context.dtype} · {context.device} · torch {torch.__version__}"
        )
        methods = standard_methods(target, small, mamba, tree_shape=tuple(args.tree_shape))
        if args.methods:
            unknown = set(args.methods) - {m.name for m in methods}
            if unknown:
                print(
                    f"error: unknown or unavailable methods {sorted(unknown)}; have {[m.name for m in methods]}"
                )
                return 2
            methods = [m for m in methods if m.name in args.methods or m.name == "target"]
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
            )
        if args.long_context:
            import hf_specssm
            from hf_specssm.tools.bench.methods import ours

            if models.tokenizer is None:
                print("the long-context check needs a tokenizer; skipped with --toy")
            else:
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
        _report(out / "summary.md", markdown_tables(summaries, METHOD_ORDER), plot_speedups, summaries,
                out / "speedups.png", METHOD_ORDER)  # fmt: skip
    long_rows = read_rows(long_results)
    if long_rows:
        _report(out / "long_context.md", long_context_table(long_rows), plot_long_context, long_rows,
                out / "long_context.png")  # fmt: skip
    return 0


def _report(table_path: Path, table: str, plot: Callable, data, plot_path: Path, *plot_args) -> None:
    """Write and print a Markdown table, then its plot (skipped, and said, without matplotlib)."""
    table_path.write_text(table)
    print(table)
    try:
        print(f"plot: {plot(data, plot_path, *plot_args)}")
    except ImportError:
        print("matplotlib is not installed (extra [bench]): no plot")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `bench` options."""
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
    parser.add_argument("--mamba-dtype", choices=["bf16", "fp32"], default="fp32")
    parser.add_argument("--sets", nargs="+", choices=PROMPT_SETS, default=list(PROMPT_SETS))
    parser.add_argument("--limit", type=int, default=4, help="prompts per set")
    parser.add_argument("--offset", type=int, default=0, help="skip this many prompts of each set")
    parser.add_argument("--methods", nargs="+", help="subset of the methods (the target alone always runs)")
    parser.add_argument("--modes", nargs="+", choices=["greedy", "sample"], default=["greedy"])
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--tree-shape", type=int, nargs="+", default=[3, 2, 1, 1, 1])
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default="artifacts/bench")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from --out")
    parser.add_argument(
        "--long-context", type=int, nargs="*", default=[], help="input lengths, e.g. 1024 2048 4096 8192"
    )
    parser.add_argument("--long-context-only", action="store_true")
    parser.add_argument("--long-context-tokens", type=int, default=96)
    parser.add_argument("--long-context-prompts", type=int, default=2)
    return parser
