"""Model-free drafts: prompt lookup and the n-gram table, on Transformer, SSM and hybrid targets."""

from __future__ import annotations

import pytest
import torch

import hf_specssm
from hf_specssm.drafters import DraftSampler

from tests.helpers.models import build

SAMPLER = DraftSampler(None, do_sample=False)


def test_prompt_lookup_golden():
    drafter = hf_specssm.PromptLookupDrafter(max_ngram_size=2)
    sequence = torch.tensor([[5, 6, 7, 8, 9, 5, 6]])
    # the 2-gram (5, 6) occurred at 0; it was followed by 7, 8, 9
    assert drafter.draft(sequence, 3, SAMPLER).tokens.tolist() == [[7, 8, 9]]
    # no earlier (3, 4): back off to the 1-gram (4,); its first occurrence (index 0) was followed by 1, 2,
    # its latest earlier one (index 3) by 3, 3
    assert drafter.draft(torch.tensor([[4, 1, 2, 4, 3, 3, 4]]), 2, SAMPLER).tokens.tolist() == [[1, 2]]
    latest = hf_specssm.PromptLookupDrafter(max_ngram_size=2, match="latest")
    assert latest.draft(torch.tensor([[4, 1, 2, 4, 3, 3, 4]]), 2, SAMPLER).tokens.tolist() == [[3, 3]]
    with pytest.raises(ValueError, match="match must be"):
        hf_specssm.PromptLookupDrafter(match="best")
    # nothing matches: an empty draft
    assert drafter.draft(torch.tensor([[1, 2, 3]]), 4, SAMPLER).length == 0
    with pytest.raises(ValueError, match="min_ngram_size"):
        hf_specssm.PromptLookupDrafter(max_ngram_size=1, min_ngram_size=2)


def test_ngram_table_golden():
    drafter = hf_specssm.NgramTableDrafter(order=3, num_draft_tokens=4)
    prompt = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])
    drafter.begin(prompt)
    # context (1, 2) -> 3, then (2, 3) -> 1, (3, 1) -> 2, (1, 2) -> 3
    assert drafter.draft(prompt, 4, SAMPLER).tokens.tolist() == [[3, 1, 2, 3]]
    # the table learns from committed output
    longer = torch.cat([prompt, torch.tensor([[9, 9, 9]])], dim=1)
    drafter.commit(longer, 0)
    assert drafter.draft(longer, 2, SAMPLER).tokens.tolist() == [[9, 9]]
    with pytest.raises(ValueError, match="order"):
        hf_specssm.NgramTableDrafter(order=1)


def _repetitive_prompt():
    pattern = torch.tensor([7, 11, 13, 17, 19, 23, 29, 31])
    return pattern.repeat(4)[None]


@pytest.mark.parametrize(
    ("target_kind", "method"),
    [("llama", "replay")]
    + [
        (kind, method)
        for kind in ["mamba", "mamba2", "jamba", "bamba", "falcon_h1", "zamba2"]
        for method in ["replay", "joint", "refeed"]
    ],
)
def test_prompt_lookup_greedy_parity(target_kind, method):
    target = hf_specssm.enable(build(target_kind, seed=0))
    prompt = _repetitive_prompt()
    reference = type(target).generate(target, prompt, max_new_tokens=30, do_sample=False)
    output = target.generate(
        prompt, prompt_lookup_num_tokens=5, max_matching_ngram_size=3, max_new_tokens=30, verification=method
    )
    assert torch.equal(output, reference)
    stats = target.last_speculation_stats
    assert stats.drafted_tokens > 0


@pytest.mark.parametrize("target_kind", ["llama", "mamba2", "bamba"])
def test_ngram_table_greedy_parity(target_kind):
    target = hf_specssm.enable(build(target_kind, seed=0))
    prompt = _repetitive_prompt()
    reference = target.generate(prompt, max_new_tokens=40, do_sample=False)
    drafter = hf_specssm.NgramTableDrafter(order=3, num_draft_tokens=4, schedule="adaptive")
    output = target.generate(prompt, assistant_model=drafter, max_new_tokens=40, do_sample=False)
    assert torch.equal(output, reference)


def test_prompt_lookup_with_assistant_is_ambiguous():
    target = hf_specssm.enable(build("llama"))
    with pytest.raises(ValueError, match="not both"):
        target.generate(_repetitive_prompt(), assistant_model=build("mamba"), prompt_lookup_num_tokens=3)
