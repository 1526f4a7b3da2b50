"""What the page shows for a `Frame`: highlighted text, meters, the statistics table and chart rows."""

from __future__ import annotations

import html
import itertools
from collections.abc import Callable, Sequence

import pandas as pd

from .race import FROM_DRAFT, FROM_TARGET, Frame, LaneView

COLOR_MAP = {FROM_DRAFT: "#22c55e", FROM_TARGET: "#f97316"}
CHART_COLUMNS = ("round", "tokens", "source")
# Highlights behind the text (the chart's colours, light enough to read dark text on), one CSS class per
# source so that the page's tests and users' styles can find them.
HIGHLIGHT = {FROM_DRAFT: "rgba(34, 197, 94, 0.30)", FROM_TARGET: "rgba(249, 115, 22, 0.35)"}
SOURCE_CLASS = {FROM_DRAFT: "from-draft", FROM_TARGET: "from-target"}
# The text keeps its layout: newlines, indentation and runs of spaces (code) as the model wrote them.
LANE_STYLE = (
    "white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, monospace; "
    "font-size: 0.9em; line-height: 1.5; min-height: 6em; padding: 0.5em; "
    "border: 1px solid rgba(128, 128, 128, 0.3); border-radius: 6px"
)


class LaneRenderer:
    """Splits a lane's text into `(text, source)` runs (`lane_html` shows them).

    Text is decoded from the start up to each run boundary, never run by run, so that a character whose
    bytes span two runs (or a tokenizer that treats a leading space specially) still comes out right.
    Prefixes that end in a whole character are cached, so each frame decodes only what is new.

    Args:
        decode: token ids → text for the lane's model.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self._prefixes: dict[int, str] = {0: ""}

    def _prefix(self, token_ids: list[int], end: int) -> str:
        if end in self._prefixes:
            return self._prefixes[end]
        text = self.decode(token_ids[:end])
        # A prefix cut inside a multi-byte character decodes to U+FFFD; it changes once the rest arrives.
        if not text.endswith("\ufffd"):
            self._prefixes[end] = text
        return text

    def runs(self, view: LaneView) -> list[tuple[str, str | None]]:
        """Maximal runs of tokens with one source, as text.

        A character whose bytes are split between two runs is shown in the run that completes it.
        """
        boundaries = [0]
        for index in range(1, len(view.sources)):
            if view.sources[index] != view.sources[index - 1]:
                boundaries.append(index)
        boundaries.append(len(view.token_ids))
        runs = []
        for start, end in itertools.pairwise(boundaries):
            if end <= start:
                continue
            before = self._prefix(view.token_ids, start).rstrip("\ufffd")
            after = self._prefix(view.token_ids, end)
            if end < len(view.token_ids):
                after = after.rstrip("\ufffd")
            text = (
                after[len(before) :] if after.startswith(before) else self.decode(view.token_ids[start:end])
            )
            runs.append((text, view.sources[start]))
        return runs


def lane_html(runs: Sequence[tuple[str, str | None]]) -> str:
    """One pane's text as HTML: escaped, layout kept (`white-space: pre-wrap`), and each run of accepted
    draft tokens or target tokens highlighted inline.

    Args:
        runs: `(text, source)` from `LaneRenderer.runs`; a `None` source (plain decoding) is not highlighted.
    """
    parts = []
    for text, source in runs:
        escaped = html.escape(text)
        if source is None:
            parts.append(escaped)
        else:
            parts.append(
                f'<span class="{SOURCE_CLASS[source]}" title="{html.escape(source)}" '
                f'style="background-color: {HIGHLIGHT[source]}; border-radius: 3px">{escaped}</span>'
            )
    return f'<div class="lane" style="{LANE_STYLE}">{"".join(parts)}</div>'


def legend_html() -> str:
    """What the speculative pane's highlights mean."""
    swatches = " ".join(
        f'<span class="{SOURCE_CLASS[source]}" style="background-color: {HIGHLIGHT[source]}; '
        f'border-radius: 3px; padding: 0 0.4em">{html.escape(source)}</span>'
        for source in (FROM_DRAFT, FROM_TARGET)
    )
    return f'<div class="legend" style="margin-bottom: 0.3em; font-size: 0.85em">{swatches}</div>'


def meter(view: LaneView, speculative: bool) -> str:
    """One line under a pane's title: tokens, time and tokens/s (and τ for the speculative side)."""
    if not view.token_ids and not view.done:
        return "waiting…"
    line = (
        f"**{view.tokens_per_second:.1f} tokens/s** · {len(view.token_ids)} tokens in {view.elapsed_s:.2f} s"
    )
    if speculative and view.rounds:
        line += f" · τ {view.mean_accepted_length:.2f} tokens/round"
    return line


def statistics(frame: Frame) -> str:
    """The comparison table and verdict (Markdown)."""
    plain, spec = frame.plain, frame.speculative
    if not plain.token_ids and not spec.token_ids:
        return ""
    lines = [
        "| | plain | speculative |",
        "|---|---:|---:|",
        f"| tokens | {len(plain.token_ids)} | {len(spec.token_ids)} |",
        f"| wall time | {plain.elapsed_s:.2f} s | {spec.elapsed_s:.2f} s |",
        f"| tokens/s | {plain.tokens_per_second:.1f} | {spec.tokens_per_second:.1f} |",
        f"| target forwards | {len(plain.token_ids)} | {len(spec.rounds)} |",
        "",
    ]
    facts = []
    if plain.done and spec.tokens_per_second > 0 and plain.tokens_per_second > 0:
        facts.append(f"**Speed-up {spec.tokens_per_second / plain.tokens_per_second:.2f}×**")
    if spec.rounds:
        facts.append(
            f"mean accepted length τ = **{spec.mean_accepted_length:.2f}** tokens per target forward"
        )
    if frame.stats is not None and frame.stats.drafted_tokens:
        stats = frame.stats
        facts.append(
            f"acceptance {stats.acceptance_rate:.0%} ({stats.accepted_tokens} of {stats.drafted_tokens} drafted)"
        )
    if facts:
        lines.append(" · ".join(facts))
    if frame.identical is not None:
        verdict = "yes" if frame.identical else "NO"
        lines += ["", f"**Greedy outputs identical: {verdict}** ({len(spec.token_ids)} tokens compared)"]
    elif frame.finished and not frame.error:
        lines += ["", "Sampling: the two outputs differ by design; each follows the target's distribution."]
    return "\n".join(lines)


def chart_rows(view: LaneView) -> pd.DataFrame:
    """Per speculative round: accepted draft tokens and the target's own token(s), for a stacked bar chart.

    Rounds are labels ("1", "2", …), so each gets one bar; `round_order` gives the order to draw them in.
    """
    rows = []
    for number, (accepted, committed) in enumerate(view.rounds, start=1):
        rows.append((str(number), accepted, FROM_DRAFT))
        rows.append((str(number), committed - accepted, FROM_TARGET))
    frame = pd.DataFrame(rows, columns=list(CHART_COLUMNS))
    # Typed even when empty: the chart picks its axis types from the first value it is given.
    return frame.astype({"round": "str", "tokens": "int64", "source": "str"})


def round_order(view: LaneView) -> list[str]:
    """The round labels of `chart_rows` in numeric order (as text they would sort "1", "10", "2")."""
    return [str(number) for number in range(1, len(view.rounds) + 1)]
