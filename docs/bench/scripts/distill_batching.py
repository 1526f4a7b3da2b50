"""Distillation throughput: one `generate` call per batch against a refilling batch, on the same tasks.

Builds the first `--tasks` tasks that `hf-specssm distill generate` would answer on an empty store (the
broad instruction set, greedy and sampled), answers them once per batching into throw-away stores, and
prints answer tokens an hour and how many answers came out token for token equal.

    .venv/bin/python docs/bench/scripts/distill_batching.py --tasks 96 --batch-size 32 --dtype bf16
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--tasks", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-prompt-tokens", type=int, default=384)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--order", nargs="+", default=["static", "refill"], choices=["static", "refill"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_specssm.training.distillation.command import _tasks, add_arguments
    from hf_specssm.training.distillation.generate import run_tasks
    from hf_specssm.training.distillation.instructions import build_broad_instructions
    from hf_specssm.training.distillation.refill import run_tasks_refill
    from hf_specssm.training.distillation.store import DistillStore
    from hf_specssm.training.mamba_drafter.command import _resolve_model_path

    path = _resolve_model_path(args.target)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    target = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    # the task list of `hf-specssm distill generate` with its default shares
    options = add_arguments(argparse.ArgumentParser()).parse_args(
        ["generate", "--max-prompt-tokens", str(args.max_prompt_tokens)]
    )
    with tempfile.TemporaryDirectory() as folder:
        empty = DistillStore(f"{folder}/empty", recipe={})
        tasks, _ = _tasks(options, tokenizer, empty, build_broad_instructions(6000, seed=0))
        tasks = tasks[: args.tasks]
        prompt_tokens = sum(len(task.prompt_ids) for task in tasks)
        print(f"{len(tasks)} tasks, {prompt_tokens} prompt tokens, {args.dtype}, batch {args.batch_size}")
        answers = {}
        for batching in args.order:
            store = DistillStore(f"{folder}/{batching}", recipe={})
            run = run_tasks_refill if batching == "refill" else run_tasks
            started = time.perf_counter()
            count, tokens, _ = run(
                target, tokenizer, tasks, store, args.batch_size, args.max_new_tokens, shard_records=10_000,
                dtype_name=args.dtype,
            )  # fmt: skip
            seconds = time.perf_counter() - started
            answers[batching] = {r["id"]: r["input_ids"][r["prompt_length"] :] for r in store.records()}
            print(
                f"{batching:>7}: {count} answers, {tokens} answer tokens in {seconds:.0f} s = "
                f"{tokens / seconds * 3600:,.0f} tokens/hour ({tokens / seconds:.1f} tok/s)",
                flush=True,
            )
        if len(answers) == 2:
            first, second = answers.values()
            same = sum(first[key] == second.get(key) for key in first)
            print(f"answers equal token for token: {same} of {len(first)}")


if __name__ == "__main__":
    main()
