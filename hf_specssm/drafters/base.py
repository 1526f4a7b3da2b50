"""The drafter protocol shared by every kind of drafter."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, PreTrainedModel

from hf_specssm.config import DraftConfig
from hf_specssm.policies.draft_length import DraftLengthPolicy, make_policy
from hf_specssm.policies.tree_shape import DynamicTreePolicy, UCBTreePolicy
from hf_specssm.tree import TokenTree


@dataclass(frozen=True)
class Draft:
    """Tokens proposed in one round.

    Attributes:
        tokens: `[1, k]` drafted ids (k may be 0).
        probs: `[1, k, V]` distributions the tokens were sampled from, or `None` when drafting was
            deterministic (greedy or n-gram); acceptance then treats `q` as one-hot.
    """

    tokens: torch.Tensor
    probs: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Number of drafted tokens."""
        return self.tokens.shape[1]


@dataclass(frozen=True)
class RoundPlan:
    """What one round drafts, decided once per round by `Drafter.plan_round`.

    Attributes:
        num_tokens: chain rounds: how many tokens to draft (0: the target alone decodes this round).
        tree: whether the round drafts a token tree (`TreeDrafter.draft_tree`) instead of a chain.
        shape: tree rounds: children per node at each depth, or `None` when the drafter shapes the tree
            itself (dynamic trees, beams, n-gram candidates).
    """

    num_tokens: int = 0
    tree: bool = False
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class RoundOutcome:
    """What a finished round did, for the drafter's policies.

    Attributes:
        drafted: tokens proposed (nodes, for trees).
        accepted: proposed tokens the target accepted.
        committed: tokens appended in all (the target's own token included; fewer at a stop).
        draft_time_s: seconds spent drafting (this row's share, in batches).
        verify_time_s: seconds of the verification forward and acceptance.
        round_time_s: seconds of the whole round, commit included.
    """

    drafted: int
    accepted: int
    committed: int
    draft_time_s: float
    verify_time_s: float
    round_time_s: float


class DraftSampler:
    """Turns drafter logits into a draft token with the target's logits processors.

    Drafting with the same processors as the target (temperature, top-k/top-p, repetition penalty, bad
    words…) makes drafts agree with the target more often; losslessness never depends on it, because
    acceptance uses the distribution each token was actually drawn from.

    Args:
        logits_processor: the target's prepared processors (and warpers, when sampling).
        do_sample: sample from the processed distribution instead of taking its argmax.
    """

    def __init__(self, logits_processor: LogitsProcessorList | None, do_sample: bool) -> None:
        self.logits_processor = logits_processor
        self.do_sample = do_sample

    def choose(
        self, sequence: torch.Tensor, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pick the next draft token.

        Args:
            sequence: `[1, L]` committed tokens followed by the drafts so far.
            logits: `[1, V]` float32 drafter logits for the next position.

        Returns:
            `(token [1], probs [1, V] or None)`.
        """
        scores = self.logits_processor(sequence, logits) if self.logits_processor else logits
        if self.do_sample:
            probs = torch.softmax(scores, dim=-1)
            return torch.multinomial(probs, 1)[:, 0], probs
        return scores.argmax(dim=-1), None


class Drafter(ABC):
    """Base class of drafters. A drafter lives across rounds of one `generate` call.

    The loop calls `begin` once, then per round `draft` and `commit`, then `end`. The loop hands over the
    whole committed sequence each time; a drafter consumes only the tokens it has not seen.

    Args:
        config: draft-length options; the policy it names is kept across calls so learned acceptance
            carries over.
    """

    def __init__(self, config: DraftConfig | None = None) -> None:
        self.config = config if config is not None else DraftConfig()
        self.length_policy: DraftLengthPolicy = make_policy(self.config)

    #: Whether the loop should hand this drafter the target's last hidden state each round (draft heads
    #: such as ReDrafter read it); the target then captures the input of its output embedding.
    wants_target_hidden: bool = False

    def observe_target_hidden(self, hidden: torch.Tensor) -> None:
        """Receive the target's last-layer hidden state `[1, H]` at the position whose logits chose the last
        committed token (the input of the target's LM head there). Called before `commit` / `commit_tree`,
        only when `wants_target_hidden` is true."""

    @property
    def vocab_size(self) -> int | None:
        """Vocabulary size of the draft distribution, or `None` if any target vocabulary works."""
        return None

    @property
    def device(self) -> torch.device | None:
        """Device the drafter runs on, or `None` if it follows the target."""
        return None

    def validate_for(self, target: PreTrainedModel) -> None:
        """Raise `ValueError` if this drafter cannot serve `target` (vocabulary, device)."""
        target_vocab = target.config.get_text_config(decoder=True).vocab_size
        if self.vocab_size is not None and self.vocab_size != target_vocab:
            raise ValueError(
                f"the drafter's vocabulary has {self.vocab_size} tokens but the target's has {target_vocab}; "
                "drafter and target must share one tokenizer and vocabulary size."
            )
        if self.device is not None and self.device != target.device:
            raise ValueError(
                f"the drafter is on {self.device} but the target is on {target.device}; "
                "move both to the same device."
            )

    @abstractmethod
    def begin(self, input_ids: torch.Tensor) -> None:
        """Start a new sequence with prompt `input_ids` `[1, L]` (drop any previous state)."""

    @abstractmethod
    def draft(self, input_ids: torch.Tensor, num_tokens: int, sampler: DraftSampler) -> Draft:
        """Propose up to `num_tokens` tokens to follow `input_ids` `[1, L]` (all committed tokens)."""

    @abstractmethod
    def commit(self, input_ids: torch.Tensor, num_accepted: int) -> None:
        """The target kept the first `num_accepted` tokens of the last draft; `input_ids` `[1, L']` is the
        new committed sequence (it may end with a token the drafter did not propose)."""

    def end(self) -> None:
        """Release per-sequence state."""

    def check_round_support(self, tree_problem: str | None) -> None:
        """Raise `ValueError` before the first round if this drafter's settings ask for what the target cannot
        verify. `tree_problem` is why the target cannot verify trees in this call (`None`: it can)."""
        if self.config.tree_shape is not None:
            raise ValueError(
                f"{type(self).__name__} cannot draft trees; drop tree_shape or use ModelDrafter."
            )

    def plan_round(self, room: int, tree_problem: str | None) -> RoundPlan:
        """Decide this round: a chain of the length policy's next length, at most `room - 1` tokens (the
        target adds one). `room` is how many tokens may still be committed."""
        return RoundPlan(num_tokens=max(0, min(self.length_policy.next_length(), room - 1)))

    def observe_round(self, plan: RoundPlan, outcome: RoundOutcome) -> None:
        """Learn from a finished round (the draft-length policy, for chain rounds)."""
        self.length_policy.update(
            outcome.drafted, outcome.accepted, outcome.draft_time_s, outcome.verify_time_s
        )

    def spawn(self) -> Drafter:
        """A drafter for another row of a batch: same model and options, its own per-sequence state.

        The draft-length policy is shared, so every row learns from every row's acceptance.
        """
        return copy.copy(self)


class TreeDrafter(Drafter):
    """A drafter that can also draft token trees (`draft_tree` / `commit_tree`).

    Whether a round is a tree is decided in one place, `plan_round`: trees when this drafter asks for them
    (`tree_shape` in its config, a tree policy, or trees it shapes itself), the target can verify them and
    more than the tree's depth is left to generate; a chain otherwise.

    Attributes:
        tree_policy: picks the tree per round (`UCBTreePolicy`, `DynamicTreePolicy`), or `None`.
    """

    tree_policy: UCBTreePolicy | DynamicTreePolicy | None = None

    #: Whether this drafter shapes trees itself (`draft_tree(..., shape=None)`): ReDrafter's beams, several
    #: prompt-lookup candidates. Such drafters draft chains where the target cannot verify trees; drafters
    #: given an explicit `tree_shape` or tree policy raise there instead.
    shapes_own_trees: bool = False

    @property
    def max_tree_depth(self) -> int | None:
        """Depth of the trees this drafter shapes itself (`None` when shapes come from config or policy)."""
        return None

    def _asks_for_trees(self) -> bool:
        return self.config.tree_shape is not None or self.tree_policy is not None

    def check_round_support(self, tree_problem: str | None) -> None:
        if tree_problem is not None and self._asks_for_trees():
            raise ValueError(tree_problem)

    def plan_round(self, room: int, tree_problem: str | None) -> RoundPlan:
        if tree_problem is None and (self._asks_for_trees() or self.shapes_own_trees):
            shape = self.tree_policy.choose() if self.tree_policy is not None else self.config.tree_shape
            depth = len(shape) if shape is not None else (self.max_tree_depth or 0)
            if room > depth:
                return RoundPlan(tree=True, shape=shape)
        return super().plan_round(room, tree_problem)

    def observe_round(self, plan: RoundPlan, outcome: RoundOutcome) -> None:
        if not plan.tree:
            super().observe_round(plan, outcome)
        elif self.tree_policy is not None:
            self.tree_policy.update(outcome.committed, outcome.round_time_s)

    @abstractmethod
    def draft_tree(
        self, input_ids: torch.Tensor, sampler: DraftSampler, shape: tuple[int, ...] | None = None
    ) -> TokenTree:
        """Propose a tree of tokens to follow `input_ids` `[1, L]`; `shape` as `RoundPlan.shape`."""

    @abstractmethod
    def commit_tree(self, input_ids: torch.Tensor, path: list[int]) -> None:
        """The target kept the nodes `path` (root first) of the last tree; `input_ids` `[1, L']` is the new
        committed sequence."""
