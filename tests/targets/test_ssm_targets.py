"""SSM and hybrid targets: lossless verification with state rollback (Activation Replay, Joint Attainment and
Advancement, and re-feed)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import hf_specssm
from hf_specssm import _compat
from hf_specssm import targets as verification
from hf_specssm.cache import ForkableCache
from hf_specssm.ssm import mixers
from hf_specssm.ssm.mixers import MixerInputRecorder
from hf_specssm.ssm.state_replay import StateRecorder
from hf_specssm.targets import joint

from tests.helpers.kernel_cases import require_cpu_kernels
from tests.helpers.models import VOCAB, align, build
from tests.helpers.sampling import chi_square_p_value, exact_distribution, no_eos, sample_continuations
from tests.helpers.scripted import ScriptedDrafter
from tests.helpers.states import fresh, max_state_diff

TARGETS = ["mamba", "mamba2", "falcon_mamba", "jamba", "bamba", "falcon_h1", "zamba2"]
METHODS = ["replay", "joint", "refeed"]
# one-step-at-a-time references in fp32; the replay path takes other kernels (multi-token scans)
STATE_ATOL = 1e-4


def _prompt(length: int, seed: int) -> torch.Tensor:
    # ids 0-2 are pad/bos/eos in these configs; a pad id in the prompt would be masked as padding
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


# The whole grid is 63 cases (~1 s each); `-m "not slow"` keeps the Mamba2 drafter's 21.
@pytest.mark.parametrize(
    ("target_kind", "drafter_kind", "method"),
    [
        pytest.param(
            target,
            drafter,
            method,
            id=f"{target}-{drafter}-{method}",
            marks=() if drafter == "mamba2" else pytest.mark.slow,
        )
        for target in TARGETS
        for drafter in ["mamba", "mamba2", "llama"]
        for method in METHODS
    ],
)
def test_greedy_parity(target_kind, drafter_kind, method):
    target = hf_specssm.enable(build(target_kind, seed=0))
    drafter_model = build(drafter_kind, seed=1)
    align(target, drafter_model)
    rounds = []
    for prompt_length, max_new, k in [(6, 30, 4), (1, 12, 2), (11, 25, 6)]:
        prompt = _prompt(prompt_length, prompt_length)
        reference = target.generate(prompt, max_new_tokens=max_new, do_sample=False)
        drafter = hf_specssm.ModelDrafter(drafter_model, num_draft_tokens=k, schedule="constant")
        output = target.generate(
            prompt, assistant_model=drafter, max_new_tokens=max_new, do_sample=False, verification=method
        )
        assert torch.equal(output, reference), f"prompt {prompt_length}"
        stats = target.last_speculation_stats
        rounds += [(a, d) for a, d in zip(stats.accepted_lengths, stats.draft_lengths) if d]
    assert any(a > 0 for a, _ in rounds) and any(a < d for a, d in rounds)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("target_kind", TARGETS)
def test_scripted_accept_lengths_and_committed_state(target_kind, method):
    """Every accept length 0..k, then the committed state equals a fresh recompute, layer by layer."""
    target = hf_specssm.enable(build(target_kind, seed=0))
    # no early EOS: the script needs its rounds
    target.generation_config.eos_token_id = None
    prompt = _prompt(5, 0)
    reference = target.generate(prompt, max_new_tokens=40, do_sample=False)
    drafter = ScriptedDrafter(reference, [0, 1, 2, 3, 4, 5], 5, VOCAB)
    output = target.generate(
        prompt,
        assistant_model=drafter,
        max_new_tokens=40,
        do_sample=False,
        verification=method,
        return_dict_in_generate=True,
    )
    assert torch.equal(output.sequences, reference)
    stats = output.speculation_stats
    assert set(range(6)) <= set(stats.accepted_lengths)
    cache = output.past_key_values
    assert all(state.shape[0] == 1 for state in cache.state_tensors())
    if method == "joint":
        # the last round's accepted tokens are fed again next round, so the cache stops before them
        last_round = stats.committed_tokens[-1]
        assert cache.seen_tokens == reference.shape[1] - last_round
    else:
        assert cache.seen_tokens == reference.shape[1] - 1
    recomputed, _ = fresh(target, reference[:, : cache.seen_tokens])
    assert max_state_diff(cache, recomputed) < STATE_ATOL


@pytest.mark.parametrize("target_kind", ["mamba", "bamba", "mamba2"])
def test_skipping_the_replay_corrupts_the_state(target_kind, monkeypatch):
    """Negative control: without replaying the accepted steps the committed state is wrong (Mamba v1 by
    mixer-input replay; Mamba2-layout targets by the state-update commit of `ssm.state_replay`)."""
    target = hf_specssm.enable(build(target_kind, seed=0))
    drafter = build("mamba2", seed=1)
    align(target, drafter)
    monkeypatch.setattr(MixerInputRecorder, "replay", lambda self, start, length: None)
    monkeypatch.setattr(StateRecorder, "commit", lambda self, length: None)
    output = target.generate(
        _prompt(5, 0),
        assistant_model=drafter,
        max_new_tokens=20,
        do_sample=False,
        return_dict_in_generate=True,
    )
    # (the corrupted state usually changes the output too, so compare with a recompute of what was output)
    recomputed, _ = fresh(target, output.sequences[:, :-1])
    assert max_state_diff(output.past_key_values, recomputed) > 1e-3


def _no_identity_steps(model, mask):
    return mixers.exact_continuation(model)


def _no_conv_cut(cache, lengths):
    return contextlib.nullcontext()


def _joint_round_state_error(target_kind: str) -> float:
    """One Joint Attainment and Advancement round (6-token prompt, 4 drafts): the largest difference
    between the committed recurrent state and a fresh recompute of the pending prefix."""
    model = build(target_kind, seed=0)
    target = verification.JointTarget(model)
    sequence = _prompt(10, 0)
    with torch.no_grad():
        target.score(sequence[:, :6], sequence[:, 6:])
        recomputed, _ = fresh(model, sequence[:, : target.consumed])
    return max(
        (committed[:1] - fresh_state).abs().max().item()
        for committed, fresh_state in zip(target.cache.state_tensors(), recomputed.state_tensors())
    )


@pytest.mark.parametrize(
    "sabotage",
    [
        pytest.param(lambda mp: mp.setattr(joint, "identity_steps", _no_identity_steps), id="no-skip"),
        pytest.param(
            lambda mp: mp.setattr(ForkableCache, "ragged_conv_rows", _no_conv_cut), id="no-conv-cut"
        ),
    ],
)
@pytest.mark.parametrize("target_kind", TARGETS)
def test_joint_verification_needs_both_the_skipped_steps_and_the_conv_cut(target_kind, sabotage, monkeypatch):
    """Negative controls: if the advancement row ran the drafts' SSM steps, or kept the padded conv window,
    its state would be wrong (and the state tests above would see it)."""
    assert _joint_round_state_error(target_kind) < 1e-5
    sabotage(monkeypatch)
    assert _joint_round_state_error(target_kind) > STATE_ATOL


def test_joint_verification_refuses_mixers_it_cannot_pad(monkeypatch):
    target = build("mamba2", seed=0)
    monkeypatch.setattr(mixers, "_scan_family", lambda mixer: None)
    with pytest.raises(ValueError, match="verification='replay'"):
        verification.JointTarget(target)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("target_kind", ["mamba2", "jamba"])
def test_eos_inside_an_accepted_block(target_kind, method):
    target = hf_specssm.enable(build(target_kind, seed=0))
    prompt = _prompt(4, 2)
    free_run = target.generate(prompt, max_new_tokens=30, do_sample=False)
    generated = free_run[0, prompt.shape[1] :].tolist()
    eos = next(token for i, token in enumerate(generated) if i >= 5 and token not in generated[:i])
    reference = target.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0)
    drafter = ScriptedDrafter(reference, [8], 8, VOCAB)
    output = target.generate(
        prompt,
        assistant_model=drafter,
        max_new_tokens=30,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
        verification=method,
    )
    assert torch.equal(output, reference) and output[0, -1].item() == eos


def test_verification_statistics_and_bad_method():
    target = hf_specssm.enable(build("bamba", seed=0))
    drafter = build("mamba2", seed=1)
    align(target, drafter)
    prompt = _prompt(6, 0)
    target.generate(prompt, assistant_model=drafter, max_new_tokens=10)
    stats = target.last_speculation_stats
    assert stats.peak_verification_bytes > 0
    with pytest.raises(ValueError, match="verification must be one of"):
        target.generate(prompt, assistant_model=drafter, max_new_tokens=5, verification="rewind")
    assert target.generate(prompt, max_new_tokens=3).shape[1] == prompt.shape[1] + 3


@pytest.mark.slow
@pytest.mark.parametrize("target_kind", ["mamba2", "bamba"])
def test_sampling_distribution_on_recurrent_targets(target_kind):
    vocab = 5
    target = hf_specssm.enable(no_eos(build(target_kind, seed=0, vocab=vocab)))
    drafter_model = no_eos(build("mamba", seed=1, vocab=vocab))
    prompt = torch.tensor([[3, 4, 3]])
    probs = exact_distribution(target, prompt)
    counts, accepted = sample_continuations(target, drafter_model, prompt, samples=1500, seed=99, vocab=vocab)
    assert chi_square_p_value(counts, probs) > 1e-3
    assert 0 in accepted and 2 in accepted


@pytest.mark.slow
@pytest.mark.parametrize("target_kind", ["mamba"])
def test_sampling_distribution_with_joint_verification(target_kind):
    vocab = 5
    target = hf_specssm.enable(no_eos(build(target_kind, seed=0, vocab=vocab)))
    drafter_model = no_eos(build("mamba2", seed=1, vocab=vocab))
    prompt = torch.tensor([[3, 4, 3]])
    probs = exact_distribution(target, prompt)
    counts, accepted = sample_continuations(
        target, drafter_model, prompt, samples=1500, seed=7, vocab=vocab, verification="joint"
    )
    assert chi_square_p_value(counts, probs) > 1e-3
    assert 0 in accepted and 2 in accepted


@pytest.mark.parametrize("target_kind", ["mamba2", "bamba", "falcon_h1", "zamba2"])
def test_mamba2_layout_targets_commit_by_state_update(target_kind):
    """Mamba2-layout targets verify with frozen state and commit by state updates (no checkpoint copy),
    and the committed state equals a fresh step-by-step recompute."""
    model = build(target_kind, seed=0)
    target = verification.make_target(model, None)
    assert target.state_recorder is not None
    sequence = _prompt(12, 3)
    with torch.no_grad():
        logits = target.score(sequence[:, :6], sequence[:, 6:11])  # 1 pending + 5 drafts
        assert target.cache.checkpoint_lengths == []
        target.keep(8)  # the pending token and two drafts
        recomputed, _ = fresh(model, sequence[:, :8])
        # the reference: transformers' own one-token steps after the same prefix
        stepped, _ = fresh(model, sequence[:, :5])
        expected = []
        for position in range(5, 11):
            expected.append(_one_step(model, stepped, sequence[:, position : position + 1], position))
    assert (logits[0] - torch.stack(expected)).abs().max() < 1e-4
    assert target.consumed == 8
    assert max_state_diff(target.cache, recomputed) < STATE_ATOL


@pytest.mark.parametrize("target_kind", ["mamba2", "bamba"])
def test_a_bf16_target_commits_by_state_update_to_bf16_tolerance(target_kind):
    """In bf16 the commit widens the conv to float32 (bf16 weights and recorded inputs): the committed
    states equal a fresh bf16 recompute of the kept prefix to bf16 rounding, and a commit that keeps one
    position fewer does not (the tolerance can tell a step apart)."""
    model = build(target_kind, seed=0).to(torch.bfloat16)
    sequence = _prompt(12, 3)
    errors = {}
    with torch.no_grad():
        for kept in (8, 7):
            target = verification.make_target(model, None)
            assert target.state_recorder is not None
            target.score(sequence[:, :6], sequence[:, 6:11])
            target.keep(kept)
            recomputed, _ = fresh(model, sequence[:, :8])
            errors[kept] = max(
                ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
                for a, b in zip(target.cache.state_tensors(), recomputed.state_tensors(), strict=True)
            )
    assert errors[8] < 2e-2, errors
    assert errors[7] > 5 * errors[8], errors


@pytest.mark.parametrize("slice_bytes", [1, 1 << 30])
def test_the_commit_runs_in_layer_slices_on_reused_buffers(slice_bytes, monkeypatch):
    """The state-update commit batches layers in slices (one layer each at 1 byte, all at 1 GiB) and takes
    its buffers from a workspace kept across rounds: rounds of other lengths reuse the same storage, and
    the committed state equals a fresh recompute after every round (a slice given another layer's
    parameters would not)."""
    from hf_specssm.ssm import state_replay

    monkeypatch.setattr(state_replay, "COMMIT_SLICE_BYTES", slice_bytes)
    model = build("bamba", seed=0)
    target = verification.make_target(model, None)
    recorder = target.state_recorder
    assert recorder is not None and len(recorder.mixers) >= 2
    sequence = _prompt(24, 5)
    storage = None
    with torch.no_grad():
        target.score(sequence[:, :5], sequence[:, :0])
        target.keep(5)
        for drafts, kept in [(6, 6), (6, 4), (3, 0), (6, 2)]:  # the longest commit first
            start = target.consumed  # then the pending token at `start`, and the drafts
            target.score(sequence[:, : start + 1], sequence[:, start + 1 : start + 1 + drafts])
            target.keep(start + 1 + kept)
            recomputed, _ = fresh(model, sequence[:, : start + 1 + kept])
            assert max_state_diff(target.cache, recomputed) < STATE_ATOL, (drafts, kept)
            pointers = {name: buffer.data_ptr() for name, buffer in recorder._workspace._buffers.items()}
            assert pointers == (storage or pointers)  # shorter commits allocate nothing again
            storage = pointers


@pytest.mark.parametrize("threshold", ["shipped", 0.0])
def test_the_commit_drops_negligible_terms_of_fast_fading_heads(threshold, monkeypatch):
    """Heads whose memory fades within a round (A = −60, Δ ≈ 1.3: one later position weighs e^−78) give
    the commit weighted inputs far below float32's normal range: it drops those under `NEGLIGIBLE_TERM`,
    so no denormal operand reaches its products, and the state still equals a fresh recompute. Negative
    control: with the threshold at 0 such operands are there (the model does make them)."""
    from hf_specssm.ssm import state_replay

    if threshold != "shipped":
        monkeypatch.setattr(state_replay, "NEGLIGIBLE_TERM", threshold)
    model = build("bamba", seed=0)
    with torch.no_grad():
        for mixer in _compat.ssm_mixers(model):
            mixer.A_log.fill_(torch.log(torch.tensor(60.0)))
            mixer.dt_bias.fill_(1.0)
    target = verification.make_target(model, None)
    sequence = _prompt(12, 3)
    with torch.no_grad():
        target.score(sequence[:, :6], sequence[:, 6:11])
        target.keep(10)
        recomputed, _ = fresh(model, sequence[:, :10])
    assert max_state_diff(target.cache, recomputed) < STATE_ATOL
    weighted = target.state_recorder._workspace._buffers["x"].abs()
    below = int(((weighted > 0) & (weighted < 2.0**-100)).sum())
    assert (below == 0) if threshold == "shipped" else (below > 0), below


def _one_step(model, cache: ForkableCache, token: torch.Tensor, position: int) -> torch.Tensor:
    """Logits `[V]` of one token fed at `position` through transformers' single-token path."""
    kwargs = {_compat.cache_kwarg_name(model): cache, "use_cache": True}
    if _compat.forward_accepts(model, "position_ids"):
        kwargs["position_ids"] = torch.tensor([[position]])
    logits = model(input_ids=token, **kwargs).logits[0, -1].float()
    cache.advance(1)
    return logits


@pytest.mark.parametrize("target_kind", ["mamba2", "bamba"])
def test_a_first_round_without_drafts_reads_the_prompt_in_one_forward(target_kind):
    """A round without drafts commits everything it feeds, so the first one reads the whole prompt in one
    forward, as plain decoding does (no separate prefill and extra step); with drafts the prompt but its
    last token is read apart (what a round's commit must not replay)."""
    model = build(target_kind, seed=0)
    prompt = _prompt(9, 4)
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    try:
        with torch.no_grad():
            target = verification.make_target(model, None)
            logits = target.score(prompt, prompt[:, :0])
            assert len(calls) == 1
            target.keep(9)
            reference = model(input_ids=prompt).logits[0, -1].float()
            calls.clear()
            drafted = verification.make_target(model, None)
            drafted.score(prompt, prompt[:, :2])
            assert len(calls) == 2
    finally:
        handle.remove()
    assert (logits[0, -1] - reference).abs().max() < 1e-4
    recomputed, _ = fresh(model, prompt)
    assert target.consumed == 9
    assert max_state_diff(target.cache, recomputed) < STATE_ATOL


def test_state_replay_forced_off_falls_back_to_mixer_input_replay():
    from hf_specssm._compat import probes

    with probes.forced(state_replay=False):
        target = verification.make_target(build("mamba2", seed=0), None)
    assert target.method == "replay" and target.state_recorder is None


def test_prompt_lookup_that_never_matches_the_target_is_gated_off():
    """On text the target never copies, copied drafts stop after a few rounds (the draft gate, here with a
    fixed cost model so the test does not depend on timing), and the output is still plain greedy."""
    target = hf_specssm.enable(build("mamba2", seed=0))
    target.generation_config.eos_token_id = None
    prompt = _prompt(40, 7)
    reference = target.generate(prompt, max_new_tokens=60, do_sample=False)
    drafter = hf_specssm.PromptLookupDrafter(
        max_ngram_size=1, num_draft_tokens=8, schedule="constant", draft_cost_ratio=0.05
    )
    output = target.generate(prompt, assistant_model=drafter, max_new_tokens=60, do_sample=False)
    assert torch.equal(output, reference)
    stats = target.last_speculation_stats
    drafted_rounds = sum(1 for length in stats.draft_lengths if length)
    assert not drafter.draft_gate.open
    assert drafted_rounds <= 12 < stats.rounds


@pytest.mark.parametrize("target_kind", ["mamba2", "bamba"])
def test_rounds_find_the_mixers_without_walking_the_modules(target_kind, monkeypatch):
    """A call walks the target's modules a fixed number of times, not once or more per round (a walk over
    a 48-layer model costs ~1.5% of its step); the output stays plain greedy."""
    target = hf_specssm.enable(build(target_kind, seed=0))
    target.generation_config.eos_token_id = None
    prompt = _prompt(12, 3)
    walks = []
    original = torch.nn.Module.modules

    def counting(module):
        if module is target:
            walks.append(1)
        return original(module)

    monkeypatch.setattr(torch.nn.Module, "modules", counting)
    counts = {}
    # the first call runs the mixer probes (once per mixer class)
    for new_tokens in (6, 6, 30):
        reference = target.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
        drafter = ScriptedDrafter(reference, [1, 0, 2, 3], num_draft_tokens=3, vocab_size=VOCAB)
        walks.clear()
        output = target.generate(prompt, assistant_model=drafter, max_new_tokens=new_tokens, do_sample=False)
        assert torch.equal(output, reference)
        counts[new_tokens] = len(walks)
        assert target.last_speculation_stats.rounds >= new_tokens // 4
    assert counts[30] == counts[6]
    # negative control: outside a call every lookup walks the modules
    walks.clear()
    for _ in range(3):
        _compat.ssm_mixers(target)
    assert len(walks) == 3
    with _compat.fixed_mixers(target), _compat.fixed_mixers(target):
        assert _compat.ssm_mixers(target) == _compat.ssm_mixers(target)
    assert len(walks) == 4


def test_prompt_lookup_drafter_and_its_gate_carry_over_between_calls():
    """`prompt_lookup_num_tokens=` keeps one drafter per target and settings, so what its draft gate learned
    (drafting off on text that never repeats) holds from the next call on; a new setting gets its own."""
    from hf_specssm import generation

    target = hf_specssm.enable(build("mamba2", seed=0))
    target.generation_config.eos_token_id = None
    prompt = _prompt(20, 5)
    reference = target.generate(prompt, max_new_tokens=12, do_sample=False)
    for _ in range(2):
        output = target.generate(prompt, prompt_lookup_num_tokens=4, max_new_tokens=12, do_sample=False)
        assert torch.equal(output, reference)
    target.generate(prompt, prompt_lookup_num_tokens=3, max_new_tokens=4, do_sample=False)
    kept = generation._LOOKUP_DRAFTERS[target]
    assert len(kept) == 2
    assert all(drafter.draft_gate is not None for drafter in kept.values())
    assert (
        sum(drafter.draft_gate.rounds for drafter in kept.values()) > 12
    )  # both calls of the first fed one gate


def test_zamba2_with_clamped_time_steps_verifies_by_state_update():
    """Zamba2 clamps Δ at `time_step_min` in its multi-token scan but not in its one-token step, so
    transformers' own multi-token forward differs from plain decoding's steps (the continuation probe fails
    and those paths step one token at a time). The frozen verification does not clamp, like the step, so it
    stays exact and is used; greedy output equals plain decoding at partial acceptance."""
    from hf_specssm._compat import probes

    model = build("zamba2", seed=0)
    with torch.no_grad():
        for mixer in mixers.ssm_mixers(model):
            mixer.dt_bias.fill_(-9.0)  # softplus ≈ 1e-4, below Zamba2's time_step_min (1e-3)
    probes.clear_cache()  # results are kept per mixer class; these weights behave unlike the other tests'
    try:
        _check_clamped_zamba2(model)
    finally:
        probes.clear_cache()


def test_zamba2_with_clamped_time_steps_verifies_trees_in_one_forward(monkeypatch):
    """With Δ under Zamba2's `time_step_min` the tree scan still equals one-token steps (it does not clamp,
    like the step), so its probe admits it and trees are verified in one forward; greedy output equals plain
    decoding. Negative control: the same tree forward with Δ clamped as the multi-token scan does is off."""
    from hf_specssm._compat import probes
    from hf_specssm.ssm import tree_scan

    model = build("zamba2", seed=0)
    with torch.no_grad():
        for mixer in mixers.ssm_mixers(model):
            mixer.dt_bias.fill_(-9.0)  # softplus ≈ 1e-4, below Zamba2's time_step_min (1e-3)
            mixer.D.zero_()  # outputs read the state alone, so a Δ off by the clamp shows
    probes.clear_cache()
    try:
        with pytest.warns(probes.MixerProbeWarning):  # the continuation probe still fails (clamped scan)
            support = probes.mixer_support(model)
        assert support.tree_scan
        drafter_model = build("mamba", seed=1)
        align(model, drafter_model)  # before the reference: it may touch the target's output layer
        model = hf_specssm.enable(model)
        model.generation_config.eos_token_id = None
        prompt = _prompt(6, 3)
        reference = model.generate(prompt, max_new_tokens=20, do_sample=False)
        calls = []
        original = tree_scan.tree_verification

        def counted(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(tree_scan, "tree_verification", counted)
        output = model.generate(
            prompt,
            assistant_model=hf_specssm.ModelDrafter(drafter_model, tree_shape=(2, 2)),
            max_new_tokens=20,
            do_sample=False,
        )
        assert calls, "trees were not verified in one forward"
        assert torch.equal(output, reference)
        # negative control: the tree scan fed Δ clamped the way the multi-token scan clamps it is refused
        scan = tree_scan.tree_scan

        def clamped(x, dt, *args, **kwargs):
            return scan(x, dt.clamp(min=1e-3), *args, **kwargs)

        probes.clear_cache()
        monkeypatch.setattr(tree_scan, "tree_scan", clamped)
        with pytest.warns(probes.MixerProbeWarning):
            assert not probes.mixer_support(model).tree_scan
    finally:
        probes.clear_cache()


def _check_clamped_zamba2(model) -> None:
    from hf_specssm._compat import probes
    from hf_specssm.testing.oracle import OracleDrafter

    with pytest.warns(probes.MixerProbeWarning):
        support = probes.mixer_support(model)
    assert support.continuation == "none" and support.state_replay
    target = verification.make_target(model, None)
    assert target.method == "replay" and target.state_recorder is not None
    model = hf_specssm.enable(model)
    model.generation_config.eos_token_id = None
    prompt = _prompt(6, 2)
    reference = model.generate(prompt, max_new_tokens=30, do_sample=False)
    drafter = OracleDrafter(
        reference, 0.6, VOCAB, config=hf_specssm.DraftConfig(num_draft_tokens=4, schedule="constant")
    )
    output = model.generate(prompt, assistant_model=drafter, max_new_tokens=30, do_sample=False)
    assert torch.equal(output, reference)


def test_frozen_verification_restores_transformers_chunk_scan_and_conv():
    """The scan and conv overrides live only while a verification runs; afterwards (also after an error)
    the module calls transformers' own `mamba2_chunk_scan` and `causal_conv1d_fn` again."""
    from hf_specssm._compat.mixers import installed_chunk_scan, installed_module_function

    name = "transformers.models.mamba2.modeling_mamba2"
    model = build("mamba2", seed=0)
    original = installed_chunk_scan(name)
    original_conv = installed_module_function(name, "causal_conv1d_fn")
    target = verification.make_target(model, None)
    sequence = _prompt(10, 1)
    with torch.no_grad():
        target.score(sequence[:, :6], sequence[:, 6:9])
        assert installed_chunk_scan(name) is original
        target.keep(7)
        with pytest.raises(RuntimeError), target.state_recorder.verifying(3):
            assert installed_chunk_scan(name) is not original
            if original_conv is not None:
                assert installed_module_function(name, "causal_conv1d_fn") is not original_conv
            raise RuntimeError("inside")
    assert installed_chunk_scan(name) is original
    assert installed_module_function(name, "causal_conv1d_fn") is original_conv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_verification_conv_is_transformers_conv(dtype):
    """`verification_conv` (K shifted products in float32) equals transformers' `causal_conv1d_fn` (oneDNN's
    grouped convolution) to float32 rounding, and to one bf16 rounding in bf16; a conv that drops the oldest
    tap does not."""
    from transformers.models.mamba2 import modeling_mamba2

    from hf_specssm.ssm.state_replay import verification_conv

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2, 24, 9, generator=generator).to(dtype)
    weight = torch.randn(24, 4, generator=generator).to(dtype)
    bias = torch.randn(24, generator=generator).to(dtype)
    expected = modeling_mamba2.causal_conv1d_fn(inputs, weight, bias, activation="silu").float()
    got = verification_conv(inputs, weight, bias, "silu").float()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got - expected).abs().max() <= tolerance * expected.abs().max()
    truncated = verification_conv(
        inputs, weight * torch.tensor([0.0, 1, 1, 1]).to(dtype), bias, "silu"
    ).float()
    assert (truncated - expected).abs().max() > 10 * tolerance * expected.abs().max()


def test_frozen_verifications_take_the_lean_conv():
    """Without the fused forward, a Mamba2 target's verification forward convolves through
    `verification_conv` (a spy counts its calls: one per layer), and its logits still equal transformers'
    one-token steps (the commit test above)."""
    from hf_specssm._compat import probes
    from hf_specssm.ssm import state_replay

    model = build("mamba2", seed=0)
    with probes.forced(fused_verification=False):
        target = verification.make_target(model, None)
    assert target.state_recorder.fused_mixers == []
    sequence = _prompt(10, 2)
    calls = []
    original = state_replay.verification_conv

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    state_replay.verification_conv = spy
    try:
        with torch.no_grad():
            target.score(sequence[:, :6], sequence[:, 6:9])
    finally:
        state_replay.verification_conv = original
    assert len(calls) == model.config.num_hidden_layers


class _KernelSpy:
    """The compiled CPU kernels with `mamba2_verification_mixer` counted (and, as negative controls, given a
    zero SSM state with `drop_state`, or told not to round a bf16 model's values with `skip_rounding`)."""

    def __init__(self, real, drop_state: bool = False, skip_rounding: bool = False) -> None:
        self.real, self.drop_state, self.skip_rounding, self.calls = real, drop_state, skip_rounding, 0

    def __getattr__(self, name):
        return getattr(self.real, name)

    def mamba2_verification_mixer(self, projected, window, state, *rest):
        self.calls += 1
        if self.drop_state:
            state = torch.zeros_like(state)
        if self.skip_rounding:  # (…, round_bf16, windows, mask)
            rest = (*rest[:-3], False, *rest[-2:])
        return self.real.mamba2_verification_mixer(projected, window, state, *rest)


def _falcon_h1(rms_norm: bool, norm_before_gate: bool = True, dtype: torch.dtype = torch.float32):
    """The tiny Falcon-H1 with its gated norm switched on or off, µP multipliers away from 1 and two
    norm groups, seeded; SSM inputs amplified as `build` does."""
    from transformers import FalconH1ForCausalLM

    from tests.helpers.models import _amplify_ssm_inputs

    config = build("falcon_h1", seed=0).config
    config.mamba_rms_norm, config.mamba_norm_before_gate = rms_norm, norm_before_gate
    config.mamba_n_groups = 2
    config.ssm_in_multiplier, config.ssm_multipliers = 1.5, [0.9, 1.1, 1.2, 0.8, 1.3]
    torch.manual_seed(0)
    model = FalconH1ForCausalLM(config).eval().to(dtype)
    _amplify_ssm_inputs(model)
    return model


FUSED_KINDS = ["mamba2", "bamba", "zamba2", "falcon_h1", "falcon_h1-norm-gate", "falcon_h1-gate-norm"]


def _fused_kind(kind: str, dtype: torch.dtype = torch.float32):
    if kind == "falcon_h1-norm-gate":
        return _falcon_h1(True, True, dtype)
    if kind == "falcon_h1-gate-norm":
        return _falcon_h1(True, False, dtype)
    if kind == "falcon_h1":
        return _falcon_h1(False, dtype=dtype)
    return build(kind, seed=0).to(dtype)


def _stepped_logits(model, sequence: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """`[end − start, V]` logits of transformers' one-token steps at positions `start … end − 1`, from a
    fresh cache holding `sequence[:, :start]`."""
    stepped, _ = fresh(model, sequence[:, :start])
    return torch.stack(
        [
            _one_step(model, stepped, sequence[:, position : position + 1], position)
            for position in range(start, end)
        ]
    )


@pytest.mark.parametrize("target_kind", FUSED_KINDS)
def test_fused_verification_matches_one_token_steps(target_kind, monkeypatch):
    """Float32 targets whose mixers pass the `fused_verification` probe run each mixer's verification
    between its projections as one compiled call (counted: one per SSM layer and round); the logits equal
    transformers' one-token steps and the committed state a fresh recompute, over two rounds."""
    from hf_specssm.kernels.cpu import cpu_kernels
    from hf_specssm.ssm import state_replay

    require_cpu_kernels()  # the fused verification forward runs on them
    model = _fused_kind(target_kind)
    target = verification.make_target(model, None)
    recorder = target.state_recorder
    assert recorder.fused_mixers and recorder.fused_mixers == recorder.mixers
    spy = _KernelSpy(cpu_kernels())
    monkeypatch.setattr(state_replay, "cpu_kernels", lambda: spy)
    sequence = _prompt(16, 5)
    with torch.no_grad():
        target.score(sequence[:, :6], sequence[:, 6:9])  # 1 pending + 3 drafts
        target.keep(7)
        logits = target.score(sequence[:, :8], sequence[:, 8:13])  # 1 pending + 5 drafts
        target.keep(11)
        recomputed, _ = fresh(model, sequence[:, :11])
        expected = _stepped_logits(model, sequence, 7, 13)
    assert spy.calls == 2 * len(recorder.mixers)
    assert (logits[0] - expected).abs().max() < 1e-4
    assert max_state_diff(target.cache, recomputed) < STATE_ATOL


def test_fused_mixers_record_through_in_proj_when_their_forward_falls_back(monkeypatch):
    """A verification the fused forward does not serve (here one that autograd follows) runs each mixer's
    own forward with the recording hook on `in_proj` instead: no kernel call, logits equal to one-token
    steps, and a commit from those records equal to a fresh recompute."""
    from hf_specssm.kernels.cpu import cpu_kernels
    from hf_specssm.ssm import state_replay

    require_cpu_kernels()  # the fused verification forward runs on them
    model = build("mamba2", seed=0)
    target = verification.make_target(model, None)
    assert target.state_recorder.fused_mixers
    spy = _KernelSpy(cpu_kernels())
    monkeypatch.setattr(state_replay, "cpu_kernels", lambda: spy)
    sequence = _prompt(12, 6)
    with torch.enable_grad():
        logits = target.score(sequence[:, :6], sequence[:, 6:10])
    assert logits.requires_grad and spy.calls == 0
    with torch.no_grad():
        target.keep(8)
        recomputed, _ = fresh(model, sequence[:, :8])
        expected = _stepped_logits(model, sequence, 5, 10)
    assert (logits[0].detach() - expected).abs().max() < 1e-4
    assert max_state_diff(target.cache, recomputed) < STATE_ATOL


@pytest.mark.parametrize("target_kind", FUSED_KINDS)
def test_bf16_fused_verification_rounds_where_the_mixer_forward_does(target_kind, monkeypatch):
    """In bf16 the fused kernel rounds the conv (before and after its SiLU), `dt + dt_bias` and its softplus to
    bf16 where transformers' forward stores bf16 tensors: its verification logits equal the unfused
    verification's (all but rare one-ulp ties of two exp implementations); without that rounding (negative
    control) most logits differ."""
    from hf_specssm._compat import probes
    from hf_specssm.kernels.cpu import cpu_kernels
    from hf_specssm.ssm import state_replay

    require_cpu_kernels()  # the fused verification forward runs on them
    model = _fused_kind(target_kind, torch.bfloat16)
    sequence = _prompt(14, 7)

    def verification_logits(fused: bool) -> torch.Tensor:
        with probes.forced(fused_verification=fused):
            target = verification.make_target(model, None)
        assert bool(target.state_recorder.fused_mixers) == fused
        with torch.no_grad():
            return target.score(sequence[:, :6], sequence[:, 6:14]).float()

    expected = verification_logits(False)
    spy = _KernelSpy(cpu_kernels())
    monkeypatch.setattr(state_replay, "cpu_kernels", lambda: spy)
    fused = verification_logits(True)
    assert spy.calls == len(_compat.ssm_mixers(model))
    assert (fused == expected).float().mean() >= 0.99
    assert (fused - expected).abs().max() <= 2e-2 * expected.abs().max()
    spy.skip_rounding = True
    unrounded = verification_logits(True)
    assert (unrounded == expected).float().mean() < 0.9


def test_a_fused_forward_that_drops_the_state_fails_its_probe(monkeypatch):
    """Negative control: a fused kernel that starts every verification from a zero state is caught by the
    `fused_verification` probe, which warns; the target then verifies through transformers' mixer forward
    (no fused mixers) and greedy output still equals plain decoding."""
    from hf_specssm._compat import probes
    from hf_specssm.kernels.cpu import cpu_kernels
    from hf_specssm.ssm import state_replay
    from hf_specssm.testing.oracle import OracleDrafter

    require_cpu_kernels()  # the fused verification forward runs on them
    spy = _KernelSpy(cpu_kernels(), drop_state=True)
    monkeypatch.setattr(state_replay, "cpu_kernels", lambda: spy)
    model = build("mamba2", seed=0)
    probes.clear_cache()
    try:
        with pytest.warns(probes.MixerProbeWarning, match="off by"):
            support = probes.mixer_support(model)
        assert support.state_replay and not support.fused_verification
        assert spy.calls > 0  # the probe ran the broken kernel
        assert "off by" in probes.unsupported_reasons(model)["fused_verification"]
        assert verification.make_target(model, None).state_recorder.fused_mixers == []
        model = hf_specssm.enable(model)
        model.generation_config.eos_token_id = None
        prompt = _prompt(6, 3)
        reference = model.generate(prompt, max_new_tokens=24, do_sample=False)
        calls = spy.calls
        drafter = OracleDrafter(
            reference, 0.7, VOCAB, config=hf_specssm.DraftConfig(num_draft_tokens=4, schedule="constant")
        )
        output = model.generate(prompt, assistant_model=drafter, max_new_tokens=24, do_sample=False)
        assert torch.equal(output, reference)
        assert spy.calls == calls  # the refused kernel never ran in decoding
    finally:
        probes.clear_cache()
