"""oneDNN-prepacked linears: the same products as `F.linear`, undone by the handle, repacked after weight
changes, stock where the measurement says so, and lossless speculative decoding on packed targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hf_specssm
from hf_specssm.kernels import packed_linear
from hf_specssm.kernels.packed_linear import PackingMeasurement, measure_packing, pack_linears
from hf_specssm.kernels.packed_linear.packing import _ATTRIBUTE

from tests.helpers.models import VOCAB, align, build

pytestmark = pytest.mark.skipif(
    not packed_linear.packed_linear_available(torch.float32), reason="this torch build has no oneDNN linear"
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _linear(dtype: torch.dtype = torch.float32, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(37, 53, bias=bias).to(dtype)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.mark.parametrize(
    ("dtype", "bias", "shape"),
    [
        pytest.param(torch.float32, True, (1, 37), id="fp32-one-row"),
        pytest.param(torch.float32, False, (2, 9, 37), id="fp32-3d-no-bias"),
        pytest.param(torch.float32, True, (3, 5, 37), id="fp32-3d"),
        pytest.param(torch.bfloat16, True, (1, 9, 37), id="bf16-3d"),
    ],
)
def test_packed_products_equal_f_linear(dtype, bias, shape):
    if not packed_linear.packed_linear_available(dtype):
        pytest.skip(f"no oneDNN {dtype} linear here")
    module = _linear(dtype, bias)
    input = torch.randn(*shape).to(dtype)
    with torch.no_grad():
        expected = F.linear(input, module.weight, module.bias)
        handle = pack_linears(module, mode="always")
        assert handle.modules == [module]
        actual = module(input)
        strided = module(input.transpose(0, -2).contiguous().transpose(0, -2))  # a non-contiguous input
    assert actual.shape == expected.shape
    assert _relative_error(actual, expected) < TOLERANCE[dtype]
    assert _relative_error(strided, expected) < TOLERANCE[dtype]


def test_remove_restores_the_stock_forward():
    module = _linear()
    input = torch.randn(4, 37)
    with torch.no_grad(), pack_linears(module, mode="always") as handle:
        assert "forward" in module.__dict__ and handle.extra_bytes == 53 * 37 * 4
    assert "forward" not in module.__dict__ and not hasattr(module, _ATTRIBUTE)
    assert not handle.packed
    with torch.no_grad():
        assert torch.equal(module(input), F.linear(input, module.weight, module.bias))


def test_suspended_runs_the_stock_product_and_packs_again_after(monkeypatch):
    module = _linear()
    calls = []
    original = packed_linear.packing._packed_product
    monkeypatch.setattr(
        packed_linear.packing, "_packed_product", lambda *args: calls.append(1) or original(*args)
    )
    input = torch.randn(3, 37)
    with torch.no_grad():
        handle = pack_linears(module, mode="always")
        calls.clear()
        with handle.suspended():
            assert torch.equal(module(input), F.linear(input, module.weight, module.bias))
        assert calls == []
        module(input)
    assert calls == [1] and handle.packed


def test_a_weight_changed_in_place_is_packed_again():
    """After `weight.mul_(2)` the packed product follows the new weight; a packed copy that is not
    refreshed (its version forged to the new one) would not — the check the forward makes."""
    module = _linear()
    input = torch.randn(5, 37)
    with torch.no_grad():
        pack_linears(module, mode="always")
        module(input)
        module.weight.mul_(2)
        refreshed = module(input)
        assert _relative_error(refreshed, F.linear(input, module.weight, module.bias)) < 1e-5
        module.weight.mul_(0.5)
        getattr(module, _ATTRIBUTE).version = module.weight._version  # forged: the stale copy stays
        stale = module(input)
    assert _relative_error(stale, F.linear(input, module.weight, module.bias)) > 0.1


def test_autograd_falls_back_to_the_stock_product():
    module = _linear()
    pack_linears(module, mode="always")
    input = torch.randn(3, 37, requires_grad=True)
    module(input).sum().backward()
    assert input.grad is not None and module.weight.grad is not None
    assert torch.allclose(input.grad, module.weight.sum(dim=0).expand(3, -1))


def _fake_measurement(stock_ms: tuple[float, ...], packed_ms: tuple[float, ...]) -> PackingMeasurement:
    return PackingMeasurement(
        (53, 37),
        torch.float32,
        (1, 2, 9),
        tuple(s / 1e3 for s in stock_ms),
        tuple(p / 1e3 for p in packed_ms),
    )


@pytest.mark.parametrize(
    ("stock", "packed", "start"),
    [
        pytest.param((1, 2, 5), (2, 1, 1), 2, id="stock-wins-one-row"),
        pytest.param((1, 2, 5), (0.5, 1, 1), 1, id="packed-wins-everywhere"),
        pytest.param((1, 2, 5), (2, 3, 6), None, id="stock-wins-everywhere"),
        pytest.param((1, 2, 5), (0.5, 3, 1), 9, id="only-the-most-rows"),
    ],
)
def test_packed_from_rows(stock, packed, start):
    assert _fake_measurement(stock, packed).packed_from_rows == start


def test_auto_keeps_the_stock_product_below_the_measured_row_count(monkeypatch):
    """A measurement where stock wins for one row: one-row inputs take `F.linear`, nine rows the packed
    product (counted), and a measurement where stock always wins packs nothing."""
    module = _linear()
    calls = []
    original = packed_linear.packing._packed_product
    monkeypatch.setattr(
        packed_linear.packing, "_packed_product", lambda *args: calls.append(1) or original(*args)
    )
    monkeypatch.setattr(
        packed_linear.packing, "measure_packing", lambda *args: _fake_measurement((1, 2, 5), (2, 1, 1))
    )
    with torch.no_grad():
        handle = pack_linears(module)
        assert "from 2 row(s) on" in handle.reason
        calls.clear()  # the availability probe's product
        module(torch.randn(1, 37))
        assert calls == []
        module(torch.randn(9, 37))
        assert calls == [1]
        handle.remove()
        monkeypatch.setattr(
            packed_linear.packing, "measure_packing", lambda *args: _fake_measurement((1, 2, 5), (2, 3, 6))
        )
        handle = pack_linears(module)
    assert not handle.packed and "stock is faster" in handle.reason


def test_auto_measures_a_real_layer():
    module = _linear()
    measurement = measure_packing(module, rows=(1, 4), repeats=2)
    assert measurement.shape == (53, 37) and len(measurement.stock_s) == len(measurement.packed_s) == 2
    assert all(s > 0 for s in measurement.stock_s + measurement.packed_s)
    assert "53×37 float32" in measurement.describe()


@pytest.mark.parametrize(
    ("stock", "layouts", "chosen"),
    [
        pytest.param(
            (2, 4, 9), ((1, (1.00, 3, 5)), (16, (1.01, 2, 3))), 16, id="many-rows-layout-as-fast-for-one"
        ),
        pytest.param((2, 4, 9), ((1, (1.00, 3, 5)), (16, (1.05, 2, 3))), 1, id="one-row-would-slow-down"),
        pytest.param((0.9, 4, 9), ((1, (1.00, 3, 5)), (16, (1.05, 2, 3))), 16, id="stock-takes-one-row"),
        pytest.param((2, 4, 9), ((1, (1.00, 2, 3)), (16, (1.00, 2, 3))), 1, id="tie-keeps-fewer-rows"),
        pytest.param((2, 4, 9), ((1, (1.10, 3, 5)), (16, (1.00, 3, 6))), 16, id="faster-for-one-row-only"),
    ],
)
def test_choose_layout(stock, layouts, chosen):
    """The layout whose module (packed where it beats stock from some row count on, stock below) takes the
    least total time, among those that run the fewest rows (a decoding step) within `ONE_ROW_SLACK` of the
    best: a layout slower for one row still wins where stock serves one row anyway."""
    assert packed_linear.choose_layout((1, 2, 9), stock, layouts) == chosen


def test_the_measured_layout_is_packed_and_kept_when_repacking(monkeypatch):
    """`pack_linears` packs in the layout its measurement chose, and a weight changed in place is repacked
    in the same layout; `measure_packing` times every layout and reports the chosen one's times."""
    measurement = measure_packing(_linear(), rows=(1, 4), repeats=2, layout_rows=(1, 16))
    assert [layout for layout, _ in measurement.layouts] == [1, 16]
    assert dict(measurement.layouts)[measurement.layout_rows] == measurement.packed_s
    layouts = []
    original = packed_linear.packing._reorder
    monkeypatch.setattr(
        packed_linear.packing,
        "_reorder",
        lambda weight, rows=1: layouts.append(rows) or original(weight, rows),
    )
    forced = PackingMeasurement((53, 37), torch.float32, (1, 9), (1.0, 1.0), (0.5, 0.5), 16, ())
    monkeypatch.setattr(packed_linear.packing, "measure_packing", lambda *args: forced)
    module = _linear()
    input = torch.randn(9, 37)
    with torch.no_grad():
        handle = pack_linears(module)
        assert "layout for 16 rows" in handle.reason and getattr(module, _ATTRIBUTE).layout_rows == 16
        module.weight.mul_(2)
        repacked = module(input)
    assert layouts[-2:] == [16, 16]
    assert _relative_error(repacked, F.linear(input, module.weight, module.bias)) < 1e-5


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda: pack_linears(_linear(), mode="fast"), "mode must be one of", id="mode"),
        pytest.param(lambda: measure_packing(nn.Conv1d(2, 2, 1)), "needs an nn.Linear", id="not-linear"),
        pytest.param(lambda: measure_packing(_linear(), rows=(4, 1)), "increasing positive", id="rows"),
        pytest.param(lambda: measure_packing(_linear().half()), "needs a CPU weight", id="dtype"),
        pytest.param(lambda: measure_packing(_linear(), layout_rows=(0,)), "layout_rows", id="layout"),
    ],
)
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_packed_model_is_packed_once_and_nothing_else_is_touched():
    model = nn.Sequential(_linear(), nn.ReLU(), nn.Linear(53, 7).half())
    first = pack_linears(model, mode="always")
    second = pack_linears(model, mode="always")
    assert first.modules == [model[0]] and not second.packed
    first.remove()
    assert pack_linears(model, mode="always").modules == [model[0]]


@pytest.mark.parametrize("target_kind", ["mamba2", "bamba", "llama"])
def test_speculative_decoding_on_a_packed_target_equals_stock_greedy(target_kind):
    """Greedy output of a packed target, plain and with a Mamba drafter, equals the stock target's."""
    target = hf_specssm.enable(build(target_kind, seed=0))
    drafter_model = build("mamba2", seed=1)
    align(target, drafter_model)
    prompt = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(7))
    reference = target.generate(prompt, max_new_tokens=24, do_sample=False)
    with pack_linears(target, mode="always") as handle:
        assert handle.packed
        plain = target.generate(prompt, max_new_tokens=24, do_sample=False)
        drafter = hf_specssm.ModelDrafter(drafter_model, num_draft_tokens=4, schedule="constant")
        speculative = target.generate(prompt, assistant_model=drafter, max_new_tokens=24, do_sample=False)
        stats = target.last_speculation_stats
    assert torch.equal(plain, reference)
    assert torch.equal(speculative, reference)
    assert any(0 < a < d for a, d in zip(stats.accepted_lengths, stats.draft_lengths, strict=True))
