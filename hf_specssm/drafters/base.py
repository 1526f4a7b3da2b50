"""The drafter protocol shared by every kind of drafter."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, PreTrainedModel

from hf_specssm.config import DraftConfig
from hf_specssm.policies.draft_length import DraftGate, DraftLengthPolicy, make_policy
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


_MASK64 = (1 << 64) - 1
#: sub-streams of `PositionNoise`: one independent family of draws per purpose
GUMBEL_STREAM, ACCEPT_STREAM, RESIDUAL_STREAM = 0, 1, 2


def _mix64(value: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit integers that scatters nearby inputs."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


class PositionNoise:
    """Random draws keyed by `(seed, row, sequence position, stream, index)` instead of drawn in order.

    A draw for the token at position `p` of a row is the same whichever round drafts or verifies `p`, so
    a speculative call's randomness does not depend on how positions were grouped into rounds (draft
    lengths and tree shapes, which the adaptive schedule and the tree bandit pick from measured times).

    - `gumbel(p, V)`: `[V]` standard Gumbel noise; `argmax(scores + gumbel)` samples `softmax(scores)`
      (Gumbel-max) and `topk` of it samples without replacement (Gumbel-top-k). Drafter and target use the
      same vector at `p`, which is what makes coupled acceptance (`decoding.acceptance`) reproducible.
    - `uniform(p, stream, index)`: one uniform in `[0, 1)`, computed in Python (identical on every device).
    - `categorical(probs, p)`: an inverse-CDF draw from `probs` with `uniform(p, RESIDUAL_STREAM)`.

    Gumbel vectors come from a torch generator on the scores' device seeded with the key (CPU and CUDA
    generators differ, so the same seed gives different text on CPU and on GPU; each is reproducible).

    Args:
        seed: the call's seed (`from_global_generator`: one draw from torch's default generator).
        row: the prompt's index in the caller's batch.
    """

    #: Gumbel vectors kept for reuse (the drafter and the target draw the same positions within a round)
    cache_size = 32

    def __init__(self, seed: int, row: int = 0) -> None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
        self.seed = seed & _MASK64
        self.row = row
        self._gumbels: dict[tuple[int, int, str], torch.Tensor] = {}
        self._generators: dict[str, torch.Generator] = {}

    @classmethod
    def from_global_generator(cls, row: int = 0) -> PositionNoise:
        """A stream whose seed is one draw from torch's default CPU generator, so `torch.manual_seed(s)`
        before `generate` fixes every token, as it does for plain sampling."""
        return cls(int(torch.randint(0, 2**62, (), dtype=torch.long)), row)

    def for_row(self, row: int) -> PositionNoise:
        """The same call's stream for another row of the batch."""
        return PositionNoise(self.seed, row)

    def key(self, position: int, stream: int, index: int = 0) -> int:
        """A 64-bit key for one draw."""
        value = 0
        for part in (self.seed, self.row, position, stream, index):
            value = _mix64(value ^ (part & _MASK64))
        return value

    def uniform(self, position: int, stream: int = ACCEPT_STREAM, index: int = 0) -> float:
        """A uniform in `[0, 1)` for draw `index` of `stream` at `position`."""
        return (self.key(position, stream, index) >> 11) * 2.0**-53

    def categorical(self, probs: torch.Tensor, position: int) -> int:
        """A token drawn from `probs` `[V]` (non-negative, any positive total) by inverse CDF."""
        cdf = probs.to(torch.float64).cumsum(dim=0)
        threshold = self.uniform(position, RESIDUAL_STREAM) * float(cdf[-1])
        token = int(torch.searchsorted(cdf, cdf.new_tensor([threshold]), right=True)[0])
        if token >= probs.shape[0]:
            # rounding put the threshold at the total: the last token with probability > 0
            token = int((probs > 0).nonzero()[-1, 0])
        return token

    def gumbel(self, position: int, vocab: int, device: torch.device) -> torch.Tensor:
        """`[V]` standard Gumbel noise for `position`, on `device` (float64; float32 on MPS)."""
        device = torch.device(device)
        entry = (position, vocab, str(device))
        noise = self._gumbels.get(entry)
        if noise is None:
            generator = self._generators.get(str(device))
            if generator is None:
                generator = self._generators[str(device)] = torch.Generator(device=device)
            generator.manual_seed(self.key(position, GUMBEL_STREAM))
            # float64 where the device has it (MPS does not)
            dtype = torch.float32 if device.type == "mps" else torch.float64
            uniforms = torch.rand(vocab, generator=generator, device=device, dtype=dtype)
            noise = -torch.log(-torch.log(uniforms))
            if len(self._gumbels) >= self.cache_size:
                self._gumbels.pop(next(iter(self._gumbels)))
            self._gumbels[entry] = noise
        return noise

    def perturb(self, scores: torch.Tensor, position: int) -> torch.Tensor:
        """`scores` `[..., V]` (log-probabilities up to a constant) plus the Gumbel noise of `position`
        (in the noise's dtype): its argmax is a sample of `softmax(scores)` keyed by `position`."""
        noise = self.gumbel(position, scores.shape[-1], scores.device)
        return scores.to(noise.dtype) + noise


class DraftSampler:
    """Turns drafter logits into draft tokens with the target's logits processors.

    Drafting with the same processors as the target (temperature, top-k/top-p, repetition penalty, bad
    words…) makes drafts agree with the target more often; losslessness never depends on it, because
    acceptance uses the distribution each token was actually drawn from (or, coupled, the target's own
    keyed draw).

    When sampling, every draw is keyed by the position of the drafted token (`PositionNoise.gumbel`), so
    the draft at position `p` is the same whichever round drafts it, and the target's coupled acceptance
    agrees with it as often as the drafter's and target's distributions allow.

    Args:
        logits_processor: the target's prepared processors (and warpers, when sampling).
        do_sample: sample from the processed distribution instead of taking its argmax.
        noise: the row's keyed draws; when sampling without one, a stream seeded by one draw from torch's
            default generator.
    """

    def __init__(
        self,
        logits_processor: LogitsProcessorList | None,
        do_sample: bool,
        noise: PositionNoise | None = None,
    ) -> None:
        self.logits_processor = logits_processor
        self.do_sample = do_sample
        self.noise = noise if noise is not None or not do_sample else PositionNoise.from_global_generator()

    def scores(self, sequence: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """`logits` `[1, V]` after the processors, with `sequence` `[1, L]` as their prefix."""
        return self.logits_processor(sequence, logits) if self.logits_processor else logits

    def choose(
        self, sequence: torch.Tensor, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pick the next draft token.

        Args:
            sequence: `[1, L]` committed tokens followed by the drafts so far; the new token's position
                is `L`.
            logits: `[1, V]` float32 drafter logits for the next position.

        Returns:
            `(token [1], probs [1, V] or None)`.
        """
        scores = self.scores(sequence, logits)
        if self.do_sample:
            probs = torch.softmax(scores, dim=-1)
            return self.noise.perturb(scores, sequence.shape[1]).argmax(dim=-1), probs
        return scores.argmax(dim=-1), None

    def choose_children(
        self, sequence: torch.Tensor, logits: torch.Tensor, width: int, sample: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A tree node's children: its best `width` tokens or (`sample`, when sampling) `width` tokens drawn
        without replacement (Gumbel-top-k keyed by the children's position; fewer if fewer tokens have
        probability > 0).

        Args:
            sequence: `[1, L]` the node's prefix; its children sit at position `L`.
            logits: `[1, V]` float32 drafter logits after the node.
            width: children wanted.
            sample: draw the children instead of taking the top `width` (only when sampling).

        Returns:
            `(tokens [w], probs [V] or None)`: the children and, when drawn, the distribution they were
            drawn from.
        """
        scores = self.scores(sequence, logits.clone())
        width = min(width, scores.shape[-1])
        if not (sample and self.do_sample):
            return scores[0].topk(width).indices, None
        probs = torch.softmax(scores[0].float(), dim=-1)
        width = min(width, int((probs > 0).sum()))
        return self.noise.perturb(scores[0], sequence.shape[1]).topk(width).indices, probs


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
        self.draft_gate: DraftGate | None = (
            DraftGate(self.config, catches_up=self.catches_up)
            if self.config.schedule == "adaptive" or self.gates_drafting
            else None
        )

    #: Whether the next draft after rounds that drafted nothing first reads every token committed in them
    #: (a model drafter's forward over them), so that draft's round costs more than drafting does.
    catches_up: bool = False

    #: Whether drafting is switched off while it does not pay (`policies.draft_length.DraftGate`) under
    #: every schedule, not only `"adaptive"`: drafters whose length is an upper bound anyway (prompt lookup).
    gates_drafting: bool = False

    #: Whether the loop should hand this drafter the target's last hidden state each round (draft heads
    #: such as ReDrafter read it); the target then captures the input of its output embedding.
    wants_target_hidden: bool = False

    #: Whether the drafter also drafts without those hidden states (from its tokens alone), so that a target
    #: that cannot hand them over (batches) is served instead of refused.
    target_hidden_optional: bool = False

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

    def begin_sequence(self, input_ids: torch.Tensor) -> None:
        """What the loop calls for each row of a call: `begin`, and tell the draft gate a new sequence starts
        (its first drafted round reads the prompt, `DraftGate.begin_sequence`)."""
        if self.draft_gate is not None:
            self.draft_gate.begin_sequence()
        self.begin(input_ids)

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
        length = self.length_policy.next_length()
        if self.draft_gate is not None:
            if not self.draft_gate.allows_drafting():
                length = 0
            elif self.draft_gate.probing:
                length = min(length, 1)  # a probe asks the first draft only: it costs least
        return RoundPlan(num_tokens=max(0, min(length, room - 1)))

    def observe_round(self, plan: RoundPlan, outcome: RoundOutcome) -> None:
        """Learn from a finished round (the draft-length policy, for chain rounds)."""
        timed = True
        if self.draft_gate is not None:
            self.draft_gate.update(outcome.drafted, outcome.committed, outcome.round_time_s)
            timed = self.draft_gate.last_round_timed
        if plan.num_tokens == 0 and not plan.tree:
            return  # a round planned without drafts (gated, or no room) says nothing about draft lengths
        # a round whose drafter also read a prompt or a closed stretch teaches acceptance, not cost
        self.length_policy.update(
            outcome.drafted, outcome.accepted, outcome.draft_time_s, outcome.verify_time_s, timed=timed
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
            return
        # the sequence's first drafted round also read the prompt: no sample of what a shape costs
        timed = self.draft_gate.tree_round() if self.draft_gate is not None else True
        if self.tree_policy is not None and timed:
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
