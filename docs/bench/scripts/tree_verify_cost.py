"""What a tree round costs the real target against a chain round: the verification forward of chains, of
trees that are one path, and of two-branch trees (a model's chain beside a prompt-lookup copy, as
`ContextCopyDrafter(chain_rounds="both")` drafts them), and the commit of a path that is the tree's first
nodes (a crop) or another branch (a gather of every layer's keys and values).

Cases run in turn within each repeat, so a drifting machine reaches all alike; medians are printed.

Run from the repository root after `hf-specssm fetch qwen2.5-coder-1.5b-instruct`:
`.venv/bin/python docs/bench/scripts/tree_verify_cost.py --context 600 --repeats 7`
"""

import argparse
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from hf_specssm.drafters.base import Draft
from hf_specssm.targets.attention import AttentionTarget
from hf_specssm.tools.fetch import fetch_model
from hf_specssm.tree import TokenTree

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
parser.add_argument("--context", type=int, default=600)
parser.add_argument("--repeats", type=int, default=7)
args = parser.parse_args()
torch.set_num_threads(2)
print(f"load average {os.getloadavg()[0]:.2f} at start")
model = AutoModelForCausalLM.from_pretrained(
    fetch_model(args.model, progress=False), dtype=getattr(torch, args.dtype)
)
model.eval()
generator = torch.Generator().manual_seed(0)
vocab = model.config.vocab_size


def tokens(count: int) -> torch.Tensor:
    return torch.randint(100, vocab - 100, (count,), generator=generator)


def branches(first: int, second: int) -> TokenTree:
    """A chain of `first` nodes (0 … first - 1) and, from the root, a second chain of `second` nodes."""
    parents = list(range(-1, first - 1)) + ([-1, *range(first, first + second - 1)] if second else [])
    return TokenTree(tokens=tokens(first + second), parents=torch.tensor(parents))


# (name, proposal, verify as a tree even when it is one path, kept path)
CASES = [
    ("chain 6", lambda: Draft(tokens=tokens(6)[None]), False, [0, 1, 2]),
    ("chain 12", lambda: Draft(tokens=tokens(12)[None]), False, [0, 1, 2]),
    ("chain 18", lambda: Draft(tokens=tokens(18)[None]), False, [0, 1, 2]),
    ("one-path tree 12, tree forward", lambda: branches(12, 0), True, [0, 1, 2]),
    ("one-path tree 12, as a chain", lambda: branches(12, 0), False, [0, 1, 2]),
    ("two branches 6 + 6, first kept", lambda: branches(6, 6), False, [0, 1, 2]),
    ("two branches 6 + 6, second kept", lambda: branches(6, 6), False, [6, 7, 8]),
    ("two branches 6 + 12, first kept", lambda: branches(6, 12), False, [0, 1, 2]),
    ("two branches 6 + 12, second kept", lambda: branches(6, 12), False, [6, 7, 8]),
]
sequence = torch.randint(100, vocab - 100, (1, args.context), generator=generator)
target = AttentionTarget(model)
seconds: dict[str, list[tuple[float, float]]] = {name: [] for name, *_ in CASES}
with torch.no_grad():
    target.prefill([sequence])
    for repeat in range(args.repeats + 1):
        for name, make, as_tree, kept in CASES:
            proposal = make()
            start = time.perf_counter()
            if as_tree:
                target._round = (True, sequence.shape[1])
                target.score_tree(sequence, proposal)
            else:
                target.verify([sequence], [proposal])
            verified = time.perf_counter()
            target.commit([kept])
            committed = time.perf_counter()
            target.keep(sequence.shape[1] - 1)  # back to the prefilled cache
            if repeat:  # the first repeat warms up
                seconds[name].append((verified - start, committed - verified))
print(f"{args.model}, {args.dtype}, {args.context} tokens of context, median of {args.repeats}:")
for name, pairs in seconds.items():
    verify = statistics.median(v for v, _ in pairs) * 1000
    commit = statistics.median(c for _, c in pairs) * 1000
    print(f"  {name:36s} verify {verify:6.1f} ms   commit {commit:5.2f} ms")
print(f"load average {os.getloadavg()[0]:.2f} at the end")
