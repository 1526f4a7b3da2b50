"""Speculative `generate` of the real pair with transformers' SDPA vs the measured few-query attention
path (`HF_SPECSSM_FEW_QUERY_ATTENTION` flipped between calls), alternating per prompt in one process (ABBA),
beside the target alone (transformers' plain `generate`, which neither setting touches).

Run from the repository root on a quiet machine, after `hf-specssm fetch qwen2.5-coder-1.5b-instruct`:
`.venv/bin/python docs/bench/scripts/few_query_attention_e2e.py --sets humaneval mt_bench --limit 2`
(or `--long-context 1500`: two code files cut to that many tokens, as `hf-specssm bench --long-context` has them)
"""

import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_specssm
from hf_specssm.kernels.few_query_attention import ENVIRONMENT_SWITCH
from hf_specssm.tools.bench.long_context import long_inputs
from hf_specssm.tools.bench.prompt_sets import load_prompt_set, render
from hf_specssm.tools.fetch import fetch_model

parser = argparse.ArgumentParser()
parser.add_argument("--sets", nargs="+", default=["humaneval", "mt_bench"])
parser.add_argument("--limit", type=int, default=2)
parser.add_argument(
    "--long-context", type=int, default=0, help="instead of the sets: 2 code inputs of this many tokens"
)
parser.add_argument("--max-new-tokens", type=int, default=96)
parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
parser.add_argument("--head", default="checkpoints/redrafter-qwen2.5-coder")
args = parser.parse_args()
torch.set_num_threads(2)
print(f"load average {os.getloadavg()[0]:.2f} at start")
folder = fetch_model("qwen2.5-coder-1.5b-instruct", progress=False)
tokenizer = AutoTokenizer.from_pretrained(folder)
target = hf_specssm.enable(
    AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()
)
head = AutoModelForCausalLM.from_pretrained(args.head, dtype=getattr(torch, args.dtype))
drafter = hf_specssm.ReDrafterDrafter(head, target, beam_width=1)  # the head alone: a chain, no copy branch
options = {"max_new_tokens": args.max_new_tokens, "do_sample": False}


def timed(**extra) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    output = target.generate(ids, **options, **extra)
    return output, time.perf_counter() - start


seconds: dict[str, list[float]] = {"target": [], "sdpa": [], "auto": []}
tokens = 0
if args.long_context:
    inputs = long_inputs(tokenizer, args.long_context)
else:
    inputs = [
        (f"{p.set} {p.id}", render(tokenizer, p))
        for set_name in args.sets
        for p in load_prompt_set(set_name, args.limit)
    ]
for number, (name, input_ids) in enumerate(inputs):
    ids = torch.tensor([input_ids])
    plain, elapsed = timed()
    seconds["target"].append(elapsed)
    new = plain.shape[1] - ids.shape[1]
    tokens += new
    outputs = {}
    for mode in ("sdpa", "auto", "auto", "sdpa") if number % 2 else ("auto", "sdpa", "sdpa", "auto"):
        os.environ[ENVIRONMENT_SWITCH] = mode
        outputs[mode], elapsed = timed(assistant_model=drafter)
        seconds[mode].append(elapsed / 2)  # two calls per mode and prompt
    same = {mode: torch.equal(output, plain) for mode, output in outputs.items()}
    print(
        f"{name}: {ids.shape[1]} prompt tokens, {new} new; identical to plain {same}",
        flush=True,
    )
os.environ.pop(ENVIRONMENT_SWITCH)
total = {mode: sum(values) for mode, values in seconds.items()}
for mode in ("target", "sdpa", "auto"):
    print(
        f"{mode:>6}: {tokens / total[mode]:.2f} tok/s, {total['target'] / total[mode]:.2f}× the target alone"
        + ("" if mode != "auto" else f", {total['sdpa'] / total['auto'] - 1:+.1%} against SDPA")
    )
print(f"load average {os.getloadavg()[0]:.2f} at end")
