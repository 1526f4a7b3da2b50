"""Gated DeltaNet (Qwen3-Next) verified by frozen single-chunk forwards and committed by state updates.

The frozen verification must give the outputs of one-token steps without writing the state and without
padding to the rule's `chunk_size`; its commit must give the stepped conv window and recurrent state for
every accepted length, without running the mixer again; a commit that drops the carried state must fail
the same comparison (negative control).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_specssm
from hf_specssm import _compat
from hf_specssm._compat.admission import layer_states, prefilled, stepped, worst_error
from hf_specssm._compat.mixers import GATED_DELTA_RULE, gated_delta_rule
from hf_specssm.cache import ForkableCache
from hf_specssm.ssm import state_replay

from tests.helpers.families import family_config

PREFILL = 2  # `admission.prefilled`: two tokens
VERIFIED = 6


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = family_config("qwen3_next")
    model = AutoModelForCausalLM.from_config(config).eval()
    # slow decays (transformers draws A up to 16): the carried state must matter
    for mixer in _compat.ssm_mixers(model):
        mixer.A_log.copy_(torch.empty_like(mixer.A_log).uniform_(0.01, 0.1).log())
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return hf_specssm.enable(model)


def _hidden(mixer: torch.nn.Module, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(1, length, mixer.hidden_size, generator=generator)


def _frozen_round(model, mixer, hidden, kept: int, drop_state: bool = False):
    """Prefill, one frozen verification of `VERIFIED` tokens, commit of `kept`: outputs, the states right
    after the verification, and the committed states."""
    cache = prefilled(mixer, hidden, lambda: ForkableCache(model.config))
    recorder = state_replay.StateRecorder(model, cache, mixers=[mixer])
    with recorder.verifying(VERIFIED):
        output = mixer(hidden[:, PREFILL : PREFILL + VERIFIED], cache_params=cache)
    after_verification = [state.clone() for state in layer_states(cache, mixer)]
    if drop_state:
        _compat.recurrent_state(cache.layers[mixer.layer_idx]).zero_()
    recorder.commit(kept)
    return output, after_verification, layer_states(cache, mixer)


@pytest.mark.parametrize("kept", [0, 1, 3, VERIFIED])
def test_frozen_verification_and_commit_match_one_token_steps(kept):
    model = _model()
    mixer = _compat.ssm_mixers(model)[0]
    hidden = _hidden(mixer, PREFILL + VERIFIED)
    new_cache = lambda: ForkableCache(model.config)  # noqa: E731
    before = layer_states(prefilled(mixer, hidden, new_cache), mixer)
    expected_outputs, _ = stepped(mixer, hidden, list(range(PREFILL, PREFILL + VERIFIED)), new_cache)
    kept_positions = list(range(PREFILL, PREFILL + kept))
    expected_states = stepped(mixer, hidden, kept_positions, new_cache)[1] if kept else before
    output, after_verification, committed = _frozen_round(model, mixer, hidden, kept)
    assert worst_error([(output, expected_outputs)]) < 1e-4
    # the verification wrote nothing: the state is the prefill's until the commit
    assert all(torch.equal(a, b) for a, b in zip(after_verification, before, strict=True))
    assert worst_error(list(zip(committed, expected_states, strict=True))) < 1e-4
    # negative control: the same commit from a dropped state is caught by the same comparison
    if kept > 0:
        _, _, forgetful = _frozen_round(model, mixer, hidden, kept, drop_state=True)
        assert worst_error(list(zip(forgetful, expected_states, strict=True))) > 1e-2


def test_verification_runs_one_unpadded_chunk_and_the_commit_no_mixer(monkeypatch):
    model = _model()
    mixer = _compat.ssm_mixers(model)[0]
    module = __import__(type(mixer).__module__, fromlist=["_"])
    original = getattr(module, GATED_DELTA_RULE)
    chunk_sizes: list[int] = []

    def spy(*args, chunk_size=64, **kwargs):
        chunk_sizes.append(chunk_size)
        return original(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(module, GATED_DELTA_RULE, spy)
    assert gated_delta_rule(mixer) is spy
    hidden = _hidden(mixer, PREFILL + VERIFIED)
    cache = prefilled(mixer, hidden, lambda: ForkableCache(model.config))
    chunk_sizes.clear()
    recorder = state_replay.StateRecorder(model, cache, mixers=[mixer])
    with recorder.verifying(VERIFIED):
        mixer(hidden[:, PREFILL : PREFILL + VERIFIED], cache_params=cache)
    assert chunk_sizes == [VERIFIED]  # one chunk of exactly the verified tokens, not padded to 64
    assert recorder.recorded_bytes > 0
    calls = []
    handle = mixer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        recorder.commit(2)
    finally:
        handle.remove()
    assert calls == [] and chunk_sizes == [VERIFIED]  # neither the mixer nor the chunked rule runs again


@pytest.mark.parametrize("l2norm", [True, False])
@pytest.mark.parametrize("key_heads", [4, 2])
@pytest.mark.parametrize("length", [1, 3, 5])
def test_the_in_place_commit_equals_the_rules_final_state(length, key_heads, l2norm):
    """`DeltaRecord.advance` (the state decayed and updated in place, no outputs) gives the final state of
    transformers' chunked rule over the kept positions, with grouped value heads and without; a bf16 state
    goes through the rule itself."""
    module = __import__(type(_compat.ssm_mixers(_model())[0]).__module__, fromlist=["_"])
    rule = getattr(module, GATED_DELTA_RULE)
    generator = torch.Generator().manual_seed(length * 10 + key_heads)
    key = torch.randn(1, 5, key_heads, 8, generator=generator)
    value = torch.randn(1, 5, 4, 6, generator=generator)
    g = -torch.rand(1, 5, 4, generator=generator)
    beta = torch.rand(1, 5, 4, generator=generator)
    record = state_replay.DeltaRecord(rule, key, value, g, beta, l2norm)
    start = torch.randn(1, 4, 8, 6, generator=generator)
    # the reference gets one key per value head: 5.17's rule takes no grouped heads (its mixer repeats the
    # keys first), 5.23's repeats them itself
    repeated = key.repeat_interleave(4 // key_heads, dim=2)
    expected = state_replay.DeltaRecord(rule, repeated, value, g, beta, l2norm).final_state(
        start.clone(), length
    )
    state = start.clone()
    record.advance(state, length)
    assert worst_error([(state, expected)]) < 1e-5
    assert worst_error([(start, expected)]) > 1e-2  # the positions do move the state
    half = start.to(torch.bfloat16)
    state_replay.DeltaRecord(rule, repeated, value, g, beta, l2norm).advance(half, length)  # through the rule
    assert worst_error([(half.float(), expected)]) < 2e-2


def test_outside_callers_of_the_rule_are_untouched_during_a_verification():
    """Another Gated DeltaNet model's forward inside the context (not recorded) runs transformers' rule and
    writes its own state."""
    model, other = _model(0), _model(1)
    mixer, other_mixer = _compat.ssm_mixers(model)[0], _compat.ssm_mixers(other)[0]
    hidden = _hidden(mixer, PREFILL + VERIFIED)
    new_cache = lambda: ForkableCache(other.config)  # noqa: E731
    expected_cache = prefilled(other_mixer, hidden, new_cache)
    expected = other_mixer(hidden[:, PREFILL:], cache_params=expected_cache)
    cache = prefilled(mixer, hidden, lambda: ForkableCache(model.config))
    other_cache = prefilled(other_mixer, hidden, new_cache)
    recorder = state_replay.StateRecorder(model, cache, mixers=[mixer])
    with recorder.verifying(VERIFIED):
        found = other_mixer(hidden[:, PREFILL:], cache_params=other_cache)
    # (the conv of any multi-token forward on this thread may take the float32 products meanwhile)
    assert worst_error([(found, expected)]) < 1e-5
    states = zip(
        layer_states(other_cache, other_mixer), layer_states(expected_cache, other_mixer), strict=True
    )
    assert worst_error(list(states)) < 1e-5
