"""Chain vs tree drafting on the offline demo pair (`hf-specssm bench-trees`).

Same process, same prompts, same new tokens; greedy; every speculative output is checked against plain
decoding. Random-weight demo models (`hf_specssm.testing.toy.demo_pair`): timings are real, acceptance is built in.
"""

from __future__ import annotations

import argparse
import time

import torch

import hf_specssm
from hf_specssm.policies.tree_shape import DynamicTreePolicy, UCBTreePolicy
from hf_specssm.testing.toy import demo_pair

METHODS: dict[str, dict | None] = {
    "plain": None,
    "chain, adaptive": {},
    "chain, k=5": {"num_draft_tokens": 5, "schedule": "constant"},
    "tree (1,1,1,1,1)": {"tree_shape": (1, 1, 1, 1, 1)},
    "tree (2,2,2,1,1,1)": {"tree_shape": (2, 2, 2, 1, 1, 1)},
    "tree (3,2,2,1,1)": {"tree_shape": (3, 2, 2, 1, 1)},
    "UCB bandit over DEFAULT_ARMS": {"tree_policy": "ucb"},
    "dynamic (EAGLE-2), depth 5, top-3, 12 nodes": {"tree_policy": "dynamic"},
}


def run(args: argparse.Namespace) -> int:
    """Print one Markdown row per method."""
    import resource

    torch.set_num_threads(args.threads)
    target, drafter_model = demo_pair(head_noise=args.head_noise)
    hf_specssm.enable(target)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 512, (1, length), generator=generator) for length in args.prompt_lengths]
    target.generate(prompts[0], max_new_tokens=4)
    references = [target.generate(prompt, max_new_tokens=args.max_new_tokens) for prompt in prompts]
    print("| method | tok/s | speed-up | τ | nodes verified per round | identical |")
    print("|---|---:|---:|---:|---:|:---:|")
    plain_rate = None
    bandit = None
    for name, options in METHODS.items():
        if options is not None and options.get("tree_policy") == "ucb":
            bandit = UCBTreePolicy()
            options = {"tree_policy": bandit}
        elif options is not None and options.get("tree_policy") == "dynamic":
            options = {"tree_policy": DynamicTreePolicy(depth=5, top_k=3, max_nodes=12)}
        drafter = hf_specssm.ModelDrafter(drafter_model, **options) if options is not None else None
        if drafter is not None:
            target.generate(prompts[0], assistant_model=drafter, max_new_tokens=4)
        seconds, new_tokens, rounds, drafted, identical = 0.0, 0, 0, 0, True
        for prompt, reference in zip(prompts, references):
            start = time.perf_counter()
            if drafter is None:
                output = target.generate(prompt, max_new_tokens=args.max_new_tokens)
            else:
                output = target.generate(prompt, assistant_model=drafter, max_new_tokens=args.max_new_tokens)
            seconds += time.perf_counter() - start
            identical &= torch.equal(output, reference)
            if drafter is None:
                new_tokens += args.max_new_tokens
                rounds += args.max_new_tokens
            else:
                stats = target.last_speculation_stats
                new_tokens, rounds, drafted = (
                    new_tokens + stats.new_tokens,
                    rounds + stats.rounds,
                    drafted + stats.drafted_tokens,
                )
        rate = new_tokens / seconds
        plain_rate = plain_rate or rate
        print(
            f"| {name} | {rate:.1f} | {rate / plain_rate:.2f}× | {new_tokens / rounds:.2f} | "
            f"{drafted / rounds:.1f} | {'yes' if identical else 'NO'} |",
            flush=True,
        )
    if bandit is not None:
        pulls = ", ".join(f"{arm}: {count}" for arm, count in zip(bandit.arms, bandit.counts))
        print(f"\nbandit pulls per arm (it learns across the prompts): {pulls}")
    print(f"\npeak process memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `hf-specssm bench-trees`."""
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt")
    parser.add_argument(
        "--prompt-lengths", type=int, nargs="+", default=[12, 48, 160], help="one random prompt per length"
    )
    parser.add_argument(
        "--head-noise",
        type=float,
        default=0.05,
        help="drafter/target disagreement knob (0.05: ~85%% acceptance)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
