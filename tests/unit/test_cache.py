"""ForkableCache: rollback, fork and select against recomputation, for Mamba, Mamba2 and a hybrid."""

from __future__ import annotations

import pytest
import torch

from hf_specssm import ForkableCache
from hf_specssm._compat import cache_kwarg_name, forward_accepts

from tests.helpers.models import VOCAB, build
from tests.helpers.states import fresh, max_state_diff

KINDS = ["mamba", "mamba2", "falcon_mamba", "bamba"]
ATOL = 2e-5


def run(model, cache: ForkableCache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed `tokens` `[B, T]` one step at a time (exact for every mixer); return the last logits `[B, V]`."""
    logits = None
    for position in range(tokens.shape[1]):
        kwargs = {cache_kwarg_name(model): cache, "use_cache": True}
        if forward_accepts(model, "position_ids"):
            start = cache.seen_tokens
            kwargs["position_ids"] = torch.full((tokens.shape[0], 1), start)
        logits = model(input_ids=tokens[:, position : position + 1], **kwargs).logits[:, -1]
        cache.advance(1)
    return logits


@pytest.fixture(params=KINDS)
def model(request):
    return build(request.param, seed=4)


def tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("keep", [0, 1, 3])
def test_rollback_to_any_checkpointed_prefix(model, keep):
    prompt, extra = tokens(1, 6, 0), tokens(1, 4, 1)
    cache, _ = fresh(model, prompt)
    for position in range(extra.shape[1]):
        cache.checkpoint()
        run(model, cache, extra[:, position : position + 1])
    reference, _ = fresh(model, torch.cat([prompt, extra[:, :keep]], dim=1))
    # Before the rollback the state is measurably different: the comparison can fail.
    assert cache.seen_tokens == 10
    cache_before = max(
        (x - y).abs().max().item() for x, y in zip(cache.state_tensors(), reference.state_tensors())
    )
    assert cache_before > 1e-3
    cache.rollback_to(6 + keep)
    assert cache.seen_tokens == 6 + keep
    assert max_state_diff(cache, reference) < ATOL
    # and the next step from the rolled-back cache equals the next step from the recomputed one
    follow = tokens(1, 1, 9)
    assert torch.allclose(run(model, cache, follow), run(model, reference, follow), atol=1e-4)


@torch.no_grad()
def test_rollback_after_a_multi_token_forward(model):
    """A verification-style forward of 4 tokens at once, then back to the checkpoint before it."""
    prompt, block = tokens(1, 5, 2), tokens(1, 4, 3)
    cache, _ = fresh(model, prompt)
    cache.checkpoint()
    kwargs = {cache_kwarg_name(model): cache, "use_cache": True}
    if forward_accepts(model, "position_ids"):
        kwargs["position_ids"] = torch.arange(5, 9)[None]
    model(input_ids=block, **kwargs)
    cache.advance(4)
    reference, _ = fresh(model, prompt)
    assert (
        max((x - y).abs().max().item() for x, y in zip(cache.state_tensors(), reference.state_tensors()))
        > 1e-3
    )
    cache.crop(-4)  # transformers' API, routed through the checkpoints
    assert max_state_diff(cache, reference) < ATOL


@torch.no_grad()
def test_snapshot_restore_round_trip(model):
    cache, _ = fresh(model, tokens(1, 7, 4))
    snapshot = cache.snapshot()
    live_before = [t.data_ptr() for t in cache.state_tensors()]
    run(model, cache, tokens(1, 3, 5))
    cache.restore(snapshot)
    reference, _ = fresh(model, tokens(1, 7, 4))
    assert max_state_diff(cache, reference) < ATOL
    # restore writes in place: the static addresses transformers marked stay valid
    assert [t.data_ptr() for t in cache.state_tensors()] == live_before


@torch.no_grad()
def test_fork_then_select(model):
    prompt = tokens(1, 6, 6)
    cache, _ = fresh(model, prompt)
    cache.fork(3)
    assert all(t.shape[0] == 3 for t in cache.state_tensors())
    branches = tokens(3, 2, 7)
    run(model, cache, branches)
    for row in range(3):
        reference, _ = fresh(model, torch.cat([prompt, branches[row : row + 1]], dim=1))
        row_states = [t[row : row + 1] for t in cache.state_tensors()]
        diffs = [(x - y).abs().max().item() for x, y in zip(row_states, reference.state_tensors())]
        assert max(diffs) < ATOL
    cache.select(torch.tensor([2]))
    reference, _ = fresh(model, torch.cat([prompt, branches[2:3]], dim=1))
    assert max_state_diff(cache, reference) < ATOL
    # the rows really differed: selecting row 0 would not match row 2's recompute
    other, _ = fresh(model, torch.cat([prompt, branches[0:1]], dim=1))
    assert max_state_diff(other, reference) > 1e-3


@torch.no_grad()
def test_fork_copies_are_independent(model):
    cache, _ = fresh(model, tokens(1, 5, 8))
    cache.fork(2)
    run(model, cache, torch.tensor([[1], [2]]))
    assert any(not torch.allclose(state[0], state[1]) for state in cache.state_tensors())


def test_seq_length_without_attention_layers():
    model = build("mamba2")
    cache, _ = fresh(model, tokens(1, 6, 0))
    assert not cache.attention_tensors()
    assert cache.get_seq_length() == 6
    cache.advance(2)
    assert cache.get_seq_length() == 8


def test_seq_length_with_attention_layers_comes_from_the_keys():
    model = build("bamba")
    cache, _ = fresh(model, tokens(1, 6, 0))
    assert cache.get_seq_length() == 6 == cache.attention_tensors()[0][0].shape[2]


def test_rollback_errors_are_clear():
    model = build("mamba")
    cache, _ = fresh(model, tokens(1, 4, 0))
    run(model, cache, tokens(1, 2, 1))
    with pytest.raises(ValueError, match="no checkpoint"):
        cache.rollback(1)
    with pytest.raises(ValueError, match="cannot roll back"):
        cache.rollback_to(9)
    with pytest.raises(ValueError, match="out of range"):
        cache.select(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="repeats"):
        cache.fork(0)
    # a failed call leaves the cache usable
    reference, _ = fresh(model, torch.cat([tokens(1, 4, 0), tokens(1, 2, 1)], dim=1))
    assert max_state_diff(cache, reference) < ATOL


def test_checkpoint_slots_are_reused():
    model = build("mamba2")
    cache, _ = fresh(model, tokens(1, 4, 0))
    for _ in range(5):
        for step in range(3):
            cache.checkpoint()
            run(model, cache, tokens(1, 1, step))
        cache.rollback_to(cache.checkpoint_lengths[0])
        cache.clear_checkpoints()
    assert len(cache._slots) <= 3
