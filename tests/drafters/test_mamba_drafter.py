"""The reduced-vocabulary Mamba2 drafter: vocabulary mapping, Hub format, lossless decoding, training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_specssm
from hf_specssm.drafters.mamba import MambaDrafterConfig, MambaDrafterForCausalLM
from hf_specssm.training.mamba_drafter.data import (
    Mixture,
    is_heldout,
    sample_blocks,
    select_vocabulary,
    token_counts,
)
from hf_specssm.training.mamba_drafter.training import (
    DrafterTrainingConfig,
    drafter_config,
    estimate_acceptance,
    new_drafter,
    simulated_tau,
    train_drafter,
)

from tests.helpers.models import build
from tests.helpers.sampling import ALPHA, chi_square_p_value, exact_distribution, sample_continuations

TARGET_VOCAB = 48
DRAFT_IDS = torch.arange(2, TARGET_VOCAB, 2)  # the even tokens from 2 (23 of them)


def tiny_drafter(seed: int = 0, draft_ids: torch.Tensor = DRAFT_IDS, target_vocab: int = TARGET_VOCAB):
    config = drafter_config("tiny", draft_ids.numel() + 1, target_vocab)
    return new_drafter(config, draft_ids, seed=seed).eval()


def test_logits_cover_the_target_vocabulary_with_zero_probability_outside():
    drafter = tiny_drafter()
    ids = torch.tensor([[3, 4, 10, 47, 2]])  # 3 and 47 are outside the draft vocabulary
    logits = drafter(ids).logits
    assert logits.shape == (1, 5, TARGET_VOCAB)
    probs = torch.softmax(logits, dim=-1)
    outside = torch.ones(TARGET_VOCAB, dtype=torch.bool)
    outside[DRAFT_IDS] = False
    assert torch.equal(probs[..., outside], torch.zeros_like(probs[..., outside]))
    assert torch.allclose(probs.sum(-1), torch.ones(1, 5))
    # inside, the logits are the draft-space logits at the mapped positions
    draft = drafter.draft_logits(drafter.to_draft_ids(ids))
    assert torch.equal(logits[..., DRAFT_IDS], draft[..., 1:])


def test_unknown_tokens_read_as_the_other_slot():
    drafter = tiny_drafter()
    assert drafter.to_draft_ids(torch.tensor([3, 47, 0])).tolist() == [0, 0, 0]
    assert drafter.to_draft_ids(torch.tensor([2, 4, 46])).tolist() == [1, 2, 23]
    assert drafter.draft_to_target.tolist() == [-1, *DRAFT_IDS.tolist()]


@pytest.mark.parametrize(
    "ids, message",
    [
        pytest.param(torch.arange(2, 20), "expected 23 target ids", id="wrong-count"),
        pytest.param(torch.tensor([2] * 23), "repeats", id="duplicate"),
        pytest.param(torch.arange(30, 53), r"lie in \[0, 48\)", id="out-of-range"),
    ],
)
def test_bad_vocabularies_are_refused(ids, message):
    drafter = tiny_drafter()
    before = drafter.draft_to_target.clone()
    with pytest.raises(ValueError, match=message):
        drafter.set_draft_vocabulary(ids)
    assert torch.equal(drafter.draft_to_target, before)


def test_config_refuses_a_draft_vocabulary_larger_than_the_target():
    with pytest.raises(ValueError, match="must cover the draft vocabulary"):
        MambaDrafterConfig(target_vocab_size=10, vocab_size=20)


def test_hub_format_round_trip(tmp_path):
    drafter = tiny_drafter(seed=3)
    drafter.save_pretrained(tmp_path, safe_serialization=True)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "hf_specssm_mamba_drafter"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MambaDrafterConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, MambaDrafterForCausalLM)
    ids = torch.tensor([[2, 5, 8, 8, 40]])
    assert torch.equal(loaded.draft_to_target, drafter.draft_to_target)
    assert torch.equal(loaded(ids).logits, drafter(ids).logits)
    # bf16 export (what ships) keeps the vocabulary exactly
    drafter.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert half.dtype == torch.bfloat16
    assert torch.equal(half.draft_to_target, drafter.draft_to_target)


def test_embeddings_start_from_the_target_principal_components():
    target_embeddings = torch.randn(TARGET_VOCAB, 40)
    config = drafter_config("tiny", DRAFT_IDS.numel() + 1, TARGET_VOCAB)
    drafter = new_drafter(config, DRAFT_IDS, target_embeddings=target_embeddings)
    # 23 rows: 23 principal components fill the first 23 of 64 dimensions
    rows = drafter.get_input_embeddings().weight[1:, : DRAFT_IDS.numel()].detach()
    # a linear image of the centred target rows
    centred = target_embeddings[DRAFT_IDS] - target_embeddings[DRAFT_IDS].mean(0)
    solution = torch.linalg.lstsq(centred, rows).solution
    assert torch.allclose(centred @ solution, rows, atol=1e-5)
    assert rows.std().item() == pytest.approx(config.initializer_range, rel=1e-3)


def _no_eos(model):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize(
    "target_kind, options",
    [
        pytest.param("llama", {}, id="llama-chain"),
        pytest.param("llama", {"tree_shape": (3, 2, 1)}, id="llama-tree"),
        pytest.param("llama", {"tree_policy": hf_specssm.UCBTreePolicy()}, id="llama-bandit"),
        pytest.param("mamba2", {}, id="mamba2-chain"),
        pytest.param("bamba", {"tree_shape": (2, 2)}, id="bamba-tree"),
    ],
)
def test_greedy_output_equals_the_target_alone(target_kind, options):
    target = _no_eos(build(target_kind, seed=0, vocab=TARGET_VOCAB))
    hf_specssm.enable(target)
    # a drafter trained a few steps on the target's own outputs, so that some drafts are accepted
    drafter_model = tiny_drafter(seed=1)
    prompt = torch.tensor([[2, 4, 6, 8, 10, 12]])
    plain = target.generate(prompt, max_new_tokens=24, do_sample=False)
    drafter = hf_specssm.ModelDrafter(drafter_model, num_draft_tokens=3, schedule="constant", **options)
    spec = target.generate(prompt, assistant_model=drafter, max_new_tokens=24, do_sample=False)
    assert torch.equal(plain, spec)
    assert target.last_speculation_stats.rounds > 0


@pytest.mark.slow
def test_a_drafter_distilled_from_the_target_gets_drafts_accepted(tmp_path):
    """The whole pipeline in miniature: the target's greedy outputs → vocabulary from their counts →
    training → drafts that the target accepts, with output identical to the target alone."""
    target = _no_eos(build("llama", seed=0, vocab=TARGET_VOCAB))
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, TARGET_VOCAB, (16, 4), generator=generator)
    outputs = target.generate(
        prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=28, do_sample=False
    )
    stream = np.concatenate([row.numpy() for row in outputs]).astype(np.uint32)
    _write_streams(tmp_path, stream)
    vocabulary = select_vocabulary(token_counts([stream], TARGET_VOCAB), 20)
    config = drafter_config("tiny", 21, TARGET_VOCAB)
    drafter_model = new_drafter(config, vocabulary, seed=0)
    train_drafter(
        drafter_model,
        tmp_path,
        tmp_path / "run",
        DrafterTrainingConfig(
            steps=120,
            batch_size=8,
            block_length=32,
            learning_rate=1e-2,
            warmup_steps=5,
            bf16=False,
            checkpoint_every=120,
            progress=False,
        ),
    )
    hf_specssm.enable(target)
    drafter = hf_specssm.ModelDrafter(drafter_model, num_draft_tokens=4, schedule="constant")
    accepted = 0
    for prompt in prompts[:4]:
        plain = target.generate(prompt[None], max_new_tokens=28, do_sample=False)
        spec = target.generate(prompt[None], assistant_model=drafter, max_new_tokens=28, do_sample=False)
        assert torch.equal(plain, spec)
        accepted += target.last_speculation_stats.accepted_tokens
    # an untrained drafter over the same vocabulary is accepted far less often
    untrained = hf_specssm.ModelDrafter(
        new_drafter(config, vocabulary, seed=0).eval(), num_draft_tokens=4, schedule="constant"
    )
    baseline = 0
    for prompt in prompts[:4]:
        target.generate(prompt[None], assistant_model=untrained, max_new_tokens=28, do_sample=False)
        baseline += target.last_speculation_stats.accepted_tokens
    assert accepted > 2 * baseline + 10


@pytest.mark.slow
def test_sampling_keeps_the_target_distribution_when_the_drafter_cannot_propose_every_token():
    """The target puts mass on tokens outside the draft vocabulary; only rejection can produce them."""
    vocab = 5
    target = _no_eos(build("llama", seed=0, vocab=vocab))
    # draft vocabulary {1, 3}: tokens 0, 2 and 4 are never drafted
    drafter_model = _no_eos(tiny_drafter(seed=2, draft_ids=torch.tensor([1, 3]), target_vocab=vocab))
    hf_specssm.enable(target)
    prompt = torch.tensor([[1, 3, 4]])
    probs = exact_distribution(target, prompt)
    outcomes = list(np.ndindex(*(vocab,) * 3))
    outside = sum(p for p, o in zip(probs, outcomes) if any(t in (0, 2, 4) for t in o))
    assert outside > 0.3, "the test needs target mass outside the draft vocabulary"
    counts, accepted = sample_continuations(target, drafter_model, prompt, samples=2500, seed=7, vocab=vocab)
    assert chi_square_p_value(counts, probs) > ALPHA
    assert 0 in accepted and max(accepted) >= 1
    # power: the drafter's own distribution is rejected by the same test
    drafter_probs = exact_distribution(drafter_model, prompt)
    wrong = np.random.default_rng(0).multinomial(int(counts.sum()), drafter_probs / drafter_probs.sum())
    assert chi_square_p_value(wrong.astype(float), probs) < ALPHA


def test_select_vocabulary_puts_special_tokens_first_then_frequency():
    counts = np.array([5, 0, 9, 9, 1, 7], dtype=float)
    chosen = select_vocabulary(counts, 4, always=[1])
    assert chosen.tolist() == [1, 2, 3, 5]  # ties broken by id
    with pytest.raises(ValueError, match="size must lie"):
        select_vocabulary(counts, 7)


def test_token_counts_weigh_each_stream():
    a, b = np.array([0, 0, 1], dtype=np.uint32), np.array([2], dtype=np.uint32)
    assert token_counts([a, b], 3, [1.0, 10.0]).tolist() == [2.0, 1.0, 10.0]
    with pytest.raises(ValueError, match="2 streams but 1 weights"):
        token_counts([a, b], 3, [1.0])


def test_batches_are_a_pure_function_of_seed_and_step():
    streams = {"chat": np.arange(1000, dtype=np.uint32), "code": np.arange(5000, 6000, dtype=np.uint32)}
    mixture = Mixture(chat=0.5, code=0.5, docs=0)
    first = sample_blocks(streams, mixture, 4, 16, step=3, seed=0)
    assert first.shape == (4, 17)
    assert torch.equal(first, sample_blocks(streams, mixture, 4, 16, step=3, seed=0))
    assert not torch.equal(first, sample_blocks(streams, mixture, 4, 16, step=4, seed=0))
    # rows are contiguous slices of one stream
    assert ((first[:, 1:] - first[:, :-1]) == 1).all()
    with pytest.raises(ValueError, match="mixture weights"):
        Mixture(chat=0, code=0, docs=0).weights()


def test_heldout_split_is_stable():
    ids = [f"code-{i}" for i in range(400)]
    held = [i for i in ids if is_heldout(i)]
    assert held == [i for i in ids if is_heldout(i)]
    assert 2 <= len(held) <= 25


@pytest.mark.parametrize(
    "hits, k, expected",
    [
        pytest.param([[1, 1, 0, 1, 1, 1, 1, 1, 1, 0]], 3, 10 / 3, id="mixed"),
        pytest.param([[0, 0, 0]], 4, 1.0, id="never"),
        pytest.param([[1] * 10], 4, 10 / 2, id="always-capped"),
        pytest.param([[1, 1]], 5, 2.0, id="answer-ends"),
    ],
)
def test_simulated_tau(hits, k, expected):
    assert simulated_tau([np.array(h, dtype=bool) for h in hits], k) == pytest.approx(expected)


def _write_streams(folder, tokens: np.ndarray) -> None:
    for name in ("chat", "code", "docs"):
        tokens.astype(np.uint32).tofile(folder / f"{name}.bin")


def test_training_lowers_the_loss_and_resumes_exactly(tmp_path):
    # a repetitive stream (period 6 over draft tokens): learnable in a few dozen steps
    pattern = np.array([2, 4, 6, 8, 10, 12], dtype=np.uint32)
    _write_streams(tmp_path, np.tile(pattern, 400))
    config = DrafterTrainingConfig(
        steps=40,
        batch_size=4,
        block_length=24,
        learning_rate=1e-2,
        warmup_steps=2,
        checkpoint_every=20,
        bf16=False,
        progress=False,
    )
    whole = tiny_drafter(seed=0)
    losses = train_drafter(whole, tmp_path, tmp_path / "whole", config)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])

    # interrupted after 20 steps (a checkpoint), then resumed by the same call
    split = tiny_drafter(seed=0)

    def interrupt(step, loss):
        if step == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_drafter(split, tmp_path, tmp_path / "split", config, on_step=interrupt)
    resumed = MambaDrafterForCausalLM.from_pretrained(tmp_path / "split" / "checkpoint-20")
    resumed_losses = train_drafter(resumed, tmp_path, tmp_path / "split", config)
    assert resumed_losses == pytest.approx(losses, abs=1e-6)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name

    # the teacher-forced estimate on the pattern: nearly every token is predicted
    record = {"input_ids": np.tile(pattern, 6).tolist(), "prompt_length": 6}
    estimate = estimate_acceptance(whole, [record], draft_length=4, bf16=False)
    assert estimate.top1 > 0.9
    assert estimate.tau > 3.5


def test_training_config_validation():
    with pytest.raises(ValueError, match="steps must be an integer"):
        DrafterTrainingConfig(steps=0)
    with pytest.raises(ValueError, match="final_fraction"):
        DrafterTrainingConfig(final_fraction=1.5)
    config = DrafterTrainingConfig(steps=10, final_fraction=0.3)
    assert config.mixture_at(6) is config.mixture and config.mixture_at(7) is config.final_mixture
