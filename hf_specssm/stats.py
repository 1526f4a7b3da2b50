"""Per-call statistics of speculative decoding."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class SpeculationStats:
    """What speculative decoding did during one `generate` call.

    Attributes:
        draft_lengths: tokens drafted in each round (0 for a round that only ran the target); for a tree
            round, the tree's nodes, i.e. the nodes the target verified that round.
        accepted_lengths: draft tokens accepted in each round (the target adds one more token per round).
        committed_tokens: tokens appended to the output in each round (accepted + 1, fewer when a stopping
            criterion ended the call inside a round).
        draft_time_s: wall time spent drafting.
        verify_time_s: wall time spent in target forwards and acceptance.
        commit_time_s: wall time spent bringing the target's cache to the accepted tokens (replay,
            re-feed, crop).
        total_time_s: wall time of the whole decoding loop.
        tree_shapes: the tree shape drafted in each fixed-shape tree round (what a `UCBTreePolicy` chose,
            over time); dynamic trees (`DynamicTreePolicy`, ReDrafter beams) have no fixed shape.
        forward_passes: target verification forwards (one per round; a batch shares each forward).
        peak_verification_bytes: most extra memory held for rolling back a recurrent target in one round
            (state checkpoint, plus recorded mixer activations with Activation Replay); 0 for Transformers.
        tree_rounds: whether each round verified a tree (else a chain, or nothing drafted).
    """

    draft_lengths: list[int] = field(default_factory=list)
    accepted_lengths: list[int] = field(default_factory=list)
    committed_tokens: list[int] = field(default_factory=list)
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    commit_time_s: float = 0.0
    total_time_s: float = 0.0
    peak_verification_bytes: int = 0
    forward_passes: int = 0
    tree_shapes: list[tuple[int, ...]] = field(default_factory=list)
    tree_rounds: list[bool] = field(default_factory=list)

    def record_round(self, drafted: int, accepted: int, committed: int, tree: bool = False) -> None:
        """Append one round's counts (`tree`: the round verified a tree)."""
        self.draft_lengths.append(drafted)
        self.accepted_lengths.append(accepted)
        self.committed_tokens.append(committed)
        self.tree_rounds.append(tree)

    def acceptance_by_position(self) -> tuple[list[int], list[int]]:
        """Per draft position `i` (0-based) of the chain rounds: `(reached, accepted)` counts.

        `reached[i]`: rounds that drafted a token at position `i` and accepted every draft before it;
        `accepted[i]`: those that accepted it too, so `accepted[i] / reached[i]` is the acceptance rate at
        position `i` given the drafts before it were right. Tree rounds are left out: their nodes have no
        single position. Both lists are as long as the longest chain drafted.
        """
        chains = [
            (drafted, kept)
            for drafted, kept, tree in zip(
                self.draft_lengths, self.accepted_lengths, self.tree_rounds, strict=True
            )
            if not tree
        ]
        depth = max((drafted for drafted, _ in chains), default=0)
        reached, accepted = [0] * depth, [0] * depth
        for drafted, kept in chains:
            for position in range(min(drafted, kept + 1)):
                reached[position] += 1
                accepted[position] += position < kept
        return reached, accepted

    @property
    def rounds(self) -> int:
        """Number of draft–verify rounds, counted per row (equals `forward_passes` for one prompt)."""
        return len(self.draft_lengths)

    @property
    def nodes_per_round(self) -> float:
        """Mean draft tokens (tree nodes) the target verified per round."""
        return self.drafted_tokens / self.rounds if self.rounds else 0.0

    @property
    def drafted_tokens(self) -> int:
        """Total draft tokens proposed."""
        return sum(self.draft_lengths)

    @property
    def accepted_tokens(self) -> int:
        """Total draft tokens accepted."""
        return sum(self.accepted_lengths)

    @property
    def new_tokens(self) -> int:
        """Total tokens generated."""
        return sum(self.committed_tokens)

    @property
    def mean_accepted_length(self) -> float:
        """τ: mean tokens committed per target forward (accepted draft tokens + the target's own token)."""
        return self.new_tokens / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drafted tokens that were accepted."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of decoding-loop wall time."""
        return self.new_tokens / self.total_time_s if self.total_time_s > 0 else 0.0

    def accepted_length_histogram(self) -> dict[int, int]:
        """How many rounds accepted each number of draft tokens."""
        return dict(sorted(Counter(self.accepted_lengths).items()))

    def summary(self) -> str:
        """One line for logs, each number with its unit, e.g. `"96 tokens in 35 rounds; τ 2.74 tokens per
        target forward; 61 of 170 drafted tokens accepted (36%); draft 120 ms, verify 900 ms, commit 15 ms;
        80.0 tokens/s"`.

        τ counts the target's own token of each round, so it is at least 1 even when no draft is accepted;
        the acceptance share is over drafted tokens (tree rounds draft many nodes and accept one path), so a
        low share can sit beside a high τ.
        """
        return (
            f"{self.new_tokens} tokens in {self.rounds} rounds; "
            f"τ {self.mean_accepted_length:.2f} tokens per target forward; "
            f"{self.accepted_tokens} of {self.drafted_tokens} drafted tokens accepted ({self.acceptance_rate:.0%}); "
            f"draft {self.draft_time_s * 1e3:.0f} ms, verify {self.verify_time_s * 1e3:.0f} ms, "
            f"commit {self.commit_time_s * 1e3:.0f} ms; "
            f"{self.tokens_per_second:.1f} tokens/s"
        )
