"""Benchmark for SSM targets (`hf-specssm bench-ssm`): verification cost and prompt-lookup speed.

Part A: cost of one Mamba2 forward over k = 1, 2, 4, 8, 16 tokens from a cached state, relative to k = 1
(Snakes and Ladders reports 6 tokens for 1.47× one forward on GPU).
Part B: cost of a steady-state round (verify k drafts, commit some of them) with each way of bringing the
state to the accepted prefix: Activation Replay, Joint Attainment and Advancement, snapshot-and-re-feed;
and the extra memory each holds for it.
Part C: end-to-end greedy tokens/s of prompt-lookup speculation vs plain decoding on the CNN/DM
summarization prompts (byte-level tokens), same process, same prompts, with an identity check.

Models have random weights (no download): timings are real, acceptance is not that of a trained model.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources

import torch
from transformers import BambaConfig, BambaForCausalLM, Mamba2Config, Mamba2ForCausalLM

import hf_specssm
from hf_specssm.targets import JointTarget, RecurrentTarget

SIZES = {
    # name: (hidden, layers); vocab 50280 and 64-dim heads as in the state-spaces Mamba2 checkpoints
    "mamba2-8M": (128, 4),
    "mamba2-40M": (384, 12),
    "mamba2-130M": (768, 24),
}


def build_mamba2(name: str, chunk_size: int, seed: int = 0) -> Mamba2ForCausalLM:
    """A random-weight Mamba2 of one of `SIZES`, fp32, eval mode."""
    hidden, layers = SIZES[name]
    torch.manual_seed(seed)
    config = Mamba2Config(
        vocab_size=50280,
        hidden_size=hidden,
        num_hidden_layers=layers,
        head_dim=64,
        num_heads=2 * hidden // 64,
        state_size=128,
        n_groups=1,
        expand=2,
        chunk_size=chunk_size,
        tie_word_embeddings=True,
        eos_token_id=None,
        pad_token_id=None,
        bos_token_id=None,
    )
    model = Mamba2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


def build_bamba(name: str, chunk_size: int, seed: int = 0) -> BambaForCausalLM:
    """A Bamba-style hybrid of the same width and depth as `SIZES[name]`: Mamba2 layers with one attention
    layer in four (8 heads, 4 KV heads), fp32, eval mode."""
    hidden, layers = SIZES[name]
    torch.manual_seed(seed)
    config = BambaConfig(
        vocab_size=50280,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        attn_layer_indices=list(range(3, layers, 4)),
        mamba_n_heads=2 * hidden // 64,
        mamba_d_head=64,
        mamba_n_groups=1,
        mamba_d_state=128,
        mamba_chunk_size=chunk_size,
        tie_word_embeddings=True,
        eos_token_id=None,
        pad_token_id=None,
        bos_token_id=None,
    )
    model = BambaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


def _prefilled(model, prompt: torch.Tensor, method: str = "replay") -> RecurrentTarget | JointTarget:
    """A target whose cache holds `prompt` except its last token (as at the start of a round)."""
    target = JointTarget(model) if method == "joint" else RecurrentTarget(model, method=method)
    target.score(prompt[:, :-1], prompt[:, :0])
    target.keep(target.consumed)
    return target


@torch.no_grad()
def verification_cost(model, widths: list[int], context: int, repeats: int) -> dict[int, float]:
    """Seconds of one verification `score()` over `k` tokens (1 pending + k-1 drafts) after a `context`-token
    prefix, checkpoint and activation recording included; min over `repeats` fresh states."""
    prompt = torch.randint(3, 50000, (1, context + 1))
    drafts = torch.randint(3, 50000, (1, max(widths)))
    times = {}
    for k in widths:
        best = float("inf")
        for _ in range(repeats):
            target = _prefilled(model, prompt)
            start = time.perf_counter()
            target.score(prompt, drafts[:, : k - 1])
            best = min(best, time.perf_counter() - start)
        times[k] = best
    return times


@torch.no_grad()
def commit_cost(
    model, k: int, accepted: int, repeats: int, context: int = 64
) -> dict[str, tuple[float, int]]:
    """Per method, `(seconds, extra bytes)` of a steady-state round: `score()` of k drafts and `keep()` of
    `accepted` of them, after a first round that also accepted `accepted` (so Joint Attainment and
    Advancement re-feeds `accepted + 1` tokens, as it would in a run)."""
    prompt = torch.randint(3, 50000, (1, context + 1))
    drafts = torch.randint(3, 50000, (2, k))
    committed = torch.cat([prompt, drafts[:1, :accepted], prompt[:, :1]], dim=1)
    results = {}
    for method in ("replay", "joint", "refeed"):
        best = float("inf")
        for _ in range(repeats):
            target = _prefilled(model, prompt, method)
            target.score(prompt, drafts[:1])
            target.keep(prompt.shape[1] + accepted)
            start = time.perf_counter()
            target.score(committed, drafts[1:])
            target.keep(committed.shape[1] + accepted)
            best = min(best, time.perf_counter() - start)
        results[method] = (best, target.peak_verification_bytes)
    return results


def byte_prompts(limit: int, max_bytes: int) -> list[torch.Tensor]:
    """CNN/DM summarization prompts as byte-level token ids (ids 3..258)."""
    text = (
        resources.files("hf_specssm").joinpath("data/cnn_dm_summarization.jsonl").read_text(encoding="utf-8")
    )
    prompts = []
    for line in text.splitlines()[:limit]:
        data = json.loads(line)["turns"][0].encode("utf-8")[:max_bytes]
        prompts.append(torch.tensor([[byte + 3 for byte in data]]))
    return prompts


def end_to_end(model, prompts, max_new_tokens: int, lookup: int) -> dict[str, float]:
    """Plain greedy vs prompt-lookup speculation on the same prompts; returns tok/s, τ, identity."""
    hf_specssm.enable(model)
    plain_s = spec_s = 0.0
    identical = True
    rounds = new_tokens = 0
    for prompt in prompts:
        start = time.perf_counter()
        plain = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)
        plain_s += time.perf_counter() - start
        start = time.perf_counter()
        spec = model.generate(
            prompt, prompt_lookup_num_tokens=lookup, max_new_tokens=max_new_tokens, do_sample=False
        )
        spec_s += time.perf_counter() - start
        identical &= torch.equal(plain, spec)
        stats = model.last_speculation_stats
        rounds += stats.rounds
        new_tokens += stats.new_tokens
    return {
        "plain_tok_s": new_tokens / plain_s,
        "spec_tok_s": new_tokens / spec_s,
        "speedup": plain_s / spec_s,
        "tau": new_tokens / rounds,
        "identical": identical,
    }


def run(args: argparse.Namespace) -> int:
    """Print the three parts as Markdown tables."""
    import resource

    torch.set_num_threads(args.threads)
    widths = [1, 2, 4, 8, 16]
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, Mamba2 chunk_size {args.chunk_size}")
    if "A" in args.parts:
        _part_a(args, widths)
    if "B" in args.parts:
        _part_b(args)
    if "C" in args.parts:
        _part_c(args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak process memory: {peak:.0f} MiB")
    return 0


def _part_a(args: argparse.Namespace, widths: list[int]) -> None:
    print("\n### A. One forward over k tokens from a cached state, relative to k = 1\n")
    print("| model | k=1 (ms) | " + " | ".join(f"k={k}" for k in widths[1:]) + " |")
    print("|---|---:|" + "---:|" * (len(widths) - 1))
    for name in args.sizes:
        model = build_mamba2(name, args.chunk_size)
        cost = verification_cost(model, widths, context=128, repeats=args.repeats)
        ratios = " | ".join(f"{cost[k] / cost[1]:.2f}×" for k in widths[1:])
        print(f"| {name} | {cost[1] * 1e3:.1f} | {ratios} |", flush=True)


def _part_b(args: argparse.Namespace) -> None:
    print("\n### B. A round that verifies k = 8 drafts and commits 4: time (extra memory) per method\n")
    print("| model | context | Activation Replay | Joint Attainment and Advancement | snapshot + re-feed |")
    print("|---|---:|---:|---:|---:|")
    builds = [(name, build_mamba2) for name in args.sizes]
    builds += [(name.replace("mamba2", "bamba"), build_bamba) for name in args.sizes if args.hybrids]
    for name, build in builds:
        model = build(name.replace("bamba", "mamba2"), args.chunk_size)
        for context in args.contexts:
            cost = commit_cost(model, k=8, accepted=4, repeats=args.repeats, context=context)
            cells = " | ".join(
                f"{cost[m][0] * 1e3:.1f} ms ({cost[m][1] / 2**20:.2f} MiB)"
                for m in ("replay", "joint", "refeed")
            )
            print(f"| {name} | {context} | {cells} |", flush=True)


def _part_c(args: argparse.Namespace) -> None:
    print(f"\n### C. Prompt lookup ({args.lookup} tokens) vs plain greedy, {args.prompts} CNN/DM prompts\n")
    prompts = byte_prompts(args.prompts, args.prompt_bytes)
    print("| model | plain tok/s | prompt lookup tok/s | speed-up | τ | identical |")
    print("|---|---:|---:|---:|---:|:---:|")
    for name in args.sizes:
        model = build_mamba2(name, args.chunk_size)
        result = end_to_end(model, prompts, args.max_new_tokens, args.lookup)
        print(
            f"| {name} | {result['plain_tok_s']:.1f} | {result['spec_tok_s']:.1f} | {result['speedup']:.2f}× | "
            f"{result['tau']:.2f} | {'yes' if result['identical'] else 'NO'} |",
            flush=True,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `hf-specssm bench-ssm`."""
    parser.add_argument(
        "--sizes", nargs="+", choices=sorted(SIZES), default=["mamba2-8M", "mamba2-40M", "mamba2-130M"]
    )
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-bytes", type=int, default=400)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--lookup", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", nargs="+", choices=["A", "B", "C"], default=["A", "B", "C"])
    parser.add_argument(
        "--hybrids", action="store_true", help="part B also on Bamba-style hybrids of the same sizes"
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[64], help="part B: cached tokens")
