"""A Mamba2 drafter over a reduced vocabulary that speaks the target's full vocabulary.

The drafter's embedding and LM head cover only the `V_d - 1` target tokens it was trained on (the most
frequent ones) plus one "other" slot at index 0. From the outside it is an ordinary causal LM over the
target's vocabulary:

    target ids [B, T] → draft ids (`target_to_draft`, unknown → 0) → Mamba2 → draft logits [B, T, V_d]
    → full logits [B, T, V] with each draft token's logit at its target id and the dtype's lowest value
      everywhere else (the "other" slot included)

so the draft distribution is defined over the full vocabulary with exact zeros outside the draft
vocabulary, which is what keeps speculative sampling lossless. Everything else (cache, mixers, state
rollback, tree forking) is transformers' `Mamba2ForCausalLM`.

A *feature-conditioned* drafter (`config.feature_size` set) also reads the target's last hidden state
`f` `[B, 1|T, F]` at the last accepted position and the draft depth `j` (own tokens fed since then):

    u = norm_f(mamba(x)) + W_f · rmsnorm(f) + depth_embedding[j]
    logits = lm_head(u)                                         (config.feature_mlp_size None)
    logits = lm_head(u + W_down · silu(W_up · u))               (config.feature_mlp_size set)

`W_f`, the depth offsets and `W_down` start at zero, so a feature-conditioned drafter initialised from a
token-only one drafts exactly like it until trained; without `target_features` the feature terms are absent
(`u = norm_f(mamba(x))`, as before the first verification) and the MLP, if any, still applies.

This module and `configuration_mamba_drafter.py` import nothing from hf_specssm: `save_pretrained` copies
them next to the weights as the folder's remote code, with `auto_map` in `config.json`, so a drafter folder
loads with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` where hf_specssm is not
installed. hf_specssm itself registers the classes with the Auto classes (`hf_specssm.drafters.mamba`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import Mamba2ForCausalLM, PretrainedConfig
from transformers.modeling_outputs import ModelOutput

# relative, not `hf_specssm.…`: this module is also the drafter folders' remote code, loaded without hf_specssm
from .configuration_mamba_drafter import MambaDrafterConfig

OTHER_INDEX = 0
MAP_NAME = "draft_to_target"
# safetensors' integer dtypes: the map holds token ids
INTEGER_DTYPES = ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")


def check_vocabulary_map(mapping: torch.Tensor, config: MambaDrafterConfig, source: str) -> None:
    """Raise `ValueError` unless `mapping` is a valid `draft_to_target` for `config`.

    Valid: shape `[vocab_size]`, `-1` at the 'other' slot (index 0), then distinct target ids in
    `[0, target_vocab_size)`.

    Args:
        mapping: the `draft_to_target` tensor.
        config: the drafter's config (`vocab_size`, `target_vocab_size`).
        source: where the map came from (a file), for the message.
    """
    if tuple(mapping.shape) != (config.vocab_size,):
        raise ValueError(
            f"{source}: {MAP_NAME} has shape {list(mapping.shape)} but config.json's vocab_size is "
            f"{config.vocab_size} (expected [{config.vocab_size}]); the weights and the config do not belong together."
        )
    if mapping.is_floating_point() or mapping.dtype == torch.bool:
        raise ValueError(f"{source}: {MAP_NAME} must hold integer token ids, got {mapping.dtype}.")
    mapping = mapping.long().cpu()
    if int(mapping[OTHER_INDEX]) != -1:
        raise ValueError(
            f"{source}: {MAP_NAME}[0] must be -1 (the 'other' slot), got {int(mapping[OTHER_INDEX])}."
        )
    known = mapping[1:]
    outside = ((known < 0) | (known >= config.target_vocab_size)).nonzero().flatten()
    if outside.numel():
        draft_id = int(outside[0]) + 1
        raise ValueError(
            f"{source}: {MAP_NAME} maps draft id {draft_id} to target id {int(mapping[draft_id])}, outside the "
            f"target vocabulary [0, {config.target_vocab_size}) of config.json's target_vocab_size."
        )
    if known.unique().numel() != known.numel():
        raise ValueError(f"{source}: {MAP_NAME} maps two draft ids to the same target id.")


class MambaDrafterForCausalLM(Mamba2ForCausalLM):
    """Mamba2 over a draft vocabulary; takes and returns target-vocabulary ids and logits.

    Buffers:
        draft_to_target: `[V_d]` target id of each draft id (`-1` at the "other" slot); saved with the
            weights.
    `target_to_draft` (`[V]`, the inverse map, 0 outside the draft vocabulary) is derived from it.
    """

    config_class = MambaDrafterConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *args, **kwargs):
        """`Mamba2ForCausalLM.from_pretrained`, refusing incomplete folders before building any model.

        A local folder without `config.json` (transformers would build a default-sized Mamba2 of several
        GB) and weights whose `draft_to_target` map is missing, of the wrong shape or dtype, or holds ids
        outside the target vocabulary raise `ValueError` naming the file and the tensor.
        """
        folder = Path(pretrained_model_name_or_path) if pretrained_model_name_or_path is not None else None
        local = folder is not None and folder.is_dir()
        config = kwargs.get("config")
        if local and not isinstance(config, PretrainedConfig) and not (folder / "config.json").is_file():
            raise ValueError(
                f"{folder} has no config.json: a {cls.__name__} folder holds config.json and "
                "model.safetensors (save_pretrained writes both). Refusing to build a default-sized model."
            )
        source = _weights_file(folder, kwargs) if local else None
        if source is not None:
            _check_map_header(source, config if isinstance(config, PretrainedConfig) else None, folder)
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
        )
        where = str(source) if source is not None else str(pretrained_model_name_or_path)
        if MAP_NAME in info.get("missing_keys", ()):
            raise ValueError(
                f"{where} has no {MAP_NAME} tensor (the draft-to-target vocabulary map); the checkpoint is "
                "incomplete: save the drafter again with save_pretrained."
            )
        check_vocabulary_map(model.draft_to_target, model.config, where)
        return (model, info) if wants_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """transformers' `save_pretrained`, with this module and its configuration copied next to the weights.

        `config.json` gets `auto_map` entries for `AutoConfig`, `AutoModelForCausalLM` and `AutoModel` (all
        three load this class), so the folder loads with `trust_remote_code=True` where hf_specssm is not
        installed; with hf_specssm imported, plain `from_pretrained` uses the registered classes.
        """
        # transformers writes the `auto_map` entry of the one class registered with `register_for_auto_class`
        # (AutoModelForCausalLM); the drafter has no separate base model, so AutoModel loads it too
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map["AutoModel"] = f"{type(self).__module__.rpartition('.')[2]}.{type(self).__name__}"
        self.config.auto_map = auto_map
        super().save_pretrained(save_directory, *args, **kwargs)

    def __init__(self, config: MambaDrafterConfig) -> None:
        super().__init__(config)
        self.register_buffer(
            "draft_to_target", torch.full((config.vocab_size,), -1, dtype=torch.long), persistent=True
        )
        # derived from draft_to_target on first use (and again whenever that buffer changes or moves)
        self._target_to_draft: torch.Tensor | None = None
        self._lookup_key: tuple | None = None
        if getattr(config, "feature_size", None):
            self.feature_norm = torch.nn.RMSNorm(config.feature_size, eps=1e-6)
            self.feature_proj = torch.nn.Linear(config.feature_size, config.hidden_size, bias=False)
            self.depth_embedding = torch.nn.Embedding(config.max_draft_depth, config.hidden_size)
            if getattr(config, "feature_mlp_size", None):
                self.feature_mlp_up = torch.nn.Linear(config.hidden_size, config.feature_mlp_size, bias=False)
                self.feature_mlp_down = torch.nn.Linear(
                    config.feature_mlp_size, config.hidden_size, bias=False
                )
            self.zero_feature_terms()

    @property
    def reads_target_hidden(self) -> bool:
        """Whether this drafter is feature-conditioned (reads the target's last hidden state)."""
        return bool(getattr(self.config, "feature_size", None))

    @property
    def fuses_head_input(self) -> bool:
        """Whether a residual MLP transforms the LM head's input (`config.feature_mlp_size` set)."""
        return bool(getattr(self.config, "feature_mlp_size", None)) and self.reads_target_hidden

    def zero_feature_terms(self, generator: torch.Generator | None = None) -> None:
        """Zero the feature projection, the depth offsets and the MLP's output: the drafter then drafts as if
        token-only (the MLP's input weights get a fresh random init from `generator`, so that its output
        weights can learn)."""
        with torch.no_grad():
            self.feature_proj.weight.zero_()
            self.depth_embedding.weight.zero_()
            self.feature_norm.weight.fill_(1.0)
            if self.fuses_head_input:
                self.feature_mlp_down.weight.zero_()
                self.feature_mlp_up.weight.normal_(0.0, self.config.hidden_size**-0.5, generator=generator)

    def _init_weights(self, module: torch.nn.Module) -> None:
        # the feature terms start at zero (see the module docstring), not at transformers' random init
        zeroed = ("feature_proj", "depth_embedding", "feature_mlp_down")
        if any(module is getattr(self, name, None) for name in zeroed):
            with torch.no_grad():
                module.weight.zero_()
            return
        if module is getattr(self, "feature_mlp_up", None):
            with torch.no_grad():
                module.weight.normal_(0.0, self.config.hidden_size**-0.5)
            return
        if module is getattr(self, "feature_norm", None):
            with torch.no_grad():
                module.weight.fill_(1.0)
            return
        super()._init_weights(module)

    def fuse_head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """`u + W_down · silu(W_up · u)` `[..., H]` for the LM head's input `u` (features already added); `u`
        itself when the drafter has no MLP."""
        if not self.fuses_head_input:
            return hidden
        weight = self.feature_mlp_up.weight
        update = self.feature_mlp_down(torch.nn.functional.silu(self.feature_mlp_up(hidden.to(weight.dtype))))
        return hidden + update.to(hidden.dtype)

    def feature_bias(
        self, target_features: torch.Tensor, draft_depth: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """`W_f · rmsnorm(f) + depth_embedding[j]` `[B, T, H]` for features `[B, T, F]` and depths (int or `[B, T]`)."""
        if not self.reads_target_hidden:
            raise ValueError("this drafter is not feature-conditioned (config.feature_size is None).")
        features = target_features.to(self.feature_proj.weight.dtype)
        bias = self.feature_proj(self.feature_norm(features))
        if draft_depth is not None:
            depth = torch.as_tensor(draft_depth, dtype=torch.long, device=bias.device)
            # an int depth gives [H] (every position), a [B, T] one gives [B, T, H]
            bias = bias + self.depth_embedding(depth.clamp(0, self.config.max_draft_depth - 1))
        return bias

    @property
    def output_vocab_size(self) -> int:
        """The vocabulary of the logits this model returns: the target's."""
        return self.config.target_vocab_size

    def set_draft_vocabulary(self, target_ids: torch.Tensor) -> None:
        """Use the target tokens `target_ids` `[V_d - 1]` (distinct, in draft-id order from 1) as the vocabulary."""
        target_ids = torch.as_tensor(target_ids, dtype=torch.long).flatten()
        if target_ids.numel() != self.config.vocab_size - 1:
            raise ValueError(
                f"expected {self.config.vocab_size - 1} target ids (vocab_size minus the 'other' slot), got "
                f"{target_ids.numel()}."
            )
        if target_ids.unique().numel() != target_ids.numel():
            raise ValueError("the draft vocabulary repeats a target id.")
        if int(target_ids.min()) < 0 or int(target_ids.max()) >= self.config.target_vocab_size:
            raise ValueError(f"target ids must lie in [0, {self.config.target_vocab_size}).")
        mapping = torch.cat([target_ids.new_tensor([-1]), target_ids]).to(self.draft_to_target.device)
        self.draft_to_target.copy_(mapping)

    @property
    def target_to_draft(self) -> torch.Tensor:
        """`[V]` draft id of each target id (0, the 'other' slot, outside the draft vocabulary)."""
        source = self.draft_to_target
        key = (source.data_ptr(), source._version, source.device)
        if self._target_to_draft is None or self._lookup_key != key:
            lookup = torch.zeros(self.config.target_vocab_size, dtype=torch.long, device=source.device)
            known = source >= 0
            lookup[source[known]] = torch.arange(source.numel(), device=source.device)[known]
            self._target_to_draft, self._lookup_key = lookup, key
        return self._target_to_draft

    def to_draft_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Target ids `[...]` → draft ids `[...]` (tokens outside the draft vocabulary → the 'other' slot)."""
        return self.target_to_draft[input_ids]

    def draft_logits(self, draft_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits over the draft vocabulary `[B, T, V_d]` for draft ids `[B, T]` (the training path)."""
        return super().forward(input_ids=draft_ids, **kwargs).logits

    def draft_hidden(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """The LM head's input `[B, T, H]` (after the final norm) for draft ids `[B, T]` (the training path
        of feature-conditioned drafters, which add `feature_bias` before `lm_head`)."""
        return self.backbone(input_ids=draft_ids).last_hidden_state

    def expand_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits `[..., V_d]` → target-vocabulary logits `[..., V]` (lowest value outside)."""
        full = logits.new_full(
            (*logits.shape[:-1], self.config.target_vocab_size), torch.finfo(logits.dtype).min
        )
        known = self.draft_to_target[1:]
        full[..., known] = logits[..., 1:]
        return full

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache_params=None,
        labels: torch.LongTensor | None = None,
        target_features: torch.Tensor | None = None,
        draft_depth: int | torch.Tensor | None = None,
        **kwargs,
    ) -> ModelOutput:
        """`Mamba2ForCausalLM.forward` in target ids: `input_ids` `[B, T]` → `logits` `[B, T', V]`.

        `labels` (target ids, `-100` ignored) give the cross-entropy over the draft vocabulary, with
        tokens outside it counted as the 'other' slot. `target_features` `[B, 1|T, F]` and `draft_depth`
        (int or `[B, T]`) condition a feature-conditioned drafter's logits (see the module docstring).
        """
        draft_ids = self.to_draft_ids(input_ids) if input_ids is not None else None
        if target_features is None and not self.fuses_head_input:
            output = super().forward(
                input_ids=draft_ids, inputs_embeds=inputs_embeds, cache_params=cache_params, **kwargs
            )
        else:
            head = self.get_output_embeddings()
            if not getattr(head, "_adds_feature_bias", False):
                # installed on first use, so a replaced or copied head gets it too
                head.register_forward_pre_hook(_add_feature_bias)
                head._adds_feature_bias = True
            if target_features is not None:
                head._feature_bias = self.feature_bias(target_features, draft_depth)
            # a bound method, not a module: nothing is registered on the head
            head._fuse_head_input = self.fuse_head_input
            try:
                output = super().forward(
                    input_ids=draft_ids, inputs_embeds=inputs_embeds, cache_params=cache_params, **kwargs
                )
            finally:
                head._feature_bias = None
                head._fuse_head_input = None
        if labels is not None:
            draft_labels = torch.where(labels < 0, labels, self.to_draft_ids(labels.clamp(min=0)))
            output.loss = torch.nn.functional.cross_entropy(
                output.logits[:, :-1].flatten(0, 1).float(), draft_labels[:, 1:].flatten(), ignore_index=-100
            )
        output.logits = self.expand_logits(output.logits)
        return output


def _add_feature_bias(module: torch.nn.Module, args: tuple) -> tuple | None:
    """Pre-hook on a feature-conditioned drafter's LM head: adds the pending feature bias to its input, then
    applies the drafter's MLP if it has one.

    The bias (`module._feature_bias`, set by `MambaDrafterForCausalLM.forward` for one call) is `[B, 1, H]`
    (one feature for every position) or `[B, T, H]`; when transformers keeps only the last positions'
    logits, the bias is cut to match. The bias and the MLP's entry point (`module._fuse_head_input`) live on
    the head for one call only, so copies of the model stay apart.
    """
    bias = getattr(module, "_feature_bias", None)
    fuse = getattr(module, "_fuse_head_input", None)
    if bias is None and fuse is None:
        return None
    hidden = args[0]
    if bias is not None:
        if bias.shape[1] not in (1, hidden.shape[1]):
            bias = bias[:, -hidden.shape[1] :]
        hidden = hidden + bias.to(hidden.dtype)
    if fuse is not None:
        hidden = fuse(hidden)
    return (hidden, *args[1:])


def _weights_file(folder: Path, kwargs: dict) -> Path | None:
    """The local safetensors file holding `draft_to_target` (through the shard index if there is one)."""
    subfolder = kwargs.get("subfolder") or ""
    base = folder / subfolder
    index = base / "model.safetensors.index.json"
    if index.is_file():
        try:
            shard = json.loads(index.read_text())["weight_map"].get(MAP_NAME)
        except (ValueError, KeyError, AttributeError):
            return None
        return base / shard if shard else index
    single = base / "model.safetensors"
    return single if single.is_file() else None


def _check_map_header(source: Path, config: PretrainedConfig | None, folder: Path) -> None:
    """Check `draft_to_target` in the safetensors header of `source`, before any model is built."""
    if source.name.endswith(".index.json"):
        raise ValueError(f"{source} names no shard for {MAP_NAME}: the checkpoint is incomplete.")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(source), "pt") as handle:
            if MAP_NAME not in handle.keys():  # noqa: SIM118 - safe_open has no __contains__
                raise ValueError(
                    f"{source} has no {MAP_NAME} tensor (the draft-to-target vocabulary map); the checkpoint "
                    "is incomplete: save the drafter again with save_pretrained."
                )
            piece = handle.get_slice(MAP_NAME)
            shape, dtype = piece.get_shape(), piece.get_dtype()
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{source} is not a readable safetensors file ({error}).") from None
    if dtype not in INTEGER_DTYPES:
        raise ValueError(f"{source}: {MAP_NAME} must hold integer token ids, got dtype {dtype}.")
    if config is None:
        try:
            config = MambaDrafterConfig.from_pretrained(folder)
        except (OSError, ValueError):
            return
    if list(shape) != [config.vocab_size]:
        raise ValueError(
            f"{source}: {MAP_NAME} has shape {list(shape)} but config.json's vocab_size is {config.vocab_size} "
            f"(expected [{config.vocab_size}]); the weights and the config do not belong together."
        )


# `save_pretrained` writes this module (and the configuration it imports) next to the weights
MambaDrafterForCausalLM.register_for_auto_class("AutoModelForCausalLM")
