"""Families beyond the tiny suite's (`testing.tiny`): Qwen3-Next and Qwen3.5 (Gated DeltaNet), LFM2 (short convolutions),
Nemotron-H and GraniteMoeHybrid (Mamba2 layout). Greedy output equals plain decoding at partial acceptance,
and LFM2's conv layers, which no SSM mixer serves, are committed by their conv windows."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_specssm
from hf_specssm import DraftConfig, targets
from hf_specssm.ssm import state_replay
from hf_specssm.testing.oracle import OracleDrafter

from tests.helpers.families import FAMILY_KINDS, VOCAB, family_config


def _model(kind: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(kind)).eval()
    with torch.no_grad():  # sharper logits: fewer near-ties between the multi-token and one-token paths
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(3)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return hf_specssm.enable(model)


def _run(model, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    reference = model.generate(prompt, max_new_tokens=40, do_sample=False)
    drafter = OracleDrafter(
        reference, alpha, VOCAB, config=DraftConfig(num_draft_tokens=4, schedule="constant")
    )
    output = model.generate(prompt, assistant_model=drafter, max_new_tokens=40, do_sample=False)
    stats = model.last_speculation_stats
    return output, reference, stats.new_tokens / stats.rounds


@pytest.mark.parametrize("kind", FAMILY_KINDS)
@pytest.mark.parametrize("verification", ["replay", "refeed"])
def test_partial_acceptance_matches_plain_greedy(kind, verification):
    model = _model(kind)
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    reference = model.generate(prompt, max_new_tokens=40, do_sample=False)
    drafter = OracleDrafter(
        reference, 0.6, VOCAB, config=DraftConfig(num_draft_tokens=4, schedule="constant")
    )
    output = model.generate(
        prompt, assistant_model=drafter, max_new_tokens=40, do_sample=False, verification=verification
    )
    assert torch.equal(output, reference)
    stats = model.last_speculation_stats
    assert 1.5 < stats.new_tokens / stats.rounds < 4.5  # partial acceptance happened


def test_mamba2_layout_families_commit_by_state_update():
    for kind in ("nemotron_h", "granitemoehybrid"):
        model = _model(kind)
        target = targets.make_target(model, None)
        assert target.state_recorder is not None
        # every Mamba layer is served by its mixer (5.17 also types Nemotron-H's MLP layer as recurrent)
        mixers = {mixer.layer_idx for mixer in target.state_recorder.mixers}
        assert mixers and not mixers & set(target.state_recorder.conv_only_layers)


def test_gated_delta_net_families_commit_by_state_update():
    for kind in ("qwen3_next", "qwen3_5"):
        model = _model(kind)
        target = targets.make_target(model, None)
        assert target.state_recorder is not None
        assert [mixer.layer_idx for mixer in target.state_recorder.delta_mixers] == [0, 1, 2]


def test_lfm2_conv_layers_are_committed_by_their_windows():
    model = _model("lfm2")
    assert state_replay.uncovered_recurrent_layers(model) == [0, 1, 3]
    target = targets.make_target(model, None)
    assert target.state_recorder is not None and target.state_recorder.conv_only_layers == [0, 1, 3]
    assert "no SSM mixer serves them" in targets.tree_problem_for(model)
    with pytest.raises(ValueError, match="pass one prompt per call"):
        targets.make_target(model, None, num_rows=2)


def test_lfm2_without_the_conv_window_commit_is_wrong(monkeypatch):
    """Negative control: dropping the conv-only layers' commit corrupts LFM2's output."""
    model = _model("lfm2")
    original = state_replay.StateRecorder.__init__

    def without_conv_layers(self, *args, **kwargs):
        kwargs["conv_only_layers"] = ()
        original(self, *args, **kwargs)

    monkeypatch.setattr(state_replay.StateRecorder, "__init__", without_conv_layers)
    output, reference, _ = _run(model, 0.6)
    assert not torch.equal(output, reference)
