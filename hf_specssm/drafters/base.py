"""The drafter protocol shared by every kind of drafter."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, PreTrainedModel

from hf_specssm.config import DraftConfig
from hf_specssm.policies.draft_length import DraftLengthPolicy, make_policy


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

    #: Whether this drafter shapes its own trees (`draft_tree(input_ids, sampler, shape=None)`, e.g. from
    #: ReDrafter's beams); it then also defines `max_tree_depth`. The loop verifies them as trees on Transformer
    #: targets with greedy decoding and asks for chains (`draft`) elsewhere.
    drafts_trees: bool = False

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

    def spawn(self) -> Drafter:
        """A drafter for another row of a batch: same model and options, its own per-sequence state.

        The draft-length policy is shared, so every row learns from every row's acceptance.
        """
        return copy.copy(self)
