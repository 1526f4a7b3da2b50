"""A `MambaDrafterForCausalLM` folder is checked when it loads, not when it first drafts.

The vocabulary map (`draft_to_target`) must be there, of shape `[vocab_size]`, with integer ids inside
the target vocabulary; a folder without `config.json` is refused before any model is built (transformers
would otherwise build a default-sized Mamba2 of several GB).
"""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hf_specssm.drafters.mamba import MambaDrafterForCausalLM
from hf_specssm.training.mamba_drafter.training import drafter_config, new_drafter

TARGET_VOCAB = 40
DRAFT_IDS = torch.arange(3, 18)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("drafter") / "ok"
    new_drafter(drafter_config("tiny", DRAFT_IDS.numel() + 1, TARGET_VOCAB), DRAFT_IDS).save_pretrained(
        folder
    )
    return folder


def _variant(saved, tmp_path, change) -> str:
    """A copy of the saved drafter whose weights went through `change(state_dict)`."""
    folder = tmp_path / "variant"
    shutil.copytree(saved, folder)
    state = load_file(saved / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _set(name, value):
    return lambda state: state.__setitem__(name, value)


def _mapping_with(index: int, value: int) -> torch.Tensor:
    mapping = torch.cat([torch.tensor([-1]), DRAFT_IDS])
    mapping[index] = value
    return mapping


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            lambda state: state.pop("draft_to_target"),
            "model.safetensors has no draft_to_target tensor (the draft-to-target vocabulary map)",
            id="missing",
        ),
        pytest.param(
            _set("draft_to_target", _mapping_with(4, TARGET_VOCAB)),
            f"draft_to_target maps draft id 4 to target id {TARGET_VOCAB}, outside the target vocabulary "
            f"[0, {TARGET_VOCAB})",
            id="id-past-the-target-vocabulary",
        ),
        pytest.param(
            _set("draft_to_target", _mapping_with(2, -1)),
            "draft_to_target maps draft id 2 to target id -1",
            id="unmapped-draft-id",
        ),
        pytest.param(
            _set("draft_to_target", _mapping_with(0, 5)),
            "draft_to_target[0] must be -1 (the 'other' slot), got 5",
            id="other-slot",
        ),
        pytest.param(
            _set("draft_to_target", _mapping_with(2, 3)),
            "draft_to_target maps two draft ids to the same target id",
            id="duplicate",
        ),
        pytest.param(
            _set("draft_to_target", torch.arange(10)),
            "draft_to_target has shape [10] but config.json's vocab_size is 16 (expected [16])",
            id="wrong-shape",
        ),
        pytest.param(
            _set("draft_to_target", torch.zeros(16)),
            "draft_to_target must hold integer token ids, got dtype F32",
            id="float-map",
        ),
    ],
)
def test_a_bad_vocabulary_map_is_refused_at_load_time(saved, tmp_path, change, message):
    folder = _variant(saved, tmp_path, change)
    for load in (MambaDrafterForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=re.escape(message)) as raised:
            load(folder)
        assert str(folder / "model.safetensors") in str(raised.value)


def test_a_folder_without_config_is_refused_before_building_a_model(saved, tmp_path, monkeypatch):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    shutil.copy(saved / "model.safetensors", folder / "model.safetensors")

    def no_building(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(MambaDrafterForCausalLM, "__init__", no_building)
    with pytest.raises(ValueError, match=re.escape(f"{folder} has no config.json")):
        MambaDrafterForCausalLM.from_pretrained(folder)


def test_a_good_folder_loads_with_and_without_loading_info(saved):
    model = MambaDrafterForCausalLM.from_pretrained(saved)
    assert torch.equal(model.draft_to_target[1:], DRAFT_IDS)
    model, info = MambaDrafterForCausalLM.from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and torch.equal(model.draft_to_target[1:], DRAFT_IDS)
