"""Tree verification on SSM and hybrid targets (STree): tree-scan logits equal per-branch sequential
decoding, the committed state after a tree round equals a fresh recompute, greedy parity of tree
speculation, and tree sampling keeps the target's distribution."""

from __future__ import annotations

import pytest
import torch

import hf_specssm
from hf_specssm import _compat
from hf_specssm.cache import ForkableCache
from hf_specssm.policies.tree_shape import DEFAULT_ARMS
from hf_specssm.ssm import tree_scan
from hf_specssm.ssm.mixers import exact_continuation
from hf_specssm.targets import RecurrentTarget
from hf_specssm.tree import TokenTree

from tests.helpers.kernel_cases import require_cpu_kernels
from tests.helpers.models import VOCAB, align, build
from tests.helpers.sampling import chi_square_p_value, exact_distribution, no_eos, sample_continuations
from tests.helpers.states import fresh, max_state_diff

TARGETS = ["mamba2", "mamba", "falcon_mamba", "jamba", "bamba", "falcon_h1", "zamba2"]
SHAPES = [*DEFAULT_ARMS, (4,)]
# root ─ 0 ─ 1 ─ 3 ─ 6        (depth 5 with the root: longer than the conv window)
#      │       │   └ 7
#      │       └ 8
#      └ 2 ─ 4
#          └ 5
PARENTS = torch.tensor([-1, 0, -1, 1, 2, 2, 3, 3, 1])
LOGITS_ATOL = 1e-5
STATE_ATOL = 1e-5


def _tokens(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _decode_branch(model, committed: torch.Tensor, path_tokens: torch.Tensor, cached: int) -> torch.Tensor:
    """Last logits after `committed + path_tokens`: `cached` tokens in one forward, then one token a step."""
    sequence = torch.cat([committed, path_tokens])[None]
    name = _compat.cache_kwarg_name(model)
    cache = ForkableCache(model.config)
    if cached:
        with exact_continuation(model):
            model(sequence[:, :cached], **{name: cache}, use_cache=True)
        cache.advance(cached)
    for position in range(cached, sequence.shape[1]):
        kwargs = {name: cache, "use_cache": True}
        if _compat.forward_accepts(model, "position_ids"):
            kwargs["position_ids"] = torch.tensor([[position]])
        logits = model(sequence[:, position : position + 1], **kwargs).logits[0, -1]
        cache.advance(1)
    return logits


@torch.no_grad()
def _tree_round_errors(
    kind: str, prefix_length: int = 7, path: tuple[int, ...] = (0, 1, 3, 6), make_target=RecurrentTarget
):
    """One tree round on `kind`: the largest logits difference to per-branch decoding over the root and
    every node, and the committed state's difference to a fresh recompute after keeping `path`."""
    model = build(kind, seed=0)
    committed = _tokens(prefix_length, 1)
    tree = TokenTree(tokens=_tokens(PARENTS.shape[0], 2), parents=PARENTS)
    target = make_target(model)
    logits = target.score_tree(committed[None], tree)[0]
    cached = max(prefix_length - 1, 0)
    worst = 0.0
    for node in [-1, *range(tree.size)]:
        reference = _decode_branch(model, committed, tree.tokens[tree.path(node)], cached)
        worst = max(worst, (logits[node + 1] - reference).abs().max().item())
    target.keep_tree(list(path))
    kept = torch.cat([committed, tree.tokens[list(path)]])[None]
    recomputed, _ = fresh(model, kept)
    assert target.cache.seen_tokens == kept.shape[1] == target.consumed
    return worst, max_state_diff(target.cache, recomputed)


@pytest.mark.parametrize("kind", TARGETS)
def test_tree_scan_equals_per_branch_decoding(kind):
    logits_error, state_error = _tree_round_errors(kind)
    print(f"{kind}: tree vs per-branch max abs diff {logits_error:.2e}, committed state {state_error:.2e}")
    assert logits_error < LOGITS_ATOL, f"logits max abs diff {logits_error:.2e}"
    assert state_error < STATE_ATOL, f"committed state max abs diff {state_error:.2e}"


@pytest.mark.parametrize("kind", ["mamba2", "jamba"])
@pytest.mark.parametrize(
    ("prefix_length", "path"),
    [
        pytest.param(1, (2, 5), id="no-cached-state"),
        pytest.param(4, (), id="nothing-accepted"),
        pytest.param(4, (2, 4), id="short-path"),
    ],
)
def test_tree_scan_edge_cases(kind, prefix_length, path):
    logits_error, state_error = _tree_round_errors(kind, prefix_length, path)
    assert logits_error < LOGITS_ATOL and state_error < STATE_ATOL, (logits_error, state_error)


@pytest.mark.parametrize("kind", ["mamba2", "jamba", "bamba"])
def test_tree_scan_check_can_fail(kind, monkeypatch):
    """Negative control: treating the nodes as one chain (a causal scan) breaks siblings' logits."""
    monkeypatch.setattr(tree_scan, "forward_parents", lambda tree, chain: torch.arange(chain + tree.size) - 1)
    logits_error, _ = _tree_round_errors(kind)
    assert logits_error > 10 * LOGITS_ATOL


@pytest.mark.parametrize("kind", ["mamba2", "mamba"])
def test_per_path_rows_baseline_matches_the_tree_scan(kind):
    model = build(kind, seed=0)
    committed = _tokens(7, 1)
    tree = TokenTree(tokens=_tokens(PARENTS.shape[0], 2), parents=PARENTS)
    target = RecurrentTarget(model)
    with torch.no_grad():
        target.score(committed[None, :-1], committed[None, -1:][:, :0])  # prefill to 6 cached tokens
        target.keep(6)
        before = [state.clone() for state in target.cache.state_tensors()]
        by_paths = tree_scan.score_tree_by_paths(model, target.cache, committed[None, 6:], tree)
        assert all(torch.equal(a, b) for a, b in zip(before, target.cache.state_tensors()))
        by_scan = target.score_tree(committed[None], tree)
    assert (by_paths - by_scan).abs().max().item() < LOGITS_ATOL


def test_unknown_mixers_are_refused(monkeypatch):
    model = build("mamba2", seed=0)
    monkeypatch.setattr(tree_scan, "mixer_family", lambda mixer: None)
    with pytest.raises(ValueError, match="no tree scan for Mamba2Mixer"):
        tree_scan.check_tree_scan(model)


def _prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _tree_parity(target_kind: str, shape: tuple[int, ...], drafter_kind: str = "mamba2") -> list[int]:
    target = hf_specssm.enable(build(target_kind, seed=0))
    drafter_model = build(drafter_kind, seed=1)
    align(target, drafter_model)
    accepted = []
    for length, seed in [(5, 0), (1, 1), (12, 2)]:
        prompt = _prompt(length, seed)
        reference = target.generate(prompt, max_new_tokens=24, do_sample=False)
        drafter = hf_specssm.ModelDrafter(drafter_model, tree_shape=shape)
        output = target.generate(
            prompt, assistant_model=drafter, max_new_tokens=24, do_sample=False, return_dict_in_generate=True
        )
        assert torch.equal(output.sequences, reference), f"prompt {length}"
        cache = output.past_key_values
        # (all of it when the stop fell on an accepted node, else all but the target's last token)
        assert reference.shape[1] - 1 <= cache.seen_tokens <= reference.shape[1]
        recomputed, _ = fresh(target, reference[:, : cache.seen_tokens])
        assert max_state_diff(cache, recomputed) < 1e-4
        accepted += target.last_speculation_stats.accepted_lengths
    return accepted


# `-m "not slow"` keeps Mamba2's 7 shapes; the hybrid (Bamba) runs them in the full suite.
@pytest.mark.parametrize(
    ("target_kind", "shape"),
    [
        pytest.param(
            target,
            shape,
            id=f"{target}-{'x'.join(map(str, shape))}",
            marks=() if target == "mamba2" else pytest.mark.slow,
        )
        for target in ["mamba2", "bamba"]
        for shape in SHAPES
    ],
)
def test_tree_greedy_parity_every_shape(target_kind, shape):
    accepted = _tree_parity(target_kind, shape)
    assert max(accepted) >= min(2, len(shape))


# `-m "not slow"` keeps one shape per family; the deeper one runs in the full suite.
@pytest.mark.parametrize(
    ("target_kind", "shape"),
    [
        pytest.param(
            target,
            shape,
            id=f"{target}-{'x'.join(map(str, shape))}",
            marks=() if shape == (2, 2, 1, 1) else pytest.mark.slow,
        )
        for target in ["mamba", "falcon_mamba", "jamba", "falcon_h1", "zamba2"]
        for shape in [(2, 2, 1, 1), (3, 2, 2, 1, 1)]
    ],
)
def test_tree_greedy_parity_every_family(target_kind, shape):
    accepted = _tree_parity(target_kind, shape, drafter_kind="mamba")
    assert max(accepted) >= 1


def test_tree_greedy_parity_with_a_transformer_drafter():
    accepted = _tree_parity("jamba", (3, 3, 2, 1), drafter_kind="llama")
    assert max(accepted) >= 1


@pytest.mark.slow
def test_tree_sampling_on_an_ssm_target_matches_the_target():
    """End to end through `generate`: every 3-token continuation of a Mamba2 target, sampled tree drafts."""
    vocab = 5
    target = hf_specssm.enable(no_eos(build("mamba2", seed=0, vocab=vocab)))
    drafter_model = no_eos(build("mamba", seed=1, vocab=vocab))
    align(target, drafter_model)
    prompt = torch.tensor([[3, 4, 3]])
    probs = exact_distribution(target, prompt)
    counts, accepted = sample_continuations(
        target,
        drafter_model,
        prompt,
        samples=1500,
        seed=5,
        vocab=vocab,
        drafter_options={"tree_shape": (3, 2), "tree_children": "sample"},
    )
    assert chi_square_p_value(counts, probs) > 1e-3
    assert 0 in accepted and 2 in accepted


def test_tree_state_is_left_alone_by_the_tree_forward():
    """The tree forward reads the committed state and writes none of it (the commit does)."""
    model = build("bamba", seed=0)
    target = RecurrentTarget(model)
    committed = _tokens(6, 1)
    tree = TokenTree(tokens=_tokens(PARENTS.shape[0], 2), parents=PARENTS)
    with torch.no_grad():
        target.score(committed[None, :-1], committed[None, :0])
        target.keep(5)
        before = [state.clone() for state in target.cache.state_tensors()]
        target.score_tree(committed[None], tree)
    assert all(torch.equal(a, b) for a, b in zip(before, target.cache.state_tensors()))


@pytest.mark.parametrize("kind", ["mamba2", "mamba"])
def test_bf16_tree_logits_agree_with_and_without_the_cpu_kernels(kind, monkeypatch):
    """bf16 takes the kernels' unfused conv path (round, then the activation): its logits must match the
    torch references' to bf16 rounding (a bias added twice moves them by whole units)."""
    from hf_specssm.kernels import cpu

    require_cpu_kernels()
    model = build(kind, seed=0).to(torch.bfloat16)
    with torch.no_grad():  # a conv bias large enough to matter
        for mixer in tree_scan.ssm_mixers(model):
            mixer.conv1d.bias.normal_(0.0, 2.0)
    committed = _tokens(7, 1)
    tree = TokenTree(tokens=_tokens(PARENTS.shape[0], 2), parents=PARENTS)
    with torch.no_grad():
        compiled = RecurrentTarget(model).score_tree(committed[None], tree)[0]
        monkeypatch.setenv(cpu.ENVIRONMENT_SWITCH, "0")
        reference = RecurrentTarget(model).score_tree(committed[None], tree)[0]
    scale = reference.abs().max().item()
    assert (compiled - reference).abs().max().item() < 0.05 * scale


@pytest.mark.parametrize("kind", ["mamba2", "bamba", "zamba2", "falcon_h1"])
def test_fused_tree_verification_equals_per_branch_decoding(kind, monkeypatch):
    """Targets whose mixers the `fused_verification` probe admitted verify trees through the same compiled
    call, with the tree's conv windows and ancestor mask (a spy sees both on every SSM layer): logits equal
    per-branch decoding and the committed path's state a fresh recompute."""
    from hf_specssm import targets
    from hf_specssm.kernels.cpu import cpu_kernels
    from hf_specssm.ssm import state_replay

    require_cpu_kernels()  # the fused verification forward runs on them
    real, calls = cpu_kernels(), []

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def mamba2_verification_mixer(self, *args):
            calls.append((args[-2].numel() > 0, args[-1].numel() > 0))
            return real.mamba2_verification_mixer(*args)

    monkeypatch.setattr(state_replay, "cpu_kernels", lambda: Spy())

    def fused_target(model):
        target = targets.make_target(model, None)  # (runs the probes on first use, through the spy too)
        assert target.state_recorder.fused_routes
        calls.clear()
        return target

    logits_error, state_error = _tree_round_errors(kind, make_target=fused_target)
    assert logits_error < LOGITS_ATOL and state_error < STATE_ATOL
    layers = len(tree_scan.ssm_mixers(build(kind, seed=0)))
    assert calls.count((True, True)) == layers  # one tree forward: windows and mask on every SSM layer
