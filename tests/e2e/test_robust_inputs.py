"""Every input of a speculative `generate` call is checked before anything runs (`hf_specssm.inputs`).

Unit tests call `validate_generate_inputs` on raw and on prepared arguments; the end-to-end tests go
through `hf_specssm.generate`, where a wrong mask used to run silently.
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

import hf_specssm
from hf_specssm import inputs
from hf_specssm.inputs import tokenizer_mismatch, validate_generate_inputs

from tests.helpers.chat_models import byte_tokenizer, save_chat_target
from tests.helpers.models import VOCAB, build


@pytest.fixture(scope="module")
def target():
    return build("llama")


@pytest.fixture(scope="module")
def drafter_model():
    return build("llama", seed=1)


def prompt(batch: int, length: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


def ones(batch: int, length: int) -> torch.Tensor:
    return torch.ones(batch, length, dtype=torch.long)


@pytest.mark.parametrize(
    ("input_ids", "model_kwargs", "message"),
    [
        pytest.param(
            prompt(2, 8),
            {"attention_mask": ones(2, 5)},
            r"attention_mask has shape [2, 5] but input_ids has shape [2, 8]",
            id="batch-mask-too-short",
        ),
        pytest.param(
            prompt(1, 8),
            {"attention_mask": ones(1, 5)},
            r"attention_mask has shape [1, 5] but input_ids has shape [1, 8]",
            id="one-prompt-mask-too-short",
        ),
        pytest.param(
            prompt(2, 8), {"attention_mask": ones(2, 10)}, "shape [2, 8]. Build both", id="mask-too-long"
        ),
        pytest.param(
            prompt(2, 4),
            {"attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])},
            "row 0 has padding after prompt tokens (right or inner padding); decoder-only",
            id="right-padding",
        ),
        pytest.param(
            prompt(2, 4),
            {"attention_mask": torch.tensor([[1, 1, 1, 1], [0, 1, 0, 1]])},
            "row 1 has padding after prompt tokens",
            id="inner-padding",
        ),
        pytest.param(
            prompt(2, 4),
            {"attention_mask": torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])},
            "attention_mask row 0 masks every prompt token",
            id="all-padding-row",
        ),
        pytest.param(
            prompt(1, 3),
            {"attention_mask": torch.tensor([[0.0, float("-inf"), 0.0]])},
            "must hold 1 (token) and 0 (padding) only",
            id="additive-mask",
        ),
        pytest.param(prompt(1, 3), {"attention_mask": torch.ones(1, 1, 3, 3)}, "must be 2D", id="4d-mask"),
        pytest.param(prompt(1, 3), {"attention_mask": [[1, 1, 1]]}, "must be a tensor", id="list-mask"),
        pytest.param(
            torch.empty(1, 0, dtype=torch.long), {}, "input_ids is empty (shape [1, 0])", id="empty-prompt"
        ),
        pytest.param(
            torch.empty(1, 0, dtype=torch.long),
            {"inputs_embeds": torch.zeros(1, 3, 32)},
            "pass input_ids",
            id="inputs-embeds",
        ),
        pytest.param(prompt(1, 3).float(), {}, "integer token ids (torch.long)", id="float-ids"),
        pytest.param(prompt(1, 3)[0], {}, "add the batch dimension: input_ids[None]", id="1d-ids"),
        pytest.param([[1, 2, 3]], {}, "input_ids must be a tensor", id="list-ids"),
        pytest.param(
            torch.tensor([[1, 2, VOCAB]]),
            {},
            f"token id {VOCAB} (row 0, position 2) but the target's vocabulary has ids 0–{VOCAB - 1}",
            id="id-past-the-vocabulary",
        ),
        pytest.param(torch.tensor([[1, -1]]), {}, "token id -1 (row 0, position 1)", id="negative-id"),
    ],
)
def test_bad_inputs_are_refused_with_the_argument_and_the_fix(target, input_ids, model_kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_generate_inputs(target, input_ids, model_kwargs)


@pytest.mark.parametrize(
    ("input_ids", "model_kwargs"),
    [
        pytest.param(prompt(1, 5), {}, id="no-mask"),
        pytest.param(prompt(1, 5), {"attention_mask": ones(1, 5)}, id="all-ones"),
        pytest.param(
            prompt(2, 4), {"attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])}, id="left-pad"
        ),
        pytest.param(prompt(2, 3), {"attention_mask": torch.ones(2, 3, dtype=torch.bool)}, id="bool-mask"),
        pytest.param(prompt(2, 3), {"attention_mask": torch.ones(2, 3)}, id="float-ones"),
    ],
)
def test_good_inputs_pass(target, input_ids, model_kwargs):
    validate_generate_inputs(target, input_ids, model_kwargs, GenerationConfig())


def test_prepared_inputs_reveal_a_mask_transformers_dropped(target):
    # transformers 5.23 drops an all-ones mask before the loop and records its length
    config = GenerationConfig()
    config._mask_length = 5
    with pytest.raises(
        ValueError, match=re.escape("attention_mask has 5 entries per row but input_ids has shape [1, 8]")
    ):
        validate_generate_inputs(target, prompt(1, 8), {"attention_mask": None}, config)
    config._mask_length = 8
    validate_generate_inputs(target, prompt(1, 8), {"attention_mask": None}, config)
    # and builds position_ids from the mask
    position_ids = torch.arange(5).expand(2, 5)
    with pytest.raises(
        ValueError, match=re.escape("position_ids has shape [2, 5] but input_ids has shape [2, 8]")
    ):
        validate_generate_inputs(target, prompt(2, 8), {"position_ids": position_ids})


def test_a_right_padding_tokenizer_is_named(target):
    tokenizer = byte_tokenizer()
    tokenizer.padding_side = "right"
    with pytest.raises(ValueError, match=r"\(the tokenizer pads on the right\).*padding_side = 'left'"):
        validate_generate_inputs(
            target,
            prompt(2, 3),
            {"attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])},
            tokenizer=tokenizer,
        )


def permuted_byte_tokenizer() -> PreTrainedTokenizerFast:
    """`byte_tokenizer()` with the ids of 'a' and 'b' swapped: same size, different numbering."""
    tokenizer = byte_tokenizer()
    backend = tokenizer.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=False)
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    from tokenizers import Tokenizer, models

    swapped = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    swapped.pre_tokenizer = backend.pre_tokenizer
    swapped.decoder = backend.decoder
    other = PreTrainedTokenizerFast(tokenizer_object=swapped)
    other.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]})
    return other


def test_tokenizer_mismatch_compares_the_numbering_not_the_size():
    same, swapped = byte_tokenizer(), permuted_byte_tokenizer()
    assert len(same) == len(swapped)
    assert tokenizer_mismatch(byte_tokenizer(), same) is None
    assert re.fullmatch(
        r"token '[ab]' is id \d+ for the target and id \d+ for the drafter", tokenizer_mismatch(same, swapped)
    )
    # a drafter tokenizer with one more special token (past the target's end) still agrees
    extended = byte_tokenizer()
    extended.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    assert tokenizer_mismatch(same, extended) is None
    # a different end-of-sequence role over the same vocabulary (base drafter, instruct target) is fine
    base = byte_tokenizer()
    base.eos_token = "<|endoftext|>"
    assert tokenizer_mismatch(same, base) is None


def test_passed_tokenizers_that_disagree_are_refused(target):
    with pytest.raises(ValueError, match=r"tokenizers disagree: token '[ab]' is id \d+ for the target"):
        validate_generate_inputs(
            target,
            prompt(1, 3),
            {},
            tokenizer=byte_tokenizer(),
            assistant_tokenizer=permuted_byte_tokenizer(),
        )


@pytest.fixture(scope="module")
def folder_pair(tmp_path_factory):
    """A target and two drafters loaded from local folders: one with the target's tokenizer, one permuted."""
    root = tmp_path_factory.mktemp("pair")
    save_chat_target(root / "target", seed=0)
    save_chat_target(root / "same", seed=1)
    save_chat_target(root / "permuted", seed=2)
    permuted_byte_tokenizer().save_pretrained(root / "permuted")
    return {
        name: AutoModelForCausalLM.from_pretrained(root / name).eval()
        for name in ("target", "same", "permuted")
    }


def test_tokenizers_are_found_in_the_models_local_folders(folder_pair, monkeypatch):
    ids = torch.tensor([[65, 66, 67]])
    with pytest.raises(ValueError, match=r"token '[ab]' is id \d+ for the target and id \d+ for the drafter"):
        validate_generate_inputs(folder_pair["target"], ids, {}, drafter_model=folder_pair["permuted"])

    # byte-identical tokenizer files: agreed without loading a tokenizer
    def no_loading(*args):
        raise AssertionError("loaded a tokenizer")

    monkeypatch.setattr(inputs, "_load_folder_tokenizer", no_loading)
    validate_generate_inputs(folder_pair["target"], ids, {}, drafter_model=folder_pair["same"])
    # models built in memory have no folder: nothing to compare
    validate_generate_inputs(build("llama"), torch.tensor([[1, 2]]), {}, drafter_model=build("llama", seed=1))


def test_generate_refuses_a_mask_of_the_wrong_shape(target, drafter_model):
    hf_specssm.enable(target)
    ids = prompt(2, 8)
    with pytest.raises(ValueError, match=re.escape("but input_ids has shape [2, 8]")):
        hf_specssm.generate(target, ids, drafter=drafter_model, attention_mask=ones(2, 5), max_new_tokens=3)
    with pytest.raises(ValueError, match=re.escape("but input_ids has shape [1, 8]")):
        hf_specssm.generate(
            target, ids[:1], drafter=drafter_model, attention_mask=ones(1, 5), max_new_tokens=3
        )
    with pytest.raises(ValueError, match=re.escape("input_ids is empty")):
        hf_specssm.generate(
            target, torch.empty(1, 0, dtype=torch.long), drafter=drafter_model, max_new_tokens=3
        )
    with pytest.raises(ValueError, match=re.escape("right or inner padding")):
        hf_specssm.generate(
            target,
            ids[:, :3],
            drafter=drafter_model,
            attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]),
            max_new_tokens=3,
        )
    # the right mask runs, and matches plain decoding
    mask = ones(2, 8)
    mask[0, :2] = 0
    plain = target.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    spec = hf_specssm.generate(
        target, ids, drafter=drafter_model, attention_mask=mask, max_new_tokens=3, do_sample=False
    )
    assert torch.equal(spec, plain)


def test_generate_refuses_drafters_with_another_tokenizer(folder_pair):
    ids = torch.tensor([[65, 66, 67]])
    with pytest.raises(ValueError, match="tokenizers disagree"):
        hf_specssm.generate(folder_pair["target"], ids, drafter=folder_pair["permuted"], max_new_tokens=2)
    out = hf_specssm.generate(folder_pair["target"], ids, drafter=folder_pair["same"], max_new_tokens=2)
    assert out.shape == (1, 5)
