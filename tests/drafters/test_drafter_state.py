"""The drafter's recurrent state after N rounds equals a fresh recompute on the committed prefix."""

from __future__ import annotations

import pytest
import torch

import hf_specssm
from hf_specssm.drafters import DraftSampler

from tests.helpers.drafters import RecordingDrafter
from tests.helpers.models import VOCAB, align, build
from tests.helpers.states import fresh, max_state_diff

# fp32 tiny models: per-step rounding accumulates over ~60 steps; states are O(1).
ATOL = 5e-5


@torch.no_grad()
@pytest.mark.parametrize("kind", ["mamba", "mamba2", "falcon_mamba", "bamba", "llama"])
def test_state_after_random_acceptances_matches_recompute(kind):
    """Drive the drafter API directly with every acceptance pattern, including partial ones."""
    model = build(kind, seed=2)
    drafter = hf_specssm.ModelDrafter(model, num_draft_tokens=4, schedule="constant")
    generator = torch.Generator().manual_seed(0)
    sequence = torch.randint(0, VOCAB, (1, 5), generator=generator)
    drafter.begin(sequence)
    sampler = DraftSampler(None, do_sample=False)
    patterns = []
    for _ in range(12):
        num_draft = int(torch.randint(1, 6, (1,), generator=generator))
        draft = drafter.draft(sequence, num_draft, sampler)
        accepted = int(torch.randint(0, num_draft + 1, (1,), generator=generator))
        bonus = torch.randint(0, VOCAB, (1, 1), generator=generator)
        sequence = torch.cat([sequence, draft.tokens[:, :accepted], bonus], dim=1)
        drafter.commit(sequence, accepted)
        patterns.append((num_draft, accepted))
        # the drafter holds a prefix of the committed sequence and has not consumed the last token
        consumed = drafter.cache.seen_tokens
        assert consumed < sequence.shape[1]
        reference, _ = fresh(model, sequence[:, :consumed])
        assert max_state_diff(drafter.cache, reference) < ATOL
    assert {a for _, a in patterns} >= {0, 1, 2}
    assert any(0 < a < d for d, a in patterns)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["mamba", "mamba2", "falcon_mamba"])
def test_state_after_generate_matches_recompute(kind):
    target = hf_specssm.enable(build("llama", seed=0))
    drafter_model = build(kind, seed=1)
    align(target, drafter_model)
    drafter = RecordingDrafter(drafter_model, num_draft_tokens=4, schedule="constant")
    # the first of a few prompts whose run has a partial acceptance (0 < accepted < drafted)
    for seed in range(8):
        prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(seed))
        target.generate(prompt, assistant_model=drafter, max_new_tokens=40)
        stats = target.last_speculation_stats
        if any(0 < a < d for a, d in zip(stats.accepted_lengths, stats.draft_lengths)):
            break
    else:
        pytest.fail("no prompt gave a partial acceptance: the check would prove little")
    consumed = drafter.final_cache.seen_tokens
    assert drafter.final_sequence.shape[1] - consumed in (1, 2)
    reference, _ = fresh(drafter_model, drafter.final_sequence[:, :consumed])
    assert max_state_diff(drafter.final_cache, reference) < ATOL


@torch.no_grad()
@pytest.mark.parametrize("kind", ["mamba2", "llama"])
def test_confidence_stop_ends_rounds_early_and_stays_lossless(kind):
    """`confidence_stop` cuts a chain after its first unsure token; the state and the output stay exact."""
    target = hf_specssm.enable(build("llama", seed=0))
    drafter_model = build(kind, seed=1)
    align(target, drafter_model)
    threshold = 0.5
    drafter = RecordingDrafter(
        drafter_model, num_draft_tokens=8, schedule="constant", confidence_stop=threshold
    )
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    # each round's drafts: confident tokens then (unless the round ran to 8) one unsure token
    sampler = DraftSampler(None, do_sample=False)
    drafter.begin(prompt)
    draft = drafter.draft(prompt, 8, sampler)
    sequence = torch.cat([prompt, draft.tokens], dim=1)
    logits = drafter_model(sequence).logits[0, prompt.shape[1] - 1 : -1].float()
    confidence = torch.softmax(logits, dim=-1).gather(1, draft.tokens[0, :, None])[:, 0]
    assert (confidence[:-1] >= threshold).all()
    assert draft.length == 8 or confidence[-1] < threshold
    drafter.end()

    output = target.generate(prompt, assistant_model=drafter, max_new_tokens=40)
    reference = target.generate(prompt, max_new_tokens=40, do_sample=False)
    assert torch.equal(output, reference)
    lengths = target.last_speculation_stats.draft_lengths
    assert min(lengths[:-1]) < 8, "no round stopped early: the check would prove little"
    consumed = drafter.final_cache.seen_tokens
    fresh_state, _ = fresh(drafter_model, drafter.final_sequence[:, :consumed])
    assert max_state_diff(drafter.final_cache, fresh_state) < ATOL


def test_confidence_stop_must_be_a_probability():
    with pytest.raises(ValueError, match="confidence_stop"):
        hf_specssm.DraftConfig(confidence_stop=1.5)
