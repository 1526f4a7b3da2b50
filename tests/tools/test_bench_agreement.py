"""The bench's teacher-forced agreement: its chain simulation accepts what real chains accepted, the
generic and the Mamba-drafter paths agree, and the table names every drafter and set."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hf_specssm
from hf_specssm.drafters.feature import FeatureDrafter
from hf_specssm.tools.bench.agreement import (
    agreement_table,
    answer_examples,
    drafter_agreements,
    token_drafter_estimate,
)
from hf_specssm.training.mamba_drafter.finetune import chain_predictions, evaluate_drafter
from hf_specssm.training.mamba_drafter.training import drafter_config, new_drafter

from tests.drafters.test_feature_drafter import DRAFT_IDS, TARGET_VOCAB, feature_drafter
from tests.helpers.models import build
from tests.helpers.sampling import no_eos

PROMPT = torch.tensor([[2, 4, 6, 8, 10, 12]])


def _target():
    return hf_specssm.enable(no_eos(build("llama", seed=0, vocab=TARGET_VOCAB)))


class _Recording(FeatureDrafter):
    """Keeps every chain it drafts, with the length of the sequence it drafted after."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chains: list[tuple[int, list[int]]] = []

    def draft(self, input_ids, num_tokens, sampler):
        proposal = super().draft(input_ids, num_tokens, sampler)
        self.chains.append((input_ids.shape[1], proposal.tokens[0].tolist()))
        return proposal


@pytest.mark.parametrize("mlp", [pytest.param(None, id="linear"), pytest.param(32, id="head-mlp")])
def test_simulated_chains_draft_what_real_chains_drafted(mlp):
    """Every draft of every round of a real greedy call (constant chains of 4) is what the simulation
    predicts at that depth when fed the same tokens: it reads the hidden state of the round's start at
    the same depths. (Each round's chain is scored as if it were the answer, so deep drafts are compared
    too, not only the first one after a right guess.)"""
    target, k = _target(), 4
    model = feature_drafter(seed=1, mlp=mlp)
    drafter = _Recording(model, num_draft_tokens=k, schedule="constant")
    output = target.generate(PROMPT, assistant_model=drafter, max_new_tokens=40, do_sample=False)
    ids, prompt = output[0].tolist(), PROMPT.shape[1]
    [example] = answer_examples(target, [("set", PROMPT, ids[prompt:])], with_hidden=True)
    compared = 0
    for length, chain in drafter.chains:
        column = length - 1 - prompt  # the round's last committed token is answer token `column`
        if column < 0:
            continue  # the first round drafts before the target chose a token: no hidden state yet
        # the committed tokens, then this round's drafts as if the target had said them; the hidden
        # states past the round's start are never read at the compared entries
        hidden = torch.cat(
            [example.hidden[: length - prompt], torch.zeros(len(chain), example.hidden.shape[1])]
        )
        guess = dataclasses.replace(example, ids=torch.tensor(ids[:length] + chain), hidden=hidden)
        predicted = model.draft_to_target[chain_predictions(model, guess, k, use_features=True)]
        assert chain == [int(predicted[depth, column + depth]) for depth in range(len(chain))], length
        compared += len(chain)
    assert compared >= 8 * k
    # the drafts differ from one depth to the next (the depth embedding is live), so depths are told apart
    assert any(len(set(chain)) > 1 for _, chain in drafter.chains)


def test_generic_and_mamba_paths_agree_and_out_of_vocabulary_tokens_never_count():
    """A token-only Mamba drafter scored through its full-vocabulary logits (any causal LM's path) and
    through its draft head (`evaluate_drafter`) gets the same numbers; tokens outside its vocabulary
    (odd ids here) are never right."""
    model = new_drafter(drafter_config("tiny", DRAFT_IDS.numel() + 1, TARGET_VOCAB), DRAFT_IDS, seed=2).eval()
    own = model.generate(PROMPT, max_new_tokens=24, do_sample=False)[0, PROMPT.shape[1] :].tolist()
    # its own greedy answer for 12 tokens, then 12 tokens outside its vocabulary (odd ids)
    answer = own[:12] + [token + 1 for token in own[12:]]
    [example] = answer_examples(_target(), [("set", PROMPT, answer)], with_hidden=False)
    generic = token_drafter_estimate(model, [example], k=4)
    assert generic == evaluate_drafter(model, [example], k=4)
    # right at the 11 positions predicting answer tokens 1 … 11, never after: of 23 round starts, the
    # first 8 accept 4 drafts, then 3, 2, 1, then none
    assert generic.top1 == pytest.approx(11 / 23) and generic.tau == pytest.approx(
        1 + (8 * 4 + 3 + 2 + 1) / 23
    )


def test_agreements_per_drafter_and_set():
    target = _target()
    answers = []
    for prompt_set, prompt in (("a", PROMPT), ("b", PROMPT[:, :4] + 10)):
        output = target.generate(prompt, max_new_tokens=12, do_sample=False)
        answers.append((prompt_set, prompt, output[0, prompt.shape[1] :].tolist()))
    agreements = drafter_agreements(target, {"self": target, "mamba": feature_drafter(seed=1)}, answers, k=4)
    assert [(a.drafter, a.set, a.prompts) for a in agreements] == [
        ("self", "a", 1), ("self", "b", 1), ("mamba", "a", 1), ("mamba", "b", 1),
    ]  # fmt: skip
    # the target drafting for itself is always right: τ = 1 + the drafts that fit at each of 11 starts
    mine = agreements[0].estimate
    assert mine.top1 == 1.0 and mine.tau == pytest.approx(1 + (8 * 4 + 3 + 2 + 1) / 11)
    assert mine.acceptance_by_position == [1.0] * 4
    table = agreement_table(agreements)
    assert "| a | self | 1 | 1.000 | 4.45 | 1.00 | 1.00 | 1.00 | 1.00 |" in table
    assert "| b | mamba | 1 |" in table


def test_agreements_of_bf16_models():
    """In bf16 (the bench's dtype) a Mamba2 drafter's final norm returns fp32; the simulation casts it to the
    head's dtype as the model's forward does, and the target drafting for itself stays right."""
    target = _target().to(torch.bfloat16)
    output = target.generate(PROMPT, max_new_tokens=12, do_sample=False)
    answers = [("a", PROMPT, output[0, PROMPT.shape[1] :].tolist())]
    drafters = {"self": target, "mamba": feature_drafter(seed=1, mlp=32).to(torch.bfloat16)}
    agreements = drafter_agreements(target, drafters, answers, k=4)
    assert [a.drafter for a in agreements] == ["self", "mamba"]
    assert agreements[0].estimate.top1 > 0.8 and agreements[1].estimate.rounds == 11
