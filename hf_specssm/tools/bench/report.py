"""Summaries of benchmark rows: per (mode, set, method) aggregates, Markdown tables and plots."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hf_specssm.tools.bench.methods import FASTEST_TARGET


@dataclass(frozen=True)
class Summary:
    """Aggregate of one method on one prompt set in one mode (pooled over prompts).

    Attributes:
        mode, set, method: what it aggregates.
        prompts: prompts with a row for both this method and the target alone.
        tokens_per_s: new tokens / seconds, pooled.
        speedup: `tokens_per_s` over the target alone's on the same prompts.
        tau: new tokens per target verification forward.
        draft_share, target_share: shares of the wall time in drafter and target forwards.
        peak_mib: largest memory of one call: the weights of the models it uses plus the most extra
            memory it allocated (caches, activations, drafts).
        identical: share of prompts whose output equals the target alone's (greedy only, else `None`;
            also `None` for the target alone in another dtype, whose output may differ by rounding).
        speedup_vs_fastest: `tokens_per_s` over the target alone's in this machine's fastest dtype
            (`FASTEST_TARGET` rows, on the same prompts), when the run had them; else `None`.
        position_reached, position_accepted: per chain draft position, pooled: rounds that drafted a
            token there after accepting every draft before it, and those that accepted it too (empty for
            methods whose loop does not report rounds, e.g. transformers' own).
    """

    mode: str
    set: str
    method: str
    prompts: int
    tokens_per_s: float
    speedup: float
    tau: float
    draft_share: float
    target_share: float
    peak_mib: float
    identical: float | None
    speedup_vs_fastest: float | None = None
    position_reached: tuple[int, ...] = ()
    position_accepted: tuple[int, ...] = ()


def _pooled(rows: Iterable[dict], key: str) -> tuple[int, ...]:
    """Element-wise sum of the rows' per-position counts `key` (rows without them add nothing)."""
    total: list[int] = []
    for row in rows:
        counts = row.get(key) or []
        total += [0] * (len(counts) - len(total))
        for position, count in enumerate(counts):
            total[position] += count
    return tuple(total)


def _rate(rows: Iterable[dict]) -> float:
    rows = list(rows)
    seconds = sum(row["seconds"] for row in rows)
    return sum(row["new_tokens"] for row in rows) / seconds if seconds else 0.0


def summarize(rows: Iterable[dict], baseline: str = "target") -> list[Summary]:
    """One `Summary` per (mode, set, method), over the prompts the method shares with `baseline`."""
    rows = list(rows)
    reference = {(r["mode"], r["set"], r["prompt_id"]): r for r in rows if r["method"] == baseline}
    fastest = {(r["mode"], r["set"], r["prompt_id"]): r for r in rows if r["method"] == FASTEST_TARGET}
    groups: dict[tuple[str, str, str], list[tuple[dict, dict]]] = defaultdict(list)
    for row in rows:
        base = reference.get((row["mode"], row["set"], row["prompt_id"]))
        if base is not None:
            groups[(row["mode"], row["set"], row["method"])].append((row, base))
    summaries = []
    for (mode, prompt_set, method), pairs in groups.items():
        tokens = sum(row["new_tokens"] for row, _ in pairs)
        seconds = sum(row["seconds"] for row, _ in pairs)
        base_rate = sum(base["new_tokens"] for _, base in pairs) / sum(base["seconds"] for _, base in pairs)
        rate = tokens / seconds if seconds else 0.0
        rounds = sum(row["rounds"] for row, _ in pairs)
        identical = None
        if mode == "greedy" and method != FASTEST_TARGET:
            identical = sum(row["output_ids"] == base["output_ids"] for row, base in pairs) / len(pairs)
        shared = [
            (row, fastest[(mode, prompt_set, row["prompt_id"])])
            for row, _ in pairs
            if (mode, prompt_set, row["prompt_id"]) in fastest
        ]
        fastest_rate = _rate(reference_row for _, reference_row in shared)
        speedup_vs_fastest = _rate(row for row, _ in shared) / fastest_rate if fastest_rate else None
        summaries.append(
            Summary(
                mode=mode,
                set=prompt_set,
                method=method,
                prompts=len(pairs),
                tokens_per_s=rate,
                speedup=rate / base_rate if base_rate else 0.0,
                tau=tokens / rounds if rounds else 0.0,
                draft_share=sum(row["drafter_s"] for row, _ in pairs) / seconds if seconds else 0.0,
                target_share=sum(row["target_s"] for row, _ in pairs) / seconds if seconds else 0.0,
                peak_mib=max(row["peak_bytes"] + row.get("weight_bytes", 0) for row, _ in pairs) / 2**20,
                identical=identical,
                speedup_vs_fastest=speedup_vs_fastest,
                position_reached=_pooled((row for row, _ in pairs), "position_reached"),
                position_accepted=_pooled((row for row, _ in pairs), "position_accepted"),
            )
        )
    return summaries


def _ordered(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    values = list(dict.fromkeys(values))
    return [v for v in preferred if v in values] + sorted(v for v in values if v not in preferred)


def markdown_tables(summaries: Sequence[Summary], method_order: Sequence[str] = ()) -> str:
    """Markdown: per mode, a speed-up table (methods × sets), then the detail of every cell."""
    out = []
    sets = _ordered((s.set for s in summaries), ("humaneval", "gsm8k", "mt_bench", "cnn_dm"))
    methods = _ordered((s.method for s in summaries), method_order)
    for mode in _ordered((s.mode for s in summaries), ("greedy", "sample")):
        cells = {(s.method, s.set): s for s in summaries if s.mode == mode}
        out.append(f"**{mode}**: speed-up over the target alone (tokens/s, τ)\n")
        out.append("| method | " + " | ".join(sets) + " |")
        out.append("|---|" + "---:|" * len(sets))
        for method in methods:
            row = []
            for prompt_set in sets:
                cell = cells.get((method, prompt_set))
                row.append(
                    f"{cell.speedup:.2f}× ({cell.tokens_per_s:.1f}, τ {cell.tau:.2f})" if cell else "–"
                )
            if any(r != "–" for r in row):
                out.append(f"| {method} | " + " | ".join(row) + " |")
        out.append("")
        fastest_cells = sorted(
            (s for s in cells.values() if s.method == FASTEST_TARGET), key=lambda s: sets.index(s.set)
        )
        if fastest_cells:
            rates = ", ".join(f"{s.set} {s.tokens_per_s:.1f}" for s in fastest_cells)
            out.append(
                f"**{mode}**: speed-up over `{FASTEST_TARGET}`, the target alone in this machine's fastest "
                f"dtype (its tokens/s: {rates})\n"
            )
            out.append("| method | " + " | ".join(sets) + " |")
            out.append("|---|" + "---:|" * len(sets))
            for method in methods:
                row = []
                for prompt_set in sets:
                    cell = cells.get((method, prompt_set))
                    vs = cell.speedup_vs_fastest if cell is not None else None
                    row.append(f"{vs:.2f}×" if vs is not None else "–")
                if any(r != "–" for r in row):
                    out.append(f"| {method} | " + " | ".join(row) + " |")
            out.append("")
    out.append("Detail (per mode, set and method):\n")
    out.append(
        "| mode | set | method | prompts | tok/s | speed-up | τ | drafter time | target time | peak memory MiB | identical |"
    )
    out.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in sorted(summaries, key=lambda s: (s.mode, sets.index(s.set), methods.index(s.method))):
        identical = f"{s.identical:.0%}" if s.identical is not None else "–"
        out.append(
            f"| {s.mode} | {s.set} | {s.method} | {s.prompts} | {s.tokens_per_s:.2f} | {s.speedup:.2f}× | "
            f"{s.tau:.2f} | {s.draft_share:.0%} | {s.target_share:.0%} | {s.peak_mib:.0f} | {identical} |"
        )
    out += _position_table(summaries, sets, methods)
    return "\n".join(out) + "\n"


#: draft positions the acceptance table shows (deeper ones are reached by few rounds)
SHOWN_POSITIONS = 8


def _position_table(summaries: Sequence[Summary], sets: Sequence[str], methods: Sequence[str]) -> list[str]:
    """Markdown lines: acceptance by chain draft position per (mode, set, method) that reports rounds."""
    cells = [s for s in summaries if any(s.position_reached)]
    if not cells:
        return []
    width = min(SHOWN_POSITIONS, max(len(s.position_reached) for s in cells))
    out = [
        "",
        "Acceptance by draft position (chain rounds; P(draft i accepted | drafts before it accepted), with the "
        "rounds that reached it):\n",
        "| mode | set | method | " + " | ".join(str(i + 1) for i in range(width)) + " |",
        "|---|---|---|" + "---:|" * width,
    ]
    for s in sorted(cells, key=lambda s: (s.mode, sets.index(s.set), methods.index(s.method))):
        shown = [
            f"{kept / reached:.2f} ({reached})" if reached else "–"
            for kept, reached in zip(s.position_accepted[:width], s.position_reached[:width])
        ]
        shown += ["–"] * (width - len(shown))
        out.append(f"| {s.mode} | {s.set} | {s.method} | " + " | ".join(shown) + " |")
    return out


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (raises ImportError without the [bench] extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def plot_speedups(summaries: Sequence[Summary], path: str | Path, method_order: Sequence[str] = ()) -> Path:
    """Grouped bars: speed-up of each method on each set, one panel per mode (needs matplotlib)."""
    plt = _pyplot()
    modes = _ordered((s.mode for s in summaries), ("greedy", "sample"))
    sets = _ordered((s.set for s in summaries), ("humaneval", "gsm8k", "mt_bench", "cnn_dm"))
    methods = [m for m in _ordered((s.method for s in summaries), method_order) if m != "target"]
    figure, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.2), squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for axis, mode in zip(axes[0], modes):
        cells = {(s.method, s.set): s.speedup for s in summaries if s.mode == mode}
        for offset, method in enumerate(methods):
            xs = [i + offset * width for i in range(len(sets))]
            axis.bar(xs, [cells.get((method, s), 0.0) for s in sets], width, label=method)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(sets))], sets)
        axis.set_ylabel("speed-up over the target alone")
        axis.set_title(mode)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    saved = _save(figure, path)
    plt.close(figure)
    return saved


def plot_long_context(rows: Sequence[dict], path: str | Path) -> Path:
    """τ (left) and drafter milliseconds per draft token (right) against the input length, per method."""
    plt = _pyplot()
    by_method: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_method[row["method"]][row["context_tokens"]].append(row)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method, by_length in sorted(by_method.items()):
        lengths = sorted(by_length)
        taus = [
            sum(r["new_tokens"] for r in by_length[n]) / max(1, sum(r["rounds"] for r in by_length[n]))
            for n in lengths
        ]
        cost = [
            1000
            * sum(r["drafter_s"] for r in by_length[n])
            / max(1, sum(r["drafted"] or 0 for r in by_length[n]))
            for n in lengths
        ]
        left.plot(lengths, taus, marker="o", label=method)
        right.plot(lengths, cost, marker="o", label=method)
    for axis, label in ((left, "τ (tokens per target forward)"), (right, "drafter ms per drafted token")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("input length (tokens)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    left.legend(fontsize=8)
    saved = _save(figure, path)
    plt.close(figure)
    return saved
