"""Running methods × prompt sets in one process and writing one JSONL row per (prompt, method, mode).

Every method sees the same prompts, the same `max_new_tokens` and the same seed per prompt. The time of
each call is split by forward hooks into target forwards, drafter forwards and the rest (draft
selection, acceptance, cache work). Peak memory is the most heap memory held for live allocations (CPU,
glibc `mallinfo2`, sampled every 5 ms) or allocated CUDA memory above what was held when the call started,
plus the weights of the models the method uses. Rows already in the output file are
skipped, so an interrupted run resumes; the target-alone row of a prompt is what speed-ups and
"identical output" refer to.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_specssm.tools.bench.methods import GenerationSettings, Method
from hf_specssm.tools.bench.prompt_sets import BenchPrompt

#: per model type, the methods a draft model drafts through when it is not its `forward`
DRAFTING_METHODS = {"redrafter": ("next_state", "draft_logits")}


class ForwardTimer:
    """Wall time and number of calls of a module's `forward`, by hooks (removed by `close`).

    A ReDrafter head drafts through `next_state` and `draft_logits`, not `forward`: those calls are timed
    instead, by wrapping them on the instance (`DRAFTING_METHODS`).
    """

    def __init__(self, module: torch.nn.Module | None) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._started: list[float] = []
        self._handles = []
        self._wrapped: list[tuple[torch.nn.Module, str]] = []
        if module is None:
            return
        methods = DRAFTING_METHODS.get(getattr(getattr(module, "config", None), "model_type", None), ())
        if not methods:
            self._handles = [
                module.register_forward_pre_hook(self._before),
                module.register_forward_hook(self._after),
            ]
        for name in methods:
            self._wrap(module, name)

    def _wrap(self, module: torch.nn.Module, name: str) -> None:
        original = getattr(module, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        setattr(module, name, timed)
        self._wrapped.append((module, name))

    def _before(self, module, args) -> None:
        self._started.append(time.perf_counter())

    def _after(self, module, args, output) -> None:
        if self._started:
            self.seconds += time.perf_counter() - self._started.pop()
            self.calls += 1

    def close(self) -> None:
        """Remove the hooks and the wrappers."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module, name in self._wrapped:
            delattr(module, name)  # the instance attribute: the class's method shows again
        self._wrapped = []


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _heap_reader() -> Callable[[], int]:
    """Bytes the C heap holds for live allocations (glibc `mallinfo2`; torch's CPU tensors live there),
    else the resident set size: a process keeps freed pages, so RSS only shows growth past earlier peaks."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
        mallinfo2.restype = _MallInfo2

        def heap_bytes() -> int:
            info = mallinfo2()
            return info.uordblks + info.hblkhd

        heap_bytes()
        return heap_bytes
    except (AttributeError, OSError):

        def rss_bytes() -> int:
            try:
                with open("/proc/self/statm") as handle:
                    return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError):
                return 0

        return rss_bytes


_heap_bytes = _heap_reader()


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose `"bytes"` is set, on exit, to the peak memory above the level at entry.

    On CUDA that is torch's allocator peak. On CPU a thread samples glibc's heap (`mallinfo2`) every 5 ms,
    so an allocation freed within a few milliseconds can be missed; a decoding call's caches and
    activations live far longer.
    """
    result = {"bytes": 0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            yield result
        finally:
            torch.cuda.synchronize(device)
            result["bytes"] = max(0, torch.cuda.max_memory_allocated(device) - base)
        return
    base = _heap_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _heap_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["bytes"] = max(0, max(peak[0], _heap_bytes()) - base)


def _weight_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


def row_key(row: dict) -> tuple:
    """What identifies a row: prompt set, prompt id, method, mode, max tokens."""
    return (row["set"], row["prompt_id"], row["method"], row["mode"], row["max_new_tokens"])


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a results JSONL file (a torn last line is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


class TokenProgress:
    """A `generate` streamer that advances a progress bar by every committed token.

    transformers' streamer protocol: the prompt first (skipped here), then the new tokens as they are
    committed (one at a time by plain decoding, a round's worth by assisted and speculative decoding).
    The bar so moves every token or round, not once per generate call.

    Args:
        bar: a tqdm bar (or anything with `update(n)`).
    """

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.tokens = 0
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        """Count `value`'s tokens (`[1, n]` or `[n]`); the first call is the prompt."""
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.tokens += value.numel()
        self.bar.update(value.numel())

    def end(self) -> None:
        """Nothing to flush (transformers calls it when generation ends)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(
    method: Method,
    target: torch.nn.Module,
    input_ids: torch.Tensor,
    settings: GenerationSettings,
    seed: int,
    streamer: Any = None,
) -> dict:
    """Run `method` once on `input_ids` `[1, P]`; its measurements (no prompt or method labels).

    `streamer` (e.g. a `TokenProgress`) is handed to `generate`. A method with its own `target_model`
    (the target alone in another dtype) is timed and weighed on that model instead of `target`.
    """
    device = input_ids.device
    target = method.target_model if method.target_model is not None else target
    target_timer, drafter_timer = ForwardTimer(target), ForwardTimer(method.drafter_model)
    torch.manual_seed(seed)
    try:
        with peak_memory(device) as memory:
            _sync(device)
            started = time.perf_counter()
            output = method.run(input_ids, settings, streamer)
            _sync(device)
            seconds = time.perf_counter() - started
    finally:
        target_timer.close()
        drafter_timer.close()
    sequences = output.sequences if hasattr(output, "sequences") else output
    new_ids = sequences[0, input_ids.shape[1] :].tolist()
    stats = method.stats() if method.stats is not None else None
    # τ: tokens per target verification forward; transformers' loops verify in every target forward
    # (the first one includes the prompt), ours prefill separately and count rounds
    rounds = stats.rounds if stats is not None else target_timer.calls
    reached, accepted = stats.acceptance_by_position() if stats is not None else (None, None)
    return {
        "new_tokens": len(new_ids),
        "seconds": seconds,
        "tokens_per_s": len(new_ids) / seconds if seconds > 0 else 0.0,
        "target_forwards": target_timer.calls,
        "rounds": rounds,
        "tau": len(new_ids) / rounds if rounds else 0.0,
        "drafted": stats.drafted_tokens if stats is not None else None,
        "accepted": stats.accepted_tokens if stats is not None else None,
        # per chain draft position: rounds that reached it, and those that accepted it (`SpeculationStats`)
        "position_reached": reached,
        "position_accepted": accepted,
        "target_s": target_timer.seconds,
        "drafter_s": drafter_timer.seconds,
        "other_s": max(0.0, seconds - target_timer.seconds - drafter_timer.seconds),
        "peak_bytes": memory["bytes"],
        "weight_bytes": _weight_bytes(target)
        + (_weight_bytes(method.drafter_model) if method.drafter_model is not None else 0),
        "output_ids": new_ids,
    }


@dataclass(frozen=True)
class BenchContext:
    """Labels copied into every row: what ran where.

    Attributes:
        target: the target's name.
        dtype: the models' dtype (`"bf16"`, `"fp32"`).
        device: e.g. `"cpu (2 threads, amx_bf16)"` or a GPU name.
    """

    target: str
    dtype: str
    device: str


def append_row(sink, row: dict, context: BenchContext, method: Method | None = None) -> None:
    """Write `row` with `context`'s labels as one JSONL line and flush it (so a crash loses no row).

    A `method` with a dtype of its own (the target alone in the fastest dtype) labels its row with it.
    """
    if method is not None and method.dtype is not None:
        context = dataclasses.replace(context, dtype=method.dtype)
    sink.write(json.dumps({**row, **dataclasses.asdict(context)}) + "\n")
    sink.flush()


#: new tokens of each method's warm-up call (also what a time budget is estimated from)
WARMUP_TOKENS = 8
#: the warm-up reads only this many of the first prompt's last tokens: it is there for first-call costs,
#: and a full prefill per method would cost minutes on a slow CPU
WARMUP_PROMPT_TOKENS = 32


@dataclass(frozen=True)
class TimeBudget:
    """Fit the run into a wall-clock budget by choosing `max_new_tokens` from the warm-up's measurements.

    The warm-up times every method with `WARMUP_TOKENS` new tokens on a short prompt, and the target alone
    with one new token on that prompt and on the first real one (≈ their prefills). A call of `n` tokens
    is then estimated as the real prompt's prefill plus `n − 1` times the method's measured cost per
    further token (prefills of drafters count as per-token cost, so the estimate errs long). The run gets
    the most tokens, up to the asked number, whose estimate ends before `deadline`, and never fewer than
    `min_new_tokens`.

    Attributes:
        deadline: a `time.perf_counter()` value (e.g. the command's start plus the budget).
        min_new_tokens: the floor, even when the budget is already spent.
    """

    deadline: float
    min_new_tokens: int = 16

    def fit(self, prefill_s: float, per_token_s: Sequence[float], calls_per_method: int, asked: int) -> int:
        """The new tokens per call that fit in what is left of the budget.

        Args:
            prefill_s: a call's fixed cost (the target's prefill and first token).
            per_token_s: per method, seconds per further token.
            calls_per_method: prompts × settings each method runs on.
            asked: the requested `max_new_tokens` (the most this returns).
        """
        left = self.deadline - time.perf_counter()
        calls = calls_per_method * len(per_token_s)
        per_token = calls_per_method * sum(max(cost, 0.0) for cost in per_token_s)
        room = left - calls * prefill_s
        fitting = 1 + int(room / per_token) if per_token > 0 and room > 0 else 1
        return max(min(asked, fitting), min(self.min_new_tokens, asked))


def run_benchmark(
    target: torch.nn.Module,
    tokenize,
    methods: Sequence[Method],
    prompts: Iterable[BenchPrompt],
    settings: Sequence[GenerationSettings],
    out_path: str | Path,
    context: BenchContext,
    warmup: bool = True,
    seed: int = 0,
    progress: bool = True,
    budget: TimeBudget | None = None,
    say: Callable[[str], None] = print,
) -> list[dict]:
    """Run every method on every prompt under every setting; append rows to `out_path` (JSONL).

    Per prompt the methods run one after another, the target alone first, so that a prompt's rows are
    measured close together in time. Rows already in `out_path` are skipped (resume). With `budget`, the
    warm-up (then always run) also picks `max_new_tokens` so the run ends within it (`TimeBudget`), and
    `say` reports the choice.

    Args:
        target: the target model (its forwards are timed as verification).
        tokenize: `BenchPrompt → input_ids [1, P]` on the target's device.
        methods: what to compare (`methods.standard_methods`).
        prompts: the prompts, e.g. `load_prompt_set("gsm8k", limit=8)` for each set.
        settings: generation settings (e.g. one greedy, one sampling).
        out_path: the JSONL file.
        context: labels for each row.
        warmup: run each method once on the first prompt's last `WARMUP_PROMPT_TOKENS` tokens with
            `WARMUP_TOKENS` new tokens before timing anything.
        seed: base seed; prompt `i` runs every method with seed `seed + i`.
        progress: show progress bars (warm-up per call; then one bar in tokens, moved by every committed
            token or round, with the method and prompt at hand).
        budget: fit the run into a time budget by choosing `max_new_tokens` (see `TimeBudget`).
        say: where the budget's choice is reported.

    Returns:
        all rows of `out_path` after the run.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    prompts = list(prompts)
    done = {row_key(row) for row in read_rows(out_path)}

    def pending(settings: Sequence[GenerationSettings]) -> list:
        return [
            (index, prompt, setting, method)
            for index, prompt in enumerate(prompts)
            for setting in settings
            for method in methods
            if (prompt.set, prompt.id, method.name, setting.mode, setting.max_new_tokens) not in done
        ]

    jobs = pending(settings)
    if jobs and (warmup or budget is not None):
        first = tokenize(prompts[0])
        short = first[:, -WARMUP_PROMPT_TOKENS:]
        warm = [(method, setting) for method in methods for setting in settings]
        seconds = {}
        for method, setting in tqdm(warm, desc="warm-up", unit="call", disable=not progress):
            warm_settings = dataclasses.replace(setting, max_new_tokens=WARMUP_TOKENS)
            seconds[method.name, setting.mode] = run_one(method, target, short, warm_settings, seed)[
                "seconds"
            ]
        if budget is not None:
            one_token = dataclasses.replace(settings[0], max_new_tokens=1)
            short_prefill_s = run_one(methods[0], target, short, one_token, seed)["seconds"]
            prefill_s = run_one(methods[0], target, first, one_token, seed)["seconds"]
            per_token = [(cost - short_prefill_s) / (WARMUP_TOKENS - 1) for cost in seconds.values()]
            asked = max(setting.max_new_tokens for setting in settings)
            fitted = budget.fit(prefill_s, per_token, len(prompts), asked)
            say(
                f"time budget: {max(0.0, budget.deadline - time.perf_counter()):.0f} s left; the warm-up "
                f"measured {prefill_s:.1f} s per prompt's prefill and {min(per_token):.2f}–{max(per_token):.2f} s "
                f"per further token across the methods → {fitted} new tokens per prompt"
                + (f" (asked {asked}; pass a larger budget for more)" if fitted < asked else "")
            )
            settings = [dataclasses.replace(setting, max_new_tokens=fitted) for setting in settings]
            jobs = pending(settings)
    # in tokens: a bar in calls would stand still for minutes on a slow target
    total = sum(setting.max_new_tokens for _, _, setting, _ in jobs)
    bar = tqdm(total=total, desc="bench", unit="tok", disable=not progress)
    with open(out_path, "a") as sink:
        for number, (index, prompt, setting, method) in enumerate(jobs, start=1):
            bar.set_postfix_str(f"{number}/{len(jobs)} {method.name} on {prompt.set}/{prompt.id}")
            input_ids = tokenize(prompt)
            streamer = TokenProgress(bar)
            measured = run_one(method, target, input_ids, setting, seed + index, streamer)
            # a call that stopped early (EOS) leaves its remaining budget to count off
            bar.update(setting.max_new_tokens - streamer.tokens)
            row = {
                "set": prompt.set,
                "prompt_id": prompt.id,
                "method": method.name,
                "family": method.family,
                "mode": setting.mode,
                "max_new_tokens": setting.max_new_tokens,
                "prompt_tokens": input_ids.shape[1],
                **measured,
            }
            append_row(sink, row, context, method)
    bar.close()
    return read_rows(out_path)
