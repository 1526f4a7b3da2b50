"""The user-facing call: enable(), the custom_generate forms, outputs, statistics, streamers, errors."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput

import hf_specssm

from tests.helpers.models import VOCAB, align, build

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def pair():
    target = build("llama", seed=0)
    drafter = build("mamba", seed=1)
    align(target, drafter)
    return hf_specssm.enable(target), drafter


@pytest.fixture
def prompt():
    return torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))


def test_enable_is_idempotent_and_leaves_plain_generate_alone(pair, prompt):
    target, _ = pair
    plain = type(target).generate(target, prompt, max_new_tokens=12)
    assert hf_specssm.enable(target) is target and hf_specssm.is_enabled(target)
    assert torch.equal(target.generate(prompt, max_new_tokens=12), plain)


def test_custom_generate_callable(pair, prompt):
    target, drafter = pair
    reference = type(target).generate(target, prompt, max_new_tokens=20)
    output = type(target).generate(
        target, prompt, max_new_tokens=20, custom_generate=hf_specssm.speculative_generate, drafter=drafter
    )
    assert torch.equal(output, reference)


def test_hub_style_custom_generate_folder(pair, prompt):
    target, drafter = pair
    reference = type(target).generate(target, prompt, max_new_tokens=20)
    output = type(target).generate(
        target,
        prompt,
        max_new_tokens=20,
        custom_generate=str(REPO_ROOT / "custom_generate"),
        trust_remote_code=True,
        assistant_model=drafter,
    )
    assert torch.equal(output, reference)
    assert target.last_speculation_stats.rounds > 0


def test_return_dict_matches_plain_scores_and_carries_stats(pair, prompt):
    target, drafter = pair
    options = dict(max_new_tokens=15, return_dict_in_generate=True, output_scores=True, output_logits=True)
    reference = target.generate(prompt, **options)
    output = target.generate(prompt, assistant_model=drafter, **options)
    assert isinstance(output, GenerateDecoderOnlyOutput)
    assert isinstance(output, hf_specssm.SpeculativeDecoderOnlyOutput)
    assert torch.equal(output.sequences, reference.sequences)
    assert len(output.scores) == len(reference.scores) == 15
    assert len(output.logits) == 15
    for mine, theirs in zip(output.scores, reference.scores):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
    stats = output.speculation_stats
    assert stats is target.last_speculation_stats
    assert stats.new_tokens == 15 and stats.rounds == len(stats.accepted_lengths)
    assert stats.mean_accepted_length == pytest.approx(15 / stats.rounds)
    assert sum(stats.accepted_length_histogram().values()) == stats.rounds
    # the returned cache holds the committed tokens but the last one, as after plain decoding
    assert output.past_key_values.get_seq_length() == output.sequences.shape[1] - 1
    # without processors a round's scores are its raw logits (no copy), yet the returned ones do not alias
    logits_before = [row.clone() for row in output.logits]
    for row in output.scores:
        row.fill_(0.0)
    assert all(torch.equal(row, before) for row, before in zip(output.logits, logits_before, strict=True))


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks: list[list[int]] = []
        self.ended = 0

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended += 1


def test_streamer_receives_exactly_the_committed_tokens(pair, prompt):
    target, drafter = pair
    streamer = RecordingStreamer()
    output = target.generate(prompt, assistant_model=drafter, max_new_tokens=25, streamer=streamer)
    assert streamer.chunks[0] == prompt[0].tolist()
    streamed = [token for chunk in streamer.chunks[1:] for token in chunk]
    assert streamed == output[0, prompt.shape[1] :].tolist()
    assert streamer.ended == 1


class RoundStreamer(RecordingStreamer):
    def __init__(self):
        super().__init__()
        self.rounds: list[tuple[int, int]] = []

    def on_round(self, num_from_draft, num_committed):
        self.rounds.append((num_from_draft, num_committed))


def test_streamer_hears_where_each_rounds_tokens_came_from(pair, prompt):
    target, drafter = pair
    streamer = RoundStreamer()
    output = target.generate(prompt, assistant_model=drafter, max_new_tokens=25, streamer=streamer)
    stats = target.last_speculation_stats
    assert [committed for _, committed in streamer.rounds] == stats.committed_tokens
    assert [drafted for drafted, _ in streamer.rounds] == [
        min(accepted, committed)
        for accepted, committed in zip(stats.accepted_lengths, stats.committed_tokens)
    ]
    assert sum(committed for _, committed in streamer.rounds) == output.shape[1] - prompt.shape[1]
    assert any(drafted > 0 for drafted, _ in streamer.rounds)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")


def test_text_iterator_streamer(pair, prompt):
    from transformers import TextIteratorStreamer

    target, drafter = pair
    tokenizer = _word_tokenizer()
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    result = {}
    thread = threading.Thread(
        target=lambda: result.setdefault(
            "out", target.generate(prompt, assistant_model=drafter, max_new_tokens=20, streamer=streamer)
        )
    )
    thread.start()
    text = "".join(streamer)
    thread.join()
    expected = tokenizer.decode(result["out"][0, prompt.shape[1] :])
    assert text.split() == expected.split()


def test_drafter_options_travel_with_the_drafter(pair, prompt):
    target, drafter_model = pair
    drafter = hf_specssm.ModelDrafter(drafter_model, num_draft_tokens=3, schedule="constant")
    target.generate(prompt, assistant_model=drafter, max_new_tokens=20)
    assert set(target.last_speculation_stats.draft_lengths[:-1]) <= {3, 2, 1}
    assert target.last_speculation_stats.draft_lengths[0] == 3


# ---------------------------------------------------------------- errors


def _assert_recovers(target, drafter, prompt):
    reference = type(target).generate(target, prompt, max_new_tokens=10)
    assert torch.equal(target.generate(prompt, assistant_model=drafter, max_new_tokens=10), reference)


def test_vocab_mismatch(pair, prompt):
    target, drafter = pair
    with pytest.raises(ValueError, match="vocabulary"):
        target.generate(prompt, assistant_model=build("mamba", seed=1, vocab=VOCAB + 3), max_new_tokens=5)
    _assert_recovers(target, drafter, prompt)


def test_unsupported_drafter_kinds(pair, prompt):
    target, drafter = pair
    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    ).eval()
    with pytest.raises(ValueError, match="decoder-only"):
        target.generate(prompt, assistant_model=t5, max_new_tokens=5)
    with pytest.raises(ValueError, match="causal LM or a hf_specssm Drafter"):
        target.generate(prompt, assistant_model="state-spaces/mamba-130m", max_new_tokens=5)
    _assert_recovers(target, drafter, prompt)


@pytest.mark.parametrize(
    "options, message",
    [
        pytest.param(dict(num_draft_tokens=0), "num_draft_tokens", id="zero-length"),
        pytest.param(dict(schedule="fast"), "schedule", id="unknown-schedule"),
        pytest.param(dict(min_draft_tokens=5, max_draft_tokens=2), "must not exceed", id="min-over-max"),
        pytest.param(
            dict(num_draft_tokens=20), r"\[min_draft_tokens, max_draft_tokens\]", id="outside-bounds"
        ),
        pytest.param(dict(draft_cost_ratio=0.0), "draft_cost_ratio", id="zero-cost"),
        pytest.param(dict(acceptance_prior=1.0), "acceptance_prior", id="certain-prior"),
    ],
)
def test_invalid_drafter_options(options, message):
    with pytest.raises(ValueError, match=message):
        hf_specssm.DraftConfig(**options)
    with pytest.raises(ValueError, match=message):
        hf_specssm.ModelDrafter(build("mamba"), **options)


def test_config_and_keywords_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        hf_specssm.ModelDrafter(build("mamba"), hf_specssm.DraftConfig(), num_draft_tokens=3)


@pytest.mark.parametrize(
    "options, message",
    [
        pytest.param(dict(num_return_sequences=2, do_sample=True), "num_return_sequences", id="num-return"),
        pytest.param(dict(num_beams=2), "beam", id="beams"),
        pytest.param(dict(use_cache=False), "use_cache", id="no-cache"),
        pytest.param(
            dict(output_attentions=True, return_dict_in_generate=True), "output_attentions", id="attn"
        ),
    ],
)
def test_invalid_generate_options(pair, prompt, options, message):
    target, drafter = pair
    with pytest.raises(ValueError, match=message):
        target.generate(prompt, assistant_model=drafter, max_new_tokens=5, **options)
    _assert_recovers(target, drafter, prompt)


def test_padding_of_a_single_prompt_is_refused(pair, prompt):
    target, drafter = pair
    mask = torch.ones_like(prompt)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="padding"):
        target.generate(prompt, attention_mask=mask, assistant_model=drafter, max_new_tokens=5)
    _assert_recovers(target, drafter, prompt)


def test_drafter_on_another_device(pair, prompt):
    target, drafter = pair
    with torch.device("meta"):
        elsewhere = build("mamba", seed=1)
    with pytest.raises(ValueError, match="device"):
        target.generate(prompt, assistant_model=elsewhere, max_new_tokens=5)
    _assert_recovers(target, drafter, prompt)


def test_error_inside_the_loop_leaves_models_usable(pair, prompt):
    target, drafter_model = pair

    class Exploding(hf_specssm.ModelDrafter):
        rounds = 0

        def draft(self, input_ids, num_tokens, sampler):
            self.rounds += 1
            if self.rounds == 3:
                raise RuntimeError("boom")
            return super().draft(input_ids, num_tokens, sampler)

    exploding = Exploding(drafter_model)
    with pytest.raises(RuntimeError, match="boom"):
        target.generate(prompt, assistant_model=exploding, max_new_tokens=30)
    assert exploding.cache is None
    _assert_recovers(target, drafter_model, prompt)
    # the same drafter object works again
    exploding.rounds = 10
    reference = type(target).generate(target, prompt, max_new_tokens=12)
    assert torch.equal(target.generate(prompt, assistant_model=exploding, max_new_tokens=12), reference)


def test_enable_rejects_non_models():
    with pytest.raises(ValueError, match="can generate"):
        hf_specssm.enable(torch.nn.Linear(2, 2))
