"""transformers' generation settings on every entry point: assisted-decoding settings mapped onto the
drafter, stop strings with a tokenizer, static caches, prompt lookup from an argument or a generation
config, and the settings the loop refuses (docs/compatibility.md, "Generation settings")."""

from __future__ import annotations

import string
import warnings
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, StaticCache, SynthIDTextWatermarkingConfig

import hf_specssm
from hf_specssm.inputs import REFUSED_SETTINGS

from tests.helpers.models import VOCAB, build
from tests.helpers.scripted import ScriptedDrafter

REPO_ROOT = Path(__file__).resolve().parents[2]
CHARS = string.ascii_letters + string.digits + ".,"
ENTRY_POINTS = ("enable", "generate", "callable", "folder")


def run(entry: str, target, prompt: torch.Tensor, drafter=None, tokenizer=None, **kwargs):
    """`generate` on `target` through one entry point; the drafter and tokenizer under that entry point's
    names (the callable path takes `drafter=` and `spec_tokenizer=`)."""
    if entry == "callable":
        extra = {"drafter": drafter} if drafter is not None else {}
        if tokenizer is not None:
            extra["spec_tokenizer"] = tokenizer
        return type(target).generate(
            target, prompt, custom_generate=hf_specssm.speculative_generate, **extra, **kwargs
        )
    if tokenizer is not None:
        kwargs["tokenizer"] = tokenizer
    if entry == "enable":
        return hf_specssm.enable(target).generate(prompt, assistant_model=drafter, **kwargs)
    if entry == "generate":
        return hf_specssm.generate(target, prompt, drafter=drafter, **kwargs)
    return type(target).generate(
        target,
        prompt,
        custom_generate=str(REPO_ROOT / "custom_generate"),
        trust_remote_code=True,
        assistant_model=drafter,
        **kwargs,
    )


def plain(target, prompt: torch.Tensor, **kwargs) -> torch.Tensor:
    """transformers' own greedy output (never the `enable` patch)."""
    return type(target).generate(target, prompt, **kwargs)


@pytest.fixture
def prompt() -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))


def repetitive_prompt() -> torch.Tensor:
    return torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]])


def oracle_pair():
    """A Llama target and a drafter with the same weights: every draft is accepted."""
    return build("llama", seed=0), build("llama", seed=0)


# ---------------------------------------------------------------- assisted-decoding settings


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_num_assistant_tokens_argument_sets_a_constant_draft_length(entry, prompt):
    target, drafter = oracle_pair()
    reference = plain(target, prompt, max_new_tokens=16)
    output = run(entry, target, prompt, drafter, max_new_tokens=16, num_assistant_tokens=3)
    assert torch.equal(output, reference)
    # 16 tokens: four rounds of 3 accepted drafts + the target's token
    assert target.last_speculation_stats.draft_lengths == [3, 3, 3, 3]


@pytest.mark.parametrize("where", ["assistant", "target"])
def test_num_assistant_tokens_from_a_generation_config(where, prompt):
    target, drafter = oracle_pair()
    (drafter if where == "assistant" else target).generation_config.num_assistant_tokens = 3
    hf_specssm.generate(target, prompt, drafter=drafter, max_new_tokens=16)
    assert target.last_speculation_stats.draft_lengths == [3, 3, 3, 3]


def test_the_call_wins_over_the_assistant_generation_config(prompt):
    target, drafter = oracle_pair()
    drafter.generation_config.num_assistant_tokens = 2
    hf_specssm.generate(target, prompt, drafter=drafter, max_new_tokens=16, num_assistant_tokens=3)
    assert target.last_speculation_stats.draft_lengths == [3, 3, 3, 3]


def test_heuristic_schedule_grows_by_two_after_full_acceptance(prompt):
    target, drafter = oracle_pair()
    hf_specssm.generate(
        target,
        prompt,
        drafter=drafter,
        max_new_tokens=30,
        num_assistant_tokens=2,
        num_assistant_tokens_schedule="heuristic_transient",
    )
    # every round accepted: 2, 4, 6, 8, then only the room left (30 - 3 - 5 - 7 - 9 = 6 tokens, 5 drafts)
    assert target.last_speculation_stats.draft_lengths == [2, 4, 6, 8, 5]


def test_confidence_threshold_ends_rounds_early(prompt):
    target, drafter = oracle_pair()
    # a random tiny model is never 99% sure, so every round stops after its first draft token
    hf_specssm.generate(
        target,
        prompt,
        drafter=drafter,
        max_new_tokens=10,
        num_assistant_tokens=4,
        assistant_confidence_threshold=0.99,
    )
    assert set(target.last_speculation_stats.draft_lengths[:-1]) == {1}


def test_transformers_defaults_leave_hf_specssm_defaults(prompt):
    target, drafter = oracle_pair()
    target.generation_config.num_assistant_tokens_schedule = "constant"
    drafter.generation_config.assistant_confidence_threshold = 0.4
    hf_specssm.generate(target, prompt, drafter=drafter, max_new_tokens=30, num_assistant_tokens=20)
    lengths = target.last_speculation_stats.draft_lengths
    # DraftConfig's defaults: 5 tokens first, then the adaptive schedule (not 20 constant, not early stops)
    assert lengths[0] == hf_specssm.DraftConfig().num_draft_tokens
    assert len(set(lengths[:-1])) > 1


def test_a_drafter_object_keeps_its_own_config_and_says_so(prompt):
    target, drafter_model = oracle_pair()
    drafter = hf_specssm.ModelDrafter(drafter_model, num_draft_tokens=4, schedule="constant")
    with pytest.warns(UserWarning, match="num_assistant_tokens=2 ignored"):
        hf_specssm.generate(target, prompt, drafter=drafter, max_new_tokens=16, num_assistant_tokens=2)
    assert target.last_speculation_stats.draft_lengths[0] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the same value as the drafter's: nothing to warn about
        hf_specssm.generate(target, prompt, drafter=drafter, max_new_tokens=6, num_assistant_tokens=4)


@pytest.mark.parametrize(
    "options, message",
    [
        pytest.param(
            dict(num_assistant_tokens_schedule="bogus"), "num_assistant_tokens_schedule", id="schedule"
        ),
        pytest.param(dict(num_assistant_tokens=0), "num_assistant_tokens", id="zero-tokens"),
        pytest.param(
            dict(assistant_confidence_threshold=1.5), "assistant_confidence_threshold", id="threshold"
        ),
    ],
)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_invalid_assisted_settings(entry, prompt, options, message):
    target, drafter = oracle_pair()
    with pytest.raises(ValueError, match=message):
        run(entry, target, prompt, drafter, max_new_tokens=5, **options)


def test_invalid_setting_is_refused_even_with_a_drafter_object(prompt):
    target, drafter_model = oracle_pair()
    drafter = hf_specssm.ModelDrafter(drafter_model)
    with pytest.raises(ValueError, match="num_assistant_tokens_schedule"):
        hf_specssm.generate(target, prompt, drafter=drafter, num_assistant_tokens_schedule="bogus")


# ---------------------------------------------------------------- refused settings

REFUSED = [
    pytest.param("assistant_early_exit", 1, id="early-exit"),
    pytest.param("use_mtp", True, id="mtp"),
    pytest.param("speculation_type", "dflash", id="dflash"),
    pytest.param("assistant_ensemble_weight", 0.5, id="ensemble"),
    pytest.param("is_assistant", True, id="is-assistant"),
    pytest.param("guidance_scale", 1.5, id="guidance"),
    pytest.param("penalty_alpha", 0.6, id="contrastive"),
    pytest.param("dola_layers", "high", id="dola"),
    pytest.param("constraints", [object()], id="constraints"),
    pytest.param("force_words_ids", [[3]], id="force-words"),
    pytest.param("num_beam_groups", 2, id="beam-groups"),
    pytest.param("token_healing", True, id="token-healing"),
    pytest.param(
        "watermarking_config", SynthIDTextWatermarkingConfig(keys=[1, 2], ngram_len=2), id="synthid"
    ),
    pytest.param("cache_implementation", "quantized", id="quantized"),
    pytest.param("cache_implementation", "paged", id="paged"),
]


def test_every_refused_setting_is_tested():
    assert {param.values[0] for param in REFUSED} == set(REFUSED_SETTINGS)


@pytest.mark.parametrize("name, value", REFUSED)
@pytest.mark.parametrize("kind", ["llama", "mamba2"])
def test_refused_settings_raise_before_decoding(kind, name, value, prompt):
    target, drafter = build(kind, seed=0), build("llama", seed=1)
    with pytest.raises(ValueError, match=name):
        hf_specssm.generate(target, prompt, drafter=drafter, max_new_tokens=5, **{name: value})


@pytest.mark.parametrize("entry", ["enable", "callable", "folder"])
def test_assistant_early_exit_is_refused_on_every_entry_point(entry, prompt):
    target, drafter = oracle_pair()
    with pytest.raises(ValueError, match="assistant_early_exit"):
        run(entry, target, prompt, drafter, max_new_tokens=5, assistant_early_exit=1)


def test_assistant_early_exit_in_the_ssm_targets_generation_config_is_refused_clearly(prompt):
    target = build("mamba2", seed=0)
    target.generation_config.assistant_early_exit = 1
    # (transformers alone would say "not supported with stateful models")
    with pytest.raises(ValueError, match="assistant_early_exit"):
        hf_specssm.enable(target).generate(prompt, assistant_model=build("llama", seed=1), max_new_tokens=5)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of `CHARS` (ids 0–63, the tiny models' vocabulary), built offline."""
    backend = Tokenizer(models.WordLevel(vocab={char: i for i, char in enumerate(CHARS)}, unk_token="."))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=".")


def test_universal_assisted_decoding_is_refused(prompt):
    target, drafter = oracle_pair()
    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(
            models.WordLevel(vocab={f"v{i}": i for i in range(VOCAB)}, unk_token="v0")
        ),
        unk_token="v0",
    )
    with pytest.raises(ValueError, match="tokenizers disagree"):
        hf_specssm.generate(
            target,
            prompt,
            drafter=drafter,
            tokenizer=char_tokenizer(),
            assistant_tokenizer=other,
            max_new_tokens=5,
        )
    with pytest.raises(ValueError, match="without tokenizer="):
        hf_specssm.generate(target, prompt, drafter=drafter, assistant_tokenizer=other, max_new_tokens=5)
    # the same vocabulary on both sides is ordinary speculative decoding
    output = hf_specssm.generate(
        target,
        prompt,
        drafter=drafter,
        tokenizer=char_tokenizer(),
        assistant_tokenizer=char_tokenizer(),
        max_new_tokens=8,
    )
    assert torch.equal(output, plain(target, prompt, max_new_tokens=8))


# ---------------------------------------------------------------- stop strings


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_stop_strings_with_a_tokenizer(entry, prompt):
    target, drafter = build("llama", seed=0), build("mamba", seed=1)
    tokenizer = char_tokenizer()
    free = plain(target, prompt, max_new_tokens=20)[0, prompt.shape[1] :]
    # the 7th and 8th generated characters: a stop inside some round's accepted block or at its end
    stop = CHARS[int(free[6])] + CHARS[int(free[7])]
    reference = plain(target, prompt, max_new_tokens=20, stop_strings=[stop], tokenizer=tokenizer)
    assert reference.shape[1] < prompt.shape[1] + 20
    output = run(entry, target, prompt, drafter, tokenizer, max_new_tokens=20, stop_strings=[stop])
    assert torch.equal(output, reference)


def test_stop_strings_from_the_generation_config(prompt):
    target, drafter = build("llama", seed=0), build("mamba", seed=1)
    tokenizer = char_tokenizer()
    free = plain(target, prompt, max_new_tokens=20)[0, prompt.shape[1] :]
    stop = CHARS[int(free[4])]
    reference = plain(target, prompt, max_new_tokens=20, stop_strings=stop, tokenizer=tokenizer)
    assert reference.shape[1] < prompt.shape[1] + 20
    target.generation_config.stop_strings = stop
    output = hf_specssm.enable(target).generate(
        prompt, assistant_model=drafter, max_new_tokens=20, tokenizer=tokenizer
    )
    assert torch.equal(output, reference)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_stop_strings_without_a_tokenizer_say_where_it_goes(entry, prompt):
    target, drafter = oracle_pair()
    match = "spec_tokenizer=" if entry == "callable" else "tokenizer="
    with pytest.raises(ValueError, match=match):
        run(entry, target, prompt, drafter, max_new_tokens=5, stop_strings=["w1"])


# ---------------------------------------------------------------- static caches


def _scripted(target, prompt, max_new_tokens):
    reference = plain(target, prompt, max_new_tokens=max_new_tokens)
    # every accept length 0..4 of 4 drafts, so every rollback size is exercised
    return reference, ScriptedDrafter(reference, [0, 1, 2, 3, 4], num_draft_tokens=4, vocab_size=VOCAB)


@pytest.mark.parametrize("entry", ["enable", "generate", "callable"])
def test_static_cache_implementation_greedy_parity(entry, prompt):
    target = build("llama", seed=0)
    reference, drafter = _scripted(target, prompt, 24)
    output = run(
        entry,
        target,
        prompt,
        drafter,
        max_new_tokens=24,
        cache_implementation="static",
        max_cache_len=40,
        return_dict_in_generate=True,
    )
    assert torch.equal(output.sequences, reference)
    assert drafter.forced[:5] == [0, 1, 2, 3, 4]
    cache = output.past_key_values
    assert isinstance(cache, StaticCache) and cache.layers[0].max_cache_len == 40
    # the cache holds the committed tokens but the last, and nothing in the rejected slots
    length = reference.shape[1] - 1
    assert int(cache.get_seq_length()) == length
    assert all(float(layer.keys[:, :, length:].abs().max()) == 0.0 for layer in cache.layers)


def test_a_static_cache_passed_in_greedy_parity(prompt):
    target = build("llama", seed=0)
    reference, drafter = _scripted(target, prompt, 20)
    cache = StaticCache(config=target.config, max_cache_len=prompt.shape[1] + 20)
    output = hf_specssm.generate(target, prompt, drafter=drafter, max_new_tokens=20, past_key_values=cache)
    assert torch.equal(output, reference)
    # the same keys as plain decoding with a static cache wrote
    plain_cache = StaticCache(config=target.config, max_cache_len=prompt.shape[1] + 20)
    plain(target, prompt, max_new_tokens=20, past_key_values=plain_cache)
    for mine, theirs in zip(cache.layers, plain_cache.layers):
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)


def test_a_static_cache_too_small_is_refused(prompt):
    target, drafter = oracle_pair()
    cache = StaticCache(config=target.config, max_cache_len=prompt.shape[1] + 4)
    with pytest.raises(ValueError, match="max_cache_len"):
        hf_specssm.generate(target, prompt, drafter=drafter, max_new_tokens=20, past_key_values=cache)


def test_a_static_sliding_window_is_refused(prompt):
    target = build("mistral", seed=0)
    with pytest.raises(ValueError, match="StaticSlidingWindowLayer"):
        hf_specssm.generate(
            target, prompt, drafter=build("mistral", seed=1), max_new_tokens=8, cache_implementation="static"
        )


def test_trees_with_a_static_cache_are_refused(prompt):
    target = build("llama", seed=0)
    drafter = hf_specssm.ModelDrafter(build("mamba", seed=1), tree_shape=(2, 1))
    with pytest.raises(ValueError, match="DynamicCache"):
        hf_specssm.generate(target, prompt, drafter=drafter, max_new_tokens=8, cache_implementation="static")


def test_static_cache_on_an_ssm_target_decodes_exactly(prompt):
    target = build("mamba2", seed=0)
    reference = plain(target, prompt, max_new_tokens=12)
    output = hf_specssm.generate(
        target, prompt, drafter=build("llama", seed=1), max_new_tokens=12, cache_implementation="static"
    )
    assert torch.equal(output, reference)


# ---------------------------------------------------------------- prompt lookup


@pytest.mark.parametrize("kind", ["llama", "mamba2"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_prompt_lookup_argument_on_every_entry_point(entry, kind):
    target = build(kind, seed=0)
    prompt = repetitive_prompt()
    reference = plain(target, prompt, max_new_tokens=16)
    output = run(
        entry, target, prompt, max_new_tokens=16, prompt_lookup_num_tokens=3, max_matching_ngram_size=2
    )
    assert torch.equal(output, reference)
    stats = target.last_speculation_stats
    assert stats.drafted_tokens > 0 and max(stats.draft_lengths) <= 3


@pytest.mark.parametrize("kind", ["llama", "mamba2"])
@pytest.mark.parametrize("entry", ["enable", "generate", "folder"])
@pytest.mark.parametrize("where", ["model", "call"])
def test_prompt_lookup_from_a_generation_config(entry, kind, where):
    target = build(kind, seed=0)
    prompt = repetitive_prompt()
    reference = plain(target, prompt, max_new_tokens=16)
    if where == "model":
        target.generation_config.prompt_lookup_num_tokens = 3
        options = {"max_new_tokens": 16}
    else:
        options = {"generation_config": GenerationConfig(prompt_lookup_num_tokens=3, max_new_tokens=16)}
    output = run(entry, target, prompt, **options)
    assert torch.equal(output, reference)
    stats = target.last_speculation_stats
    assert stats.drafted_tokens > 0 and max(stats.draft_lengths) <= 3


def test_prompt_lookup_refuses_model_drafter_settings():
    target = build("llama", seed=0)
    with pytest.raises(ValueError, match="num_assistant_tokens=4 applies to a drafter model"):
        hf_specssm.generate(
            target, repetitive_prompt(), prompt_lookup_num_tokens=3, num_assistant_tokens=4, max_new_tokens=5
        )
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens must be an integer"):
        hf_specssm.generate(target, repetitive_prompt(), prompt_lookup_num_tokens=0, max_new_tokens=5)


def test_no_drafter_and_no_prompt_lookup_names_both(prompt):
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        hf_specssm.generate(build("llama", seed=0), prompt, max_new_tokens=5)


def test_enabled_model_without_speculation_stays_transformers(prompt):
    target = hf_specssm.enable(build("llama", seed=0))
    target.last_speculation_stats = None
    output = target.generate(prompt, max_new_tokens=6)
    assert torch.equal(output, plain(target, prompt, max_new_tokens=6))
    assert target.last_speculation_stats is None
