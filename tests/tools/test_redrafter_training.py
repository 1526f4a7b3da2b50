"""Training ReDrafter heads: a trained head is accepted more, checkpoints resume exactly, the CLI works.

The acceptance test trains on the target's own greedy continuations (distillation) with fixed seeds, so
its numbers are reproducible; they are printed (`pytest -s`) and recorded as test properties.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_specssm
from hf_specssm.drafters.redrafter import ReDrafterConfig, ReDrafterDrafter, ReDrafterHead
from hf_specssm.tools.cli import main
from hf_specssm.training.checkpoints import checkpoints
from hf_specssm.training.redrafter.command import toy_target
from hf_specssm.training.redrafter.training import (
    TrainingConfig,
    blocks_from_documents,
    distill,
    mean_accepted_length,
    random_prompts,
    read_corpus,
    train_head,
)

from tests.helpers.models import HIDDEN, VOCAB, build


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (thread hand-offs cost more than their matmuls)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def new_head(seed: int = 0) -> ReDrafterHead:
    torch.manual_seed(seed)
    return ReDrafterHead(ReDrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, beam_width=4, beam_length=4))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "margin"),
    [
        pytest.param("llama", 0.8, id="llama-tree-rounds"),
        pytest.param("jamba", 0.8, id="jamba-hybrid-chain-rounds"),
    ],
)
def test_training_raises_mean_accepted_length(kind, margin, record_property):
    target = toy_target(f"toy-{kind}", seed=0)
    data = distill(target, random_prompts(VOCAB, 256, 8, seed=1), 40, progress=False)
    evaluation = random_prompts(VOCAB, 6, 8, seed=2)
    head = new_head(seed=0)
    untrained = mean_accepted_length(target, head.attach(target), evaluation, 40)
    losses = train_head(
        head, target, data, TrainingConfig(steps=300, batch_size=16, learning_rate=3e-3, progress=False)
    )
    trained = mean_accepted_length(target, head, evaluation, 40)
    print(
        f"\n{kind}: τ untrained {untrained:.3f} → trained {trained:.3f} (loss {losses[0]:.2f} → {losses[-1]:.2f})"
    )
    record_property("tau_untrained", untrained)
    record_property("tau_trained", trained)
    assert sum(losses[-20:]) / 20 < 0.6 * losses[0]
    assert trained > untrained + margin


def test_toy_targets_are_the_test_suites_models():
    for kind in ("llama", "mamba2", "jamba"):
        toy, built = toy_target(f"toy-{kind}", seed=0), build(kind, seed=0)
        assert toy.generation_config.eos_token_id is None
        for (name, tensor), other in zip(toy.state_dict().items(), built.state_dict().values()):
            assert torch.equal(tensor, other), name


def test_resume_after_an_interruption_is_exact(tmp_path):
    target = toy_target("toy-llama")
    data = distill(target, random_prompts(VOCAB, 32, 6, seed=1), 10, progress=False)
    config = TrainingConfig(steps=20, batch_size=4, checkpoint_every=5, keep_checkpoints=2, progress=False)
    straight = new_head()
    straight_losses = train_head(straight, target, data, config)

    def interrupt(step, loss):
        if step == 12:
            raise KeyboardInterrupt

    interrupted = new_head()
    with pytest.raises(KeyboardInterrupt):
        train_head(interrupted, target, data, config, output_dir=tmp_path, on_step=interrupt)
    assert [folder.name for folder in checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-10"]
    # a fresh process: new head, state only from the folder
    resumed = new_head(seed=99)
    resumed_losses = train_head(resumed, target, data, config, output_dir=tmp_path)
    assert resumed_losses == straight_losses
    for name, tensor in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert [folder.name for folder in checkpoints(tmp_path)] == ["checkpoint-15", "checkpoint-20"]
    saved = ReDrafterHead.from_pretrained(tmp_path / "checkpoint-20")
    assert saved.config.training_steps == 20


def test_distillation_labels_only_the_targets_continuation():
    target = toy_target("toy-llama")
    prompts = random_prompts(VOCAB, 3, 5, seed=0)
    plain = target.generate(
        prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=6, do_sample=False
    )
    # make the target's 3rd generated token of the first prompt its end of sequence
    eos = int(plain[0, 5 + 2])
    target.generation_config.eos_token_id = eos
    data = distill(target, prompts, 6, progress=False)
    assert data.input_ids.shape == (3, 11)
    assert (data.labels[:, :5] == -100).all()
    first = data.labels[0, 5:].tolist()
    assert first[:3] == plain[0, 5:8].tolist() and first[2] == eos
    assert all(label == -100 for label in first[3:])
    assert "greedy continuations of 6 tokens" in data.description


class WordTokenizer:
    """A stand-in tokenizer: one id per word (enough to check how corpora are read)."""

    chat_template = "{{ messages }}"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [len(word) for word in text.split()]}

    def apply_chat_template(self, messages, tokenize=False):
        return " ".join(f"<{m['role']}> {m['content']}" for m in messages)


def test_read_corpus_formats(tmp_path):
    jsonl = tmp_path / "corpus.jsonl"
    records = [
        {"input_ids": [1, 2, 3]},
        {"text": "a bb ccc"},
        {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "yo"}]},
        {"conversations": [{"from": "human", "value": "abc"}, {"from": "gpt", "value": "de"}]},
    ]
    jsonl.write_text("\n".join(json.dumps(record) for record in records) + "\n\n")
    assert read_corpus(jsonl, WordTokenizer()) == [[1, 2, 3], [1, 2, 3], [6, 2, 5, 11, 2], [6, 3, 11, 2]]
    text = tmp_path / "corpus.txt"
    text.write_text("one two\nthree\n\n\nfour five six\n")
    assert read_corpus(text, WordTokenizer()) == [[3, 3, 5], [4, 4, 3]]
    with pytest.raises(ValueError, match="a tokenizer is needed"):
        read_corpus(text)
    (tmp_path / "bad.jsonl").write_text('{"title": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected input_ids"):
        read_corpus(tmp_path / "bad.jsonl")
    blocks = blocks_from_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4, "test")
    assert blocks.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert torch.equal(blocks.labels, blocks.input_ids)


def test_cli_trains_saves_and_resumes(tmp_path, capsys):
    out = tmp_path / "head"
    common = ["train-redrafter", "--target", "toy-llama", "--out", str(out), "--threads", "1", "--quiet"]
    small = [
        "--distill-samples",
        "32",
        "--eval-prompts",
        "2",
        "--eval-new-tokens",
        "12",
        "--checkpoint-every",
        "10",
    ]
    assert main([*common, *small, "--steps", "20"]) == 0
    printed = capsys.readouterr().out
    assert "mean accepted length τ over 2 prompts × 12 tokens: untrained" in printed
    names = sorted(path.name for path in out.iterdir())
    assert names == [
        "README.md",
        "card.py",  # the head's own code, for trust_remote_code loading without hf_specssm
        "checkpoint-10",
        "checkpoint-20",
        "config.json",
        "configuration.py",
        "eval_prompts.pt",
        "model.safetensors",
        "modeling.py",
        "run.json",
        "target",
        "training_data.pt",
    ]
    card = (out / "README.md").read_text()
    assert "| training steps | 20 |" in card and "32 random prompts of 8 tokens" in card
    # the saved toy target is the one the head was trained for, and the head drafts for it losslessly
    target = hf_specssm.enable(AutoModelForCausalLM.from_pretrained(out / "target"))
    drafter = ReDrafterDrafter(ReDrafterHead.from_pretrained(out), target)
    prompt = random_prompts(VOCAB, 1, 6, seed=7)
    reference = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12)
    output = target.generate(
        prompt, attention_mask=torch.ones_like(prompt), assistant_model=drafter, max_new_tokens=12
    )
    assert torch.equal(output, reference)
    # a longer run resumes from the newest checkpoint
    assert main([*common, *small, "--steps", "30"]) == 0
    assert f"resuming from {out / 'checkpoint-20'}" in capsys.readouterr().out
    resumed = ReDrafterConfig.from_pretrained(out)
    assert resumed.training_steps == 30
    assert (
        resumed.untrained_mean_accepted_length
        == ReDrafterConfig.from_pretrained(out / "checkpoint-20").untrained_mean_accepted_length
    )
