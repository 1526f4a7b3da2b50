"""The ReDrafter head: a small recurrent network that drafts from the target's own last hidden state.

This module, `configuration.py` and `card.py` import nothing from hf_specssm: `save_pretrained` copies them
next to the weights as the folder's remote code (`auto_map` in `config.json`), so a head folder loads with
`AutoModel.from_pretrained(folder, trust_remote_code=True)` where hf_specssm is not installed.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

# relative, not `hf_specssm.…`: this module is also the head folders' remote code, loaded without hf_specssm
from .card import write_model_card
from .configuration import ReDrafterConfig


class ResidualBlock(nn.Module):
    """`x + SiLU(Linear(x))` on `[..., D]`."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


@dataclass
class ReDrafterOutput(ModelOutput):
    """What a training forward of the head returns.

    Attributes:
        loss: sum over the `C` draft steps of the mean cross-entropy of that step (scalar), or `None` when
            no position has a label.
        logits: `[B, N, C, V_d]` the output layer's logits (`V_d = V` without a reduced vocabulary):
            `logits[b, t, i]` predicts token `t + i + 2` from the target's hidden state at `t` and the tokens
            `t + 1 … t + i + 1`.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class ReDrafterHead(PreTrainedModel):
    """A recurrent draft head (ReDrafter, arXiv 2403.09919) for one target model.

    Given the target's last hidden state `h` `[H]` at the position that chose token `g_0`, the head runs
    the recurrence `s_t = SiLU(W·E(g_{t-1}) + U·s_{t-1})` from `s_0 = 0` (`E(g) + s` when `config.rnn` is
    false) and scores token `t` with `lm_head(blocks(proj([h; s_t])))`. `E` is the target's own input
    embedding, shared and frozen: call `attach(target)` before drafting or training; it is not saved.

    With `config.draft_vocab_size` the output layer scores a reduced vocabulary: index 0 is the 'other'
    slot (every target token outside it, trained as one class and never drafted), indices `1 … V_d - 1`
    the target tokens the `draft_to_target` buffer names. `draft_logits` still returns target-vocabulary
    logits, so beam search, logits processors and the drafter see the target's ids.

    Args:
        config: the head's `ReDrafterConfig`.

    Buffers:
        draft_to_target: `[V_d]` (reduced vocabulary only) the target id of each draft id, `-1` at the
            'other' slot; saved with the weights.
    """

    config_class = ReDrafterConfig
    base_model_prefix = "redrafter"
    main_input_name = "input_ids"

    def __init__(self, config: ReDrafterConfig) -> None:
        super().__init__(config)
        size = config.hidden_size
        if config.rnn:
            self.state_input = nn.Linear(size, size)
            self.state_recurrence = nn.Linear(size, size, bias=False)
        if config.exit_dim is not None:
            self.input_projection = nn.Linear(2 * size, config.exit_dim)
        self.blocks = nn.ModuleList(ResidualBlock(config.head_width) for _ in range(config.num_draft_layers))
        self.lm_head = nn.Linear(config.head_width, config.output_size)
        if config.draft_vocab_size is not None:
            # until `set_draft_vocabulary`: the first V_d - 1 target ids
            identity = torch.arange(-1, config.draft_vocab_size - 1)
            self.register_buffer("draft_to_target", identity, persistent=True)
        # a plain attribute, not a submodule: the target owns (and saves) its embedding
        object.__setattr__(self, "_target_embedding", None)
        self.post_init()

    @property
    def reduced_vocabulary(self) -> bool:
        """Whether the output layer scores a reduced vocabulary (`config.draft_vocab_size`)."""
        return self.config.draft_vocab_size is not None

    def set_draft_vocabulary(self, target_ids: torch.Tensor) -> None:
        """Use the target tokens `target_ids` `[V_d - 1]` (distinct, in draft-id order from 1) as the
        reduced vocabulary.

        Raises:
            ValueError: the head scores the whole vocabulary, or the ids are not `V_d - 1` distinct ids of
                the target vocabulary.
        """
        if not self.reduced_vocabulary:
            raise ValueError(
                "this head scores the whole target vocabulary (config.draft_vocab_size is None)."
            )
        target_ids = torch.as_tensor(target_ids, dtype=torch.long).flatten()
        size = self.config.draft_vocab_size
        if target_ids.numel() != size - 1:
            raise ValueError(
                f"expected {size - 1} target ids (draft_vocab_size minus the 'other' slot), got {target_ids.numel()}."
            )
        if target_ids.unique().numel() != target_ids.numel():
            raise ValueError("the draft vocabulary repeats a target id.")
        if int(target_ids.min()) < 0 or int(target_ids.max()) >= self.config.vocab_size:
            raise ValueError(f"target ids must lie in [0, {self.config.vocab_size}).")
        mapping = torch.cat([target_ids.new_tensor([-1]), target_ids])
        self.draft_to_target.copy_(mapping.to(self.draft_to_target.device))

    def to_draft_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """Target ids `[...]` → output-layer ids `[...]` (0, the 'other' slot, outside a reduced vocabulary;
        the ids themselves when the head scores the whole vocabulary). `-100` (no label) stays `-100`."""
        if not self.reduced_vocabulary:
            return tokens
        mapping = self.draft_to_target
        # the inverse map, rebuilt only when the buffer changed (set, loaded or moved)
        key = (mapping.data_ptr(), mapping._version, mapping.device)
        if getattr(self, "_lookup_key", None) != key:
            lookup = torch.zeros(self.config.vocab_size, dtype=torch.long, device=mapping.device)
            lookup[mapping[1:]] = torch.arange(1, mapping.numel(), device=mapping.device)
            object.__setattr__(self, "_lookup", lookup)
            object.__setattr__(self, "_lookup_key", key)
        lookup = self._lookup
        ignored = tokens < 0
        mapped = lookup[tokens.to(mapping.device).clamp(min=0)]
        return torch.where(ignored.to(mapped.device), tokens.to(mapped.device), mapped)

    def expand_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Output-layer logits `[..., V_d]` → target-vocabulary logits `[..., V]` (the dtype's lowest value
        outside the draft vocabulary and for the 'other' slot, which is never drafted)."""
        if not self.reduced_vocabulary:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), torch.finfo(logits.dtype).min)
        full[..., self.draft_to_target[1:]] = logits[..., 1:]
        return full

    @property
    def is_attached(self) -> bool:
        """Whether a target's embedding is attached."""
        return self._target_embedding is not None

    def attach(self, target: PreTrainedModel) -> ReDrafterHead:
        """Share `target`'s input embedding `[V, H]` (frozen); returns `self`.

        Raises:
            ValueError: the target's vocabulary or hidden size differs from the head's (a head trained for
                another target).
        """
        text_config = target.config.get_text_config(decoder=True)
        embedding = target.get_input_embeddings()
        target_vocab = text_config.vocab_size
        target_hidden = embedding.weight.shape[1] if embedding is not None else text_config.hidden_size
        if target_vocab != self.config.vocab_size or target_hidden != self.config.hidden_size:
            trained_for = f" ({self.config.target_name})" if self.config.target_name else ""
            name = getattr(target.config, "name_or_path", "") or type(target).__name__
            raise ValueError(
                f"this ReDrafter head was trained for a target{trained_for} with vocab_size "
                f"{self.config.vocab_size} and hidden_size {self.config.hidden_size}, but the target {name} has "
                f"vocab_size {target_vocab} and hidden_size {target_hidden}; train a head for this target "
                "(hf-specssm train-redrafter)."
            )
        object.__setattr__(self, "_target_embedding", embedding)
        return self

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """`E(tokens)`: `[...]` ids → `[..., H]` in the head's dtype, without gradient into the target."""
        if self._target_embedding is None:
            raise RuntimeError("attach the target first: head.attach(target) shares its token embedding.")
        weight = self._target_embedding.weight.detach()
        return F.embedding(tokens.to(weight.device), weight).to(device=self.device, dtype=self.dtype)

    def initial_state(self, rows: int) -> torch.Tensor:
        """`s_0 = 0`: `[rows, H]`."""
        return torch.zeros(rows, self.config.hidden_size, device=self.device, dtype=self.dtype)

    def next_state(self, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One step of the recurrence: `s [..., H]` and tokens `g [...]` → `s' [..., H]`."""
        embedded = self.embed(tokens)
        if not self.config.rnn:
            return embedded + state
        return F.silu(self.state_input(embedded) + self.state_recurrence(state))

    def output_logits(self, hidden: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """The output layer's logits from `h [..., H]` and `s_t [..., H]`: `[..., V_d]` (`[..., V]` when the
        head scores the whole vocabulary); the training path."""
        x = torch.cat([hidden.to(self.dtype), state], dim=-1)
        if self.config.exit_dim is not None:
            x = self.input_projection(x)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)

    def draft_logits(self, hidden: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Logits of the next draft token from `h [..., H]` and `s_t [..., H]`, in the target vocabulary:
        `[..., V]`."""
        return self.expand_logits(self.output_logits(hidden, state))

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden_states: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> ReDrafterOutput:
        """Draft logits at every start position of a training sequence, and the ReDrafter loss.

        Start position `t` takes the target's hidden state there (the one that chose token `t + 1`, which
        is `g_0`) and predicts tokens `t + 2 … t + C + 1`.

        Args:
            input_ids: `[B, T]` tokens, `T >= C + 2`.
            hidden_states: `[B, T, H]` the target's last hidden states (its LM head's inputs) over `input_ids`.
            labels: `[B, T]` target tokens to predict, `-100` where a position carries no loss (default:
                `input_ids`); with a reduced vocabulary, tokens outside it are the 'other' class.

        Returns:
            `ReDrafterOutput` with the output layer's `logits` `[B, N, C, V_d]` (`V_d = V` without a reduced
            vocabulary), `N = T - C - 1`, and the summed loss.
        """
        steps = self.config.beam_length
        starts = input_ids.shape[1] - steps - 1
        if starts < 1:
            raise ValueError(
                f"training sequences need at least beam_length + 2 = {steps + 2} tokens, got {input_ids.shape[1]}."
            )
        labels = self.to_draft_ids(input_ids if labels is None else labels)
        hidden = hidden_states[:, :starts]
        state = torch.zeros_like(hidden, dtype=self.dtype)
        all_logits, loss = [], None
        for step in range(1, steps + 1):
            state = self.next_state(state, input_ids[:, step : step + starts])
            logits = self.output_logits(hidden, state)
            all_logits.append(logits)
            target = labels[:, step + 1 : step + 1 + starts]
            if bool((target != -100).any()):
                step_loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
                loss = step_loss if loss is None else loss + step_loss
        return ReDrafterOutput(loss=loss, logits=torch.stack(all_logits, dim=2))

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """transformers' `save_pretrained` (config and weights, never the target's embedding, and this module
        with the configuration and card modules as remote code, `auto_map` in `config.json`), plus a model
        card (`README.md`) recording the target, the training data and steps, and the measured acceptance."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_model_card(save_directory, self.config)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ):
        """Upload the head (config, weights, remote code and its generated model card) to the Hub.

        Takes transformers' own `push_to_hub` arguments. transformers' implementation replaces `README.md`
        with a generic card; this one uploads exactly what `save_pretrained` writes, with `tags` added to
        the card's metadata.

        Args:
            repo_id: the Hub repository (`name` or `org/name`); created when missing.
            commit_message: defaults to "Upload ReDrafter head".
            commit_description: the commit's description.
            private: visibility of a repository this call creates.
            token: Hub token (default: the stored login).
            revision: the branch to push to (created when missing).
            create_pr: open a pull request instead of committing.
            max_shard_size: largest weights file before sharding.
            tags: Hub tags added to the card's.

        Returns:
            the `huggingface_hub` commit info of the upload.
        """
        from huggingface_hub import HfApi

        api = HfApi(library_name="hf_specssm")
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            write_model_card(folder, self.config, tags=tags or ())
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or "Upload ReDrafter head",
                commit_description=commit_description,
                token=token,
                revision=revision,
                create_pr=create_pr,
            )


# `save_pretrained` writes this module (and the modules it imports) next to the weights
ReDrafterHead.register_for_auto_class("AutoModel")
