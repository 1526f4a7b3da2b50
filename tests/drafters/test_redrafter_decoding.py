"""Speculative decoding with ReDrafter heads: greedy parity (tree rounds on Transformer targets, best-beam
chains on SSM and hybrid targets), dynamic tree attention in the loop, and the sampling distribution."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch

import hf_specssm
from hf_specssm import DraftConfig
from hf_specssm.drafters.redrafter import ReDrafterConfig, ReDrafterDrafter, ReDrafterHead
from hf_specssm.training.redrafter.training import (
    TrainingConfig,
    distill,
    random_prompts,
    target_hidden_states,
    train_head,
)

from tests.helpers.models import HIDDEN, VOCAB, build
from tests.helpers.sampling import (
    ALPHA,
    NEW_TOKENS,
    TEMPERATURE,
    TOP_K,
    chi_square_p_value,
    exact_distribution,
)

BEAM_WIDTH, BEAM_LENGTH = 4, 4


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (thread hand-offs cost more than their matmuls)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def no_eos(model):
    model.generation_config.eos_token_id = None
    return model


@functools.cache
def target_and_head(kind: str, steps: int) -> tuple:
    """A tiny target and a head trained `steps` steps on its own continuations (so rounds accept some
    drafts and reject others), or an untrained head for `steps = 0`."""
    target = hf_specssm.enable(no_eos(build(kind, seed=0)))
    torch.manual_seed(0)
    head = ReDrafterHead(
        ReDrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, beam_width=BEAM_WIDTH, beam_length=BEAM_LENGTH)
    )
    if steps:
        data = distill(target, random_prompts(VOCAB, 128, 8, seed=1), 32, progress=False)
        train_head(head, target, data, TrainingConfig(steps=steps, learning_rate=3e-3, progress=False))
    return target, head.eval()


def prompts(count: int = 3, length: int = 7) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(42)
    return [torch.randint(0, VOCAB, (1, length), generator=generator) for _ in range(count)]


@pytest.mark.parametrize(
    ("kind", "verification", "rounds", "longest"),
    [
        pytest.param("llama", "replay", "tree", 2, id="llama-tree"),
        # SSM and hybrid targets verify the beam trees with the tree scan
        pytest.param("mamba2", "replay", "tree", 1, id="mamba2-tree", marks=pytest.mark.slow),
        pytest.param("jamba", "replay", "tree", 2, id="jamba-hybrid-tree", marks=pytest.mark.slow),
        pytest.param("bamba", "replay", "tree", 1, id="bamba-hybrid-tree", marks=pytest.mark.slow),
        # Joint Attainment and Advancement verifies chains: the best beam
        pytest.param("jamba", "joint", "chain", 2, id="jamba-hybrid-joint-chain", marks=pytest.mark.slow),
    ],
)
def test_greedy_output_is_the_targets(kind, verification, rounds, longest):
    # (random Mamba2 and Bamba targets continue chaotically: 150 steps teach their heads little)
    target, head = target_and_head(kind, 150)
    # chain rounds are gated: a fixed cost ratio keeps the gate's decisions off this machine's timings
    config = DraftConfig(num_draft_tokens=BEAM_LENGTH, schedule="constant", draft_cost_ratio=0.01)
    drafter = ReDrafterDrafter(head, target, config=config)
    accepted = []
    for prompt in prompts():
        reference = target.generate(prompt, max_new_tokens=30, do_sample=False)
        output = target.generate(
            prompt, assistant_model=drafter, max_new_tokens=30, do_sample=False, verification=verification
        )
        assert torch.equal(output, reference)
        stats = target.last_speculation_stats
        # round 1 has no hidden state yet: the target decodes alone
        assert stats.draft_lengths[0] == 0
        drafted = [length for length in stats.draft_lengths if length]
        if rounds == "tree":
            # unique tokens only: up to M·C nodes, fewer where beams share prefixes
            assert max(drafted) <= BEAM_WIDTH * BEAM_LENGTH
            assert min(drafted) < BEAM_WIDTH * BEAM_LENGTH
        else:
            assert set(drafted) <= set(range(1, BEAM_LENGTH + 1))
        accepted += stats.accepted_lengths
    assert 0 in accepted[1:], "no round rejected a draft"
    assert max(accepted) >= longest, "rounds accepted fewer drafts than this head proposes correctly"


@pytest.mark.parametrize("kind", ["llama", pytest.param("mamba2", marks=pytest.mark.slow)])
def test_one_beam_drafts_chains_and_copies_from_the_context(kind):
    """A one-beam head drafts chains of `C` on any target (no tree rounds), and `ContextCopyDrafter` around it
    copies prompt-lookup matches instead in some rounds, or (`chain_rounds="both"`) verifies its chain and
    the copy as one tree; greedy output stays the target's."""
    target, head = target_and_head(kind, 150)
    assert not ReDrafterDrafter(head, target, beam_width=1).shapes_own_trees
    # chain rounds are gated (a fixed cost ratio: the gate does not read this machine's timings); new drafters
    # each call, since this weak head's chains lose and a kept drafter's gate would stay closed from the
    # first call on
    fixed = DraftConfig(num_draft_tokens=BEAM_LENGTH, schedule="constant", draft_cost_ratio=0.01)
    # a prompt that repeats itself: the target's greedy continuation of random models falls into loops
    repeating = torch.tensor([[5, 9, 3, 7, 5, 9, 3, 7, 5, 9]]) % VOCAB
    copied_rounds, both_copied_rounds, two_branch_rounds = 0, 0, 0
    for prompt in [*prompts(2), repeating]:
        reference = target.generate(prompt, max_new_tokens=30, do_sample=False)
        chain = ReDrafterDrafter(head, target, beam_width=1, config=fixed)
        copying = hf_specssm.ContextCopyDrafter(ReDrafterDrafter(head, target, beam_width=1, config=fixed))
        both = hf_specssm.ContextCopyDrafter(
            ReDrafterDrafter(head, target, beam_width=1, config=fixed), chain_rounds="both"
        )
        for drafter in (chain, copying, both):
            output = target.generate(prompt, assistant_model=drafter, max_new_tokens=30, do_sample=False)
            assert torch.equal(output, reference)
            stats = target.last_speculation_stats
            if drafter is both:
                two_branch_rounds += sum(stats.tree_rounds)
                continue
            assert not any(stats.tree_rounds)
            if drafter is chain:
                # chains of C, shorter only where the room runs out
                assert set(stats.draft_lengths[1:]) <= set(range(0, BEAM_LENGTH + 1))
                assert BEAM_LENGTH in stats.draft_lengths
        copied_rounds += copying.copied_rounds
        both_copied_rounds += both.copied_rounds
    assert copied_rounds > 0
    assert both_copied_rounds > 0 and two_branch_rounds > 0


def test_tree_rounds_keep_beams_and_logits_processors_exact():
    target, head = target_and_head("llama", 150)
    drafter = ReDrafterDrafter(head, target)
    for prompt in prompts():
        kwargs = dict(max_new_tokens=25, do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=3)
        reference = target.generate(prompt, **kwargs)
        assert torch.equal(target.generate(prompt, assistant_model=drafter, **kwargs), reference)
    beams = drafter.last_beams
    # the last tree is the deduplicated beams: every beam's path spells its tokens
    for nodes in beams.beam_nodes:
        assert beams.tree.path(int(nodes[-1])) == nodes.tolist()


def test_the_head_reads_the_hidden_state_it_was_trained_on():
    """Decoding hands the head the target's hidden state at the position that chose `g_0`; training reads
    the same position from a full forward (`target_hidden_states`)."""
    for kind in ("llama", "mamba2"):
        target, head = target_and_head(kind, 0)

        class Recorder(ReDrafterDrafter):
            def observe_target_hidden(self, hidden):
                super().observe_target_hidden(hidden)
                self.seen.append(hidden)

            def commit(self, input_ids, num_accepted):
                self.seen_at.append(input_ids.shape[1])

            def commit_tree(self, input_ids, path):
                self.seen_at.append(input_ids.shape[1])

        drafter = Recorder(head, target)
        drafter.seen, drafter.seen_at = [], []
        output = target.generate(prompts(1)[0], assistant_model=drafter, max_new_tokens=16, do_sample=False)
        full = target_hidden_states(target, output)[0]
        assert drafter.seen
        for hidden, length in zip(drafter.seen, drafter.seen_at):
            torch.testing.assert_close(hidden[0], full[length - 2], atol=2e-5, rtol=1e-4)


def test_batches_are_refused():
    target, head = target_and_head("llama", 0)
    batch = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="one prompt per call"):
        target.generate(batch, assistant_model=ReDrafterDrafter(head, target), max_new_tokens=4)


@pytest.mark.slow
@pytest.mark.parametrize("drafter_kind", ["beams", "one-beam-and-copy"])
def test_sampling_keeps_the_targets_distribution(drafter_kind):
    """(With 3 new tokens and C = 2 most rounds here are chains: room for a tree runs out.) The best beam is
    drafted as a chain with a one-hot `q`: accepting it with probability
    `p(token)` keeps the target's distribution. With `ContextCopyDrafter(chain_rounds="both")` rounds with a
    one-token match verify the beam and the copy as two deterministic branches of one tree. Chi-square over
    every 3-token continuation (p < 1e-3)."""
    vocab = 5
    target = hf_specssm.enable(no_eos(build("llama", seed=0, vocab=vocab)))
    target.generation_config.pad_token_id = 0
    torch.manual_seed(5)
    head = ReDrafterHead(ReDrafterConfig(hidden_size=HIDDEN, vocab_size=vocab, beam_width=3, beam_length=2))
    drafter = ReDrafterDrafter(head, target)
    if drafter_kind == "one-beam-and-copy":
        lookup = hf_specssm.PromptLookupDrafter(max_ngram_size=1, min_ngram_size=1, num_draft_tokens=2)
        drafter = hf_specssm.ContextCopyDrafter(
            ReDrafterDrafter(head, target, beam_width=1), lookup, min_copy=1, chain_rounds="both"
        )
    prompt = torch.tensor([[1, 3, 4]])
    probs = exact_distribution(target, prompt)
    index = {outcome: i for i, outcome in enumerate(itertools.product(range(vocab), repeat=NEW_TOKENS))}
    counts = np.zeros(len(index))
    accepted = []
    two_branch_rounds = 0
    torch.manual_seed(1234)
    for _ in range(2500):
        output = target.generate(
            prompt,
            assistant_model=drafter,
            max_new_tokens=NEW_TOKENS,
            do_sample=True,
            temperature=TEMPERATURE,
            top_k=TOP_K,
            top_p=1.0,
        )
        counts[index[tuple(output[0, prompt.shape[1] :].tolist())]] += 1
        accepted += target.last_speculation_stats.accepted_lengths[1:]
        two_branch_rounds += sum(target.last_speculation_stats.tree_rounds)
    assert chi_square_p_value(counts, probs) > ALPHA
    # drafts were both accepted and rejected
    assert 0 in accepted and max(accepted) >= 1
    if drafter_kind == "one-beam-and-copy":
        assert drafter.copied_rounds > 0 and two_branch_rounds > 0
    # power: with as many samples, the same test rejects a distribution 5 points off the target's on one
    # continuation (the most frequent one)
    skewed = probs.copy()
    skewed[int(np.argmax(counts))] += 0.05
    skewed /= skewed.sum()
    wrong = np.random.default_rng(0).multinomial(int(counts.sum()), skewed)
    assert chi_square_p_value(wrong.astype(float), probs) < ALPHA


def test_a_head_passed_as_assistant_model_drafts_its_beams(tmp_path):
    """`assistant_model=` a head (as `AutoModelForCausalLM.from_pretrained` loads it after `import hf_specssm`)
    becomes a `ReDrafterDrafter`:
    beam-tree rounds with the head's own draft length, greedy output unchanged."""
    from transformers import AutoModelForCausalLM

    target, head = target_and_head("llama", 150)
    head.save_pretrained(tmp_path / "head")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "head")
    assert isinstance(loaded, ReDrafterHead)
    prompt = prompts(1)[0]
    reference = target.generate(prompt, max_new_tokens=20, do_sample=False)
    assert torch.equal(
        target.generate(prompt, assistant_model=loaded, max_new_tokens=20, do_sample=False), reference
    )
    drafted = [length for length in target.last_speculation_stats.draft_lengths if length]
    assert drafted and max(drafted) <= BEAM_WIDTH * BEAM_LENGTH
    assert max(target.last_speculation_stats.accepted_lengths) >= 2


def test_chains_that_lose_are_switched_off():
    """A one-beam head whose chains lose (this weak head on Llama, at a fixed cost ratio so that the decision
    does not read this machine's timings) stops drafting after a few rounds and probes now and then; the
    output stays the target's. Before, its constant schedule had no draft gate and drafted every round."""
    target, head = target_and_head("llama", 150)
    config = DraftConfig(num_draft_tokens=BEAM_LENGTH, schedule="constant", draft_cost_ratio=0.01)
    drafter = ReDrafterDrafter(head, target, beam_width=1, config=config)
    assert drafter.draft_gate is not None
    prompt = prompts(3)[1]  # (on the first, one draft in two passes: that pays at this ratio, and it drafts)
    output = target.generate(prompt, assistant_model=drafter, max_new_tokens=60, do_sample=False)
    assert torch.equal(output, target.generate(prompt, max_new_tokens=60, do_sample=False))
    lengths = target.last_speculation_stats.draft_lengths
    assert BEAM_LENGTH in lengths[:5], "it drafted chains of C before the gate judged them"
    assert not drafter.draft_gate.open
    assert sum(1 for length in lengths[15:] if length) <= 3, "probes only, once closed"
