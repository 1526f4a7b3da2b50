"""What one draft token costs: the shipped ReDrafter head against the attending layer of
`feature_sequence_probe.py` (one decoder layer of the target's width over a cache of the target's features).

Each draft of a chain is one row through the drafter. The head: one recurrent step and its two 640-wide
blocks and output rows; the attending layer: `fc`, one query over `--keys` cached keys and values, the
layer's MLP, the norm and 16,383 output rows. Both in the dtype given, medians of `--repeats` timings of
`--drafts` drafts each, one process, beside one decode step of the target itself for scale.

    .venv/bin/python docs/bench/scripts/draft_step_cost.py --dtype bf16 --keys 300 1500
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache

from hf_specssm.drafters.redrafter.modeling import ReDrafterHead
from hf_specssm.training.mamba_drafter.command import _resolve_model_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from feature_sequence_probe import FeatureSequenceHead  # a sibling script


def median_ms(run, repeats: int) -> float:
    run()  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--head", default="checkpoints/redrafter-qwen2.5-coder")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--keys", type=int, nargs="+", default=[300, 1500])
    parser.add_argument("--drafts", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    target = AutoModelForCausalLM.from_pretrained(_resolve_model_path(args.target), dtype=dtype).eval()
    hidden_size = target.config.hidden_size
    head = ReDrafterHead.from_pretrained(args.head).to(dtype).eval().attach(target)
    layer = FeatureSequenceHead(target, torch.arange(1, 16384)).to(dtype).eval()
    print(
        f"{args.target}, {args.dtype}, {args.threads} threads, {args.drafts} drafts, median of {args.repeats}"
    )

    feature = torch.randn(1, hidden_size, dtype=dtype)
    token = torch.tensor([100])

    def head_chain() -> None:
        state = head.initial_state(1)
        current = token
        for _ in range(args.drafts):
            state = head.next_state(state, current)
            current = head.output_logits(feature, state).argmax(-1)

    print(f"  ReDrafter head, chain of {args.drafts}: {median_ms(head_chain, args.repeats):7.2f} ms")
    for keys in args.keys:
        cache_k = torch.randn(1, layer.heads, keys, layer.head_dim, dtype=dtype)
        cache_v = torch.randn_like(cache_k)
        run = partial(layer_chain, layer, cache_k, cache_v, feature, token, args.drafts)
        print(
            f"  attending layer over {keys:5d} keys, chain of {args.drafts}: {median_ms(run, args.repeats):7.2f} ms"
        )
        cache = DynamicCache(config=target.config)
        target(torch.randint(100, 1000, (1, keys)), past_key_values=cache, use_cache=True)
        run = partial(target_step, target, cache, token)
        print(f"  the target's own decode step at {keys:5d} tokens: {median_ms(run, args.repeats):7.2f} ms")


def layer_chain(layer, cache_k, cache_v, feature, token, drafts: int) -> None:
    """`drafts` drafts of the attending layer after `cache_k, cache_v [1, nh, L, d]`, feeding its own
    predicted features and argmax tokens."""
    k_all, v_all, own, current = cache_k, cache_v, feature, token
    for step in range(drafts):
        x = layer.inputs(own[:, None], current[:, None])  # [1, 1, H]
        q, k, v = layer.qkv(x, torch.tensor([[cache_k.shape[2] + step]]))
        k_all, v_all = torch.cat([k_all, k], 2), torch.cat([v_all, v], 2)
        predicted, logits = layer.finish(x, F.scaled_dot_product_attention(q, k_all, v_all))
        own, current = predicted[:, 0], logits[:, 0].argmax(-1)


def target_step(target, cache, token) -> None:
    """One decode step of the target after its cached tokens (the step's token cropped off after)."""
    target(token[None], past_key_values=cache, use_cache=True)
    cache.crop(-1)  # drop the step's token (a negative count: transformers 5.23 refuses a positive length)


if __name__ == "__main__":
    main()
