"""Grouped-query attention without `repeat_kv` in our forwards (`_compat.attention.grouped_query_attention`)."""

from __future__ import annotations

import copy
import itertools
import threading

import pytest
import torch
import torch.nn.functional as F
import transformers.integrations.sdpa_attention as sdpa_attention

import hf_specssm
from hf_specssm import _compat
from hf_specssm._compat import attention
from hf_specssm.kernels.few_query_attention import ENVIRONMENT_SWITCH
from hf_specssm.targets import AttentionTarget

from tests.helpers.models import VOCAB, build


def _repeated(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    batch, heads, length, dim = tensor.shape
    return (
        tensor[:, :, None]
        .expand(batch, heads, groups, length, dim)
        .reshape(batch, heads * groups, length, dim)
    )


_SDPA_CASES = [
    pytest.param(
        dtype,
        heads,
        queries,
        length,
        mask,
        id=f"{str(dtype)[6:]}-{heads[0]}q{heads[1]}kv-{queries}x{length}-{mask}",
    )
    for dtype, heads, (queries, length), mask in itertools.product(
        (torch.float32, torch.bfloat16, torch.float16),
        ((4, 2), (12, 2), (32, 8)),
        ((1, 37), (9, 537), (17, 1100)),
        ("bool", "float", "padded"),
    )
]


@pytest.mark.parametrize(("dtype", "heads", "queries", "length", "mask"), _SDPA_CASES)
def test_enable_gqa_equals_repeated_heads_bit_for_bit(dtype, heads, queries, length, mask):
    """The fact the context rests on: torch's CPU SDPA with `enable_gqa=True` returns exactly what it returns
    for keys and values repeated per query head (transformers' `repeat_kv`)."""
    generator = torch.Generator().manual_seed(queries * length)
    query_heads, kv_heads = heads
    batch = 2 if mask == "padded" else 1
    query = torch.randn(batch, query_heads, queries, 64, generator=generator).to(dtype)
    key = torch.randn(batch, kv_heads, length, 64, generator=generator).to(dtype)
    value = torch.randn(batch, kv_heads, length, 64, generator=generator).to(dtype)
    allowed = (
        torch.ones(queries, length, dtype=torch.bool)
        .tril(length - queries)[None, None]
        .repeat(batch, 1, 1, 1)
    )
    if mask == "padded":
        allowed[1, :, :, :5] = False  # a left-padded second row
    if mask == "float":
        allowed = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    groups = query_heads // kv_heads
    repeated = F.scaled_dot_product_attention(
        query, _repeated(key, groups), _repeated(value, groups), attn_mask=allowed, scale=0.125
    )
    grouped = F.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed, scale=0.125, enable_gqa=True
    )
    assert torch.equal(grouped, repeated)


@pytest.mark.parametrize(
    ("mask_shape", "key_device", "value_dim", "expected"),
    [
        pytest.param(None, "cpu", 16, False, id="no mask: transformers already passes enable_gqa"),
        pytest.param((1, 5, 12), "cpu", 16, False, id="3D mask"),
        pytest.param((1, 1, 5, 12), "meta", 16, False, id="not a CPU tensor"),
        pytest.param((1, 1, 5, 12), "cpu", 8, False, id="value head dim differs"),
        pytest.param((1, 1, 5, 12), "cpu", 16, True, id="several queries with a 4D mask"),
        pytest.param((1, 1, 1, 12), "cpu", 16, "one query", id="one query"),
    ],
)
def test_which_calls_skip_the_repeat(mask_shape, key_device, value_dim, expected):
    mask = None if mask_shape is None else torch.ones(mask_shape, dtype=torch.bool)
    key = torch.zeros(1, 2, 12, 16, device=key_device)
    value = torch.zeros(1, 2, 12, value_dim, device=key_device)
    if expected == "one query":
        # 5.23 attends one query per key/value head itself (`pack_gqa`); 5.17 repeats there too
        expected = not callable(getattr(sdpa_attention, "pack_gqa", None))
    assert attention._skips_repeat(mask, key, value) is expected


class _RepeatCounter:
    """transformers' `repeat_kv` counted by thread name."""

    def __init__(self, real) -> None:
        self.real, self.calls = real, []

    def __call__(self, hidden_states, n_rep):
        if n_rep > 1:
            self.calls.append(threading.current_thread().name)
        return self.real(hidden_states, n_rep)


@pytest.fixture
def repeats(monkeypatch) -> _RepeatCounter:
    counter = _RepeatCounter(sdpa_attention.repeat_kv)
    monkeypatch.setattr(sdpa_attention, "repeat_kv", counter)
    return counter


def _verification_logits(model, cache, tokens: torch.Tensor) -> torch.Tensor:
    """A multi-token forward after a cached prefix: the shape of every verification."""
    return model(input_ids=tokens, past_key_values=copy.deepcopy(cache), use_cache=True).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_context_skips_the_repeat_with_equal_logits(repeats, dtype, monkeypatch):
    # SDPA for every call: the grouped products (tests/kernels/test_few_query_attention.py) round otherwise
    monkeypatch.setenv(ENVIRONMENT_SWITCH, "sdpa")
    model = build("llama").to(dtype)  # 4 query heads over 2 key/value heads
    prompt = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    drafts = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
        transformers_logits = _verification_logits(model, cache, drafts)
        # the negative control: transformers' own path repeats the heads of every layer (keys and values)
        assert len(repeats.calls) == 2 * model.config.num_hidden_layers
        repeats.calls.clear()
        original = sdpa_attention.use_gqa_in_sdpa
        with _compat.grouped_query_attention():
            with _compat.grouped_query_attention():  # nested contexts share one installed decision
                ours = _verification_logits(model, cache, drafts)
            assert sdpa_attention.use_gqa_in_sdpa is not original
        assert sdpa_attention.use_gqa_in_sdpa is original
    assert repeats.calls == []
    assert torch.equal(ours, transformers_logits)


def test_other_threads_keep_transformers_path(repeats):
    model = build("llama")
    prompt = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
        with _compat.grouped_query_attention():
            worker = threading.Thread(
                target=_verification_logits, args=(model, cache, prompt[:, :4]), name="other-thread"
            )
            worker.start()
            worker.join()
            _verification_logits(model, cache, prompt[:, :4])
    assert set(repeats.calls) == {"other-thread"}


def test_speculative_generate_never_repeats_heads(repeats):
    """Target prefill and verifications (`Target._forward`) and the Transformer drafter's forwards
    (`ModelDrafter._forward`) run inside the context: no head is repeated, and the output is the target's
    own greedy output."""
    target, drafter = build("llama", seed=0), build("llama", seed=1)
    prompt = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    plain = target.generate(prompt, max_new_tokens=24, do_sample=False)
    repeats.calls.clear()
    ours = hf_specssm.generate(target, prompt, drafter=drafter, max_new_tokens=24, do_sample=False)
    assert repeats.calls == []
    assert torch.equal(ours, plain)


def test_attention_target_scores_inside_the_context(repeats):
    model = build("qwen2")
    sequence = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    target = AttentionTarget(model)
    with torch.no_grad():
        target.score(sequence[:, :10], sequence[:, 10:])
        target.keep(12)
        target.score(sequence[:, :12], sequence[:, 12:])
    assert repeats.calls == []


def test_decision_wraps_an_original_without_value():
    """Releases before 5.17 called `use_gqa_in_sdpa(attention_mask, key)`: the wrapper takes either form."""
    calls = []

    def two_argument_original(attention_mask, key):
        calls.append(attention_mask)
        return False

    decide = attention._gqa_decision(two_argument_original)
    mask, key = torch.ones(1, 1, 5, 12, dtype=torch.bool), torch.zeros(1, 2, 12, 16)
    assert decide(mask, key) is False  # outside the context: the original decides
    with _compat.grouped_query_attention():
        assert decide(mask, key) is True
        assert decide(None, key) is False
    assert len(calls) == 2
