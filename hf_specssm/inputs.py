"""Checking what a speculative `generate` call was given, before anything runs.

transformers checks few of its inputs and some mistakes run silently in a speculative loop: a mask of
the wrong length, an empty prompt, right padding, a drafter whose tokenizer numbers tokens differently.
`validate_generate_inputs` applies transformers' rules (and the ones its model forwards enforce by
failing) to every input and raises `ValueError` naming the argument and the fix.

It runs either on `generate`'s raw arguments or on the ones transformers prepared for the decoding loop
(where an all-ones mask may already have been dropped; its length survives in the generation config).
Tokenizers are compared when both are given, or when a model was loaded from a local folder holding
tokenizer files; nothing is ever fetched from the Hub.

`check_generation_settings` refuses the generation settings the speculative loop cannot honour, and
`user_set` tells a setting somebody set from a default transformers filled in (docs/compatibility.md
lists what happens to every `GenerationConfig` field).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, SynthIDTextWatermarkingConfig

from hf_specssm import _compat

# Any one of these in a model folder means a tokenizer can be loaded from it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
LEFT_PADDING_FIX = "set tokenizer.padding_side = 'left' before tokenizing the batch"


def validate_generate_inputs(
    model: PreTrainedModel,
    input_ids: Any,
    model_kwargs: dict[str, Any],
    generation_config: GenerationConfig | None = None,
    tokenizer: Any = None,
    assistant_tokenizer: Any = None,
    drafter_model: PreTrainedModel | None = None,
) -> None:
    """Raise `ValueError` for an input of a speculative `generate` call that would run wrong or crash.

    Checks, in order: `input_ids` (a 2D integer tensor, not empty, ids inside the target's vocabulary);
    `attention_mask` (2D, one entry per prompt token, 0/1 values, left padding, no empty row); the mask
    length transformers recorded when it dropped an all-ones mask, and `position_ids`' length; the two
    tokenizers (same id for every token both know).

    Args:
        model: the target.
        input_ids: the prompt `[B, T]`, as given or as prepared by `generate`.
        model_kwargs: `generate`'s keyword arguments for the model (`attention_mask`, `position_ids`,
            `past_key_values`, `inputs_embeds`, …), raw or prepared.
        generation_config: the merged generation config, when known (it records the length of a mask
            transformers dropped).
        tokenizer: the target's tokenizer (`generate(..., tokenizer=)`), if given.
        assistant_tokenizer: the drafter's tokenizer (`generate(..., assistant_tokenizer=)`), if given.
        drafter_model: the drafter's model, if it has one; its local folder may provide its tokenizer.

    Raises:
        ValueError: naming the argument, what is wrong with it, and how to fix it.
    """
    prompt_length = _check_input_ids(model, input_ids, model_kwargs)
    past_length = _past_length(model_kwargs)
    _check_attention_mask(input_ids, model_kwargs.get("attention_mask"), past_length, tokenizer)
    _check_prepared_lengths(input_ids, model_kwargs, generation_config, prompt_length + past_length)
    _check_tokenizers(model, drafter_model, tokenizer, assistant_tokenizer)


Settings = GenerationConfig | Mapping[str, Any]

#: the assisted-decoding settings that map onto `DraftConfig` (`config.draft_config_from_assisted_settings`)
ASSISTED_DRAFT_SETTINGS = (
    "num_assistant_tokens",
    "num_assistant_tokens_schedule",
    "assistant_confidence_threshold",
)


def setting(settings: Settings | None, name: str) -> Any:
    """The value of generation setting `name` in a `GenerationConfig` or a mapping (`None` if absent)."""
    if settings is None:
        return None
    if isinstance(settings, Mapping):
        return settings.get(name)
    return getattr(settings, name, None)


def user_set(settings: Settings | None, name: str) -> Any:
    """`name`'s value when somebody set it, else `None`.

    transformers fills every unset field with a global default before the decoding loop
    (`num_assistant_tokens=20`, `num_assistant_tokens_schedule="constant"`, …), so a value equal to that
    default reads as unset: hf_specssm's own defaults then apply.
    """
    value = setting(settings, name)
    if value is None or value == _compat.generation_defaults().get(name):
        return None
    return value


def _is_on(value: Any) -> bool:
    return value is not None and value is not False


def _above(threshold: float) -> Callable[[Any], bool]:
    return lambda value: value is not None and value > threshold


def _cache_refused(value: Any) -> bool:
    return value in ("quantized", "paged")


def _stateful_watermark(value: Any) -> bool:
    return isinstance(value, SynthIDTextWatermarkingConfig)


# (setting, when it is refused, why and what to do instead)
_REFUSED_SETTINGS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    (
        "assistant_early_exit",
        _is_on,
        "drafting with the target's own early layers is not supported by hf_specssm; pass a drafter as "
        "assistant_model= (or prompt_lookup_num_tokens=) and drop assistant_early_exit.",
    ),
    (
        "use_mtp",
        _is_on,
        "drafting with the target's multi-token-prediction heads is not supported by hf_specssm; drop "
        "use_mtp (or call transformers' generate without hf_specssm).",
    ),
    (
        "speculation_type",
        _is_on,
        "DFlash drafting is not supported by hf_specssm; drop speculation_type and pass assistant_model=.",
    ),
    (
        "assistant_ensemble_weight",
        _is_on,
        "it verifies against a mix of the target's and the drafter's distributions, so the output is no "
        "longer the target's; hf_specssm is lossless only: drop assistant_ensemble_weight.",
    ),
    (
        "is_assistant",
        _is_on,
        "it marks a model as transformers' drafter (generate then stops on the drafter's own confidence); a "
        "speculative target is not one: set generation_config.is_assistant = False.",
    ),
    (
        "guidance_scale",
        lambda value: value is not None and value != 1,
        "classifier-free guidance runs an unconditional decode inside a logits processor that expects one "
        "call per generated token, but a speculative round scores several positions: drop guidance_scale.",
    ),
    (
        "penalty_alpha",
        _above(0),
        "it selects contrastive search, which speculative decoding does not run: drop penalty_alpha.",
    ),
    (
        "dola_layers",
        _is_on,
        "it selects DoLa decoding, which speculative decoding does not run: drop dola_layers.",
    ),
    (
        "constraints",
        _is_on,
        "it selects constrained beam search, which speculative decoding does not run: drop constraints.",
    ),
    (
        "force_words_ids",
        _is_on,
        "it selects constrained beam search, which speculative decoding does not run: drop force_words_ids.",
    ),
    (
        "num_beam_groups",
        _above(1),
        "group beam search does not combine with speculative decoding: set num_beam_groups=1 and num_beams=1.",
    ),
    (
        "token_healing",
        _is_on,
        "transformers heals the prompt with generate's tokenizer, which it does not hand to custom decoding "
        "loops: heal the prompt first (input_ids = model.heal_tokens(input_ids, tokenizer=tokenizer)) and "
        "drop token_healing.",
    ),
    (
        "watermarking_config",
        _stateful_watermark,
        "the SynthID watermark keeps per-sequence state across calls to its logits processor, which a "
        "speculative round calls for several positions and then rolls back: drop watermarking_config (the "
        "stateless WatermarkingConfig works).",
    ),
    (
        "cache_implementation",
        _cache_refused,
        "'quantized' keeps most keys quantized, where a rejected draft cannot be cropped, and 'paged' hands "
        "generation to continuous batching, which skips hf_specssm's loop: use the default dynamic cache "
        "(or 'static').",
    ),
)

#: generation settings `check_generation_settings` may refuse
REFUSED_SETTINGS = tuple(name for name, _, _ in _REFUSED_SETTINGS)


def check_generation_settings(settings: Settings) -> None:
    """Raise `ValueError` for a generation setting the speculative loop cannot honour.

    Each refused setting either selects another decoding algorithm (contrastive search, DoLa, constrained
    or group beam search, transformers' early-exit / MTP / DFlash drafting), would change the output
    (ensemble verification), or needs per-token state the loop cannot roll back (classifier-free guidance,
    the SynthID watermark, a quantized cache). `num_beams`, `num_return_sequences`, `use_cache=False` and
    the output flags are checked with the call's inputs.

    Args:
        settings: the merged `GenerationConfig`, or a mapping of the call's settings.
    """
    for name, refused, why in _REFUSED_SETTINGS:
        value = setting(settings, name)
        if refused(value):
            raise ValueError(f"{name}={value!r} is not supported with speculative decoding: {why}")


def assisted_settings(
    target_settings: Settings | None, assistant_settings: Settings | None
) -> dict[str, Any]:
    """The user-set `ASSISTED_DRAFT_SETTINGS`: the call's (arguments and the target's generation config,
    merged by transformers) first, else the assistant model's generation config (where transformers reads
    them)."""
    found = {}
    for name in ASSISTED_DRAFT_SETTINGS:
        value = user_set(target_settings, name)
        if value is None:
            value = user_set(assistant_settings, name)
        if value is not None:
            found[name] = value
    return found


def check_prompt_lookup_settings(num_tokens: Any, max_ngram_size: Any) -> None:
    """Raise `ValueError` for `prompt_lookup_num_tokens` / `max_matching_ngram_size` values that cannot work."""
    for name, value in (
        ("prompt_lookup_num_tokens", num_tokens),
        ("max_matching_ngram_size", max_ngram_size),
    ):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


def check_tokenizer_pair(
    model: PreTrainedModel, drafter_model: Any, tokenizer: Any, assistant_tokenizer: Any
) -> None:
    """Raise `ValueError` for `assistant_tokenizer=` (transformers' universal assisted decoding) unless it
    numbers tokens exactly as the target's `tokenizer=`: hf_specssm never translates between vocabularies."""
    if assistant_tokenizer is None:
        return
    if tokenizer is None:
        raise ValueError(
            "assistant_tokenizer= was given without tokenizer=: hf_specssm does not translate between "
            "vocabularies (universal assisted decoding), so the drafter must share the target's tokenizer; "
            "drop assistant_tokenizer, or pass tokenizer= too so the two can be compared."
        )
    _check_tokenizers(model, drafter_model, tokenizer, assistant_tokenizer)


def _shape(tensor: torch.Tensor) -> str:
    return f"[{', '.join(str(size) for size in tensor.shape)}]"


def _target_vocab_size(model: PreTrainedModel) -> int | None:
    """Rows of the target's input embedding (the ids its forward can look up), else its config's size."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None:
        return int(rows)
    return getattr(model.config.get_text_config(decoder=True), "vocab_size", None)


def _check_input_ids(model: PreTrainedModel, input_ids: Any, model_kwargs: dict[str, Any]) -> int:
    """Raise for a prompt the loop cannot take; return its length `T`."""
    if input_ids is None or (
        isinstance(input_ids, torch.Tensor)
        and input_ids.ndim == 2
        and input_ids.shape[1] == 0
        and model_kwargs.get("inputs_embeds") is not None
    ):
        raise ValueError(
            "speculative decoding takes token ids: pass input_ids (the drafter reads ids), not inputs_embeds."
        )
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(
            f"input_ids must be a tensor of token ids [batch, length], got {type(input_ids).__name__}; "
            "use tokenizer(text, return_tensors='pt').input_ids."
        )
    if input_ids.ndim != 2:
        raise ValueError(
            f"input_ids must be 2D [batch, length], got shape {_shape(input_ids)}; "
            + ("add the batch dimension: input_ids[None]." if input_ids.ndim == 1 else "one row per prompt.")
        )
    if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError(
            f"input_ids must hold integer token ids (torch.long), got {input_ids.dtype}; pass input_ids.long()."
        )
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise ValueError(
            f"input_ids is empty (shape {_shape(input_ids)}): speculative decoding needs at least one prompt "
            "token per row to condition on; start from the BOS token, e.g. [[tokenizer.bos_token_id]]."
        )
    vocab = _target_vocab_size(model)
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        bad = low if low < 0 else high
        row, position = (input_ids == bad).nonzero()[0].tolist()
        allowed = f"0–{vocab - 1}" if vocab is not None else "non-negative ids"
        raise ValueError(
            f"input_ids holds token id {bad} (row {row}, position {position}) but the target's vocabulary "
            f"has ids {allowed}; were the ids made by another model's tokenizer?"
        )
    return length


def _past_length(model_kwargs: dict[str, Any]) -> int:
    """Tokens already in a cache the caller passed (the mask then covers them too); 0 for a fresh cache."""
    cache = model_kwargs.get("past_key_values")
    get_length = getattr(cache, "get_seq_length", None)
    if get_length is None:
        return 0
    try:
        return int(get_length())
    except (TypeError, ValueError, IndexError):
        return 0


def _check_attention_mask(input_ids: torch.Tensor, mask: Any, past_length: int, tokenizer: Any) -> None:
    """Raise for a mask of the wrong kind, shape or values, an all-padding row, or right/inner padding."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"attention_mask must be a tensor [batch, length] like input_ids, got {type(mask).__name__}; "
            "use the attention_mask of tokenizer(..., return_tensors='pt')."
        )
    if mask.ndim != 2:
        raise ValueError(
            f"attention_mask must be 2D [batch, length] like input_ids, got shape {_shape(mask)}; generate "
            "builds the 4D mask itself."
        )
    if mask.is_complex():
        raise ValueError(
            f"attention_mask must be integer or bool (1 = token, 0 = padding), got {mask.dtype}."
        )
    expected = (input_ids.shape[0], past_length + input_ids.shape[1])
    if tuple(mask.shape) != expected:
        covers = f" plus the {past_length} cached tokens" if past_length else ""
        raise ValueError(
            f"attention_mask has shape {_shape(mask)} but input_ids has shape {_shape(input_ids)}; the mask "
            f"needs one entry per prompt token{covers}, i.e. shape [{expected[0]}, {expected[1]}]. Build both "
            "with one tokenizer call: tokenizer(texts, padding=True, return_tensors='pt')."
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        values = sorted({float(value) for value in mask.unique()[:4].tolist()})
        raise ValueError(
            f"attention_mask must hold 1 (token) and 0 (padding) only, got values {values}; an additive "
            "mask (0 / -inf) reads inverted here: pass (mask == 0).long() instead."
        )
    keep = mask[:, past_length:].bool()
    empty = (~keep.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"attention_mask row {empty[0]} masks every prompt token: that prompt is empty. Drop the row, or "
            "give it at least one token."
        )
    # left padding: no zero after a row's first one
    started = keep.cumsum(dim=1) > 0
    bad_rows = (started & ~keep).any(dim=1).nonzero().flatten().tolist()
    if bad_rows:
        side = getattr(tokenizer, "padding_side", None)
        hint = f" (the tokenizer pads on the {side})" if side not in (None, "left") else ""
        raise ValueError(
            f"prompts must be left-padded, but attention_mask row {bad_rows[0]} has padding after prompt tokens "
            f"(right or inner padding){hint}; decoder-only generation continues the last position of each "
            f"row: {LEFT_PADDING_FIX}."
        )


def _check_prepared_lengths(
    input_ids: torch.Tensor,
    model_kwargs: dict[str, Any],
    generation_config: GenerationConfig | None,
    expected_length: int,
) -> None:
    """Catch a wrong mask length after `generate` prepared the inputs.

    transformers drops an all-ones mask before the decoding loop (recording its length as
    `_compat.dropped_mask_length`) and builds `position_ids` from it, so a `[1, 5]` all-ones mask given
    with 8 prompt tokens is only visible through those two.
    """
    if model_kwargs.get("attention_mask") is None and generation_config is not None:
        recorded = _compat.dropped_mask_length(generation_config)
        if recorded is not None and recorded != expected_length:
            raise ValueError(
                f"attention_mask has {recorded} entries per row but input_ids has shape {_shape(input_ids)}; "
                f"the mask needs one entry per prompt token ({expected_length}). Build both with one "
                "tokenizer call: tokenizer(texts, padding=True, return_tensors='pt')."
            )
    position_ids = model_kwargs.get("position_ids")
    if (
        isinstance(position_ids, torch.Tensor)
        and position_ids.ndim >= 1
        and position_ids.shape[-1] != input_ids.shape[1]
    ):
        raise ValueError(
            f"position_ids has shape {_shape(position_ids)} but input_ids has shape {_shape(input_ids)}; "
            "generate builds position_ids from attention_mask, so check that the mask has one entry per "
            "prompt token (or drop position_ids)."
        )


def _check_tokenizers(
    model: PreTrainedModel, drafter_model: Any, tokenizer: Any, assistant_tokenizer: Any
) -> None:
    """Raise when the target's and the drafter's tokenizers number tokens differently."""
    target_side = tokenizer if tokenizer is not None else _folder_of(model)
    drafter_side = assistant_tokenizer if assistant_tokenizer is not None else _folder_of(drafter_model)
    if target_side is None or drafter_side is None:
        return
    both_folders = isinstance(target_side, Path) and isinstance(drafter_side, Path)
    if both_folders and _same_tokenizer_files(target_side, drafter_side):
        return
    target_tokenizer = _as_tokenizer(target_side)
    drafter_tokenizer = _as_tokenizer(drafter_side)
    if target_tokenizer is None or drafter_tokenizer is None:
        return
    problem = tokenizer_mismatch(target_tokenizer, drafter_tokenizer)
    if problem is not None:
        raise ValueError(
            f"the target's and the drafter's tokenizers disagree: {problem}. Speculative decoding feeds the "
            "target's token ids to the drafter, so both must number tokens the same way: pick a drafter "
            "trained with the target's tokenizer (hf_specssm does not translate between vocabularies)."
        )


def tokenizer_mismatch(target_tokenizer: Any, drafter_tokenizer: Any) -> str | None:
    """How two tokenizers number tokens differently, or `None` when every shared token has one id.

    A token both vocabularies hold must have the same id in both, and an id both use must mean the same
    token; one side may have extra tokens (added specials past the other's end). The special tokens' ids
    (BOS, EOS, PAD, UNK) are compared through the same vocabulary, so a drafter whose EOS is another token
    of the same vocabulary (a base model for an instruct target) is fine.
    """
    key = (target_tokenizer, drafter_tokenizer, len(target_tokenizer), len(drafter_tokenizer))
    try:
        return _cached_vocab_mismatch(*key)
    except TypeError:
        # an unhashable tokenizer class: compare without the cache
        return _vocab_mismatch(target_tokenizer, drafter_tokenizer)


@functools.lru_cache(maxsize=8)
def _cached_vocab_mismatch(
    target_tokenizer: Any, drafter_tokenizer: Any, _target_len: int, _drafter_len: int
) -> str | None:
    # the lengths are part of the key: adding tokens to either tokenizer invalidates the cached answer
    return _vocab_mismatch(target_tokenizer, drafter_tokenizer)


def _vocab_mismatch(target_tokenizer: Any, drafter_tokenizer: Any) -> str | None:
    target_vocab = target_tokenizer.get_vocab()
    drafter_vocab = drafter_tokenizer.get_vocab()
    for token, index in target_vocab.items():
        other = drafter_vocab.get(token)
        if other is not None and other != index:
            return f"token {token!r} is id {index} for the target and id {other} for the drafter"
    drafter_tokens = {index: token for token, index in drafter_vocab.items()}
    shared = 0
    for token, index in target_vocab.items():
        other = drafter_tokens.get(index)
        if other is None:
            continue
        if other != token:
            return f"id {index} is {token!r} for the target and {other!r} for the drafter"
        shared += 1
    smaller = min(len(target_vocab), len(drafter_vocab))
    if shared < smaller // 2:
        return f"they share only {shared} of {smaller} tokens"
    return None


def _folder_of(model: Any) -> Path | None:
    """The local folder `model` was loaded from, if it holds tokenizer files (never a Hub id)."""
    if model is None:
        return None
    name = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", ""
    )
    if not name:
        return None
    folder = Path(name)
    if folder.is_dir() and any((folder / filename).is_file() for filename in TOKENIZER_FILES):
        return folder
    return None


def _stamp(folder: Path) -> tuple:
    """`(name, size, mtime)` of the tokenizer files in `folder`: a new stamp means changed files."""
    stamp = []
    for filename in TOKENIZER_FILES:
        path = folder / filename
        if path.is_file():
            info = path.stat()
            stamp.append((filename, info.st_size, info.st_mtime_ns))
    return tuple(stamp)


def _same_tokenizer_files(first: Path, second: Path) -> bool:
    """Whether two folders hold byte-identical tokenizer files (then no tokenizer need be loaded)."""
    if first.resolve() == second.resolve():
        return True
    return _identical_files(str(first), _stamp(first), str(second), _stamp(second))


@functools.lru_cache(maxsize=16)
def _identical_files(first: str, first_stamp: tuple, second: str, second_stamp: tuple) -> bool:
    if [entry[:2] for entry in first_stamp] != [entry[:2] for entry in second_stamp]:
        return False
    return all(
        (Path(first) / name).read_bytes() == (Path(second) / name).read_bytes() for name, *_ in first_stamp
    )


def _as_tokenizer(side: Any) -> Any:
    """A tokenizer object: `side` itself, or the one loaded from its folder (`None` if it cannot load)."""
    if isinstance(side, Path):
        return _load_folder_tokenizer(str(side), _stamp(side))
    return side if hasattr(side, "get_vocab") else None


@functools.lru_cache(maxsize=8)
def _load_folder_tokenizer(folder: str, _stamp: tuple) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, ImportError, KeyError, TypeError):
        # a folder whose tokenizer cannot load is not checked here; loading it for real will say why
        return None
