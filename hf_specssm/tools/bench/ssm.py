"""`hf-specssm bench-ssm`: what verifying drafts costs on SSM and hybrid targets of real sizes, and what it buys.

Targets are random-weight models built from published configs (`ssm_models.TARGET_CONFIGS`): cost does
not depend on the weights. Parts (each a Markdown table):

- `verify`: one plain step (a one-token forward from the cache) and one verification forward of `k` drafts
  (`k + 1` tokens: the pending token and the drafts) for k = 1, 2, 4, 8, 16, relative to the step — by the
  path `make_target` picks (for the Mamba2 family: one chunk of exactly `k + 1` tokens with the state frozen,
  `ssm.state_replay`) and by transformers' own multi-token forward (padded to `chunk_size`) for reference;
  and the part of the k = 8 forward that is not the projections' matrix products, relative to a step, with
  the share of it inside the SSM mixers' forwards (apart from their linears) and its compute floor (the
  attention kernels and the compiled CPU kernels alone).
- `commit`: a round that verifies 8 drafts and commits 4, per way of bringing the state to the accepted
  prefix: state-update commit (Activation Replay as the paper has it), mixer-input replay, Joint Attainment
  and Advancement, re-feed — the commit's time relative to a step, and the extra memory each holds.
- `tree`: verifying a token tree of 8, 16 and 32 nodes in one forward (STree tree scan), relative to a step.
- `oracle`: end to end with `testing.oracle.OracleDrafter` (the target's own greedy continuation, each
  token corrupted with probability 1 − α) against plain decoding, per α and k, next to the ideal
  `(1 − α^(k+1)) / (1 − α) / cost(k)` with `cost(k)` the measured round (verify + commit) over a token of
  plain `generate`. A model's first speculative call (probes, chain-path trials) is reported apart from
  warm calls, which alternate with plain calls (`--oracle-repeats`); the ideal is compared with the
  *decoding* speed-up, without the prompt's prefill that both sides pay alike (it is not part of a round).
  Greedy output is checked against plain decoding. Run in fp32: random bf16 targets have near-ties, so
  the verification forward and plain steps pick different argmaxes and the oracle stops matching.
- `lookup`: prompt lookup (transformers' n-gram drafts) vs plain decoding on CNN/DM prompts as byte-level
  tokens: a random target never continues its prompt, so this measures what a draft source that accepts
  nothing costs (the adaptive schedule's off-switch).

With `--pack-linears` the target's linears are packed for oneDNN first (`kernels.packed_linear`, decided by
measurement): every part then runs packed, plain steps and plain `generate` included, so ratios compare
like with like; the oracle part also times plain `generate` with the stock linears (`stock` column).

Timings are the minimum over `--repeats`. Run on a quiet machine (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import resource
import time
from dataclasses import dataclass
from importlib import resources

import torch

import hf_specssm
from hf_specssm.config import DraftConfig
from hf_specssm.kernels.cpu import cpu_kernels, cpu_kernels_disabled, cpu_kernels_failure, timed_kernels
from hf_specssm.ssm.mixers import ssm_mixers
from hf_specssm.targets import JointTarget, RecurrentTarget, make_target, tree_problem_for
from hf_specssm.targets.chain_paths import ChainPathCosts
from hf_specssm.testing.oracle import OracleDrafter
from hf_specssm.tools.bench.ssm_models import TARGET_CONFIGS, build_target
from hf_specssm.tree import TokenTree

PARTS = ("verify", "commit", "tree", "oracle", "lookup")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: profiler keys of the projections' matrix products (stock `nn.Linear`, and packed for oneDNN)
PROJECTION_OPS = ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise")
#: profiler keys of the attention kernels SDPA dispatches to on the CPU
ATTENTION_OPS = (
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_attention_math",
)
#: ways of bringing the state to the accepted prefix, as the `commit` part names them
COMMIT_PATHS = ("state update", "mixer-input replay", "joint", "refeed")


def _now(device: torch.device | None = None) -> float:
    """`time.perf_counter()` after the device's queued work is done (CUDA runs asynchronously)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _new_target(model, path: str):
    """A fresh single-row verifier: `"ours"` (what `make_target` picks, chains by its multi-token forward),
    `"tree chain"` (the same target verifying chains as one-branch trees through the tree scan; `None`
    where that does not serve), `"transformers"` (transformers' padded multi-token forward, commit by
    mixer-input replay), or one of `COMMIT_PATHS`."""
    if path in ("ours", "state update", "tree chain"):
        target = make_target(model, None)
        if path == "state update" and getattr(target, "state_recorder", None) is None:
            return None
        if path == "tree chain":
            if target.tree_problem() is not None:
                return None
            target.chain_paths = ChainPathCosts(("tree",))
        elif isinstance(target, RecurrentTarget):
            target.chain_paths = None  # the multi-token forward only (`generate` measures both, per round)
        return target
    if path in ("transformers", "mixer-input replay"):
        return RecurrentTarget(model, method="replay")
    if path == "joint":
        return JointTarget(model)
    return RecurrentTarget(model, method="refeed")


class _Run:
    """One target in the middle of a sequence: each measurement verifies drafts after the committed
    tokens and commits some, so the sequence grows by what was kept."""

    def __init__(self, model, path: str, context: int, vocab: int, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.device = model.device
        self.target = _new_target(model, path)
        self.sequence = self._tokens(context + 1)
        if self.target is not None:
            self.target.score(self.sequence[:, :-1], self.sequence[:, :0])
            self.target.keep(self.target.consumed)
            for warm_up in (0, 2, 0):  # first calls allocate buffers and run the mixer probes
                self.chain(warm_up)
            self.target.peak_verification_bytes = 0  # the prefill's checkpoint is not a round's

    def _tokens(self, count: int) -> torch.Tensor:
        return torch.randint(3, self.vocab, (1, count), generator=self.generator).to(self.device)

    def chain(self, num_drafts: int, kept: int = 0) -> tuple[float, float]:
        """`(verify seconds, commit seconds)` of one round of `num_drafts` drafts keeping `kept`."""
        drafts = self._tokens(num_drafts)
        start = _now(self.device)
        self.target.score(self.sequence, drafts)
        middle = _now(self.device)
        self.target.keep(self.sequence.shape[1] + kept)
        end = _now(self.device)
        self.sequence = torch.cat([self.sequence, drafts[:, :kept], self._tokens(1)], dim=1)
        return middle - start, end - middle

    def verifications(self, num_drafts: int, rounds: int, around=contextlib.nullcontext) -> None:
        """`rounds` rounds of `num_drafts` drafts keeping none, each verification (not its commit, which may
        run forwards of its own) inside a fresh `around()` context: a profiler, a stopwatch."""
        for _ in range(rounds):
            with around():
                self.target.score(self.sequence, self._tokens(num_drafts))
            self.target.keep(self.sequence.shape[1])
            self.sequence = torch.cat([self.sequence, self._tokens(1)], dim=1)

    def tree(self, num_nodes: int) -> float:
        """Seconds of one tree verification of `num_nodes` nodes (a binary tree); keeps two nodes."""
        parents = torch.tensor([-1 if i < 2 else (i - 2) // 2 for i in range(num_nodes)])
        tree = TokenTree(
            tokens=self._tokens(num_nodes)[0].cpu(), parents=parents
        )  # drafters keep trees on the CPU
        start = _now(self.device)
        self.target.score_tree(self.sequence, tree)
        elapsed = _now(self.device) - start
        path = [0, 2] if num_nodes > 2 else [0]
        self.target.keep_tree(path)
        self.sequence = torch.cat(
            [self.sequence, tree.tokens[path][None].to(self.device), self._tokens(1)], dim=1
        )
        return elapsed


def _cpu_kernels_description() -> str:
    """Whether the verification scans and convs run the compiled CPU kernels (`hf_specssm.kernels.cpu`)."""
    if cpu_kernels_disabled():
        return "CPU kernels switched off (torch references)"
    if cpu_kernels() is None:
        return f"CPU kernels unavailable ({cpu_kernels_failure()}; torch references)"
    return "compiled CPU kernels"


def _best(measure, repeats: int) -> float:
    return min(measure() for _ in range(repeats))


@torch.no_grad()
def split_seconds(model, num_drafts: int, context: int, path: str = "ours") -> dict[str, float]:
    """Seconds per verification forward spent in its compute kernels, mean of two rounds after a warm-up:
    `"products"`, the projections' matrix products (`PROJECTION_OPS` self time under `torch.profiler`);
    `"attention"`, SDPA's CPU kernels (`ATTENTION_OPS`, likewise); and each compiled CPU kernel by name
    (`kernels.cpu`, timed by `timed_kernels`: they are not dispatcher ops, so the profiler does not see
    them). Callers split a round by these and its unprofiled wall time (a profiled wall time carries the
    profiler's per-op overhead, while these are few, large calls that it times closely); everything but the
    products is the floor under the rest of the verification: what it would cost with no Python and no
    small torch ops. Empty on a GPU (the split is of CPU time; there the launches overlap the kernels)."""
    if model.device.type != "cpu":
        return {}
    vocab = model.config.get_text_config(decoder=True).vocab_size
    run = _Run(model, path, context, vocab)
    run.chain(num_drafts)
    rounds, seconds = 2, {"products": 0.0, "attention": 0.0}

    @contextlib.contextmanager
    def measured():
        with (
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile,
            timed_kernels() as timings,
        ):
            yield
        for event in profile.key_averages():
            for key, ops in (("products", PROJECTION_OPS), ("attention", ATTENTION_OPS)):
                if event.key in ops:
                    seconds[key] += event.self_cpu_time_total / 1e6
        for name, elapsed in timings.items():
            seconds[name] = seconds.get(name, 0.0) + elapsed

    run.verifications(num_drafts, rounds, measured)
    return {name: total / rounds for name, total in seconds.items()}


@torch.no_grad()
def mixer_seconds(model, num_drafts: int, context: int, path: str = "ours") -> float:
    """Seconds per verification forward spent inside the SSM mixers' forwards apart from their linears
    (projections): the SSM-specific part in the strict sense, which leaves out the decoder layers' norms
    and residual adds, attention and MLPs. Timed by module hooks (a few µs each), mean of two rounds after
    a warm-up; 0 on a target without SSM mixers."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    run = _Run(model, path, context, vocab)
    run.chain(num_drafts)
    total = [0.0]

    def clock(sign: float):
        def hook(*_):
            total[0] += sign * _now(run.device)

        return hook

    handles = []
    for mixer in ssm_mixers(model):
        handles += [mixer.register_forward_pre_hook(clock(-1.0)), mixer.register_forward_hook(clock(1.0))]
        for linear in (m for m in mixer.modules() if isinstance(m, torch.nn.Linear)):
            handles += [
                linear.register_forward_pre_hook(clock(1.0)),
                linear.register_forward_hook(clock(-1.0)),
            ]
    rounds = 2
    try:
        run.verifications(num_drafts, rounds)
    finally:
        for handle in handles:
            handle.remove()
    return total[0] / rounds


@torch.no_grad()
def verification_costs(
    model, widths: list[int], context: int, repeats: int, path: str = "ours"
) -> dict[int, tuple[float, float]]:
    """Per number of drafts `k` (0 = a plain step), `(verify seconds, commit seconds)` of a round keeping
    none of the drafts, min over `repeats`. The widths are measured in turn within each repeat, so that a
    slow spell of the machine reaches every width rather than one."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    run = _Run(model, path, context, vocab)
    counts = [0, *widths]
    for k in counts:
        run.chain(k)  # warm-up at this width
    samples: dict[int, list[tuple[float, float]]] = {k: [] for k in counts}
    for _ in range(repeats):
        for k in counts:
            samples[k].append(run.chain(k))
    return {k: (min(s[0] for s in samples[k]), min(s[1] for s in samples[k])) for k in counts}


@torch.no_grad()
def commit_costs(
    model, num_drafts: int, kept: int, context: int, repeats: int
) -> dict[str, tuple[float, float, int]]:
    """Per `COMMIT_PATHS` entry that serves `model`, `(verify seconds, commit seconds, extra bytes)` of
    steady-state rounds of `num_drafts` drafts keeping `kept` (after a first such round, so Joint
    Attainment and Advancement re-feeds what was kept, as in a run)."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    results = {}
    for path in COMMIT_PATHS:
        try:
            run = _Run(model, path, context, vocab)
        except ValueError:
            continue  # e.g. no identity steps for Joint Attainment and Advancement on this family
        if run.target is None:
            continue
        run.chain(num_drafts, kept)
        samples = [run.chain(num_drafts, kept) for _ in range(repeats)]
        results[path] = (
            min(s[0] for s in samples),
            min(s[1] for s in samples),
            run.target.peak_verification_bytes,
        )
    return results


@torch.no_grad()
def tree_costs(model, sizes: list[int], context: int, repeats: int) -> dict[int, float] | str:
    """Seconds of one tree verification per tree size, or why the target cannot verify trees."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    run = _Run(model, "ours", context, vocab)
    problem = run.target.tree_problem()
    if problem is not None:
        return problem
    return {size: _best(lambda size=size: run.tree(size), repeats) for size in sizes}


def ideal_speedup(alpha: float, num_drafts: int, cost: float) -> float:
    """Expected tokens per round over the round's cost in plain steps: `(1 − α^(k+1)) / (1 − α) / cost`."""
    if alpha >= 1.0:
        return (num_drafts + 1) / cost
    return (1 - alpha ** (num_drafts + 1)) / (1 - alpha) / cost


@dataclass
class PlainTiming:
    """Plain greedy decoding of one seeded prompt: the output and what it took (minimum over repeats).

    Attributes:
        reference: `[1, prompt + new]` token ids.
        total_s: seconds of the whole `generate` call.
        prefill_s: seconds of a `generate` call for one new token (reading the prompt and the first token).
        new_tokens: tokens generated by the whole call.
    """

    reference: torch.Tensor
    total_s: float
    prefill_s: float
    new_tokens: int

    @property
    def step_s(self) -> float:
        """Seconds per token after the first (what a decoding step costs through `generate`)."""
        return max(self.total_s - self.prefill_s, 0.0) / max(self.new_tokens - 1, 1)


def decoding_speedup(plain_s: float, speculative_s: float, prefill_s: float) -> float:
    """The speed-up of two whole calls over the same tokens without the prefill both pay alike:
    `(plain − prefill) / (speculative − prefill)`."""
    return max(plain_s - prefill_s, 1e-9) / max(speculative_s - prefill_s, 1e-9)


@torch.no_grad()
def oracle_run(
    model,
    alphas: list[float],
    widths: list[int],
    prompt_length: int,
    max_new_tokens: int,
    seed: int = 0,
    repeats: int = 1,
) -> tuple[PlainTiming, list[dict]]:
    """Plain greedy decoding and, per (α, k), the oracle drafter end to end.

    Per (α, k): a first call (what a new model pays once: mixer probes, buffers, the chain-path trials of
    `targets.chain_paths`), then `repeats` warm calls alternating with plain calls, each side's minimum
    kept, so both halves see the same state of the machine. Each row holds `first_s`, `warm_s` and
    `plain_s` (the plain minimum next to it), τ, and whether every output equals plain decoding.
    """
    plain = plain_timing(model, prompt_length, max_new_tokens, seed, repeats)
    reference = plain.reference
    vocab = model.config.get_text_config(decoder=True).vocab_size
    prompt = reference[:, :prompt_length]
    rows = []
    for alpha in alphas:
        for k in widths:
            drafter = OracleDrafter(
                reference,
                alpha,
                vocab,
                seed=seed,
                config=DraftConfig(num_draft_tokens=k, schedule="constant"),
            )

            def speculative(drafter=drafter) -> tuple[torch.Tensor, float]:
                start = _now(model.device)
                output = model.generate(
                    prompt, assistant_model=drafter, max_new_tokens=max_new_tokens, do_sample=False
                )
                return output, _now(model.device) - start

            output, first_s = speculative()
            identical = torch.equal(output, reference)
            warm_s, plain_s = float("inf"), float("inf")
            for _ in range(repeats):
                plain_s = min(plain_s, plain_run(model, prompt, max_new_tokens)[1])
                output, seconds = speculative()
                warm_s = min(warm_s, seconds)
                identical = identical and torch.equal(output, reference)
            stats = model.last_speculation_stats
            rows.append(
                {
                    "alpha": alpha,
                    "k": k,
                    "first_s": first_s,
                    "warm_s": warm_s,
                    "plain_s": plain_s,
                    "tau": stats.new_tokens / max(stats.rounds, 1),
                    "identical": identical,
                }
            )
    return plain, rows


def seeded_prompt(model, prompt_length: int, seed: int = 0) -> torch.Tensor:
    """`[1, prompt_length]` random token ids (3 … V − 1), seeded."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    prompt = torch.randint(3, vocab, (1, prompt_length), generator=torch.Generator().manual_seed(seed))
    return prompt.to(model.device)


@torch.no_grad()
def plain_run(model, prompt: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, float]:
    """One plain greedy `generate` call: `([1, prompt + new] ids, seconds)`."""
    start = _now(model.device)
    output = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return output, _now(model.device) - start


@torch.no_grad()
def plain_timing(
    model, prompt_length: int, max_new_tokens: int, seed: int = 0, repeats: int = 1
) -> PlainTiming:
    """Plain greedy decoding of a seeded random prompt after a warm-up, and its one-token call (the
    prefill), each the minimum over `repeats`."""
    hf_specssm.enable(model)
    prompt = seeded_prompt(model, prompt_length, seed)
    model.generate(prompt, max_new_tokens=2, do_sample=False)  # warm-up
    reference, total_s = plain_run(model, prompt, max_new_tokens)
    for _ in range(repeats - 1):
        total_s = min(total_s, plain_run(model, prompt, max_new_tokens)[1])
    prefill_s = min(plain_run(model, prompt, 1)[1] for _ in range(repeats))
    new_tokens = reference.shape[1] - prompt_length
    return PlainTiming(reference, total_s, prefill_s, new_tokens)


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


@torch.no_grad()
def lookup_run(model, prompts, max_new_tokens: int, lookup: int, repeats: int = 1) -> dict[str, float]:
    """Plain greedy vs prompt-lookup speculation on the same prompts; tok/s, τ, identity.

    Each prompt runs plain then speculative `repeats` times in turn. `speedup` is the first pass (the
    prompt-lookup drafter's gate learns from scratch on the first prompt and carries over to later
    calls, as for a user's), `steady_speedup` the ratio of the per-prompt minimum times over the repeats
    (what a noisy machine's slow spells do not reach; with repeats, also calls whose gate was already
    closed).
    """
    hf_specssm.enable(model)
    first_plain = first_spec = best_plain = best_spec = 0.0
    identical = True
    rounds = new_tokens = drafted = 0
    for prompt in prompts:
        prompt = prompt.to(model.device)
        plain_times, spec_times = [], []
        for repeat in range(repeats):
            start = _now(model.device)
            plain = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)
            plain_times.append(_now(model.device) - start)
            start = _now(model.device)
            spec = model.generate(
                prompt, prompt_lookup_num_tokens=lookup, max_new_tokens=max_new_tokens, do_sample=False
            )
            spec_times.append(_now(model.device) - start)
            identical &= torch.equal(plain, spec)
            if repeat == 0:
                stats = model.last_speculation_stats
                rounds += stats.rounds
                new_tokens += stats.new_tokens
                drafted += stats.drafted_tokens
        first_plain, first_spec = first_plain + plain_times[0], first_spec + spec_times[0]
        best_plain, best_spec = best_plain + min(plain_times), best_spec + min(spec_times)
    return {
        "plain_tok_s": new_tokens / first_plain,
        "spec_tok_s": new_tokens / first_spec,
        "speedup": first_plain / first_spec,
        "steady_speedup": best_plain / best_spec,
        "tau": new_tokens / max(rounds, 1),
        "drafted": drafted,
        "identical": identical,
    }


def _device_description(device: torch.device) -> str:
    """The GPU's name for a CUDA device, else the CPU's (`_cpu_description`)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return _cpu_description()


def _cpu_description() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            info = handle.read()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line), "CPU")
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    found = [flag for flag in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f" {flag}" in flags]
    return f"{name} ({', '.join(found) or 'no AVX2'})"


def run(args: argparse.Namespace) -> int:
    """Print the chosen parts as Markdown tables.

    Raises:
        ValueError: a count option below 1, named.
    """
    for flag, value in (("--repeats", args.repeats), ("--oracle-repeats", args.oracle_repeats)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}.")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU, and torch sees none; pass --device cpu.")
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        # fp32 in full precision, so verification forwards and one-token steps round alike (the oracle's
        # identity check), as on the CPU
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    print(
        f"# bench-ssm: torch {torch.__version__}, {args.threads} threads, {_device_description(device)}, "
        f"load average {os.getloadavg()[0]:.2f} at start; {_cpu_kernels_description()}"
    )
    widths = [1, 2, 4, 8, 16]
    for name in args.models:
        for dtype_name in args.dtypes:
            started = time.perf_counter()
            model = build_target(name, DTYPES[dtype_name], chunk_size=args.chunk_size).to(device)
            print(f"\n## {name} ({TARGET_CONFIGS[name][0]}), {dtype_name}\n", flush=True)
            args._packed = None
            if args.pack_linears:
                args._packed = hf_specssm.pack_linears(model)
                print(f"linears: {args._packed.reason}\n", flush=True)
            if "verify" in args.parts:
                _part_verify(model, widths, args)
            if "commit" in args.parts:
                _part_commit(model, args)
            if "tree" in args.parts:
                _part_tree(model, args)
            if "oracle" in args.parts and dtype_name == "float32":
                _part_oracle(model, args)
            if "lookup" in args.parts:
                _part_lookup(model, args)
            print(f"\n({name} {dtype_name}: {time.perf_counter() - started:.0f} s)", flush=True)
            # the packed linears hold the model's modules: drop both before the next model is built
            args._packed = None
            del model
            gc.collect()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = ""
    if device.type == "cuda":
        gpu = f", peak GPU memory allocated {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    print(f"\npeak process memory: {peak:.0f} MiB{gpu}; load average {os.getloadavg()[0]:.2f} at the end")
    return 0


def _part_verify(model, widths: list[int], args: argparse.Namespace) -> None:
    ours = verification_costs(model, widths, args.context, args.repeats, "ours")
    theirs = verification_costs(model, [8], args.context, args.repeats, "transformers")
    step = ours[0][0]
    share_step = min(split_seconds(model, 0, args.context).get("products", float("nan")) / step, 1.0)
    print("verification forward of k drafts (k + 1 tokens), relative to one plain step:\n")
    header = " | ".join(f"k={k}" for k in widths)
    print(f"| path | step (ms) | {header} |")
    print("|---|---:|" + "---:|" * len(widths))
    cells = " | ".join(f"{ours[k][0] / step:.2f}×" for k in widths)
    print(f"| ours: multi-token forward | {step * 1e3:.1f} | {cells} |")
    tree = None
    if tree_problem_for(model) is None:
        tree = verification_costs(model, widths, args.context, args.repeats, "tree chain")
        cells = " | ".join(f"{tree[k][0] / step:.2f}×" for k in widths)
        print(f"| ours: chain as a one-branch tree (tree scan) | {tree[0][0] * 1e3:.1f} | {cells} |")
    print(
        f"| transformers' multi-token forward | {theirs[0][0] * 1e3:.1f} | – | – | – | "
        f"{theirs[8][0] / theirs[0][0]:.2f}× | – |"
    )
    # the split of the path `generate` takes at k = 8 (the cheaper round)
    tree_at_8 = tree is not None and tree[8][0] + tree[8][1] < ours[8][0] + ours[8][1]
    verify_8 = tree[8][0] if tree_at_8 else ours[8][0]
    split_8 = split_seconds(model, 8, args.context, "tree chain" if tree_at_8 else "ours")
    products_8 = split_8.get("products", float("nan"))
    share_8 = min(products_8 / verify_8, 1.0)
    other = max(verify_8 - products_8, 0.0) / step
    if math.isnan(share_8):  # not measured on this device
        print("\ntime split: measured on the CPU only (on a GPU the launches overlap the kernels).")
    else:
        inside = mixer_seconds(model, 8, args.context, "tree chain" if tree_at_8 else "ours") / step
        print(
            f"\ntime split (products: torch.profiler self CPU time; rounds: wall time): the projections' matrix products take "
            f"{share_8:.0%} of the k=8 verification ({'chain as a tree' if tree_at_8 else 'multi-token forward'}) and {share_step:.0%} of a step; the rest of the k=8 verification (SSM scan, "
            f"conv, norms, attention, Python) is {other:.0%} of a step, against {1 - share_step:.0%} of a step "
            f"in the step itself; of that rest, the SSM mixers' forwards apart from their linears take "
            f"{inside:.0%} of a step (module hooks)."
        )
        floor = {name: seconds for name, seconds in split_8.items() if name != "products"}
        parts = ", ".join(f"{name} {seconds / step:.1%}" for name, seconds in floor.items() if seconds > 0)
        print(
            f"compute floor of that rest (attention kernels and the compiled CPU kernels; no Python, no small "
            f"torch ops): {sum(floor.values()) / step:.0%} of a step ({parts or 'none'})."
        )
    # `generate` takes the cheaper path per round (measured, `targets.chain_paths`)
    seconds = {
        k: min(ours[k][0] + ours[k][1], tree[k][0] + tree[k][1]) if tree else ours[k][0] + ours[k][1]
        for k in widths
    }
    if tree:
        print(
            "\nround (verify + commit of k drafts keeping none), the cheaper path: "
            + ", ".join(
                f"k={k} {'tree' if tree[k][0] + tree[k][1] < ours[k][0] + ours[k][1] else 'forward'}"
                for k in widths
            )
        )
    rounds = {k: seconds[k] / step for k in widths}
    for alpha in (0.6, 0.7, 0.8):
        best = max(widths, key=lambda k: ideal_speedup(alpha, k, rounds[k]))
        print(
            f"α = {alpha}: best k = {best} (expected {ideal_speedup(alpha, best, rounds[best]):.2f}× "
            f"from round cost {rounds[best]:.2f} steps)"
        )
    args._round_seconds = seconds


def _part_commit(model, args: argparse.Namespace) -> None:
    costs = commit_costs(model, 8, 4, args.context, args.repeats)
    step = verification_costs(model, [], args.context, args.repeats, "ours")[0][0]
    print("\na round of 8 drafts keeping 4: verify and commit, relative to one plain step:\n")
    print("| commit by | verify | commit | round | extra memory |")
    print("|---|---:|---:|---:|---:|")
    for path, (verify_s, commit_s, extra) in costs.items():
        print(
            f"| {path} | {verify_s / step:.2f}× | {commit_s / step:.1%} | {(verify_s + commit_s) / step:.2f}× | "
            f"{extra / 2**20:.2f} MiB |"
        )


def _part_tree(model, args: argparse.Namespace) -> None:
    costs = tree_costs(model, [8, 16, 32], args.context, args.repeats)
    if isinstance(costs, str):
        print(f"\ntree verification: not served ({costs})")
        return
    step = verification_costs(model, [], args.context, args.repeats, "ours")[0][0]
    cells = " | ".join(f"{costs[n] / step:.2f}×" for n in costs)
    print("\ntree verification (STree tree scan), relative to one plain step:\n")
    print("| nodes | " + " | ".join(str(n) for n in costs) + " |")
    print("|---|" + "---:|" * len(costs))
    print(f"| cost | {cells} |")


def _part_oracle(model, args: argparse.Namespace) -> None:
    repeats = args.oracle_repeats
    plain, rows = oracle_run(
        model, args.alphas, args.oracle_k, args.prompt_length, args.max_new_tokens, repeats=repeats
    )
    new_tokens = plain.new_tokens
    rounds = getattr(args, "_round_seconds", None)
    packed: hf_specssm.PackedLinears | None = getattr(args, "_packed", None)
    stock = None
    if packed is not None and packed.packed:
        with packed.suspended():
            stock = new_tokens / plain_timing(model, args.prompt_length, args.max_new_tokens).total_s
    print(
        f"\noracle drafter, {new_tokens} new tokens after a {args.prompt_length}-token prompt, plain greedy "
        f"{new_tokens / plain.total_s:.2f} tok/s",
        end="",
    )
    if stock is not None:
        print(f" packed, {stock:.2f} tok/s stock", end="")
    print(
        f"; the prompt and first token take {plain.prefill_s * 1e3:.0f} ms, each further token "
        f"{plain.step_s * 1e3:.0f} ms through `generate`."
    )
    print(
        f"first call = a new model's first speculative call (probes, chain-path trials); warm = the minimum of "
        f"{repeats} later calls, each after a plain call (plain tok/s and speed-ups use the minimum of those); "
        "decoding = the warm speed-up without the prompt's prefill, which both pay alike. ideal = "
        "(1 − α^(k+1)) / (1 − α) / cost(k), cost(k) = the verify part's round (verify + commit of k drafts) "
        "over a token of plain `generate` after the first; at τ = the measured τ / cost(k); within = decoding "
        "over ideal:\n"
        if rounds
        else "(run the verify part too for the ideal columns)\n"
    )
    stock_header = " over stock |" if stock is not None else ""
    print(
        f"| α | k | plain tok/s | tok/s (warm) | speed-up, first call | speed-up, warm | decoding |{stock_header} "
        "τ | ideal | at τ | within | identical |"
    )
    print(
        "|---:|---:|---:|---:|---:|---:|---:|"
        + ("---:|" if stock is not None else "")
        + "---:|---:|---:|---:|:---:|"
    )
    for row in rows:
        decoding = decoding_speedup(row["plain_s"], row["warm_s"], plain.prefill_s)
        if rounds:
            # a decoding token of the plain calls measured next to this row's speculative ones
            step_s = PlainTiming(plain.reference, row["plain_s"], plain.prefill_s, new_tokens).step_s
            cost = rounds[row["k"]] / max(step_s, 1e-9)
            ideal, at_tau = ideal_speedup(row["alpha"], row["k"], cost), row["tau"] / cost
        else:
            ideal = at_tau = float("nan")
        stock_cell = f" {new_tokens / row['warm_s'] / stock:.2f}× |" if stock is not None else ""
        print(
            f"| {row['alpha']} | {row['k']} | {new_tokens / row['plain_s']:.2f} | "
            f"{new_tokens / row['warm_s']:.2f} | {row['plain_s'] / row['first_s']:.2f}× | "
            f"{row['plain_s'] / row['warm_s']:.2f}× | {decoding:.2f}× |{stock_cell} {row['tau']:.2f} | "
            f"{ideal:.2f}× | {at_tau:.2f}× | {decoding / ideal:.0%} | {'yes' if row['identical'] else 'NO'} |",
            flush=True,
        )


def _part_lookup(model, args: argparse.Namespace) -> None:
    prompts = byte_prompts(args.prompts, args.prompt_bytes)
    result = lookup_run(model, prompts, args.max_new_tokens, args.lookup, args.repeats)
    print(
        f"\nprompt lookup ({args.lookup} tokens) vs plain greedy, {len(prompts)} CNN/DM prompts as bytes "
        f"(first pass; steady: per-prompt minimum over {args.repeats} alternating repeats):\n"
    )
    print("| plain tok/s | prompt lookup tok/s | speed-up | steady speed-up | τ | drafted | identical |")
    print("|---:|---:|---:|---:|---:|---:|:---:|")
    print(
        f"| {result['plain_tok_s']:.2f} | {result['spec_tok_s']:.2f} | {result['speedup']:.2f}× | "
        f"{result['steady_speedup']:.2f}× | {result['tau']:.2f} | {result['drafted']} | "
        f"{'yes' if result['identical'] else 'NO'} |",
        flush=True,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `hf-specssm bench-ssm`."""
    parser.add_argument(
        "--models",
        "--sizes",
        dest="models",
        nargs="+",
        choices=sorted(TARGET_CONFIGS),
        default=["mamba2-370m"],
        help="targets, from published configs with random weights",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=sorted(DTYPES),
        default=["float32"],
        help="model dtypes (the oracle part runs in float32 only)",
    )
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which tables to print"
    )
    parser.add_argument(
        "--chunk-size", type=int, default=256, help="the Mamba2 family's chunk_size (published: 256)"
    )
    parser.add_argument("--context", type=int, default=64, help="cached tokens before the measured rounds")
    parser.add_argument("--repeats", type=int, default=3, help="timings are the minimum over these")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.7, 0.9], help="oracle acceptance")
    parser.add_argument("--oracle-k", type=int, nargs="+", default=[2, 4, 8], help="oracle draft lengths")
    parser.add_argument(
        "--oracle-repeats",
        type=int,
        default=2,
        help="oracle: warm speculative calls per (α, k), each after a plain call (minimum of each kept)",
    )
    parser.add_argument("--prompt-length", type=int, default=32, help="oracle prompt tokens")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="oracle and lookup: tokens per prompt")
    parser.add_argument("--prompts", type=int, default=4, help="lookup: CNN/DM prompts")
    parser.add_argument("--prompt-bytes", type=int, default=400, help="lookup: bytes of each prompt kept")
    parser.add_argument("--lookup", type=int, default=8, help="prompt_lookup_num_tokens")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--device", default="cpu", help="where the targets run: cpu, or cuda (timings synchronise the GPU)"
    )
    parser.add_argument(
        "--pack-linears",
        action="store_true",
        help="pack the target's linears for oneDNN first (measured; plain decoding runs packed too)",
    )
