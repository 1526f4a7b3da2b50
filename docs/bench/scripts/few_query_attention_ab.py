"""Verification forwards and one-token steps with transformers' SDPA vs the measured choice of
`kernels.few_query_attention` (grouped matrix products where a shape class measured them faster),
alternating in one process (ABBA order per repeat, so a drifting machine reaches both alike).

Run from the repository root on a quiet machine:
`.venv/bin/python docs/bench/scripts/few_query_attention_ab.py --models qwen2.5-coder-1.5b-instruct --dtype bfloat16 --context 1500 --ks 0 6`
(targets from `hf_specssm.tools.bench.ssm_models.TARGET_CONFIGS` are packed; `qwen2.5-coder-1.5b-instruct` is
the real target after `hf-specssm fetch qwen2.5-coder-1.5b-instruct`, stock linears).
"""

import argparse
import os

import torch
from transformers import AutoModelForCausalLM

import hf_specssm
from hf_specssm.kernels.few_query_attention import ENVIRONMENT_SWITCH, PATH_CHOICE
from hf_specssm.tools.bench.ssm import _Run
from hf_specssm.tools.bench.ssm_models import build_target
from hf_specssm.tools.fetch import fetch_model

parser = argparse.ArgumentParser()
parser.add_argument("--models", nargs="+", default=["qwen2.5-coder-1.5b-instruct"])
parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
parser.add_argument("--ks", nargs="+", type=int, default=[0, 6])
parser.add_argument("--context", type=int, default=1500)
parser.add_argument("--repeats", type=int, default=8)
args = parser.parse_args()
torch.set_num_threads(2)
dtype = getattr(torch, args.dtype)
print(f"load average {os.getloadavg()[0]:.2f} at start")
for name in args.models:
    if name.startswith("qwen"):
        model = AutoModelForCausalLM.from_pretrained(fetch_model(name, progress=False), dtype=dtype).eval()
    else:
        model = build_target(name, dtype)
        hf_specssm.pack_linears(model)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    PATH_CHOICE.clear()
    seconds: dict[tuple[str, int], list[float]] = {}
    with torch.no_grad():
        run = _Run(model, "ours", args.context, vocab)
        for repeat in range(args.repeats + 1):
            for mode in ("sdpa", "auto") if repeat % 2 else ("auto", "sdpa"):
                os.environ[ENVIRONMENT_SWITCH] = mode
                for k in args.ks:
                    elapsed = run.chain(k)[0]
                    if repeat:  # the first pass warms both paths up and measures the shape classes
                        seconds.setdefault((mode, k), []).append(elapsed)
    os.environ.pop(ENVIRONMENT_SWITCH)
    for k in args.ks:
        before, after = (sorted(seconds[(mode, k)]) for mode in ("sdpa", "auto"))
        middle = len(before) // 2
        print(
            f"{name} {args.dtype} context {args.context} k={k}: SDPA {before[middle] * 1e3:.1f} ms, "
            f"measured choice {after[middle] * 1e3:.1f} ms (median of {len(before)}; "
            f"{after[middle] / before[middle] - 1:+.1%}); min {before[0] * 1e3:.1f} / {after[0] * 1e3:.1f} ms"
        )
    for shape, measurement in sorted(PATH_CHOICE.measurements.items(), key=str):
        queries, keys = 2 ** shape[-2], 2 ** shape[-1]
        print(
            f"  ≤{queries} queries over ≤{keys} keys ({shape[2]}/{shape[3]} heads): SDPA "
            f"{measurement.sdpa_s * 1e3:.3f} ms, grouped {measurement.grouped_s * 1e3:.3f} ms -> "
            f"{'grouped' if measurement.grouped_wins else 'SDPA'}"
        )
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    del model, run
