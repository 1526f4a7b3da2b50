"""The speculative decoding loop: one round for single prompts and ragged batches alike.

A round reads like the papers:

    plan → draft → verify → accept → commit / roll back → update policies

- **plan**: each row's drafter decides a chain length or a tree (`Drafter.plan_round`), knowing whether
  the target can verify trees and how much room is left;
- **draft**: the drafter proposes a chain (`Draft`) or a `TokenTree`;
- **verify**: the target scores every row's proposal in one forward (`Target.verify`);
- **accept**: the target's processed scores pick the kept positions and the target's own next token
  (`accept_proposal`: greedy matching or speculative sampling; sampling draws are keyed by sequence
  position, so a seed gives the same text whatever the draft lengths, see `decoding.acceptance`);
- **commit**: tokens are appended one by one under the stopping criteria; the target keeps its cache for
  exactly those tokens (`Target.commit`), the drafter rolls its state to them;
- **update**: the drafter's length and tree policies learn from the round (`Drafter.observe_round`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from hf_specssm._compat.mixers import fixed_mixers
from hf_specssm._compat.processors import row_processors
from hf_specssm.decoding.acceptance import SAMPLING_RULES, accept_proposal
from hf_specssm.decoding.scores import process_proposal_scores
from hf_specssm.drafters.base import (
    Draft,
    Drafter,
    DraftSampler,
    PositionNoise,
    RoundOutcome,
    RoundPlan,
    TreeDrafter,
)
from hf_specssm.stats import SpeculationStats
from hf_specssm.targets.base import Proposal, Target
from hf_specssm.tree import TokenTree


@dataclass
class Row:
    """One prompt being decoded.

    Attributes:
        index: position in the caller's batch.
        left_pad: `[P]` the caller's left padding, re-attached for stopping criteria and the output.
        sequence: `[1, L]` committed tokens (prompt and generated).
        drafter: this row's drafter (`Drafter.spawn` for batches).
        finished: whether a stopping criterion or the length limit ended the row.
        scores: with `output_scores`, one `[1, V]` processed score per generated token.
        logits: with `output_logits`, one `[1, V]` raw logit per generated token.
    """

    index: int
    left_pad: torch.Tensor
    sequence: torch.Tensor
    drafter: Drafter
    finished: bool = False
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None

    @property
    def length(self) -> int:
        """Tokens in the caller's layout: padding and committed tokens."""
        return self.left_pad.shape[0] + self.sequence.shape[1]

    def padded(self) -> torch.Tensor:
        """`[1, P + L]` padding followed by the committed tokens."""
        return torch.cat([self.left_pad[None], self.sequence], dim=1)


class SpeculativeLoop:
    """Runs rounds until every row is finished.

    Args:
        target: the verifier (`hf_specssm.targets.make_target`).
        logits_processor: `generate`'s processors (and warpers when sampling).
        stopping_criteria: `generate`'s criteria, checked after every committed token, so a stop inside an
            accepted block is exact.
        generation_config: the merged generation config (`max_length`, `do_sample`).
        streamer: single prompts only: receives each committed token; if it has
            `on_round(num_from_draft, num_committed)`, that is called after each round.
        sampling: the sampling rule, one of `decoding.acceptance.SAMPLING_RULES`: `"coupled"` (the same
            text for a seed whatever the draft lengths and tree shapes) or `"rejection"` (classic
            speculative sampling: higher acceptance for sampled drafts, reproducible only while the
            draft lengths repeat). Each call draws one seed from torch's default generator, so
            `torch.manual_seed` before `generate` fixes the text.
    """

    def __init__(
        self,
        target: Target,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        generation_config: GenerationConfig,
        streamer=None,
        sampling: str = "coupled",
    ) -> None:
        if sampling not in SAMPLING_RULES:
            raise ValueError(f"sampling must be one of {SAMPLING_RULES}, got {sampling!r}.")
        self.target = target
        self.logits_processor = logits_processor
        self.stopping_criteria = stopping_criteria
        self.max_length = generation_config.max_length
        self.do_sample = bool(generation_config.do_sample)
        self.sampling = sampling
        self._samplers: dict[int, DraftSampler] = {}
        # per row: the processors applied to its unpadded sequence (`_compat.processors.row_processors`)
        self._processors: dict[int, LogitsProcessorList | None] = {}
        self.streamer = streamer
        self._on_round = getattr(streamer, "on_round", None)
        self.stats = SpeculationStats()
        self.tree_problem = target.tree_problem()

    # ------------------------------------------------------------------ checks, once per call

    def check(self, rows: list[Row]) -> None:
        """Raise `ValueError` for what this target cannot do with these rows' drafters, before any work."""
        problem = self.target.row_problem(len(rows))
        if problem is not None:
            raise ValueError(problem)
        if self.streamer is not None and len(rows) > 1:
            raise ValueError("streamers take one sequence: pass one prompt per call to stream.")
        drafter = rows[0].drafter
        if (
            drafter.wants_target_hidden
            and not drafter.target_hidden_optional
            and self.target.hidden_problem() is not None
        ):
            raise ValueError(f"{type(drafter).__name__}: {self.target.hidden_problem()}")
        drafter.check_round_support(self.tree_problem)

    def make_samplers(self, rows: list[Row]) -> dict[int, DraftSampler]:
        """One `DraftSampler` per row (by `Row.index`). When sampling, the call draws one seed from torch's
        default generator and every row's draws are keyed by `(seed, row, position)`."""
        if not self.do_sample:
            if len(rows) == 1:
                shared = DraftSampler(self.logits_processor, False)
                return {row.index: shared for row in rows}
            return {row.index: DraftSampler(self._row_processors(row), False) for row in rows}
        noise = PositionNoise.from_global_generator()
        return {
            row.index: DraftSampler(self._row_processors(row), True, noise.for_row(row.index)) for row in rows
        }

    def _row_processors(self, row: Row) -> LogitsProcessorList | None:
        return self._processors.get(row.index, self.logits_processor)

    # ------------------------------------------------------------------ the loop

    def run(self, rows: list[Row]) -> SpeculationStats:
        """Decode `rows` to the end; their `sequence`s hold the results afterwards."""
        self.check(rows)
        self._processors = {
            row.index: row_processors(self.logits_processor, row.index, len(rows), row.left_pad.shape[-1])
            for row in rows
        }
        self._samplers = self.make_samplers(rows)
        # drafters that can do without hidden states draft from tokens where the target has none to give
        self.target.capture_hidden = (
            rows[0].drafter.wants_target_hidden and self.target.hidden_problem() is None
        )
        loop_start = time.perf_counter()
        started: list[Row] = []
        # the target's module tree is fixed for the call: rounds find its SSM mixers without a module walk
        with fixed_mixers(self.target.model):
            try:
                for row in rows:
                    row.drafter.begin_sequence(row.sequence)
                    started.append(row)
                self.target.prefill([row.sequence for row in rows])
                for row in rows:
                    row.finished = row.length >= self.max_length
                active = [row for row in rows if not row.finished]
                if active and len(active) < len(rows):
                    self.target.release([b for b, row in enumerate(rows) if not row.finished])
                while active:
                    active = self.round(active)
            finally:
                for row in started:
                    row.drafter.end()
                self.target.close()
        self.stats.total_time_s = time.perf_counter() - loop_start
        self.stats.peak_verification_bytes = self.target.peak_verification_bytes
        if self.streamer is not None:
            self.streamer.end()
        return self.stats

    def round(self, active: list[Row]) -> list[Row]:
        """One round for every active row; returns the rows still active after it."""
        t0 = time.perf_counter()
        plans = [row.drafter.plan_round(self.max_length - row.length, self.tree_problem) for row in active]
        proposals = [self.draft(row, plan) for row, plan in zip(active, plans)]
        t1 = time.perf_counter()
        logits = self.target.verify([row.sequence for row in active], proposals)
        decisions = [
            self.accept(row, proposal, row_logits)
            for row, proposal, row_logits in zip(active, proposals, logits)
        ]
        t2 = time.perf_counter()
        kept, committed = [], []
        for row, proposal, (path, token, scores), row_logits in zip(active, proposals, decisions, logits):
            count = self.append(row, proposal, path, token, scores, row_logits[0])
            committed.append(count)
            # the cache keeps every committed token but the last (a stop inside the block ends earlier)
            kept.append(path if count > len(path) else path[: count - 1])
        self.target.commit(kept)
        t3 = time.perf_counter()
        for row, plan, proposal, path, decision, count in zip(
            active, plans, proposals, kept, decisions, committed
        ):
            outcome = RoundOutcome(
                drafted=_proposal_tokens(proposal).shape[0],
                accepted=len(decision[0]),
                committed=count,
                draft_time_s=(t1 - t0) / len(active),
                verify_time_s=t2 - t1,
                round_time_s=time.perf_counter() - t0,
            )
            self.update(row, plan, path, outcome)
        self.stats.draft_time_s += t1 - t0
        self.stats.verify_time_s += t2 - t1
        self.stats.commit_time_s += t3 - t2
        self.stats.forward_passes += 1
        still = [b for b, row in enumerate(active) if not row.finished]
        if still and len(still) < len(active):
            self.target.release(still)
        return [active[b] for b in still]

    # ------------------------------------------------------------------ the steps

    def draft(self, row: Row, plan: RoundPlan) -> Proposal:
        """The row's proposal for `plan`: a `TokenTree` for tree rounds, a `Draft` of `[1, k]` otherwise."""
        if plan.tree:
            drafter: TreeDrafter = row.drafter  # plan_round only plans trees for tree drafters
            return drafter.draft_tree(row.sequence, self._samplers[row.index], plan.shape)
        if plan.num_tokens > 0:
            return row.drafter.draft(row.sequence, plan.num_tokens, self._samplers[row.index])
        return Draft(tokens=row.sequence.new_empty((1, 0)))

    def accept(
        self, row: Row, proposal: Proposal, logits: torch.Tensor
    ) -> tuple[list[int], int, torch.Tensor]:
        """`(kept positions, target's next token, processed scores [1 + n, V])` for one row."""
        scores = process_proposal_scores(self._row_processors(row), row.sequence, proposal, logits)
        path, token = accept_proposal(
            proposal,
            scores,
            self.do_sample,
            noise=self._samplers[row.index].noise,
            position=row.sequence.shape[1],
            rule=self.sampling,
        )
        return path, token, scores

    def append(
        self,
        row: Row,
        proposal: Proposal,
        path: list[int],
        token: int,
        scores: torch.Tensor,
        logits: torch.Tensor,
    ) -> int:
        """Append the accepted tokens and the target's token one by one, honouring the stopping criteria;
        returns how many were appended (fewer than `len(path) + 1` when a criterion stopped the row)."""
        tokens = _proposal_tokens(proposal)
        new_tokens = [*(int(tokens[position]) for position in path), token]
        score_rows = [0, *(position + 1 for position in path)]
        for count, (new_token, score_row) in enumerate(zip(new_tokens, score_rows), start=1):
            row.sequence = torch.cat([row.sequence, row.sequence.new_tensor([[new_token]])], dim=1)
            if row.scores is not None:  # a copy: without processors `scores` is the raw logits themselves
                row.scores += (scores[score_row : score_row + 1].clone(),)
            if row.logits is not None:
                row.logits += (logits[score_row : score_row + 1],)
            if self.streamer is not None:
                self.streamer.put(row.sequence[:, -1].cpu())
            if bool(self.stopping_criteria(row.padded(), row.scores).all()) or row.length >= self.max_length:
                row.finished = True
                return count
        return len(new_tokens)

    def update(self, row: Row, plan: RoundPlan, kept: list[int], outcome: RoundOutcome) -> None:
        """Hand the drafter what the target kept (and its hidden state), and let its policies learn."""
        drafter = row.drafter
        if drafter.wants_target_hidden and self.target.capture_hidden:
            # the hidden state at the position whose logits chose the last committed token
            position = [0, *(p + 1 for p in kept)][outcome.committed - 1]
            drafter.observe_target_hidden(self.target.last_hidden[:, position])
        if plan.tree:
            drafter.commit_tree(row.sequence, kept)
        else:
            drafter.commit(row.sequence, len(kept))
        drafter.observe_round(plan, outcome)
        self.stats.record_round(outcome.drafted, outcome.accepted, outcome.committed, tree=plan.tree)
        if plan.tree and plan.shape is not None:
            self.stats.tree_shapes.append(plan.shape)
        if self._on_round is not None:
            self._on_round(min(outcome.accepted, outcome.committed), outcome.committed)


def _proposal_tokens(proposal: Proposal) -> torch.Tensor:
    """`[n]` proposed tokens: a chain's drafts or a tree's nodes."""
    return proposal.tokens if isinstance(proposal, TokenTree) else proposal.tokens[0]
