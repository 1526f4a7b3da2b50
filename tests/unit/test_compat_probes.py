"""Mixer probes (`_compat.probes`) and the scoped patches they admit (`_compat.mixers`).

Every tiny SSM family passes every probe; a deliberately broken patch or path fails its probe, says so once,
and the fallback stays exact; every patch is undone on exit, also after an exception.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from hf_specssm import _compat
from hf_specssm._compat import admission, probes
from hf_specssm._compat import mixers as patches
from hf_specssm._compat.probes import MixerProbeWarning, MixerSupport, mixer_support
from hf_specssm.cache import ForkableCache
from hf_specssm.kernels.cpu import cpu_kernels
from hf_specssm.ssm import tree_scan
from hf_specssm.ssm.mixers import (
    MixerInputRecorder,
    check_identity_steps,
    exact_continuation,
    identity_steps,
    ssm_mixers,
)

from tests.helpers.models import VOCAB, build

MAMBA_MODULE = "transformers.models.mamba.modeling_mamba"

FAMILIES = [
    pytest.param("mamba", "patched", id="mamba"),
    pytest.param("falcon_mamba", "patched", id="falcon_mamba"),
    pytest.param("jamba", "patched", id="jamba"),
    pytest.param("mamba2", "native", id="mamba2"),
    pytest.param("bamba", "native", id="bamba"),
    pytest.param("falcon_h1", "native", id="falcon_h1"),
    pytest.param("zamba2", "native", id="zamba2"),
]


@pytest.fixture(autouse=True)
def fresh_probes():
    """Each test probes from scratch, and leaves no (possibly sabotaged) result to the next one."""
    probes.clear_cache()
    yield
    probes.clear_cache()


def _tokens(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _forward(model, cache, tokens: torch.Tensor) -> torch.Tensor:
    kwargs = {_compat.cache_kwarg_name(model): cache, "use_cache": True}
    if _compat.forward_accepts(model, "position_ids"):
        start = cache.seen_tokens
        kwargs["position_ids"] = torch.arange(start, start + tokens.shape[1])[None]
    logits = model(input_ids=tokens, **kwargs).logits
    cache.advance(tokens.shape[1])
    return logits


def _continuation_gap(model) -> float:
    """Largest logit difference between a 4-token forward from a cached state inside `exact_continuation`
    and the same tokens fed one at a time."""
    tokens = _tokens(9)
    with torch.no_grad():
        stepped = ForkableCache(model.config)
        _forward(model, stepped, tokens[:, :5])
        reference = torch.cat([_forward(model, stepped, tokens[:, i : i + 1]) for i in range(5, 9)], dim=1)
        cache = ForkableCache(model.config)
        _forward(model, cache, tokens[:, :5])
        with exact_continuation(model):
            continued = _forward(model, cache, tokens[:, 5:])
    return (continued - reference).abs().max().item()


@pytest.mark.parametrize(("kind", "continuation"), FAMILIES)
def test_every_family_passes_every_probe(kind, continuation):
    model = build(kind, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MixerProbeWarning)
        support = mixer_support(model)
    # the state-update commit serves the Mamba2 layout (and Gated DeltaNet); Mamba v1 mixers keep mixer-input
    # replay
    mamba2_layout = continuation == "native"
    # the fused verification forward: Mamba2-layout mixers with the gated group norm, in float32 with the
    # compiled CPU kernels (Mamba v1 families have none)
    fused = kind in ("mamba2", "bamba", "zamba2", "falcon_h1") and cpu_kernels() is not None
    assert support == MixerSupport(
        continuation=continuation,
        replay=True,
        identity_steps=True,
        tree_scan=True,
        state_replay=mamba2_layout,
        fused_verification=fused,
    )
    reasons = probes.unsupported_reasons(model)
    expected = set() if mamba2_layout else {"state_replay"}
    if not fused:
        expected.add("fused_verification")
    assert set(reasons) == expected
    if not mamba2_layout:
        assert "neither a Mamba2 layout nor a gated delta rule" in reasons["state_replay"]
    if kind in ("mamba", "falcon_mamba", "jamba"):
        assert "no fused verification forward for this mixer layout" in reasons["fused_verification"]


def test_models_without_ssm_mixers_support_everything():
    assert mixer_support(build("llama", seed=0)) == MixerSupport()


def _adds_the_state_twice(original):
    return patches_real_wrapper(patches_real_wrapper(original))


def _drops_the_state(original):
    return original


patches_real_wrapper = patches._scan_with_initial_state


@pytest.mark.parametrize("kind", ["mamba", "jamba"])
@pytest.mark.parametrize(
    "broken",
    [pytest.param(_adds_the_state_twice, id="adds-twice"), pytest.param(_drops_the_state, id="drops")],
)
def test_a_broken_scan_patch_fails_its_probe_and_the_fallback_is_exact(kind, broken, monkeypatch):
    model = build(kind, seed=0)
    monkeypatch.setattr(patches, "_scan_with_initial_state", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        support = mixer_support(model)
    said = " ".join(str(warning.message) for warning in caught if warning.category is MixerProbeWarning)
    assert "continuation probe failed" in said and "identity_steps probe failed" in said
    assert support.continuation == "none"
    # Joint Attainment and Advancement needs exact multi-token forwards
    assert not support.identity_steps
    with pytest.raises(ValueError, match="verification='replay'"):
        check_identity_steps(model)
    assert "continuation" in probes.unsupported_reasons(model)
    # said once per mixer class and capability
    with warnings.catch_warnings():
        warnings.simplefilter("error", MixerProbeWarning)
        mixer_support(model)
    # the fallback feeds one token at a time inside `exact_continuation`
    assert _continuation_gap(model) < 1e-5


def test_the_scan_patch_is_needed_where_the_probe_says_so():
    """Negative control: Mamba's multi-token forward from a state is wrong without any help."""
    model = build("mamba", seed=0)
    with probes.forced(continuation="native"):
        assert _continuation_gap(model) > 1e-3
    assert _continuation_gap(model) < 1e-5


def test_a_native_path_that_forgets_the_state_is_caught(monkeypatch):
    """If transformers' Mamba2 scan stopped taking the cached state, the probe would stop trusting it."""
    module = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    chunk_scan = module.mamba2_chunk_scan

    def forgetful(*args, **kwargs):
        kwargs["initial_states"] = None
        return chunk_scan(*args, **kwargs)

    monkeypatch.setattr(module, "mamba2_chunk_scan", forgetful)
    model = build("mamba2", seed=0)
    with pytest.warns(MixerProbeWarning):
        support = mixer_support(model)
    assert support.continuation == "none"
    assert _continuation_gap(model) < 1e-5


def test_upstream_exactness_is_trusted_without_the_patch(monkeypatch):
    """If Mamba's own forward became exact, the probe would say `native` and the wrapper (which would add
    the state a second time) would never be installed."""
    monkeypatch.setattr(admission, "_continuation_error", lambda found, expected, forgetful, limit: 0.0)
    model = build("mamba", seed=0)
    with warnings.catch_warnings():
        # (replay and identity steps, which rely on the continuation, then fail their probes)
        warnings.simplefilter("ignore", MixerProbeWarning)
        assert mixer_support(model).continuation == "native"
    original = patches.installed_scan(MAMBA_MODULE)
    with exact_continuation(model):
        assert patches.installed_scan(MAMBA_MODULE) is original


def test_a_broken_replay_fails_its_probe(monkeypatch):
    monkeypatch.setattr(MixerInputRecorder, "replay", lambda self, start, length: None)
    with pytest.warns(MixerProbeWarning, match="replay probe failed"):
        support = mixer_support(build("mamba2", seed=0))
    assert not support.replay
    assert support.continuation == "native" and support.tree_scan


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_a_broken_tree_forward_fails_its_probe(kind, monkeypatch):
    family = tree_scan.mixer_family(ssm_mixers(build(kind, seed=0))[0])
    real = tree_scan._TREE_FORWARDS[family]

    def from_zero_state(mixer, hidden_states, plan, cache, record):
        # forgets the committed state: reads an empty cache instead
        return real(mixer, hidden_states, plan, ForkableCache(build(kind, seed=0).config), record)

    monkeypatch.setitem(tree_scan._TREE_FORWARDS, family, from_zero_state)
    model = build(kind, seed=0)
    with pytest.warns(MixerProbeWarning, match="tree_scan probe failed"):
        assert not mixer_support(model).tree_scan
    with pytest.raises(ValueError, match="verify chains"):
        tree_scan.check_tree_scan(model)


def test_a_probe_that_raises_has_failed(monkeypatch):
    def explode(mixer, model):
        raise RuntimeError("kernel missing")

    monkeypatch.setitem(probes._PROBES, "tree_scan", explode)
    model = build("bamba", seed=0)
    with pytest.warns(MixerProbeWarning, match="kernel missing"):
        assert not mixer_support(model).tree_scan
    assert "raised RuntimeError" in probes.unsupported_reasons(model)["tree_scan"]


def test_fused_kernels_refuse_identity_steps(monkeypatch):
    model = build("mamba2", seed=0)
    assert not patches.fused_kernels_active(ssm_mixers(model)[0])  # CPU
    monkeypatch.setattr(patches, "fused_kernels_active", lambda mixer: True)
    monkeypatch.setattr(probes, "fused_kernels_active", lambda mixer: True)
    with pytest.warns(MixerProbeWarning, match="fused CUDA kernels"):
        assert not mixer_support(model).identity_steps
    with pytest.raises(ValueError, match=r"fused CUDA kernels.*verification='replay'"):
        check_identity_steps(model)


def test_forcing_results():
    model = build("mamba2", seed=0)
    with probes.forced(continuation="none", replay=False):
        assert mixer_support(model) == MixerSupport(
            continuation="none", replay=False, identity_steps=False, tree_scan=True
        )
        with probes.forced(tree_scan=False):
            assert not mixer_support(model).tree_scan
        assert mixer_support(model).tree_scan
        # a forced stepwise continuation is still exact
        assert _continuation_gap(model) < 1e-5
    assert mixer_support(model) == MixerSupport()
    # models without SSM mixers have no fallback to take
    with probes.forced(replay=False):
        assert mixer_support(build("llama", seed=0)).replay
    with pytest.raises(ValueError, match="unknown capabilities"), probes.forced(speed=True):
        pass
    with pytest.raises(ValueError, match="cannot be forced"), probes.forced(continuation="sometimes"):
        pass


# ---------------------------------------------------------------- patches are scoped


class _Boom(Exception):
    pass


def _raise_inside(context) -> None:
    with pytest.raises(_Boom), context:
        raise _Boom


def test_the_scan_patch_lives_only_inside_its_contexts():
    model = build("mamba", seed=0)
    original = patches.installed_scan(MAMBA_MODULE)
    assert mixer_support(model).continuation == "patched"
    with exact_continuation(model):
        patched = patches.installed_scan(MAMBA_MODULE)
        assert patched is not original
        with exact_continuation(model), patches.scan_patch():
            assert patches.installed_scan(MAMBA_MODULE) is patched
        assert patches.installed_scan(MAMBA_MODULE) is patched
    assert patches.installed_scan(MAMBA_MODULE) is original
    _raise_inside(exact_continuation(model))
    assert patches.installed_scan(MAMBA_MODULE) is original
    assert all(not mixer._forward_pre_hooks and not mixer._forward_hooks for mixer in ssm_mixers(model))


def test_identity_steps_restore_the_time_step_limits():
    model = build("mamba2", seed=0)
    mixers = ssm_mixers(model)
    limits = [_compat.time_step_bounds(mixer) for mixer in mixers]
    skip = torch.zeros((2, 3), dtype=torch.bool)
    with identity_steps(model, skip):
        assert all(isinstance(_compat.time_step_bounds(mixer)[0], torch.Tensor) for mixer in mixers)
    assert all(_compat.time_step_bounds(m) is limit for m, limit in zip(mixers, limits))
    _raise_inside(identity_steps(model, skip))
    assert all(_compat.time_step_bounds(m) is limit for m, limit in zip(mixers, limits))


def _instance_forwards(model) -> list:
    return [mixer.__dict__.get("forward") for mixer in ssm_mixers(model)]


def test_tree_forwards_are_restored():
    model = build("bamba", seed=0)
    cache = ForkableCache(model.config)
    parents = torch.tensor([-1, 0, 0])
    with tree_scan.tree_verification(model, cache, parents):
        assert all(forward is not None for forward in _instance_forwards(model))
    assert _instance_forwards(model) == [None] * len(ssm_mixers(model))
    _raise_inside(tree_scan.tree_verification(model, cache, parents))
    assert _instance_forwards(model) == [None] * len(ssm_mixers(model))
    # a forward someone else set on the instance (accelerate's hooks do) comes back
    mixer = ssm_mixers(model)[0]
    theirs = mixer.forward
    mixer.forward = theirs
    with tree_scan.tree_verification(model, cache, parents):
        assert mixer.forward is not theirs
    assert mixer.__dict__["forward"] is theirs


def test_stepwise_forwards_are_restored():
    model = build("mamba2", seed=0)
    with probes.forced(continuation="none"):
        with exact_continuation(model):
            assert all(forward is not None for forward in _instance_forwards(model))
        assert _instance_forwards(model) == [None] * len(ssm_mixers(model))
        _raise_inside(exact_continuation(model))
    assert _instance_forwards(model) == [None] * len(ssm_mixers(model))


# ---------------------------------------------------------------- kept positions


def test_keep_positions_gathers_attention_layers_only():
    model = build("bamba", seed=0)
    cache = ForkableCache(model.config)
    with torch.no_grad():
        _forward(model, cache, _tokens(6))
    states = [state.clone() for state in cache.state_tensors()]
    keys = [(k.clone(), v.clone()) for k, v in cache.attention_tensors()]
    kept = torch.tensor([0, 1, 2, 4])
    cache.keep_positions(kept)
    for (k, v), (k0, v0) in zip(cache.attention_tensors(), keys):
        assert torch.equal(k, k0.index_select(2, kept)) and torch.equal(v, v0.index_select(2, kept))
    assert all(torch.equal(a, b) for a, b in zip(cache.state_tensors(), states))
    with pytest.raises(ValueError, match="ascending"):
        cache.keep_positions(torch.tensor([2, 1]))


def test_keep_positions_counts_sliding_window_tokens():
    model = build("mistral", seed=0)
    cache = ForkableCache(model.config)
    with torch.no_grad():
        _forward(model, cache, _tokens(8))
    cache.keep_positions(torch.tensor([0, 1, 2, 3, 5]))
    assert all(layer.get_seq_length() == 5 for layer in cache.layers)


def test_a_wrong_state_update_commit_fails_its_probe(monkeypatch):
    """Negative control: a commit that drops the accepted steps is caught by the probe, which warns and
    sends the target back to mixer-input replay."""
    from hf_specssm import targets
    from hf_specssm.ssm import state_replay

    monkeypatch.setattr(state_replay, "commit_state", lambda *args, **kwargs: None)
    model = build("mamba2", seed=0)
    with pytest.warns(MixerProbeWarning):
        support = mixer_support(model)
    assert support.state_replay is False and support.replay is True
    assert "off by" in probes.unsupported_reasons(model)["state_replay"]
    assert targets.make_target(model, None).state_recorder is None
