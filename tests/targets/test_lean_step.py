"""Lean one-token steps (`ssm.lean_step`): the same logits and states as transformers' steps for every
Mamba2-layout family, routed only inside the context that asked for them, and used by `ModelDrafter`."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, GraniteMoeHybridConfig, Mamba2Config, NemotronHConfig

import hf_specssm
from hf_specssm import _compat
from hf_specssm.cache import ForkableCache
from hf_specssm.drafters.base import DraftSampler
from hf_specssm.drafters.model import ModelDrafter
from hf_specssm.ssm import lean_step
from hf_specssm.ssm.lean_step import lean_step_mixers, lean_steps
from hf_specssm.testing.tiny import TINY_VOCAB, tiny_model

_MAMBA2_MODULE = "transformers.models.mamba2.modeling_mamba2"
_COMMON = {"vocab_size": TINY_VOCAB, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "mamba2_groups":  # two groups share B and C: the per-head expansion must pick the right one
        config = Mamba2Config(
            vocab_size=TINY_VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_heads=4,
            head_dim=16,
            state_size=8,
            n_groups=2,
            expand=1,
            chunk_size=8,
        )
        return AutoModelForCausalLM.from_config(config).eval()
    if kind == "nemotron_h":
        config = NemotronHConfig(
            **_COMMON,
            num_hidden_layers=3,
            intermediate_size=64,
            mamba_num_heads=4,
            mamba_head_dim=16,
            ssm_state_size=8,
            n_groups=1,
            chunk_size=8,
            hybrid_override_pattern="M*M",
        )
        return AutoModelForCausalLM.from_config(config).eval()
    if kind == "granitemoehybrid":
        config = GraniteMoeHybridConfig(
            **_COMMON,
            num_hidden_layers=3,
            intermediate_size=64,
            layer_types=["mamba", "attention", "mamba"],
            mamba_n_heads=4,
            mamba_d_head=32,
            mamba_d_state=8,
            mamba_n_groups=1,
            mamba_chunk_size=8,
            num_local_experts=0,
            num_experts_per_tok=0,
            shared_intermediate_size=64,
        )
        return AutoModelForCausalLM.from_config(config).eval()
    return tiny_model(kind)


def _steps(model, prompt: torch.Tensor, tokens: torch.Tensor, lean: bool, zero_state: bool = False):
    """Prefill `prompt` `[1, L]`, then feed `tokens` `[1, S]` one at a time; return the step logits
    `[S, V]` and the final recurrent states."""
    cache = ForkableCache(model.config)
    name = _compat.cache_kwarg_name(model)
    logits = []
    with torch.no_grad():
        model(input_ids=prompt, use_cache=True, **{name: cache})
        cache.advance(prompt.shape[1])
        if zero_state:
            for state in cache.state_tensors():
                state.zero_()
        for position in range(tokens.shape[1]):
            step = tokens[:, position : position + 1]
            positions = torch.tensor([[cache.seen_tokens]])
            kwargs = {name: cache, "use_cache": True}
            if _compat.forward_accepts(model, "position_ids"):
                kwargs["position_ids"] = positions
            if lean:
                with lean_steps(model):
                    out = model(input_ids=step, **kwargs)
            else:
                out = model(input_ids=step, **kwargs)
            cache.advance(1)
            logits.append(out.logits[0, -1])
    return torch.stack(logits), [state.clone() for state in cache.state_tensors()]


KINDS = ["mamba2", "mamba2_groups", "bamba", "falcon_h1", "zamba2", "nemotron_h", "granitemoehybrid"]


@pytest.mark.parametrize("kind", KINDS)
def test_lean_steps_match_transformers_steps(kind, monkeypatch):
    """fp32: every step's logits and the final conv and SSM states equal transformers' one-token steps to
    float32 rounding, and the lean functions are what ran (a spy counts their calls per layer and step)."""
    model = _model(kind)
    assert lean_step_mixers(model), f"{kind} has Mamba2-layout mixers"
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, TINY_VOCAB, (1, 7), generator=generator)
    tokens = torch.randint(0, TINY_VOCAB, (1, 6), generator=generator)
    calls = {"state": 0, "conv": 0}
    state_update, conv_update = lean_step.lean_selective_state_update, lean_step.lean_conv1d_update

    def counted_state(*args):
        calls["state"] += 1
        return state_update(*args)

    def counted_conv(*args):
        calls["conv"] += 1
        return conv_update(*args)

    monkeypatch.setattr(lean_step, "lean_selective_state_update", counted_state)
    monkeypatch.setattr(lean_step, "lean_conv1d_update", counted_conv)
    reference, reference_states = _steps(model, prompt, tokens, lean=False)
    assert calls == {"state": 0, "conv": 0}, "outside the context nothing is routed"
    lean, lean_states = _steps(model, prompt, tokens, lean=True)
    layers = len(lean_step_mixers(model))
    assert calls == {"state": layers * tokens.shape[1], "conv": layers * tokens.shape[1]}
    torch.testing.assert_close(lean, reference, rtol=1e-5, atol=1e-5)
    for got, expected in zip(lean_states, reference_states, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_the_comparison_sees_a_dropped_state():
    """Negative control: lean steps from a zeroed state are far from transformers' steps from the real one."""
    model = _model("mamba2")
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, TINY_VOCAB, (1, 7), generator=generator)
    tokens = torch.randint(0, TINY_VOCAB, (1, 4), generator=generator)
    reference, _ = _steps(model, prompt, tokens, lean=False)
    dropped, _ = _steps(model, prompt, tokens, lean=True, zero_state=True)
    assert (dropped - reference).abs().max() > 1e-3


def test_bf16_lean_steps_stay_close():
    """bf16: the lean conv sums in float32, so logits differ from transformers' bf16 steps by bf16 rounding."""
    model = _model("mamba2").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, TINY_VOCAB, (1, 7), generator=generator)
    tokens = torch.randint(0, TINY_VOCAB, (1, 5), generator=generator)
    reference, _ = _steps(model, prompt, tokens, lean=False)
    lean, _ = _steps(model, prompt, tokens, lean=True)
    scale = reference.float().abs().max()
    assert (lean.float() - reference.float()).abs().max() <= 0.05 * scale


def test_the_module_functions_come_back_even_after_an_error():
    model = _model("mamba2")
    names = ("mamba2_selective_state_update", "causal_conv1d_update")
    originals = [_compat.mixers.installed_module_function(_MAMBA2_MODULE, name) for name in names]
    with pytest.raises(RuntimeError, match="boom"), lean_steps(model):
        with lean_steps(model):  # nested: the outer one keeps the routing
            pass
        assert _compat.mixers.installed_module_function(_MAMBA2_MODULE, names[0]) is not originals[0]
        raise RuntimeError("boom")
    assert [_compat.mixers.installed_module_function(_MAMBA2_MODULE, name) for name in names] == originals


def test_other_threads_keep_transformers_steps(monkeypatch):
    """While one thread is inside `lean_steps`, another thread's steps of a model of the same family run
    transformers' functions (the routing is per context)."""
    model, other = _model("mamba2"), _model("mamba2")
    routed = []
    state_update = lean_step.lean_selective_state_update
    monkeypatch.setattr(
        lean_step,
        "lean_selective_state_update",
        lambda *args: routed.append(threading.get_ident()) or state_update(*args),
    )
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, TINY_VOCAB, (1, 5), generator=generator)
    tokens = torch.randint(0, TINY_VOCAB, (1, 3), generator=generator)
    entered, release = threading.Event(), threading.Event()

    def hold_context_open():
        with lean_steps(model):
            entered.set()
            release.wait(timeout=30)

    original = _compat.mixers.installed_module_function(_MAMBA2_MODULE, "mamba2_selective_state_update")
    holder = threading.Thread(target=hold_context_open)
    holder.start()
    try:
        assert entered.wait(timeout=30)
        # the module global is swapped for the router while the other thread holds the context open
        installed = _compat.mixers.installed_module_function(_MAMBA2_MODULE, "mamba2_selective_state_update")
        assert installed is not original
        _steps(other, prompt, tokens, lean=False)
    finally:
        release.set()
        holder.join()
    assert routed == []


def test_state_updates_that_are_not_broadcast_fall_back():
    """A `dt` that varies along the head dimension is not the Mamba2 layout: the router calls transformers'."""
    import transformers.models.mamba2.modeling_mamba2 as module

    original = module.mamba2_selective_state_update
    router = lean_step._route_state_update(original)
    generator = torch.Generator().manual_seed(0)
    state = torch.randn(1, 2, 4, 3, generator=generator)
    x = torch.randn(1, 2, 4, generator=generator)
    dt = torch.randn(1, 2, 4, generator=generator)  # per channel, not per head
    A = -torch.rand(2, 4, 3, generator=generator)
    B, C = torch.randn(1, 1, 3, generator=generator), torch.randn(1, 1, 3, generator=generator)
    expected_state = state.clone()
    expected = original(expected_state, x, dt, A, B, C, dt_softplus=True)
    token = lean_step._LEAN.set(True)
    try:
        got = router(state, x, dt, A, B, C, dt_softplus=True)
    finally:
        lean_step._LEAN.reset(token)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(state, expected_state, rtol=0, atol=0)


def test_model_drafters_step_lean_and_stay_exact(monkeypatch):
    """A Mamba2 drafter's steps go through the lean functions, and speculative greedy output still equals the
    target's own."""
    target = hf_specssm.enable(tiny_model("llama"))
    drafter_model = tiny_model("mamba2", seed=1)
    drafter = ModelDrafter(drafter_model, num_draft_tokens=3, schedule="constant")
    calls = []
    state_update = lean_step.lean_selective_state_update
    monkeypatch.setattr(
        lean_step, "lean_selective_state_update", lambda *args: calls.append(1) or state_update(*args)
    )
    prompt = torch.randint(0, TINY_VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    expected = target.generate(prompt, max_new_tokens=20, do_sample=False)
    got = target.generate(prompt, max_new_tokens=20, do_sample=False, assistant_model=drafter)
    assert torch.equal(got, expected)
    assert calls, "the drafter's one-token steps were lean"


def test_drafts_match_transformers_steps():
    """The drafts of a lean drafter equal those of the same drafter stepping through transformers."""
    model = tiny_model("mamba2", seed=3)
    sampler = DraftSampler(None, do_sample=False)
    prompt = torch.randint(0, TINY_VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    drafts = []
    for lean in (True, False):
        drafter = ModelDrafter(model, num_draft_tokens=5, schedule="constant")
        if not lean:
            drafter._lean_mixers = []
        drafter.begin(prompt)
        sequence, tokens = prompt, []
        for _ in range(4):
            draft = drafter.draft(sequence, 5, sampler)
            tokens.append(draft.tokens)
            sequence = torch.cat([sequence, draft.tokens[:, :2], torch.tensor([[5]])], dim=1)
            drafter.commit(sequence, 2)
        drafts.append(torch.cat(tokens, dim=1))
    assert torch.equal(drafts[0], drafts[1])
