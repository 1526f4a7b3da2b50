"""One race: validate the request, then plain decoding, then speculative decoding, both streamed.

The two runs go one after the other, each with the whole CPU: on a machine with few cores, running them
at the same time would make each slow the other down and the timings would say little. Each run happens
in a worker thread whose streamer (a `Lane`) records committed tokens; `race` polls the lanes and yields
a `Frame` whenever something changed.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import hf_specssm
from hf_specssm.drafters import (
    ContextCopyDrafter,
    Drafter,
    ModelDrafter,
    NgramTableDrafter,
    PromptLookupDrafter,
)
from hf_specssm.policies.tree_shape import DynamicTreePolicy, UCBTreePolicy

from .catalog import Catalog, LoadedModel, ModelChoice

CHAIN = "chain"
TREE = "tree (3, 2, 2, 1, 1)"
BANDIT = "bandit (UCB over tree shapes)"
COPY_BANDIT = "bandit + prompt-lookup branch"
COPY_CHAIN = "chain + prompt-lookup copy"
DYNAMIC = "dynamic tree (EAGLE-2 style)"
PROMPT_LOOKUP = "prompt lookup"
NGRAM_TABLE = "n-gram table"
REDRAFTER = "ReDrafter head"
REDRAFTER_COPY = "ReDrafter head + prompt-lookup copy"
TREE_SHAPE = (3, 2, 2, 1, 1)
logger = logging.getLogger(__name__)
# Methods that draft with a second model; the others draft from the text itself.
MODEL_METHODS = (CHAIN, COPY_CHAIN, TREE, BANDIT, COPY_BANDIT, DYNAMIC)
SCHEDULES = ("adaptive", "constant", "heuristic")

MAX_NEW_TOKENS = 512
# The toy target reads one position per UTF-8 byte and has 4096 positions.
MAX_PROMPT_BYTES = 4000
MAX_DRAFT_TOKENS = 16
# Labels of where a token came from, as the highlighted panes show them.
FROM_DRAFT = "accepted draft"
FROM_TARGET = "target"


def available_methods() -> list[str]:
    """The drafting methods this installation offers (ReDrafter only where `hf_specssm.drafters.redrafter` exists)."""
    methods = [CHAIN, COPY_CHAIN, TREE, BANDIT, COPY_BANDIT, DYNAMIC, PROMPT_LOOKUP, NGRAM_TABLE]
    if importlib.util.find_spec("hf_specssm.drafters.redrafter") is not None:
        methods += [REDRAFTER, REDRAFTER_COPY]
    return methods


@dataclass(frozen=True)
class RaceSettings:
    """What the user asked for; `check` says what is wrong with it, in words."""

    prompt: str
    target: str
    drafter: str | None
    method: str
    max_new_tokens: float | int | None = 64
    num_draft_tokens: float | int | None = 5
    schedule: str = "adaptive"
    do_sample: bool = False
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    seed: float | int | None = 0

    def check(self, catalog: Catalog) -> str | None:
        """`None` if the race can run, else a message for the user."""
        if not self.prompt or not self.prompt.strip():
            return "Type a prompt first."
        size = len(self.prompt.encode("utf-8"))
        if size > MAX_PROMPT_BYTES:
            return f"The prompt takes {size} bytes; this demo takes at most {MAX_PROMPT_BYTES}."
        problem = _check_whole("Max new tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
        problem = problem or _check_whole("Draft tokens", self.num_draft_tokens, 1, MAX_DRAFT_TOKENS)
        problem = problem or _check_whole("Seed", self.seed, 0, 2**32 - 1)
        if problem:
            return problem
        target = catalog.find(self.target)
        if target is None or target not in catalog.targets():
            return f"Unknown target {self.target!r}; pick one from the list."
        if self.method not in available_methods():
            return f"Unknown method {self.method!r}; pick one from the list."
        if self.schedule not in SCHEDULES:
            return f"Unknown schedule {self.schedule!r}; pick one of {', '.join(SCHEDULES)}."
        if self.method in MODEL_METHODS:
            drafter = catalog.find(self.drafter) if self.drafter else None
            if drafter is None or drafter not in catalog.drafters():
                return f"The {self.method} method drafts with a second model: pick a drafter model."
            if drafter.family != target.family:
                return (
                    f"Mismatched pair: {drafter.label} and {target.label} do not share a tokenizer. "
                    "Pick a drafter of the target's family, or a method without a drafter model "
                    f"({PROMPT_LOOKUP}, {NGRAM_TABLE})."
                )
        if self.do_sample:
            if self.temperature is None or not 0.05 <= self.temperature <= 5:
                return "Temperature must lie between 0.05 and 5."
            if self.top_p is None or not 0 < self.top_p <= 1:
                return "Top-p must lie in (0, 1]."
        return None

    def generate_kwargs(self) -> dict:
        """Keyword arguments shared by the plain and the speculative `generate` call."""
        kwargs: dict = {"max_new_tokens": int(self.max_new_tokens), "do_sample": self.do_sample}
        if self.do_sample:
            kwargs.update(temperature=float(self.temperature), top_p=float(self.top_p), top_k=0)
        return kwargs


def _check_whole(name: str, value: float | int | None, low: int, high: int) -> str | None:
    """A message unless `value` is a whole number in `[low, high]`."""
    if value is None or value != value or int(value) != value:
        return f"{name} must be a whole number."
    if not low <= value <= high:
        return f"{name} must lie between {low} and {high}; got {int(value)}."
    return None


def build_drafter(settings: RaceSettings, target: LoadedModel, drafter: LoadedModel | None) -> Drafter:
    """A fresh drafter for one run (drafters learn acceptance and bandit rewards as they go)."""
    k, schedule = int(settings.num_draft_tokens), settings.schedule
    if schedule != "constant":
        options = {"num_draft_tokens": k, "schedule": schedule, "max_draft_tokens": max(k, MAX_DRAFT_TOKENS)}
    else:
        options = {"num_draft_tokens": k, "schedule": schedule}
    if settings.method == CHAIN:
        return ModelDrafter(drafter.model, **options)
    if settings.method == COPY_CHAIN:
        return ContextCopyDrafter(ModelDrafter(drafter.model, **options))
    if settings.method == TREE:
        return ModelDrafter(drafter.model, tree_shape=TREE_SHAPE)
    if settings.method == BANDIT:
        return ModelDrafter(drafter.model, tree_policy=UCBTreePolicy())
    if settings.method == COPY_BANDIT:
        return ContextCopyDrafter(ModelDrafter(drafter.model, tree_policy=UCBTreePolicy()))
    if settings.method == DYNAMIC:
        return ModelDrafter(drafter.model, tree_policy=DynamicTreePolicy(depth=5, top_k=3, max_nodes=12))
    if settings.method == PROMPT_LOOKUP:
        return PromptLookupDrafter(max_ngram_size=3, **options)
    if settings.method == NGRAM_TABLE:
        return NgramTableDrafter(order=3, **options)
    if settings.method == REDRAFTER:
        return _redrafter(target)
    if settings.method == REDRAFTER_COPY:
        return ContextCopyDrafter(_redrafter(target, beam_width=1))
    raise ValueError(f"unknown method {settings.method!r}")


def _redrafter(target: LoadedModel, beam_width: int | None = None) -> Drafter:
    """A ReDrafter head for `target`, made once per target and kept on it.

    The trained head that ships for the target (Qwen2.5-Coder-1.5B: `checkpoints/redrafter-qwen2.5-coder`,
    one beam: chains of 6) when there is one, in the target's dtype; other targets get a head with its
    initial random weights: the race then shows the mechanism (beam search on the target's hidden state,
    beams verified as one tree), and its drafts are rarely accepted.
    """
    redrafter = importlib.import_module("hf_specssm.drafters.redrafter")
    if target.redrafter_head is None and target.head_folder is not None:
        target.redrafter_head = redrafter.ReDrafterHead.from_pretrained(
            target.head_folder, dtype=target.model.dtype
        ).eval()
    if target.redrafter_head is None:
        config = target.model.config.get_text_config(decoder=True)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            head_config = redrafter.ReDrafterConfig(
                hidden_size=config.hidden_size, vocab_size=config.vocab_size
            )
            target.redrafter_head = redrafter.ReDrafterHead(head_config).eval()
    return redrafter.ReDrafterDrafter(target.redrafter_head, target=target.model, beam_width=beam_width)


class Lane:
    """One side of the race, and the streamer its `generate` call writes to.

    transformers' streamer protocol: `put(prompt [1, L])` first, then `put(token [1])` per new token, then
    `end()`. hf_specssm's loop also calls `on_round(num_from_draft, num_committed)` after each round; the
    lane then labels that round's tokens (the first `num_from_draft` were accepted drafts, the rest came
    from the target). Plain decoding never calls it, and its tokens stay unlabelled.
    """

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.sources: list[str | None] = []
        # (accepted draft tokens, committed tokens) per round
        self.rounds: list[tuple[int, int]] = []
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.error: Exception | None = None
        self.changed = threading.Event()
        self.cancelled = threading.Event()
        self._prompt_seen = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the clock (called right before `generate`)."""
        self.started_at = time.perf_counter()

    def put(self, value: torch.Tensor) -> None:
        """Record new tokens; the first two-dimensional `put` is the prompt and is skipped."""
        if value.dim() == 2 and not self._prompt_seen:
            self._prompt_seen = True
            return
        with self._lock:
            ids = value.reshape(-1).tolist()
            self.token_ids.extend(ids)
            self.sources.extend([None] * len(ids))
        self.changed.set()

    def on_round(self, num_from_draft: int, num_committed: int) -> None:
        """Label the tokens of the round that just ended."""
        with self._lock:
            start = len(self.sources) - num_committed
            for offset in range(num_committed):
                self.sources[start + offset] = FROM_DRAFT if offset < num_from_draft else FROM_TARGET
            self.rounds.append((num_from_draft, num_committed))
        self.changed.set()

    def end(self) -> None:
        """Stop the clock."""
        self.ended_at = time.perf_counter()
        self.changed.set()

    def stopping_criteria(self) -> StoppingCriteriaList:
        """Criteria for `generate` that stop the run once `cancelled` is set (the page went away)."""
        return StoppingCriteriaList([_StopWhenSet(self.cancelled)])

    def snapshot(self) -> LaneView:
        """A consistent copy of what the lane holds now."""
        with self._lock:
            now = self.ended_at or time.perf_counter()
            elapsed = now - self.started_at if self.started_at is not None else 0.0
            return LaneView(
                list(self.token_ids),
                list(self.sources),
                list(self.rounds),
                elapsed,
                self.ended_at is not None,
            )


class _StopWhenSet(StoppingCriteria):
    """Stops every row once `event` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None, **kwargs) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


@dataclass(frozen=True)
class LaneView:
    """What one side has produced so far.

    Attributes:
        token_ids: committed tokens, in order.
        sources: per token, `FROM_DRAFT`, `FROM_TARGET`, or `None` (plain decoding).
        rounds: `(accepted draft tokens, committed tokens)` per speculative round.
        elapsed_s: wall time since the run started (until it ended, once it has).
        done: the run has ended.
    """

    token_ids: list[int] = field(default_factory=list)
    sources: list[str | None] = field(default_factory=list)
    rounds: list[tuple[int, int]] = field(default_factory=list)
    elapsed_s: float = 0.0
    done: bool = False

    @property
    def tokens_per_second(self) -> float:
        """Committed tokens per second of wall time so far."""
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """τ: tokens committed per target forward, over the rounds so far."""
        return sum(committed for _, committed in self.rounds) / len(self.rounds) if self.rounds else 0.0


@dataclass(frozen=True)
class Frame:
    """The state of the race at one moment; the last frame of a race has `finished=True`.

    Attributes:
        status: one line for the user (what is happening, or what went wrong).
        plain: the plain-decoding side.
        speculative: the speculative side.
        decode: turns token ids into text for the chosen target.
        stats: the speculative call's `SpeculationStats`, once it has ended.
        identical: for greedy races that finished, whether both sides produced the same tokens.
        finished: nothing more will come.
        error: the status is an error message.
    """

    status: str
    plain: LaneView = field(default_factory=LaneView)
    speculative: LaneView = field(default_factory=LaneView)
    decode: Callable[[list[int]], str] | None = None
    stats: hf_specssm.SpeculationStats | None = None
    identical: bool | None = None
    finished: bool = False
    error: bool = False


def _stream(run: Callable[[Lane], None], lane: Lane, refresh_s: float) -> Iterator[LaneView]:
    """Run `run(lane)` in a worker thread; yield the lane's view as it changes, at most every `refresh_s`."""

    def work() -> None:
        try:
            lane.start()
            run(lane)
        except Exception as error:
            # The page gets one line (`Race.run`); the log keeps the traceback.
            logger.exception("decoding failed")
            lane.error = error
        finally:
            if lane.ended_at is None:
                lane.end()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            lane.changed.wait(timeout=refresh_s)
            lane.changed.clear()
            yield lane.snapshot()
            time.sleep(refresh_s)
    finally:
        # The consumer stopped listening (page closed): stop decoding instead of finishing unseen.
        lane.cancelled.set()
    worker.join()
    yield lane.snapshot()


class Race:
    """Races plain against speculative decoding on the models of a `Catalog`.

    Args:
        catalog: where the models come from.
        refresh_s: shortest time between two frames while a side is streaming.
    """

    def __init__(self, catalog: Catalog, refresh_s: float = 0.1) -> None:
        self.catalog = catalog
        self.refresh_s = refresh_s
        self._warm: set[tuple[str, str | None, str]] = set()

    def run(self, settings: RaceSettings) -> Iterator[Frame]:
        """Yield frames: loading, the plain side streaming, the speculative side streaming, the result."""
        problem = settings.check(self.catalog)
        if problem:
            yield Frame(status=problem, finished=True, error=True)
            return
        yield Frame(status="Loading models (the first time only)…")
        target = self.catalog.load(self.catalog.find(settings.target))
        drafter_choice: ModelChoice | None = None
        if settings.method in MODEL_METHODS:
            drafter_choice = self.catalog.find(settings.drafter)
        drafter = self.catalog.load(drafter_choice) if drafter_choice is not None else None
        input_ids = target.codec.encode(settings.prompt)
        kwargs = settings.generate_kwargs()
        seed = int(settings.seed)

        warm_key = (settings.target, drafter_choice.label if drafter_choice else None, settings.method)
        if warm_key not in self._warm:
            yield Frame(status="Warming up (first race of this combination: buffers get allocated)…")
            try:
                target.model.generate(input_ids, max_new_tokens=2, do_sample=False)
                hf_specssm.generate(
                    target.model,
                    input_ids,
                    drafter=build_drafter(settings, target, drafter),
                    max_new_tokens=4,
                    do_sample=False,
                )
            except Exception as error:
                logger.exception("warm-up failed")
                yield Frame(status=describe_error(error), finished=True, error=True)
                return
            self._warm.add(warm_key)

        def plain_run(lane: Lane) -> None:
            torch.manual_seed(seed)
            target.model.generate(
                input_ids, streamer=lane, stopping_criteria=lane.stopping_criteria(), **kwargs
            )

        def speculative_run(lane: Lane) -> None:
            torch.manual_seed(seed)
            hf_specssm.generate(
                target.model,
                input_ids,
                drafter=build_drafter(settings, target, drafter),
                streamer=lane,
                stopping_criteria=lane.stopping_criteria(),
                **kwargs,
            )

        decode = target.codec.decode
        plain_view = LaneView()
        plain_lane = Lane()
        for plain_view in _stream(plain_run, plain_lane, self.refresh_s):
            yield Frame(status="Plain decoding…", plain=plain_view, decode=decode)
        if plain_lane.error is not None:
            yield Frame(
                describe_error(plain_lane.error), plain=plain_view, decode=decode, finished=True, error=True
            )
            return
        spec_lane = Lane()
        spec_view = LaneView()
        for spec_view in _stream(speculative_run, spec_lane, self.refresh_s):
            yield Frame(
                status="Speculative decoding…", plain=plain_view, speculative=spec_view, decode=decode
            )
        if spec_lane.error is not None:
            yield Frame(
                describe_error(spec_lane.error),
                plain=plain_view,
                speculative=spec_view,
                decode=decode,
                finished=True,
                error=True,
            )
            return
        identical = None if settings.do_sample else plain_view.token_ids == spec_view.token_ids
        yield Frame(
            status="Done.",
            plain=plain_view,
            speculative=spec_view,
            decode=decode,
            stats=target.model.last_speculation_stats,
            identical=identical,
            finished=True,
        )


def describe_error(error: Exception) -> str:
    """One line for the user, never a traceback; `ValueError`s from hf_specssm already say what to change."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, ValueError):
        return f"Cannot run this combination: {first_line}"
    return f"The run failed ({type(error).__name__}: {first_line}). The server log has the details."
