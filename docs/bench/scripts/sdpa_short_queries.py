"""Attention of a few queries over a long KV cache on CPU: torch's SDPA (flash kernel for CPU, with
`enable_gqa` and with the key/value heads repeated) against two grouped matrix products (each key/value
head's query heads stacked as rows: `[Hkv, G·T, D] @ [Hkv, D, L]`, softmax, `@ [Hkv, L, D]`).

A verification forward attends k + 1 queries to the whole cache; this measures what each way costs at the
shapes of the SSM hybrids' attention layers (Falcon-H1-0.5B: 8 query heads over 2, head size 128) and of
the real target (Qwen2.5-Coder-1.5B: 12 over 2). Run from the repository root on a quiet machine:
`.venv/bin/python docs/bench/scripts/sdpa_short_queries.py` (add `--dtypes float32 bfloat16` where bf16 has
matrix instructions).
"""

import argparse
import os
import time

import torch
import torch.nn.functional as F

parser = argparse.ArgumentParser()
parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
parser.add_argument("--repeats", type=int, default=50)
args = parser.parse_args()
torch.set_num_threads(2)
print(f"load average {os.getloadavg()[0]:.2f} at start")


def milliseconds(function, repeats: int) -> float:
    for _ in range(5):
        function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats * 1e3


SHAPES = [  # (query heads, key/value heads, queries, cached keys)
    (8, 2, 1, 2073),
    (8, 2, 9, 537),
    (8, 2, 9, 2073),
    (12, 2, 7, 600),
    (12, 2, 7, 1500),
]


def row(dtype: torch.dtype, heads: int, kv_heads: int, queries: int, keys: int) -> str:
    """One table row: milliseconds of each way, and their largest difference."""
    group, size = heads // kv_heads, 128
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, queries, size, generator=generator).to(dtype)
    k = torch.randn(1, kv_heads, keys, size, generator=generator).to(dtype)
    v = torch.randn(1, kv_heads, keys, size, generator=generator).to(dtype)
    mask = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)[None, None]
    k_repeated, v_repeated = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

    def grouped():
        scores = torch.matmul(q.view(1, kv_heads, group * queries, size), k.transpose(-1, -2))
        scores = scores.mul_(size**-0.5).view(1, kv_heads, group, queries, keys)
        scores.masked_fill_(~mask[:, :, None], float("-inf"))
        weights = torch.softmax(scores, -1, dtype=torch.float32).to(dtype)
        return torch.matmul(weights.view(1, kv_heads, group * queries, keys), v).view(1, heads, queries, size)

    def gqa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def repeated():
        return F.scaled_dot_product_attention(q, k_repeated, v_repeated, attn_mask=mask)

    difference = (gqa().float() - grouped().float()).abs().max().item()
    times = [milliseconds(function, args.repeats) for function in (gqa, repeated, grouped)]
    cells = " | ".join(f"{t:.3f}" for t in times)
    return f"| {str(dtype).removeprefix('torch.')} | {heads} / {kv_heads} | {queries} | {keys} | {cells} | {difference:.1e} |"


print(
    "| dtype | query / kv heads | queries | keys | SDPA enable_gqa (ms) | SDPA repeated kv | grouped products | max diff |"
)
print("|---|---|---:|---:|---:|---:|---:|---:|")
for name in args.dtypes:
    for shape in SHAPES:
        print(row(getattr(torch, name), *shape))
