"""Seeded speculative sampling returns the same text on every run, whatever the draft lengths.

`torch.manual_seed(s)` before `generate` fixes the call's seed; every draw is keyed by `(seed, row,
position)` (`PositionNoise`) and the default coupled rule commits, at each position, the target's keyed
Gumbel-max sample. So the text is the same for constant, heuristic and timing-driven adaptive lengths,
for chains and trees, and equals a plain (non-speculative) loop that samples each token with the same keyed
noise. The rules' statistics (exact distribution with keyed draws) are tested at the end.
"""

from __future__ import annotations

import functools
import itertools
import random
import types

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

import hf_specssm
from hf_specssm import generation
from hf_specssm.decoding import acceptance
from hf_specssm.decoding import round as round_module
from hf_specssm.decoding.acceptance import accept_coupled, accept_sampling, accept_tree_sampling
from hf_specssm.drafters.base import Draft, DraftSampler, PositionNoise
from hf_specssm.targets import make_target
from hf_specssm.tree import TokenTree

from tests.helpers.models import align, build
from tests.helpers.sampling import ALPHA, chi_square_p_value, no_eos

TREE_SAMPLES = 3000
PROMPT = torch.tensor([[5, 9, 3, 7, 4, 5, 9, 3, 11]])
NEW_TOKENS = 30
SEQUENCE = torch.zeros(1, 10, dtype=torch.long)  # a prefix of 10 tokens: children sit at position 10
SAMPLING = {"do_sample": True, "temperature": 0.9, "top_k": 20, "top_p": 1.0}


@pytest.fixture(scope="module")
def llama_pair():
    target = no_eos(build("llama", seed=0))
    drafter_model = build("mamba", seed=1)
    align(target, drafter_model)
    return hf_specssm.enable(target), drafter_model


def _noisy_clock(seed: int) -> types.SimpleNamespace:
    """A `time` stand-in whose `perf_counter` advances by random steps (1 ms … 50 ms): timing noise that
    the adaptive schedule and the tree bandit react to, drawn from its own RNG (torch's is untouched)."""
    rng = random.Random(seed)
    now = [0.0]

    def perf_counter() -> float:
        now[0] += rng.uniform(0.001, 0.05)
        return now[0]

    return types.SimpleNamespace(perf_counter=perf_counter)


def _sample(target, drafter, seed: int = 7, prompt: torch.Tensor = PROMPT, **kwargs) -> tuple[list, list]:
    torch.manual_seed(seed)
    output = target.generate(prompt, assistant_model=drafter, max_new_tokens=NEW_TOKENS, **SAMPLING, **kwargs)
    return output.tolist(), list(target.last_speculation_stats.draft_lengths)


@torch.no_grad()
def _keyed_plain_sampling(target, prompt: torch.Tensor, seed: int) -> list:
    """No drafter: each token is `argmax(processed scores + keyed Gumbel noise)`, one forward per token,
    up to EOS."""
    torch.manual_seed(seed)
    noise = PositionNoise.from_global_generator()
    processors = LogitsProcessorList([TemperatureLogitsWarper(0.9), TopKLogitsWarper(20)])
    eos = target.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos]) - {None}
    sequence = prompt
    for _ in range(NEW_TOKENS):
        scores = processors(sequence, target(sequence).logits[:, -1].float())
        token = noise.perturb(scores[0], sequence.shape[1]).argmax()
        sequence = torch.cat([sequence, token.view(1, 1)], dim=1)
        if int(token) in stop:
            break
    return sequence.tolist()


# ---------------------------------------------------------------- the same text whatever was drafted


DRAFTERS = {
    "constant-2": {"num_draft_tokens": 2, "schedule": "constant"},
    "constant-5": {"num_draft_tokens": 5, "schedule": "constant"},
    "heuristic": {"schedule": "heuristic"},
    "adaptive": {},
    "tree-top": {"tree_shape": (2, 2)},
    "tree-sampled": {"tree_shape": (3, 2), "tree_children": "sample"},
}


def test_same_seed_same_text_for_every_draft_length_and_tree(llama_pair, monkeypatch):
    target, drafter_model = llama_pair
    outputs, lengths = {}, {}
    for name, options in DRAFTERS.items():
        monkeypatch.setattr(round_module, "time", _noisy_clock(len(name)))
        outputs[name], lengths[name] = _sample(target, hf_specssm.ModelDrafter(drafter_model, **options))
    copy = hf_specssm.ContextCopyDrafter(
        hf_specssm.ModelDrafter(drafter_model, tree_policy=hf_specssm.UCBTreePolicy())
    )
    outputs["copy-ucb"], lengths["copy-ucb"] = _sample(target, copy)
    # the runs grouped positions into rounds differently, or this test proves nothing
    assert len({tuple(value) for value in lengths.values()}) >= 5
    reference = _keyed_plain_sampling(target, PROMPT, seed=7)
    for name, output in outputs.items():
        assert output == reference, name


def test_timing_noise_does_not_change_the_text(llama_pair, monkeypatch):
    """The adaptive schedule drafts different lengths under different clocks; the text stays."""
    target, drafter_model = llama_pair
    runs = []
    for clock in range(3):
        monkeypatch.setattr(round_module, "time", _noisy_clock(100 + clock))
        runs.append(_sample(target, hf_specssm.ModelDrafter(drafter_model)))
    assert len({tuple(lengths) for _, lengths in runs}) > 1, "the clocks must change the draft lengths"
    assert all(output == runs[0][0] for output, _ in runs)


def test_seeds_change_the_text(llama_pair):
    target, drafter_model = llama_pair
    drafter = hf_specssm.ModelDrafter(drafter_model, num_draft_tokens=3, schedule="constant")
    assert _sample(target, drafter, seed=1)[0] != _sample(target, drafter, seed=2)[0]


def test_ssm_target_text_is_independent_of_draft_lengths():
    target = hf_specssm.enable(no_eos(build("mamba2", seed=0)))
    drafter_model = build("mamba", seed=1)
    align(target, drafter_model)
    drafters = [
        hf_specssm.ModelDrafter(drafter_model, num_draft_tokens=1, schedule="constant"),
        hf_specssm.ModelDrafter(drafter_model, num_draft_tokens=4, schedule="constant"),
        hf_specssm.ModelDrafter(drafter_model, tree_shape=(2, 1)),
    ]
    reference = _keyed_plain_sampling(target, PROMPT, seed=7)
    for drafter in drafters:
        assert _sample(target, drafter)[0] == reference


def test_batch_rows_are_reproducible_across_draft_lengths(llama_pair):
    """Each row has its own keyed stream: the batch's text does not depend on the draft length either."""
    target, drafter_model = llama_pair
    prompts = torch.tensor([[0, 0, 5, 9, 3, 7], [8, 2, 5, 9, 3, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    texts = set()
    for k in (2, 5):
        torch.manual_seed(3)
        output = target.generate(
            prompts,
            attention_mask=mask,
            assistant_model=hf_specssm.ModelDrafter(drafter_model, num_draft_tokens=k, schedule="constant"),
            max_new_tokens=12,
            pad_token_id=0,
            **SAMPLING,
        )
        texts.add(tuple(map(tuple, output.tolist())))
    assert len(texts) == 1


def test_rejection_rule_repeats_its_text_while_the_draft_lengths_repeat(llama_pair, monkeypatch):
    """`sampling="rejection"` (classic speculative sampling, keyed draws): a seed fixes the text for a
    fixed schedule, even when the clock that the schedule ignores changes."""
    target, drafter_model = llama_pair
    monkeypatch.setattr(
        generation, "SpeculativeLoop", functools.partial(round_module.SpeculativeLoop, sampling="rejection")
    )
    runs = []
    for clock in range(2):
        monkeypatch.setattr(round_module, "time", _noisy_clock(200 + clock))
        runs.append(
            _sample(target, hf_specssm.ModelDrafter(drafter_model, num_draft_tokens=3, schedule="constant"))
        )
    assert runs[0] == runs[1]
    assert (
        runs[0][0]
        != _sample(
            target, hf_specssm.ModelDrafter(drafter_model, num_draft_tokens=3, schedule="constant"), seed=8
        )[0]
    )


# ---------------------------------------------------------------- keyed draws


def test_keyed_draws_depend_only_on_seed_row_and_position():
    noise = PositionNoise(seed=42)
    assert torch.equal(noise.gumbel(7, 50, "cpu"), PositionNoise(seed=42).gumbel(7, 50, "cpu"))
    assert not torch.equal(noise.gumbel(7, 50, "cpu"), noise.gumbel(8, 50, "cpu"))
    assert not torch.equal(noise.gumbel(7, 50, "cpu"), noise.for_row(1).gumbel(7, 50, "cpu"))
    assert noise.uniform(3) == PositionNoise(seed=42).uniform(3) != noise.uniform(4)
    with pytest.raises(TypeError, match="seed must be an int"):
        PositionNoise(seed=1.5)


def test_a_sampler_draws_its_seed_from_torch():
    """`torch.manual_seed` fixes the stream, as it fixes plain sampling."""
    torch.manual_seed(5)
    first = DraftSampler(None, do_sample=True).noise.seed
    torch.manual_seed(5)
    assert DraftSampler(None, do_sample=True).noise.seed == first
    assert DraftSampler(None, do_sample=False).noise is None


def test_the_loop_refuses_an_unknown_sampling_rule(llama_pair):
    target, _ = llama_pair
    with pytest.raises(ValueError, match="sampling must be one of"):
        round_module.SpeculativeLoop(
            make_target(target, None), None, None, target.generation_config, sampling="x"
        )


def test_rejection_rule_draws_at_a_position_do_not_depend_on_the_draft_length():
    """With keyed draws the classic rule's test and residual draw at position p are those of p."""
    generator = torch.Generator().manual_seed(0)
    vocab, k = 6, 5
    target_probs = torch.softmax(torch.randn(k + 1, vocab, generator=generator) * 2, dim=-1)
    drafts = torch.multinomial(torch.full((vocab,), 1.0 / vocab), k, replacement=True, generator=generator)
    contradictions = 0
    for seed in range(200):
        noise = PositionNoise(seed)
        short = accept_sampling(drafts[:2], None, target_probs[:3], noise=noise, position=10)
        long = accept_sampling(drafts, None, target_probs, noise=noise, position=10)
        if short[0] < 2:  # rejected inside the shorter draft: the longer one rejects there too
            assert long == short
        else:
            contradictions += long[0] < 2
    assert contradictions == 0


# ---------------------------------------------------------------- statistics of the keyed rules


def _tables(seed: int, vocab: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target = torch.softmax(torch.randn(3, vocab, generator=generator, dtype=torch.float64) * 1.5, dim=-1)
    draft = torch.softmax(torch.randn(2, vocab, generator=generator, dtype=torch.float64) * 1.5, dim=-1)
    return target, draft


@pytest.mark.slow
def test_coupled_rule_outputs_the_target_distribution():
    """Chains drafted with the same keyed noise (as `DraftSampler` does): the first output token follows
    `p`, both acceptance and rejection occur, and the same test rejects the drafter's distribution."""
    target, draft = _tables(0)
    vocab = target.shape[1]
    counts, accepted = np.zeros(vocab), np.zeros(3)
    for seed in range(8000):
        noise = PositionNoise(seed)
        tokens = [int(noise.perturb(draft[i].log(), 10 + i).argmax()) for i in range(2)]
        path, token = accept_coupled(Draft(tokens=torch.tensor([tokens])), target.log(), noise, position=10)
        counts[tokens[0] if path else token] += 1
        accepted[len(path)] += 1
    assert chi_square_p_value(counts, target[0].numpy()) > ALPHA
    assert (accepted > 0).all()
    assert chi_square_p_value(counts, draft[0].numpy()) < ALPHA


@pytest.mark.slow
@pytest.mark.parametrize(
    "sampled", [pytest.param(True, id="sampled-drafts"), pytest.param(False, id="one-hot")]
)
def test_keyed_rejection_rule_outputs_the_target_distribution(sampled):
    target, draft = _tables(1)
    vocab = target.shape[1]
    counts = np.zeros(vocab)
    for seed in range(8000):
        noise = PositionNoise(seed)
        tokens = torch.stack([noise.perturb(draft[i].log(), 10 + i).argmax() for i in range(2)])
        num_accepted, token = accept_sampling(
            tokens, draft if sampled else None, target, noise=noise, position=10
        )
        counts[int(tokens[0]) if num_accepted else token] += 1
    assert chi_square_p_value(counts, target[0].numpy()) > ALPHA


@pytest.mark.slow
def test_keyed_tree_rules_output_the_target_distribution(monkeypatch):
    """Sampled children (Gumbel-top-k with the position's noise, `DraftSampler.choose_children`) under both
    rules; the power check sabotages the residual, which the same test rejects."""
    target, draft = _tables(2)
    vocab = target.shape[1]
    sampler = DraftSampler(None, do_sample=True)

    def counts_of(rule: str) -> np.ndarray:
        counts = np.zeros(vocab)
        for seed in range(TREE_SAMPLES):
            sampler.noise = PositionNoise(seed)
            children, probs = sampler.choose_children(SEQUENCE, draft[:1].log(), 3, sample=True)
            tree = TokenTree(
                tokens=children, parents=torch.full((3,), -1), draft_probs=probs.expand(3, -1),
                sampled_without_replacement=True,
            )  # fmt: skip
            scores = target[[0, 1, 1, 1]].log()
            if rule == "coupled":
                path, token = accept_coupled(tree, scores, sampler.noise, position=10)
            else:
                path, token = accept_tree_sampling(tree, scores.exp(), noise=sampler.noise, position=10)
            counts[int(children[path[0]]) if path else token] += 1
        return counts

    for rule in ("coupled", "rejection"):
        assert chi_square_p_value(counts_of(rule), target[0].numpy()) > ALPHA, rule
    monkeypatch.setattr(acceptance, "_residual", lambda p, q: p)
    assert chi_square_p_value(counts_of("rejection"), target[0].numpy()) < ALPHA


def test_gumbel_top_k_children_are_drawn_without_replacement():
    """`choose_children(sample=True)`: the ordered pair of the first two children has the exact
    without-replacement probability `q(a) q(b) / (1 - q(a))`."""
    _, draft = _tables(3, vocab=4)
    q = draft[0]
    sampler = DraftSampler(None, do_sample=True)
    counts = np.zeros(16)
    for seed in range(6000):
        sampler.noise = PositionNoise(seed)
        children, _ = sampler.choose_children(SEQUENCE, q[None].log(), 2, sample=True)
        counts[int(children[0]) * 4 + int(children[1])] += 1
    exact = np.array(
        [float(q[a] * q[b] / (1 - q[a])) if a != b else 0.0 for a, b in itertools.product(range(4), repeat=2)]
    )
    assert chi_square_p_value(counts, exact) > ALPHA
