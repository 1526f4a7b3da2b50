"""Tree verification on SSM targets: tree scan vs per-path rows vs sequential steps, and chain vs tree
end to end (`python -m hf_specssm.tools.bench.tree_scan`).

Part A times one verification of a tree of `N` nodes on random-weight Mamba2 targets, three ways:
the tree scan (one forward, `tree_scan.tree_verification`), one batch row per root-to-leaf path
(`tree_scan.score_tree_by_paths`, shared prefixes recomputed) and `N` sequential single-token steps.
Part B runs greedy generation with chains and trees on a Mamba2 and a Bamba (hybrid) target with an
aligned random drafter (`toy.align_for_agreement`), and checks every output against plain decoding.
Random weights: timings are real, acceptance is built in.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from transformers import BambaConfig, BambaForCausalLM, Mamba2Config, Mamba2ForCausalLM

import hf_specssm
from hf_specssm.cache import ForkableCache
from hf_specssm.ssm.tree_scan import forward_parents, score_tree_by_paths, tree_verification
from hf_specssm.testing.toy import align_for_agreement
from hf_specssm.tree import TokenTree

VOCAB = 512


def mamba2(hidden: int, layers: int, seed: int = 0) -> Mamba2ForCausalLM:
    """A random fp32 Mamba2 LM: head_dim 64, state 64, `hidden` model width."""
    torch.manual_seed(seed)
    config = Mamba2Config(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_heads=2 * hidden // 64,
        head_dim=64, state_size=64, n_groups=1, expand=2, chunk_size=64, tie_word_embeddings=False,
    )  # fmt: skip
    return Mamba2ForCausalLM(config).eval()


def bamba(hidden: int, layers: int, seed: int = 0) -> BambaForCausalLM:
    """A random fp32 Bamba hybrid: one attention layer in four."""
    torch.manual_seed(seed)
    config = BambaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
        attn_layer_indices=list(range(1, layers, 4)), mamba_n_heads=2 * hidden // 64, mamba_d_head=64,
        mamba_n_groups=1, mamba_d_state=64, mamba_chunk_size=64, tie_word_embeddings=False,
    )  # fmt: skip
    return BambaForCausalLM(config).eval()


def binary_tree(size: int, generator: torch.Generator) -> TokenTree:
    """A complete binary tree of `size` nodes (breadth first), random tokens."""
    parents = torch.tensor([-1, -1, *[(node - 2) // 2 for node in range(2, size)]])[:size]
    return TokenTree(tokens=torch.randint(3, VOCAB, (size,), generator=generator), parents=parents)


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _time_tree(model, cache: ForkableCache, root: torch.Tensor, tree: TokenTree, repeats: int) -> list[float]:
    """Median ms of one verification of `tree` by tree scan, by per-path rows and by sequential steps."""
    tokens = torch.cat([root, tree.tokens[None]], dim=1)
    parents = forward_parents(tree, 1)
    stepped = copy.deepcopy(cache)

    def scan():
        with tree_verification(model, cache, parents):
            model(tokens, cache_params=cache, use_cache=True)

    def rows():
        score_tree_by_paths(model, cache, root, tree)

    def steps():
        for token in tree.tokens.tolist():
            model(torch.tensor([[token]]), cache_params=stepped, use_cache=True)

    return [_median_ms(fn, repeats) for fn in (scan, rows, steps)]


@torch.no_grad()
def part_a(args: argparse.Namespace) -> None:
    """Verification time of an `N`-node tree, three ways (median of `--repeats`)."""
    print("| model | N | depth | leaves | tree scan ms | per-path rows ms | N sequential steps ms | rows / scan | steps / scan |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    generator = torch.Generator().manual_seed(0)
    for hidden, layers in args.sizes:
        model = mamba2(hidden, layers)
        cache = ForkableCache(model.config)
        prompt = torch.randint(3, VOCAB, (1, args.prompt_length), generator=generator)
        model(prompt[:, :-1], cache_params=cache, use_cache=True)
        cache.advance(prompt.shape[1] - 1)
        root = prompt[:, -1:]
        for size in args.nodes:
            tree = binary_tree(size, generator)
            scan_ms, rows_ms, steps_ms = _time_tree(model, cache, root, tree, args.repeats)
            leaves = sum(1 for node in range(size) if not tree.children(node))
            print(
                f"| Mamba2 h={hidden} L={layers} | {size} | {int(tree.depths().max())} | {leaves} | "
                f"{scan_ms:.1f} | {rows_ms:.1f} | {steps_ms:.1f} | {rows_ms / scan_ms:.2f}× | "
                f"{steps_ms / scan_ms:.2f}× |",
                flush=True,
            )


METHODS: dict[str, dict | None] = {
    "plain": None,
    "chain, k=4": {"num_draft_tokens": 4, "schedule": "constant"},
    "tree (1,1,1,1)": {"tree_shape": (1, 1, 1, 1)},
    "tree (2,2,1,1)": {"tree_shape": (2, 2, 1, 1)},
    "tree (3,2,2,1,1)": {"tree_shape": (3, 2, 2, 1, 1)},
}


@torch.no_grad()
def part_b(args: argparse.Namespace) -> None:
    """Greedy tokens/s, plain vs chain vs tree, on an SSM and a hybrid target."""
    print("| target | method | tok/s | speed-up | τ | nodes verified per round | identical |")
    print("|---|---|---:|---:|---:|---:|:---:|")
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (1, length), generator=generator) for length in args.prompt_lengths]
    for name, build in (("Mamba2", mamba2), ("Bamba", bamba)):
        target = hf_specssm.enable(build(args.target_hidden, args.target_layers))
        drafter_model = mamba2(args.target_hidden, 2, seed=1)
        align_for_agreement(target, drafter_model, head_noise=args.head_noise, seed=0)
        references = [target.generate(prompt, max_new_tokens=args.max_new_tokens) for prompt in prompts]
        plain_rate = None
        for method, options in METHODS.items():
            drafter = hf_specssm.ModelDrafter(drafter_model, **options) if options is not None else None
            kwargs = {"assistant_model": drafter} if drafter is not None else {}
            target.generate(prompts[0], max_new_tokens=4, **kwargs)
            seconds, new_tokens, rounds, drafted, identical = 0.0, 0, 0, 0, True
            for prompt, reference in zip(prompts, references):
                start = time.perf_counter()
                output = target.generate(prompt, max_new_tokens=args.max_new_tokens, **kwargs)
                seconds += time.perf_counter() - start
                identical &= torch.equal(output, reference)
                if drafter is None:
                    new_tokens, rounds = new_tokens + args.max_new_tokens, rounds + args.max_new_tokens
                else:
                    stats = target.last_speculation_stats
                    new_tokens += stats.new_tokens
                    rounds += stats.rounds
                    drafted += stats.drafted_tokens
            rate = new_tokens / seconds
            plain_rate = plain_rate or rate
            print(
                f"| {name} h={args.target_hidden} L={args.target_layers} | {method} | {rate:.1f} | "
                f"{rate / plain_rate:.2f}× | {new_tokens / rounds:.2f} | {drafted / rounds:.1f} | "
                f"{'yes' if identical else 'NO'} |",
                flush=True,
            )


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of `hf-specssm bench-tree-scan`."""
    parser.add_argument("--parts", default="ab", help="a: verification cost, b: end to end")
    parser.add_argument(
        "--nodes", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="tree sizes (part a)"
    )
    parser.add_argument(
        "--sizes",
        type=lambda text: tuple(map(int, text.split("x"))),
        nargs="+",
        default=[(256, 4), (768, 8)],
        metavar="HIDDENxLAYERS",
        help="Mamba2 targets of part a, e.g. 256x4",
    )
    parser.add_argument("--prompt-length", type=int, default=64, help="tokens before the tree (part a)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per case; the median is shown")
    parser.add_argument("--target-hidden", type=int, default=512, help="hidden size of part b's targets")
    parser.add_argument("--target-layers", type=int, default=8, help="layers of part b's targets")
    parser.add_argument(
        "--head-noise", type=float, default=0.05, help="drafter/target disagreement knob (part b)"
    )
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[12, 48], help="prompts of part b")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="new tokens per prompt (part b)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the parts named by `--parts` and print Markdown tables."""
    unknown = sorted(set(args.parts) - set("ab"))
    if unknown or not args.parts:
        raise ValueError(f"--parts takes a, b or ab; got {args.parts!r}.")
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, fp32\n"
    )
    if "a" in args.parts:
        part_a(args)
        print()
    if "b" in args.parts:
        part_b(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m hf_specssm.tools.bench.tree_scan` (the same as `hf-specssm bench-tree-scan`)."""
    parser = argparse.ArgumentParser(
        prog="python -m hf_specssm.tools.bench.tree_scan",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
