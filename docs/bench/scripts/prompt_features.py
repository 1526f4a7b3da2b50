"""The target's last hidden states over chats' prompts, for `feature_sequence_probe.py --context prompt`.

A distill store keeps the hidden states of answer positions only (`distill label`). A drafter that attends
over the target's features (EAGLE-style) would also see the prompt's at run time, since the target's
prefill computes them; this script computes them for the chats the probe reads — the benchmark answers
(`--bench-store`), the store's held-out greedy chats, then up to `--train` training chats in the probe's
seeded order — one prompt per forward (no padding), and writes each as `[P, H]` float16 to
`<out>/<key>.npy` (`key`: sha1 of the prompt's ids), atomically. A rerun skips what exists, so an
interrupted run continues; `--hours` bounds one run.

Each prompt's last row is the hidden state that chose the answer's first token, which the store already
holds (`hidden[0]`, from a forward over prompt and answer): the largest difference between the two is
printed as a check.

    .venv/bin/python docs/bench/scripts/prompt_features.py --train 600 --hours 0.6
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from hf_specssm.training.distillation.store import DistillStore
from hf_specssm.training.mamba_drafter.command import _resolve_model_path
from hf_specssm.training.mamba_drafter.finetune import heldout_greedy, load_examples


def prompt_key(ids: torch.Tensor, prompt_length: int) -> str:
    """The file stem of a prompt's features: sha1 of its `prompt_length` ids as int64 bytes."""
    return hashlib.sha1(ids[:prompt_length].to(torch.int64).numpy().tobytes()).hexdigest()[:20]


def seeded_order(count: int) -> list[int]:
    """The order in which the probe takes training chats (its `--train` subset is a prefix of it)."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(0)).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="artifacts/distill/qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--bench-store", default="artifacts/finetune/bench-answers")
    parser.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--train", type=int, default=600, help="training chats, in the probe's seeded order")
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="artifacts/probe-prompt-features")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.hours * 3600

    store = DistillStore(args.store)
    bench = load_examples(DistillStore(args.bench_store), "all", need_hidden=True)
    heldout = heldout_greedy(store, need_hidden=True, limit=200)
    train = load_examples(store, "train", need_hidden=True)
    chosen = [train[i] for i in seeded_order(len(train))[: args.train]]
    todo = [
        e
        for e in bench + heldout + chosen
        if not (out / f"{prompt_key(e.ids, e.prompt_length)}.npy").exists()
    ]
    print(
        f"{len(bench)} bench, {len(heldout)} held out, {len(chosen)} training chats; {len(todo)} to compute",
        flush=True,
    )

    target = AutoModelForCausalLM.from_pretrained(_resolve_model_path(args.target), dtype=torch.bfloat16)
    base = getattr(target, target.base_model_prefix)
    started, tokens, worst = time.time(), 0, 0.0
    for index, example in enumerate(todo):
        if time.time() > deadline:
            print(f"deadline: {index} of {len(todo)} computed; rerun to continue", flush=True)
            break
        prompt = example.ids[: example.prompt_length]
        with torch.no_grad():
            states = base(input_ids=prompt[None], use_cache=False).last_hidden_state[0]  # [P, H]
        rows = states.to(torch.float16).numpy()
        worst = max(worst, float((states[-1].float() - example.hidden[0].float()).abs().max()))
        path = out / f"{prompt_key(example.ids, example.prompt_length)}.npy"
        temporary = path.with_suffix(".tmp")
        with open(temporary, "wb") as sink:
            np.save(sink, rows)
        os.replace(temporary, path)
        tokens += prompt.numel()
        if (index + 1) % 20 == 0:
            seconds = time.time() - started
            print(
                f"{index + 1}/{len(todo)}  {tokens:,} prompt tokens in {seconds:.0f} s "
                f"({tokens / seconds:.0f}/s); last row vs stored hidden[0]: max |diff| {worst:.3f}",
                flush=True,
            )
    print(
        f"done: {tokens:,} prompt tokens in {time.time() - started:.0f} s; max |diff| {worst:.3f}", flush=True
    )


if __name__ == "__main__":
    main()
