"""Verification forwards with transformers' `repeat_kv` vs `_compat.grouped_query_attention` (`enable_gqa`),
alternating in one process (ABBA order per repeat, so a drifting machine reaches both alike).

Run from the repository root:
`.venv/bin/python docs/bench/scripts/grouped_query_ab.py --models falcon-h1-0.5b --dtype float32 --ks 0 8`
(targets from `hf_specssm.tools.bench.ssm_models.TARGET_CONFIGS`, packed linears; or
`qwen2.5-coder-1.5b-instruct` for the real target after `hf-specssm fetch qwen2.5-coder-1.5b-instruct`).
"""

import argparse
import os

import torch
from transformers import AutoModelForCausalLM

import hf_specssm
from hf_specssm._compat import attention
from hf_specssm.tools.bench.ssm import _Run
from hf_specssm.tools.bench.ssm_models import build_target
from hf_specssm.tools.fetch import fetch_model

parser = argparse.ArgumentParser()
parser.add_argument("--models", nargs="+", default=["falcon-h1-0.5b"])
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
parser.add_argument("--ks", nargs="+", type=int, default=[0, 8])
parser.add_argument("--context", type=int, default=512)
parser.add_argument("--repeats", type=int, default=10)
args = parser.parse_args()
torch.set_num_threads(2)
dtype = getattr(torch, args.dtype)
grouped = attention._skips_repeat
print(f"load average {os.getloadavg()[0]:.2f} at start")
for name in args.models:
    if name.startswith("qwen"):
        model = AutoModelForCausalLM.from_pretrained(fetch_model(name, progress=False), dtype=dtype).eval()
    else:
        model = build_target(name, dtype)
        hf_specssm.pack_linears(model)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    seconds: dict[tuple[str, int], list[float]] = {}
    with torch.no_grad():
        run = _Run(model, "ours", args.context, vocab)
        for repeat in range(args.repeats + 1):
            for mode in ("repeat_kv", "enable_gqa") if repeat % 2 else ("enable_gqa", "repeat_kv"):
                attention._skips_repeat = grouped if mode == "enable_gqa" else (lambda *_: False)
                for k in args.ks:
                    elapsed = run.chain(k)[0]
                    if repeat:  # the first pass warms both paths up
                        seconds.setdefault((mode, k), []).append(elapsed)
    attention._skips_repeat = grouped
    for k in args.ks:
        before, after = (sorted(seconds[(mode, k)]) for mode in ("repeat_kv", "enable_gqa"))
        middle = len(before) // 2
        print(
            f"{name} {args.dtype} context {args.context} k={k}: repeat_kv {before[middle] * 1e3:.1f} ms, "
            f"enable_gqa {after[middle] * 1e3:.1f} ms (median of {len(before)}; "
            f"{after[middle] / before[middle] - 1:+.1%}); min {before[0] * 1e3:.1f} / {after[0] * 1e3:.1f} ms"
        )
    del model, run
