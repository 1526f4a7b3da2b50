"""Few queries over a KV cache as grouped matrix products (`kernels.few_query_attention`), the per-shape
choice of path, and its use inside our forwards (`_compat.grouped_query_attention`)."""

from __future__ import annotations

import copy
import itertools
import threading

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_utils import AttentionInterface

import hf_specssm
from hf_specssm import _compat
from hf_specssm.kernels import few_query_attention
from hf_specssm.kernels.few_query_attention import (
    ENVIRONMENT_SWITCH,
    PathChoice,
    attention_mode,
    grouped_attention,
    shape_class,
)

from tests.helpers.models import VOCAB, build
from tests.helpers.sampling import no_eos
from tests.helpers.scripted import ScriptedDrafter

_TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _inputs(dtype, heads, queries, length, batch=1, value_dim=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query_heads, kv_heads = heads
    query = torch.randn(batch, query_heads, queries, 64, generator=generator).to(dtype)
    key = torch.randn(batch, kv_heads, length, 64, generator=generator).to(dtype)
    value = torch.randn(batch, kv_heads, length, value_dim, generator=generator).to(dtype)
    return query, key, value


def _causal_mask(batch, heads, queries, length):
    return (
        torch.ones(queries, length, dtype=torch.bool)
        .tril(length - queries)[None, None]
        .repeat(batch, heads, 1, 1)
    )


def _sdpa_reference(query, key, value, mask, scale):
    """torch's SDPA over keys and values repeated per query head (transformers' `repeat_kv` path), in
    float64: `[B, T, H, Dv]`."""
    groups = query.shape[1] // key.shape[1]
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    output = F.scaled_dot_product_attention(
        query.double(),
        key.double().repeat_interleave(groups, 1),
        value.double().repeat_interleave(groups, 1),
        attn_mask=mask,
        scale=scale,
    )
    return output.transpose(1, 2)


_CASES = [
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
        ((4, 2), (12, 2), (8, 8)),
        ((1, 37), (7, 537), (17, 203), (32, 61)),
        ("none", "bool", "additive", "padded", "per-head", "empty-row"),
    )
    if not (mask == "none" and queries > 1)
]


@pytest.mark.parametrize(("dtype", "heads", "queries", "length", "mask_kind"), _CASES)
def test_grouped_products_equal_repeated_sdpa(dtype, heads, queries, length, mask_kind):
    batch = 2 if mask_kind == "padded" else 1
    query, key, value = _inputs(dtype, heads, queries, length, batch, value_dim=48, seed=queries * length)
    mask = None
    if mask_kind != "none":
        mask = _causal_mask(batch, heads[0] if mask_kind == "per-head" else 1, queries, length)
    if mask_kind == "padded":
        mask[1, :, :, :5] = False  # a left-padded second row
    if mask_kind == "per-head":
        mask[:, 1::3, :, : length // 2] = False  # heads of one group see different keys
    if mask_kind == "empty-row":
        mask[..., queries // 2, :] = False  # SDPA gives such a row zeros
    if mask_kind == "additive":
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    scale = 0.125
    ours = grouped_attention(query, key, value, mask, scale)
    expected = _sdpa_reference(query, key, value, mask, scale)
    assert ours.shape == (batch, queries, heads[0], 48) and ours.dtype == dtype and ours.is_contiguous()
    torch.testing.assert_close(ours.double(), expected, atol=_TOLERANCE[dtype], rtol=_TOLERANCE[dtype])
    if mask_kind == "empty-row":
        assert torch.equal(ours[:, queries // 2], torch.zeros_like(ours[:, queries // 2]))


def test_a_wrong_grouping_is_caught():
    """The negative control of the table above: pairing query heads with key/value heads the other way
    (`h % H_kv` instead of `h // G`) leaves the tolerance."""
    query, key, value = _inputs(torch.float32, (4, 2), 5, 40)
    mask = _causal_mask(1, 1, 5, 40)
    swap = torch.tensor([0, 2, 1, 3])  # heads 1 and 2 trade key/value heads (swapping back after)
    wrong = grouped_attention(query[:, swap], key, value, mask, 0.125)[:, :, swap]
    expected = _sdpa_reference(query, key, value, mask, 0.125)
    torch.testing.assert_close(wrong[:, :, [0, 3]].double(), expected[:, :, [0, 3]], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(wrong.double(), expected, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_errs_no_more_than_sdpa(dtype):
    """Large scores (a trained model's sharp attention): the products' error against float64 stays within
    SDPA's own in that dtype (bf16 scores before the softmax would err ~9× more, the negative control)."""
    query, key, value = _inputs(torch.float32, (12, 2), 7, 600, seed=5)
    query, key, value = (query * 3).to(dtype), (key * 3).to(dtype), value.to(dtype)
    mask = _causal_mask(1, 1, 7, 600)
    expected = _sdpa_reference(query, key, value, mask, 128**-0.5)
    sdpa = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=128**-0.5, enable_gqa=True)
    sdpa_error = (sdpa.transpose(1, 2).double() - expected).abs().mean()
    ours = grouped_attention(query, key, value, mask, 128**-0.5)
    assert ours.dtype == dtype
    assert (ours.double() - expected).abs().mean() <= 1.2 * sdpa_error
    # the control: the same products with the scores rounded to the inputs' dtype
    rounded = torch.matmul(query.reshape(1, 2, 42, 64), key.transpose(-1, -2)).float() * 128**-0.5
    rounded = rounded.view(1, 2, 6, 7, 600).masked_fill(~mask[:, :, None], float("-inf")).softmax(-1)
    rounded = torch.matmul(rounded.view(1, 2, 42, 600), value.float()).view(1, 12, 7, 64).transpose(1, 2)
    assert (rounded.double() - expected).abs().mean() > 2 * sdpa_error


class _Clock:
    """A stopwatch that reads out scripted times."""

    def __init__(self, times: list[float]) -> None:
        self.times = iter(times)

    def __call__(self) -> float:
        return next(self.times)


def _scripted(sdpa_s: float, grouped_s: float) -> _Clock:
    # per measured call pair: sdpa start, end, grouped start, end
    times, now = [], 0.0
    for _ in range(few_query_attention.grouped.MEASURED_CALLS):
        times += [now, now + sdpa_s, now + sdpa_s, now + sdpa_s + grouped_s]
        now += sdpa_s + grouped_s
    return _Clock(times)


@pytest.mark.parametrize(
    ("sdpa_s", "grouped_s", "grouped_wins"),
    [
        pytest.param(10.0, 2.0, True, id="grouped much faster"),
        pytest.param(10.0, 9.7, False, id="a near tie keeps SDPA"),
        pytest.param(2.0, 10.0, False, id="SDPA faster"),
    ],
)
def test_the_measured_path_serves_later_calls_of_the_shape_class(sdpa_s, grouped_s, grouped_wins):
    choice = PathChoice(clock=_scripted(sdpa_s, grouped_s))
    query, key, value = _inputs(torch.float32, (4, 2), 5, 100)
    mask = _causal_mask(1, 1, 5, 100)
    calls = []

    def sdpa():
        calls.append("sdpa")
        return _sdpa_reference(query, key, value, mask, 0.125).float().contiguous()

    first = choice.attend(query, key, value, mask, 0.125, sdpa)
    assert len(calls) == 1 + few_query_attention.grouped.MEASURED_CALLS  # warm-up and timed calls
    [measurement] = choice.measurements.values()
    assert measurement.grouped_wins is grouped_wins
    # the first call already returns the chosen path's output (every call of the class rounds alike)
    chosen = grouped_attention(query, key, value, mask, 0.125) if grouped_wins else sdpa()
    assert torch.equal(first, chosen)
    calls.clear()
    # 7 queries over 120 keys round up to the same powers of two: no new measurement (the clock is spent)
    query, key, value = _inputs(torch.float32, (4, 2), 7, 120, seed=1)
    mask = _causal_mask(1, 1, 7, 120)
    choice.attend(query, key, value, mask, 0.125, sdpa)
    assert calls == ([] if grouped_wins else ["sdpa"])
    assert len(choice.measurements) == 1


def test_a_class_measured_meanwhile_by_another_thread_decides():
    """Two threads measuring one shape class at once: the first stored measurement decides, and the other
    thread's call returns that path's output too (every call of a class rounds alike)."""
    query, key, value = _inputs(torch.float32, (4, 2), 5, 100)
    mask = _causal_mask(1, 1, 5, 100)
    shape = shape_class(query, key, value, mask)
    scripted = _scripted(10.0, 2.0)  # this thread measures the products faster

    def clock() -> float:
        # the other thread stores its measurement (SDPA faster) while this one is still timing
        choice.measurements.setdefault(shape, few_query_attention.Measurement(1.0, 5.0))
        return scripted()

    choice = PathChoice(clock=clock)
    calls = []

    def sdpa():
        calls.append("sdpa")
        return _sdpa_reference(query, key, value, mask, 0.125).float().contiguous()

    output = choice.attend(query, key, value, mask, 0.125, sdpa)
    assert not choice.measurements[shape].grouped_wins
    assert torch.equal(output, sdpa())
    assert len(calls) == 2 + few_query_attention.grouped.MEASURED_CALLS + 1  # warm-up, timed, followed, here


def test_shape_classes_split_by_powers_of_two():
    query, key, value = _inputs(torch.float32, (4, 2), 8, 128)
    longer_query, longer_key, longer_value = _inputs(torch.float32, (4, 2), 9, 129)
    assert shape_class(query, key, value, None) != shape_class(longer_query, key, value, None)
    assert shape_class(query, key, value, None) != shape_class(query, longer_key, longer_value, None)
    assert shape_class(query, key, value, None) != shape_class(query.bfloat16(), key, value, None)


@pytest.mark.parametrize("mode", ["sdpa", "grouped"])
def test_a_forced_path_measures_nothing(mode):
    choice = PathChoice(clock=_Clock([]))
    query, key, value = _inputs(torch.float32, (4, 2), 3, 30)
    calls = []

    def sdpa():
        calls.append("sdpa")
        return _sdpa_reference(query, key, value, None, 0.125).float()

    choice.attend(query[:, :, :1], key, value, None, 0.125, sdpa, mode=mode)
    assert calls == (["sdpa"] if mode == "sdpa" else [])
    assert choice.measurements == {}


def test_the_environment_switch_is_checked(monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_SWITCH, raising=False)
    assert attention_mode() == "auto"
    monkeypatch.setenv(ENVIRONMENT_SWITCH, " Grouped ")
    assert attention_mode() == "grouped"
    monkeypatch.setenv(ENVIRONMENT_SWITCH, "fast")
    with pytest.raises(ValueError, match=ENVIRONMENT_SWITCH):
        attention_mode()


class _GroupedCalls:
    """`grouped_attention` as the path choice calls it, counted by thread name and query count."""

    def __init__(self, real, drop_mask: bool = False) -> None:
        self.real, self.drop_mask, self.calls = real, drop_mask, []

    def __call__(self, query, key, value, mask, scale):
        self.calls.append((threading.current_thread().name, query.shape[2]))
        return self.real(query, key, value, None if self.drop_mask else mask, scale)


@pytest.fixture
def grouped_calls(monkeypatch) -> _GroupedCalls:
    monkeypatch.setenv(ENVIRONMENT_SWITCH, "grouped")
    counter = _GroupedCalls(grouped_attention)
    monkeypatch.setattr(few_query_attention.grouped, "grouped_attention", counter)
    return counter


def test_our_verification_forwards_use_the_grouped_products(grouped_calls):
    model = build("llama")  # 4 query heads over 2 key/value heads
    prompt = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    drafts = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    original = AttentionInterface._global_mapping["sdpa"]
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
        expected = model(input_ids=drafts, past_key_values=copy.deepcopy(cache)).logits
        assert grouped_calls.calls == []  # outside the context: transformers' path
        with _compat.grouped_query_attention():
            # a prefill longer than MAX_QUERIES keeps SDPA; the verification takes the products
            model(input_ids=prompt, use_cache=True)
            assert grouped_calls.calls == []
            ours = model(input_ids=drafts, past_key_values=copy.deepcopy(cache)).logits
            assert AttentionInterface._global_mapping["sdpa"] is not original
        assert AttentionInterface._global_mapping["sdpa"] is original
    assert grouped_calls.calls == [("MainThread", 6)] * model.config.num_hidden_layers
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_other_threads_keep_sdpa(grouped_calls):
    model = build("llama")
    prompt = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values

        def verify():
            model(input_ids=prompt[:, :4], past_key_values=copy.deepcopy(cache))

        with _compat.grouped_query_attention():
            worker = threading.Thread(target=verify, name="other-thread")
            worker.start()
            worker.join()
            verify()
    assert {name for name, _ in grouped_calls.calls} == {"MainThread"}


@pytest.mark.parametrize("kind", ["llama", "bamba"])
def test_speculative_greedy_output_is_plain_with_the_products(grouped_calls, kind):
    """Prefill, verifications and one-token steps of the target through the grouped products, with drafts
    accepted in full, in part and not at all: the output is the target's own greedy output."""
    target = no_eos(build(kind, seed=0))
    prompt = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    plain = target.generate(prompt, max_new_tokens=24, do_sample=False)
    drafter = ScriptedDrafter(plain, [4, 1, 0, 2], 4, target.config.vocab_size)
    ours = hf_specssm.generate(target, prompt, drafter=drafter, max_new_tokens=24, do_sample=False)
    assert any(queries > 1 for _, queries in grouped_calls.calls)
    assert set(drafter.forced) == {0, 1, 2, 4}
    assert torch.equal(ours, plain)


def test_a_broken_path_leaves_the_verification_logits(monkeypatch):
    """Negative control of the parity tests above: products that ignore the mask let each verification
    query see the drafts after it, and the logits leave transformers'."""
    monkeypatch.setenv(ENVIRONMENT_SWITCH, "grouped")
    broken = _GroupedCalls(grouped_attention, drop_mask=True)
    monkeypatch.setattr(few_query_attention.grouped, "grouped_attention", broken)
    model = build("llama")
    prompt = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    drafts = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
        expected = model(input_ids=drafts, past_key_values=copy.deepcopy(cache)).logits
        with _compat.grouped_query_attention():
            ours = model(input_ids=drafts, past_key_values=copy.deepcopy(cache)).logits
    assert broken.calls
    assert not torch.allclose(ours[:, :-1], expected[:, :-1], atol=1e-3)
