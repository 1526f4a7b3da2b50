"""Calls as users write them: `target.generate(ids, assistant_model=<a model>)` once per prompt, the same
assistant model each time, against the target alone on the same prompt right before.

Each call wraps the assistant model in a new drafter; what the draft-length policy and the draft gate
learned in earlier calls carries over only where hf_specssm keeps it (`generation._with_kept_learning`).
Prints per call: tokens per second of both, the speed-up, τ (tokens per target forward) and how many rounds
drafted nothing (the draft gate closed, or measuring the alternative).

Run from the repository root after `hf-specssm fetch qwen2.5-coder-1.5b-instruct`:
`.venv/bin/python docs/bench/scripts/assistant_calls.py --dtype float32 --sets mt_bench gsm8k --limit 3`
(another checkout's code: `PYTHONPATH=<checkout> .venv/bin/python docs/bench/scripts/assistant_calls.py …`).
"""

import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_specssm
from hf_specssm.tools.bench.prompt_sets import PUBLIC_SETS, load_prompt_set, render
from hf_specssm.tools.fetch import fetch_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
parser.add_argument("--drafter", default="mamba2-qwen2.5-coder", help="a shipped drafter's name")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
parser.add_argument("--sets", nargs="+", default=list(PUBLIC_SETS))
parser.add_argument("--limit", type=int, default=3)
parser.add_argument("--max-new-tokens", type=int, default=64)
args = parser.parse_args()
torch.set_num_threads(2)
print(
    f"hf_specssm from {os.path.dirname(hf_specssm.__file__)}; load average {os.getloadavg()[0]:.2f} at start"
)
dtype = getattr(torch, args.dtype)
folder = fetch_model(args.model, progress=False)
tokenizer = AutoTokenizer.from_pretrained(folder)
target = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
assistant = AutoModelForCausalLM.from_pretrained(
    hf_specssm.shipped_drafter_path(args.drafter), dtype=dtype
).eval()
hf_specssm.enable(target)
settings = {"max_new_tokens": args.max_new_tokens, "do_sample": False}


def timed(**kwargs) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = target.generate(input_ids, **settings, **kwargs)
    return out, time.perf_counter() - start


totals = {"plain": 0.0, "ours": 0.0, "tokens": 0}
for name in args.sets:
    for prompt in load_prompt_set(name, limit=args.limit):
        input_ids = torch.tensor([render(tokenizer, prompt)])
        plain, plain_s = timed()
        out, ours_s = timed(assistant_model=assistant)
        stats = target.last_speculation_stats
        new = out.shape[1] - input_ids.shape[1]
        assert new == plain.shape[1] - input_ids.shape[1]
        undrafted = sum(1 for length in stats.draft_lengths if length == 0)
        totals["plain"] += plain_s
        totals["ours"] += ours_s
        totals["tokens"] += new
        print(
            f"{name:9s} {prompt.id:14s} plain {new / plain_s:5.2f} tok/s  ours {new / ours_s:5.2f} tok/s  "
            f"{plain_s / ours_s:4.2f}x  tau {new / max(stats.forward_passes, 1):4.2f}  "
            f"undrafted {undrafted}/{stats.rounds} rounds  same {torch.equal(out, plain)}",
            flush=True,
        )
print(
    f"all: plain {totals['tokens'] / totals['plain']:.2f} tok/s, ours {totals['tokens'] / totals['ours']:.2f} tok/s, "
    f"{totals['plain'] / totals['ours']:.2f}x; load average {os.getloadavg()[0]:.2f} at the end"
)
