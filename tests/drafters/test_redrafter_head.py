"""The ReDrafter head as a transformers model: config, the training loss, Hub-format checkpoints, the card."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, LogitsProcessorList, PreTrainedModel

import hf_specssm
from hf_specssm.drafters.base import DraftSampler
from hf_specssm.drafters.redrafter import ReDrafterConfig, ReDrafterDrafter, ReDrafterHead

from tests.helpers.models import HIDDEN, VOCAB, build


def make_head(seed: int = 0, **overrides) -> ReDrafterHead:
    """A random head with peaked distributions (so beams differ clearly), for a `build(...)` target."""
    torch.manual_seed(seed)
    config = dict(hidden_size=HIDDEN, vocab_size=VOCAB, beam_width=4, beam_length=3, target_name="tiny-llama")
    head = ReDrafterHead(ReDrafterConfig(**{**config, **overrides}))
    with torch.no_grad():
        head.lm_head.weight.mul_(50)
    return head.eval()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param({"beam_width": 0}, "beam_width must be an integer >= 1", id="no-beams"),
        pytest.param({"beam_length": 0}, "beam_length must be an integer >= 1", id="no-length"),
        pytest.param(
            {"vocab_size": 8, "beam_width": 9},
            "cannot exceed the tokens the head can draft \\(8\\)",
            id="wider-than-vocab",
        ),
        pytest.param({"num_draft_layers": -1}, "num_draft_layers", id="negative-layers"),
        pytest.param({"exit_dim": 0}, "exit_dim", id="zero-exit-dim"),
    ],
)
def test_config_rejects_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        ReDrafterConfig(**{"hidden_size": HIDDEN, "vocab_size": VOCAB, **fields})


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="rnn"),
        pytest.param({"rnn": False}, id="running-sum"),
        pytest.param({"exit_dim": 24, "num_draft_layers": 1}, id="projected"),
    ],
)
def test_loss_is_the_sum_of_per_step_cross_entropies(overrides):
    target = build("llama", seed=0)
    head = make_head(**overrides).attach(target)
    steps = head.config.beam_length
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (2, 9), generator=generator)
    hidden = torch.randn(2, 9, HIDDEN, generator=generator)
    output = head(input_ids, hidden)
    starts = 9 - steps - 1
    assert output.logits.shape == (2, starts, steps, VOCAB)
    # the recurrence by hand, one start position at a time
    expected_loss = 0.0
    for step in range(steps):
        losses = []
        for b in range(2):
            for t in range(starts):
                state = head.initial_state(1)[0]
                for i in range(1, step + 2):
                    state = head.next_state(state, input_ids[b, t + i])
                logits = head.draft_logits(hidden[b, t], state)
                torch.testing.assert_close(output.logits[b, t, step], logits)
                losses.append(F.cross_entropy(logits[None], input_ids[b, t + step + 2][None]))
        expected_loss += torch.stack(losses).mean()
    torch.testing.assert_close(output.loss, expected_loss)


def test_loss_skips_unlabelled_positions():
    head = make_head().attach(build("llama", seed=0))
    input_ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    hidden = torch.randn(1, 8, HIDDEN)
    labels = torch.full_like(input_ids, -100)
    assert head(input_ids, hidden, labels).loss is None
    with pytest.raises(ValueError, match="at least beam_length"):
        head(input_ids[:, :4], hidden[:, :4])


def test_embedding_is_the_targets_and_frozen():
    target = build("llama", seed=0)
    head = make_head().attach(target)
    tokens = torch.tensor([3, 5])
    torch.testing.assert_close(head.embed(tokens), target.get_input_embeddings()(tokens))
    input_ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    head(input_ids, torch.randn(1, 8, HIDDEN)).loss.backward()
    assert target.get_input_embeddings().weight.grad is None
    assert head.lm_head.weight.grad is not None
    # not a parameter of the head, so never in its checkpoint
    assert not any("embed" in name for name, _ in head.named_parameters())


def test_unattached_head_says_what_to_do():
    with pytest.raises(RuntimeError, match="attach the target"):
        make_head().embed(torch.tensor([1]))


@pytest.mark.parametrize(
    ("head_fields", "target_vocab", "named"),
    [
        pytest.param({"vocab_size": 80}, VOCAB, ("vocab_size 80", f"vocab_size {VOCAB}"), id="other-vocab"),
        pytest.param(
            {"hidden_size": 48}, VOCAB, ("hidden_size 48", f"hidden_size {HIDDEN}"), id="other-hidden"
        ),
        pytest.param({}, 80, (f"vocab_size {VOCAB}", "vocab_size 80"), id="target-of-other-vocab"),
    ],
)
def test_attach_refuses_a_head_for_another_target(head_fields, target_vocab, named):
    target = build("llama", seed=0, vocab=target_vocab)
    head = make_head(**head_fields)
    with pytest.raises(ValueError, match="trained for a target") as error:
        head.attach(target)
    for text in named:
        assert text in str(error.value)


def test_loading_a_head_for_another_vocab_raises(tmp_path):
    make_head(vocab_size=80, target_name="other-target").save_pretrained(tmp_path)
    head = ReDrafterHead.from_pretrained(tmp_path)
    target = hf_specssm.enable(build("llama", seed=0))
    with pytest.raises(ValueError, match=r"other-target\) with vocab_size 80.*vocab_size 64"):
        ReDrafterDrafter(head, target)
    # also when the drafter meets its target only in generate
    with pytest.raises(ValueError, match="vocab_size 80"):
        target.generate(torch.tensor([[1, 2, 3]]), assistant_model=ReDrafterDrafter(head), max_new_tokens=4)


def drafts_of(head: ReDrafterHead, target, prompt: torch.Tensor) -> list[tuple[list[int], ...]]:
    """Trees and chains the head drafts from the target's hidden states along `prompt`."""
    from hf_specssm.training.redrafter.training import target_hidden_states

    drafter = ReDrafterDrafter(head, target)
    sampler = DraftSampler(LogitsProcessorList(), do_sample=False)
    hidden = target_hidden_states(target, prompt)
    drafts = []
    drafter.begin(prompt)
    for length in range(2, prompt.shape[1] + 1):
        drafter.observe_target_hidden(hidden[:, length - 2])
        tree = drafter.draft_tree(prompt[:, :length], sampler)
        chain = drafter.draft(prompt[:, :length], 3, sampler)
        drafts.append((tree.tokens.tolist(), tree.parents.tolist(), chain.tokens[0].tolist()))
    return drafts


def test_save_load_round_trip_reproduces_drafts(tmp_path):
    target = build("llama", seed=0)
    head = make_head(seed=3, training_steps=7, training_data="unit-test corpus", mean_accepted_length=2.5)
    head.save_pretrained(tmp_path)
    # weights, config, card, and the remote code that loads the folder without hf_specssm
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "README.md",
        "card.py",
        "config.json",
        "configuration.py",
        "model.safetensors",
        "modeling.py",
    ]
    # the checkpoint holds the head only: the embedding is the target's
    assert set(load_file(tmp_path / "model.safetensors")) == set(head.state_dict())
    loaded = ReDrafterHead.from_pretrained(tmp_path)
    assert loaded.config.to_diff_dict() == head.config.to_diff_dict()
    prompt = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(4))
    original = drafts_of(head, target, prompt)
    assert drafts_of(loaded, target, prompt) == original
    # the drafts are not trivially equal: trees branch and differ across positions
    assert len({tuple(tokens) for tokens, _, _ in original}) > 1
    assert any(parents.count(-1) > 1 for _, parents, _ in original)


def test_auto_classes_load_the_head(tmp_path):
    head = make_head()
    head.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ReDrafterConfig)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, ReDrafterHead)
    for name, tensor in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def test_model_card_records_target_data_steps_and_acceptance(tmp_path):
    head = make_head(
        target_name="org/target-model",
        target_model_type="llama",
        training_data="chat.jsonl (120 documents)",
        training_steps=300,
        mean_accepted_length=2.345,
        untrained_mean_accepted_length=1.012,
    )
    head.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith(
        "---\nlicense: apache-2.0\nlibrary_name: transformers\npipeline_tag: text-generation\n"
    )
    assert "base_model: org/target-model" in card
    for fact in (
        "`org/target-model` (llama)",
        "chat.jsonl (120 documents)",
        "| training steps | 300 |",
        "2.35 trained vs 1.01 untrained",
        "4 beams × 3 tokens",
    ):
        assert fact in card
    # names that are not Hub ids (toy targets, local paths) are not claimed as base models
    make_head(target_name="toy-llama").save_pretrained(tmp_path / "toy")
    toy_card = (tmp_path / "toy" / "README.md").read_text()
    assert "base_model" not in toy_card
    # a head trained on a store: its simulated τ, and no empty end-to-end row
    make_head(simulated_tau=2.0234, draft_vocab_size=9).save_pretrained(tmp_path / "store")
    store_card = (tmp_path / "store" / "README.md").read_text()
    assert "| 2.02 |" in store_card and "8 target tokens" in store_card
    assert "mean accepted length" not in store_card and "mean accepted length" not in toy_card


def _intercept_hub(monkeypatch) -> dict:
    """Replace the Hub calls `push_to_hub` makes with recorders (the Hub is unreachable here)."""
    import huggingface_hub

    sent: dict = {}

    class RepoUrl:
        repo_id = "someone/redrafter-head"

    def create_repo(self, repo_id, **kwargs):
        sent["created"] = (repo_id, kwargs)
        return RepoUrl()

    def create_branch(self, **kwargs):
        sent["branch"] = kwargs

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {path.name: path.read_bytes() for path in sorted(Path(folder_path).iterdir())}
        sent["upload"] = (repo_id, files, kwargs)
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return sent


def test_push_to_hub_uploads_the_saved_folder(tmp_path, monkeypatch):
    sent = _intercept_hub(monkeypatch)
    head = make_head(training_steps=12, training_data="toy corpus")
    assert head.push_to_hub("redrafter-head", private=True) == "commit-info"
    assert sent["created"] == ("redrafter-head", {"private": True, "token": None, "exist_ok": True})
    assert "branch" not in sent
    repo_id, files, kwargs = sent["upload"]
    assert repo_id == "someone/redrafter-head"
    assert sorted(files) == [
        "README.md",
        "card.py",
        "config.json",
        "configuration.py",
        "model.safetensors",
        "modeling.py",
    ]
    # our card, not transformers' generic one
    assert b"| training steps | 12 |" in files["README.md"]
    config = json.loads(files["config.json"])
    assert config["model_type"] == "redrafter"
    assert config["auto_map"] == {
        "AutoConfig": "configuration.ReDrafterConfig",
        "AutoModel": "modeling.ReDrafterHead",
    }
    assert kwargs["commit_message"] == "Upload ReDrafter head"


def test_push_to_hub_takes_transformers_arguments(monkeypatch):
    """Every argument of transformers' own `push_to_hub` is accepted, and each reaches the Hub call it is for."""
    ours = inspect.signature(ReDrafterHead.push_to_hub).parameters
    theirs = inspect.signature(PreTrainedModel.push_to_hub).parameters
    assert set(theirs) <= set(ours)
    sent = _intercept_hub(monkeypatch)
    make_head().push_to_hub(
        "redrafter-head",
        commit_message="first head",
        commit_description="trained on toy data",
        private=False,
        token="hf_secret",
        revision="v1",
        create_pr=True,
        max_shard_size="1MB",
        tags=["my-tag", "needs: quoting"],
    )
    assert sent["created"] == ("redrafter-head", {"private": False, "token": "hf_secret", "exist_ok": True})
    assert sent["branch"] == {
        "repo_id": "someone/redrafter-head",
        "branch": "v1",
        "token": "hf_secret",
        "exist_ok": True,
    }
    _, files, kwargs = sent["upload"]
    assert kwargs == {
        "commit_message": "first head",
        "commit_description": "trained on toy data",
        "token": "hf_secret",
        "revision": "v1",
        "create_pr": True,
    }
    metadata = files["README.md"].decode().split("---")[1]
    assert "- my-tag\n" in metadata and '- "needs: quoting"\n' in metadata and "- redrafter\n" in metadata
