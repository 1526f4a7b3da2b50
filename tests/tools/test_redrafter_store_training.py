"""ReDrafter heads trained on a distillation store: rows line up with what decoding reads, a reduced
vocabulary drafts in target ids, stored features that name the next token are learned, the chain
simulation counts what the drafter's own chains accept, resuming is exact, and the command runs end to end."""

from __future__ import annotations

import json

import pytest
import torch

from hf_specssm.drafters.base import DraftSampler
from hf_specssm.drafters.redrafter import ReDrafterConfig, ReDrafterDrafter, ReDrafterHead
from hf_specssm.training.mamba_drafter.finetune import ChainTally, Example
from hf_specssm.training.redrafter.command import toy_target
from hf_specssm.training.redrafter.store_training import (
    HeadFinetuneConfig,
    evaluate_head,
    finetune_head,
    head_chain_table,
    head_rows,
    init_output_from_target,
    store_vocabulary,
)

VOCAB, HIDDEN = 64, 32  # the toy target's
DRAFTABLE = torch.arange(2, VOCAB, 2)  # the answers' tokens: 31 even ids


def _examples(count: int, seed: int, answer: int = 20, informative: bool = True) -> list[Example]:
    """Random answers over even ids whose stored hidden state at token `j` (the one that chose it) encodes
    answer token `j + 1`, what a round starting after token `j` drafts first."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(7))
    examples = []
    for _ in range(count):
        ids = DRAFTABLE[torch.randint(DRAFTABLE.numel(), (3 + answer,), generator=generator)]
        tokens = ids[3:]
        following = torch.cat([tokens[1:], tokens[-1:]])
        hidden = codes[following] if informative else torch.randn(answer, HIDDEN, generator=generator)
        others = DRAFTABLE[torch.randint(DRAFTABLE.numel(), (answer, 1), generator=generator)]
        examples.append(
            Example(
                ids=ids,
                prompt_length=3,
                mode="greedy",
                topk_ids=torch.cat([tokens[:, None], others], dim=1),
                topk_logp=torch.tensor([[-0.01, -4.6]]).expand(answer, 2).clone(),
                hidden=hidden.to(torch.float16),
            )
        )
    return examples


def _head(draft_vocab_size: int | None = 32, beam_length: int = 3, seed: int = 0) -> ReDrafterHead:
    torch.manual_seed(seed)
    config = ReDrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, exit_dim=48, beam_width=2,
                             beam_length=beam_length, draft_vocab_size=draft_vocab_size)  # fmt: skip
    head = ReDrafterHead(config).eval()
    if draft_vocab_size is not None:
        head.set_draft_vocabulary(DRAFTABLE.flip(0)[: draft_vocab_size - 1])
    return head.attach(toy_target("toy-llama"))


def test_rows_hold_the_hidden_state_that_chose_g0_and_the_tokens_after_it():
    example = _examples(1, seed=0, answer=6)[0]
    rows = head_rows([example], steps=3)
    answer = example.ids[3:]
    # round starts after answer tokens 0 … 4 (the last token starts no round with something to draft)
    assert len(rows) == 5
    for j in range(5):
        assert torch.equal(rows.hidden[j], example.hidden[j])
        expected = [int(answer[j + s]) if j + s < 6 else -100 for s in range(4)]
        assert rows.tokens[j].tolist() == expected
        for s in range(1, 4):
            if j + s < 6:
                assert torch.equal(rows.soft_ids[j, s - 1], example.topk_ids[j + s])
    with pytest.raises(ValueError, match="distill label"):
        head_rows([Example(**{**example.__dict__, "hidden": None})], steps=3)


def test_a_reduced_vocabulary_scores_its_tokens_in_target_ids_and_survives_saving(tmp_path):
    head = _head(draft_vocab_size=9)
    hidden, state = torch.randn(4, HIDDEN), torch.randn(4, HIDDEN)
    reduced = head.output_logits(hidden, state)
    full = head.draft_logits(hidden, state)
    assert reduced.shape == (4, 9) and full.shape == (4, VOCAB)
    known = head.draft_to_target[1:]
    assert torch.equal(full[:, known], reduced[:, 1:])
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[known] = False
    assert (full[:, outside] == torch.finfo(full.dtype).min).all()
    # target ids outside the vocabulary are the 'other' class (0); no label stays no label
    assert head.to_draft_ids(torch.tensor([int(known[2]), 1, -100])).tolist() == [3, 0, -100]
    head.save_pretrained(tmp_path / "head")
    loaded = ReDrafterHead.from_pretrained(tmp_path / "head").attach(toy_target("toy-llama"))
    assert torch.equal(loaded.draft_to_target, head.draft_to_target)
    assert torch.equal(loaded.draft_logits(hidden, state), full)
    assert "8 target tokens" in (tmp_path / "head" / "README.md").read_text()


@pytest.mark.parametrize(
    ("size", "message"), [(1, "draft_vocab_size must be None or an integer in"), (66, "vocab_size \\+ 1")]
)
def test_bad_draft_vocabularies_are_refused(size, message):
    with pytest.raises(ValueError, match=message):
        ReDrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, draft_vocab_size=size)
    with pytest.raises(ValueError, match="cannot exceed the tokens the head can draft"):
        ReDrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, draft_vocab_size=3, beam_width=4)
    head = _head(draft_vocab_size=5)
    with pytest.raises(ValueError, match="repeats a target id"):
        head.set_draft_vocabulary(torch.tensor([2, 2, 4, 6]))


@pytest.mark.parametrize("draft_vocab_size", [32, None])
def test_the_output_layer_can_start_from_the_targets_output_rows(draft_vocab_size):
    head = _head(draft_vocab_size=draft_vocab_size)
    target_output = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(3))
    ids = head.draft_to_target[1:] if draft_vocab_size else torch.arange(VOCAB)
    centred = target_output[ids] - target_output[ids].mean(0)

    def gram_matches(rows):
        gram, expected = rows @ rows.T, centred @ centred.T
        return torch.allclose(gram / gram.norm(), expected / expected.norm(), atol=1e-5)

    first = 1 if draft_vocab_size else 0
    assert not gram_matches(head.lm_head.weight[first:].detach())  # a random layer has its own geometry
    init_output_from_target(head, target_output)
    weight = head.lm_head.weight.detach()
    # the head's rows relate as the target's centred rows do (width 48 holds all their directions) ...
    assert gram_matches(weight[first:])
    # ... at the initialiser's spread, with the 'other' slot and the biases at zero
    filled = weight[first:, : min(ids.numel(), HIDDEN)]  # the rest of the width starts at zero
    assert filled.std().item() == pytest.approx(head.config.initializer_range, rel=0.05)
    assert not weight[first:, filled.shape[1] :].any()
    assert not weight[:first].any() and not head.lm_head.bias.any()
    with pytest.raises(ValueError, match="output embedding"):
        init_output_from_target(head, target_output[:, :-1])


def test_the_vocabulary_comes_from_the_answers_by_count():
    examples = _examples(4, seed=3)
    chosen = store_vocabulary(examples, VOCAB, 5, always=[1])
    counts = torch.bincount(torch.cat([e.ids[3:] for e in examples]), minlength=VOCAB)
    assert chosen[0] == 1
    assert counts[chosen[1:]].tolist() == sorted(counts[chosen[1:]].tolist(), reverse=True)
    assert set(counts.topk(4).values.tolist()) == set(counts[chosen[1:]].tolist())


def test_the_simulation_counts_what_the_drafters_own_chains_accept(tmp_path):
    """Wherever `ReDrafterDrafter`'s greedy chain (one beam) reached a depth with correct drafts, its next
    draft is the simulated table's prediction there, and the chain count over the table accepts exactly the
    runs of leading correct drafts the drafter's chains make (on a trained head, right more often than not)."""
    head = _head(draft_vocab_size=32, beam_length=3)
    config = HeadFinetuneConfig(steps=40, batch_size=128, learning_rate=1e-2, warmup_steps=5,
                                checkpoint_every=40, progress=False)  # fmt: skip
    finetune_head(head, head_rows(_examples(48, seed=1), 3), tmp_path / "run", config)
    example = _examples(1, seed=9, answer=16)[0]
    table = head_chain_table(head, example, k=3)
    assert table[0].mean() > 0.5
    drafter = ReDrafterDrafter(head, beam_width=1, beam_length=3)
    answer = example.ids[3:]
    runs = []
    for j in range(answer.numel() - 1):
        drafter.observe_target_hidden(example.hidden[j][None].float())
        committed = torch.cat([example.ids[:3], answer[: j + 1]])[None]
        length = min(3, answer.numel() - 1 - j)
        drafted = drafter.draft(committed, length, DraftSampler(None, do_sample=False)).tokens[0]
        run = 0
        while run < length and drafted[run] == answer[j + 1 + run]:
            run += 1
        runs.append(run)
        for depth in range(min(run + 1, length)):
            assert bool(drafted[depth] == answer[j + 1 + depth]) == bool(table[depth, j + depth])
    tally = ChainTally(3)
    tally.add(table)
    assert (tally.accepted, tally.rounds) == (sum(runs), len(runs))
    assert sum(runs) > len(runs) // 2


def test_stored_features_that_name_the_next_token_are_learned(tmp_path):
    train, heldout = _examples(48, seed=1), _examples(8, seed=2)
    config = HeadFinetuneConfig(steps=40, batch_size=128, learning_rate=1e-2, warmup_steps=5,
                                checkpoint_every=40, progress=False)  # fmt: skip
    head = _head()
    before = evaluate_head(head, heldout, k=3)
    finetune_head(head, head_rows(train, 3), tmp_path / "informative", config)
    after = evaluate_head(head, heldout, k=3)
    blind = _head()
    finetune_head(blind, head_rows(_examples(48, seed=1, informative=False), 3), tmp_path / "blind", config)
    baseline = evaluate_head(blind, _examples(8, seed=2, informative=False), k=3)
    # tokens alone cannot beat chance (1/31); the hidden state names the first draft
    assert before.top1 < 0.15 and baseline.top1 < 0.15
    assert after.top1 > 0.8
    assert after.tau > baseline.tau + 0.5


@pytest.mark.parametrize("bf16", [pytest.param(False, id="fp32"), pytest.param(True, id="bf16-autocast")])
def test_resuming_gives_the_same_weights(tmp_path, bf16):
    rows = head_rows(_examples(8, seed=1), 3)
    config = HeadFinetuneConfig(steps=6, batch_size=32, checkpoint_every=3, progress=False, bf16=bf16)
    whole = _head()
    losses = finetune_head(whole, rows, tmp_path / "whole", config)
    halted = _head()
    finetune_head(halted, rows, tmp_path / "halted", HeadFinetuneConfig(**{**config.__dict__, "steps": 3}))
    resumed = _head()
    assert finetune_head(resumed, rows, tmp_path / "halted", config) == losses
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_training_refuses_what_does_not_fit(tmp_path):
    rows = head_rows(_examples(2, seed=1), 3)
    config = HeadFinetuneConfig(steps=1, progress=False)
    unattached = ReDrafterHead(ReDrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, beam_length=3))
    with pytest.raises(ValueError, match="attach the target"):
        finetune_head(unattached, rows, tmp_path, config)
    with pytest.raises(ValueError, match="beam_length is 4"):
        finetune_head(_head(beam_length=4), rows, tmp_path, config)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        HeadFinetuneConfig(batch_size=0)


def test_the_command_trains_a_head_on_a_store_and_resumes(tmp_path, capsys):
    from hf_specssm.tools.cli import main

    from tests.helpers.chat_models import save_chat_target, write_corpus

    save_chat_target(tmp_path / "model")
    root = write_corpus(tmp_path / "corpus")
    store = tmp_path / "store"
    assert main(["distill", "generate", "--target", str(tmp_path / "model"), "--store", str(store),
                 "--corpus-root", str(root), "--batch-size", "8", "--max-new-tokens", "8", "--count", "48",
                 "--quiet"]) == 0  # fmt: skip
    base = ["train-redrafter", "--store", str(store), "--target", str(tmp_path / "model"), "--out",
            str(tmp_path / "head"), "--draft-vocab-size", "24", "--batch-size", "64", "--beam-length", "3",
            "--checkpoint-every", "2", "--threads", "1", "--quiet"]  # fmt: skip
    assert main([*base, "--steps", "2"]) == 0
    assert main([*base, "--steps", "4"]) == 0
    output = capsys.readouterr().out
    assert "trained 4 steps" in output
    head = ReDrafterHead.from_pretrained(tmp_path / "head")
    assert head.config.draft_vocab_size == 24 and head.config.training_steps == 4
    card = (tmp_path / "head" / "README.md").read_text()
    assert "23 target tokens" in card
    # this store's 48+ chats hold held-out ones (1 in 40 by a hash of the id): simulated at each checkpoint
    log = [json.loads(line) for line in (tmp_path / "head" / "eval.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [2, 4]
    assert head.config.simulated_tau == pytest.approx(log[-1]["tau"])
    # `finetune-drafter evaluate --drafter` loads a head folder and simulates it as evaluate_head does
    import argparse

    from hf_specssm.training.distillation.store import DistillStore
    from hf_specssm.training.mamba_drafter.finetune import load_examples
    from hf_specssm.training.mamba_drafter.finetune_command import _Evaluator

    evaluator = _Evaluator(argparse.Namespace(device="cpu", target=str(tmp_path / "model")))
    loaded = evaluator.load(tmp_path / "head")
    assert isinstance(loaded, ReDrafterHead) and loaded.is_attached
    examples = load_examples(DistillStore(store), "all", need_hidden=True)
    reference = head.float().attach(evaluator._target)
    assert evaluator.estimate(loaded, examples, 3) == evaluate_head(reference, examples, k=3)
    # another setting in the same folder is refused by name
    assert main([*base, "--steps", "4", "--soft-weight", "0.2"]) == 2
    assert "--soft-weight" in capsys.readouterr().err
    # ... and --restart starts over with it: no checkpoint or log of the old run survives
    assert main([*base, "--steps", "2", "--soft-weight", "0.2", "--restart"]) == 0
    assert sorted(path.name for path in (tmp_path / "head").glob("checkpoint-*")) == ["checkpoint-2"]
    assert ReDrafterHead.from_pretrained(tmp_path / "head").config.training_steps == 2
    # --init-from-target is part of what a run is trained from; it resumes like any other setting
    started = [*base[:6], str(tmp_path / "init"), *base[7:], "--init-from-target"]
    assert main([*started, "--steps", "2"]) == 0
    assert main([*started, "--steps", "4"]) == 0
    started_head = ReDrafterHead.from_pretrained(tmp_path / "init")
    assert started_head.config.training_steps == 4
    # four small steps later the flagged head's output rows still relate as the target's rows do; the
    # random start's (the first run above) do not
    from transformers import AutoModelForCausalLM

    target_rows = (
        AutoModelForCausalLM.from_pretrained(tmp_path / "model").get_output_embeddings().weight.detach()
    )

    def agreement(trained: ReDrafterHead) -> float:
        ids = trained.draft_to_target[1:]
        centred = target_rows[ids] - target_rows[ids].mean(0)
        rows = trained.lm_head.weight.detach()[1:].float()
        apart = ~torch.eye(len(ids), dtype=torch.bool)  # how rows relate, not their lengths
        gram, expected = (rows @ rows.T)[apart], (centred @ centred.T)[apart]
        return torch.nn.functional.cosine_similarity(gram, expected, dim=0).item()

    assert agreement(started_head) > 0.9 > 0.5 > agreement(head)
    assert main([*base[:6], str(tmp_path / "init"), *base[7:], "--steps", "6"]) == 2
    assert "--init-from-target" in capsys.readouterr().err
    # a corpus run has no output layer to start from the target's rows
    assert main(["train-redrafter", "--target", "toy-llama", "--out", str(tmp_path / "corpus"),
                 "--init-from-target", "--steps", "1", "--quiet"]) == 2  # fmt: skip
    assert "--init-from-target" in capsys.readouterr().err


def test_bf16_autocast_keeps_fp32_weights_and_tracks_fp32(tmp_path):
    rows = head_rows(_examples(8, seed=1), 3)
    config = HeadFinetuneConfig(steps=6, batch_size=32, checkpoint_every=3, progress=False, bf16=True)
    whole = _head()
    losses = finetune_head(whole, rows, tmp_path / "whole", config)
    assert all(parameter.dtype == torch.float32 for parameter in whole.parameters())
    # the same steps in fp32: bf16 rounding moves the losses a little, not the training
    exact = finetune_head(
        _head(), rows, tmp_path / "fp32", HeadFinetuneConfig(**{**config.__dict__, "bf16": False})
    )
    assert losses != exact
    assert losses == pytest.approx(exact, rel=0.02)


def test_bf16_is_refused_without_a_store(capsys):
    from hf_specssm.tools.cli import main

    assert main(["train-redrafter", "--target", "toy-llama", "--out", "unused", "--bf16"]) == 2
    assert "--bf16 trains a --store head" in capsys.readouterr().err
