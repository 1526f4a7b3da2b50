"""Greedy speculative output equals the target's own greedy output, token for token (fp32)."""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import hf_specssm

from tests.helpers.models import VOCAB, align, build
from tests.helpers.scripted import ScriptedDrafter

TARGETS = ["llama", "qwen2", "gpt_neox", "mistral"]
DRAFTERS = ["mamba", "mamba2", "falcon_mamba", "bamba", "llama"]


def _pair(target_kind: str, drafter_kind: str):
    target = build(target_kind, seed=0)
    drafter = build(drafter_kind, seed=1)
    align(target, drafter)
    return hf_specssm.enable(target), drafter


# The whole grid is 20 cases (~1 s each); `-m "not slow"` keeps the Mamba2 drafter's 4.
@pytest.mark.parametrize(
    ("target_kind", "drafter_kind"),
    [
        pytest.param(
            target, drafter, id=f"{target}-{drafter}", marks=() if drafter == "mamba2" else pytest.mark.slow
        )
        for target in TARGETS
        for drafter in DRAFTERS
    ],
)
def test_greedy_parity_across_prompts_and_lengths(target_kind, drafter_kind):
    target, drafter_model = _pair(target_kind, drafter_kind)
    generator = torch.Generator().manual_seed(TARGETS.index(target_kind) * 10 + DRAFTERS.index(drafter_kind))
    accepted = []
    for prompt_length, max_new, schedule, k in [
        (1, 9, "constant", 3),
        (5, 40, "adaptive", 4),
        (17, 23, "heuristic", 2),
        (9, 30, "constant", 7),
    ]:
        prompt = torch.randint(0, VOCAB, (1, prompt_length), generator=generator)
        reference = target.generate(prompt, max_new_tokens=max_new, do_sample=False)
        drafter = hf_specssm.ModelDrafter(drafter_model, num_draft_tokens=k, schedule=schedule)
        output = target.generate(prompt, assistant_model=drafter, max_new_tokens=max_new, do_sample=False)
        assert torch.equal(output, reference), f"prompt {prompt_length}, {schedule}"
        accepted += target.last_speculation_stats.accepted_lengths
    # The aligned pair must exercise partial acceptance, or this test proves little.
    assert any(a > 0 for a in accepted) and any(a == 0 for a in accepted)


@pytest.mark.parametrize("target_kind", TARGETS)
def test_plain_model_as_assistant(target_kind):
    target, drafter_model = _pair(target_kind, "mamba2")
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    reference = target.generate(prompt, max_new_tokens=30, do_sample=False)
    assert torch.equal(target.generate(prompt, assistant_model=drafter_model, max_new_tokens=30), reference)


@pytest.mark.parametrize("num_draft", [1, 3, 6])
def test_scripted_drafter_forces_every_accept_length(num_draft):
    target = hf_specssm.enable(build("llama", seed=0))
    prompt = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(1))
    reference = target.generate(prompt, max_new_tokens=60, do_sample=False)
    script = list(range(num_draft + 1))
    drafter = ScriptedDrafter(reference, script, num_draft, VOCAB)
    output = target.generate(prompt, assistant_model=drafter, max_new_tokens=60, do_sample=False)
    assert torch.equal(output, reference)
    stats = target.last_speculation_stats
    # Every forced length 0..k shows up as the accepted length of its round.
    drafted_rounds = [a for a, d in zip(stats.accepted_lengths, stats.draft_lengths) if d > 0]
    assert drafted_rounds == drafter.forced
    assert set(range(num_draft + 1)) <= set(stats.accepted_lengths)


def _eos_inside_block_case(target_kind: str):
    target = hf_specssm.enable(build(target_kind, seed=0))
    prompt = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(2))
    free_run = target.generate(prompt, max_new_tokens=30, do_sample=False)
    # A token first generated well inside the continuation becomes the EOS token.
    generated = free_run[0, prompt.shape[1] :].tolist()
    eos = next(token for i, token in enumerate(generated) if i >= 7 and token not in generated[:i])
    return target, prompt, eos


@pytest.mark.parametrize("target_kind", ["llama", "gpt_neox"])
def test_eos_inside_an_accepted_block(target_kind):
    target, prompt, eos = _eos_inside_block_case(target_kind)
    reference = target.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert reference[0, -1].item() == eos and reference.shape[1] < prompt.shape[1] + 30
    # An always-right drafter with long drafts puts the EOS in the middle of an accepted block.
    drafter = ScriptedDrafter(reference, [8], 8, VOCAB)
    output = target.generate(
        prompt, assistant_model=drafter, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    assert torch.equal(output, reference)
    assert target.last_speculation_stats.committed_tokens[-1] < 9


class StopOnToken(StoppingCriteria):
    def __init__(self, token: int):
        self.token = token
        self.calls = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return input_ids[:, -1] == self.token


def test_user_stopping_criterion_inside_a_block():
    target, prompt, stop_token = _eos_inside_block_case("llama")
    reference = target.generate(
        prompt, max_new_tokens=30, stopping_criteria=StoppingCriteriaList([StopOnToken(stop_token)])
    )
    drafter = ScriptedDrafter(reference, [8], 8, VOCAB)
    output = target.generate(
        prompt,
        assistant_model=drafter,
        max_new_tokens=30,
        stopping_criteria=StoppingCriteriaList([StopOnToken(stop_token)]),
    )
    assert torch.equal(output, reference)
    assert output[0, -1].item() == stop_token


@pytest.mark.parametrize("max_new", [1, 2, 5, 13])
def test_max_new_tokens_is_exact(max_new):
    target, drafter_model = _pair("llama", "mamba")
    prompt = torch.randint(0, VOCAB, (1, 3), generator=torch.Generator().manual_seed(max_new))
    reference = target.generate(prompt, max_new_tokens=max_new, do_sample=False)
    drafter = hf_specssm.ModelDrafter(drafter_model, num_draft_tokens=8, schedule="constant")
    output = target.generate(prompt, assistant_model=drafter, max_new_tokens=max_new, do_sample=False)
    assert output.shape[1] == prompt.shape[1] + max_new
    assert torch.equal(output, reference)


def test_logits_processors_are_honoured_in_greedy():
    target, drafter_model = _pair("qwen2", "mamba")
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(5))
    options = dict(
        max_new_tokens=40,
        do_sample=False,
        repetition_penalty=1.7,
        no_repeat_ngram_size=2,
        bad_words_ids=[[7], [9]],
    )
    reference = target.generate(prompt, **options)
    output = target.generate(prompt, assistant_model=drafter_model, **options)
    assert torch.equal(output, reference)
    generated = output[0, prompt.shape[1] :].tolist()
    assert 7 not in generated and 9 not in generated


@pytest.mark.parametrize("target_kind", TARGETS)
def test_target_cache_is_rolled_back_exactly(target_kind):
    """After generation the target's KV equals a fresh forward over the committed tokens (minus the last)."""
    from transformers import DynamicCache

    target = hf_specssm.enable(build(target_kind, seed=0))
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    reference = target.generate(prompt, max_new_tokens=30, do_sample=False)
    # rejections of every size, so the cache has drafts of every length to undo
    drafter = ScriptedDrafter(reference, [2, 0, 5, 1, 6, 3], 6, VOCAB)
    output = target.generate(
        prompt, assistant_model=drafter, max_new_tokens=30, do_sample=False, return_dict_in_generate=True
    )
    assert torch.equal(output.sequences, reference)
    fresh = DynamicCache(config=target.config)
    with torch.no_grad():
        target(output.sequences[:, :-1], past_key_values=fresh, use_cache=True)
    for mine, reference in zip(output.past_key_values.layers, fresh.layers, strict=True):
        assert mine.get_seq_length() == reference.get_seq_length() == output.sequences.shape[1] - 1
        # sliding-window layers keep only the window; compare what both hold
        kept = min(mine.keys.shape[2], reference.keys.shape[2])
        torch.testing.assert_close(
            mine.keys[:, :, -kept:], reference.keys[:, :, -kept:], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            mine.values[:, :, -kept:], reference.values[:, :, -kept:], atol=1e-5, rtol=1e-5
        )
