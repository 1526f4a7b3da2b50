"""Configuration of a ReDrafter head: its sizes, its beam shape, and the target it was trained for.

Imports nothing from hf_specssm: it is part of the head folders' remote code (see `modeling.py`).
"""

from __future__ import annotations

from transformers import PretrainedConfig


class ReDrafterConfig(PretrainedConfig):
    """A recurrent draft head (ReDrafter, arXiv 2403.09919) for one target model.

    The head reads the target's last hidden state `h` `[H]` and the target's token embedding `E` `[V, H]`,
    so `hidden_size` and `vocab_size` are the target's. `E` is borrowed from the target at run time and is
    not part of the checkpoint.

    Attributes:
        hidden_size: the target's hidden size `H` (also the size of the recurrent state `s`).
        vocab_size: the target's vocabulary size `V`.
        rnn: `s_t = SiLU(W·E(g_{t-1}) + U·s_{t-1})` when true; the cheaper running sum
            `s_t = E(g_{t-1}) + s_{t-1}` when false.
        num_draft_layers: residual blocks `x + SiLU(Linear(x))` between `[h; s_t]` and the output layer.
        exit_dim: width of the residual blocks; `None` keeps `2H` (no input projection).
        draft_vocab_size: `V_d`, the size of a reduced output vocabulary (the 'other' slot at index 0, then
            `V_d - 1` target tokens named by the `draft_to_target` buffer saved with the weights), or `None`
            to score the whole target vocabulary. A head for a large vocabulary (Qwen's 151,936 tokens) spends
            most of its weights on the output layer; a reduced one keeps it small. Its logits are returned in
            the target vocabulary all the same (the lowest value outside the draft vocabulary).
        beam_width: beams `M` kept by the beam search.
        beam_length: tokens `C` each beam drafts.
        initializer_range: std of the normal initialisation of the linear layers.
        target_name: name or path of the target the head was trained for (recorded, shown in the card).
        target_model_type: the target's `model_type` (recorded).
        training_data: what the head was trained on (recorded).
        training_steps: optimiser steps the weights have seen.
        mean_accepted_length: τ measured with the trained head (tokens per target forward), if measured.
        untrained_mean_accepted_length: τ of an untrained head on the same prompts, for comparison.
        simulated_tau: τ of greedy chains of `beam_length` drafts simulated on held-out answers of the
            target (heads trained on a distillation store), if measured.
    """

    model_type = "redrafter"

    hidden_size: int = 4096
    vocab_size: int = 32000
    rnn: bool = True
    num_draft_layers: int = 2
    exit_dim: int | None = None
    draft_vocab_size: int | None = None
    beam_width: int = 4
    beam_length: int = 4
    initializer_range: float = 0.02
    target_name: str | None = None
    target_model_type: str | None = None
    training_data: str | None = None
    training_steps: int = 0
    mean_accepted_length: float | None = None
    untrained_mean_accepted_length: float | None = None
    simulated_tau: float | None = None

    def __post_init__(self, **kwargs) -> None:
        for name in ("hidden_size", "vocab_size", "beam_width", "beam_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if not isinstance(self.num_draft_layers, int) or self.num_draft_layers < 0:
            raise ValueError(f"num_draft_layers must be an integer >= 0, got {self.num_draft_layers!r}.")
        if self.exit_dim is not None and (not isinstance(self.exit_dim, int) or self.exit_dim < 1):
            raise ValueError(f"exit_dim must be an integer >= 1 or None, got {self.exit_dim!r}.")
        if self.draft_vocab_size is not None and (
            not isinstance(self.draft_vocab_size, int)
            or isinstance(self.draft_vocab_size, bool)
            or not 2 <= self.draft_vocab_size <= self.vocab_size + 1
        ):
            raise ValueError(
                f"draft_vocab_size must be None or an integer in [2, vocab_size + 1 = {self.vocab_size + 1}] "
                f"(the 'other' slot and at least one target token), got {self.draft_vocab_size!r}."
            )
        if self.beam_width > self.draftable_tokens:
            raise ValueError(
                f"beam_width ({self.beam_width}) cannot exceed the tokens the head can draft "
                f"({self.draftable_tokens}): the first beam step expands one beam into its best tokens."
            )
        super().__post_init__(**kwargs)

    @property
    def draftable_tokens(self) -> int:
        """How many target tokens the head can propose: `vocab_size`, or `draft_vocab_size - 1`."""
        return self.vocab_size if self.draft_vocab_size is None else self.draft_vocab_size - 1

    @property
    def output_size(self) -> int:
        """Width of the output layer: `draft_vocab_size` when reduced, else `vocab_size`."""
        return self.vocab_size if self.draft_vocab_size is None else self.draft_vocab_size

    @property
    def head_width(self) -> int:
        """Width of the residual blocks: `exit_dim`, or `2H` when there is no input projection."""
        return self.exit_dim if self.exit_dim is not None else 2 * self.hidden_size


# `save_pretrained` writes this module next to the config, and `auto_map["AutoConfig"]` naming it
ReDrafterConfig.register_for_auto_class()
