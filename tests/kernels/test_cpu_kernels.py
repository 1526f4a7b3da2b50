"""The compiled CPU kernels (`hf_specssm.kernels.cpu`) against their torch references and loop definitions.

The build needs a C++ compiler (CI has gcc); where it cannot be had the tests skip and every caller runs
the torch references, which `test_the_references_run_when_the_kernels_are_switched_off` checks."""

from __future__ import annotations

import pytest
import torch

from hf_specssm.kernels import cpu as cpu_module
from hf_specssm.kernels.tree_scan import tree_scan, tree_scan_diagonal
from hf_specssm.kernels.tree_scan.reference import tree_scan_diagonal_torch, tree_scan_naive, tree_scan_torch
from hf_specssm.ssm import state_replay
from hf_specssm.ssm.state_replay import verification_conv, verification_scan
from hf_specssm.ssm.tree_scan import _TreePlan

from tests.helpers.kernel_cases import ancestor_mask, random_parents, require_cpu_kernels


@pytest.fixture(scope="module")
def kernels():
    return require_cpu_kernels()


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=2e-5, msg=lambda m: f"{what}: {m}")


# (Bt, T, H, P, G, N): odd sizes, grouped heads, one position, a long window
MAMBA2_SHAPES = [(1, 9, 3, 5, 1, 7), (2, 13, 4, 17, 2, 19), (1, 1, 2, 3, 1, 5), (1, 40, 6, 8, 3, 16)]


def _mamba2_case(shape, generator):
    batch, length, heads, head_dim, groups, state = shape
    x = torch.randn(batch, length, heads, head_dim, generator=generator)
    dt = torch.nn.functional.softplus(torch.randn(batch, length, heads, generator=generator))
    A = -torch.rand(heads, generator=generator) * 4
    B = torch.randn(batch, length, groups, state, generator=generator)
    C = torch.randn(batch, length, groups, state, generator=generator)
    h0 = torch.randn(batch, heads, head_dim, state, generator=generator)
    D = torch.randn(heads, generator=generator)
    return x, dt, A, B, C, h0, D


@pytest.mark.parametrize("shape", MAMBA2_SHAPES, ids=str)
def test_masked_chunk_scan_matches_the_tree_definition(kernels, shape):
    generator = torch.Generator().manual_seed(1)
    x, dt, A, B, C, h0, D = _mamba2_case(shape, generator)
    length = shape[1]
    for parents in (torch.arange(length) - 1, random_parents(length, generator)):
        mask = ancestor_mask(parents)
        expected = tree_scan_naive(x, dt, A, B, C, h0, parents, D)
        _close(
            kernels.masked_chunk_scan(x, dt, A, B, C, h0, mask, D), expected, f"parents {parents.tolist()}"
        )
        _close(tree_scan(x, dt, A, B, C, h0, mask, D), expected, "dispatch")
        # no skip term, zero state
        _close(
            kernels.masked_chunk_scan(x, dt, A, B, C, torch.empty(0), mask, torch.empty(0)),
            tree_scan_torch(x, dt, A, B, C, torch.zeros_like(h0), mask, None),
            "no D, no state",
        )
    # negative control: the state matters
    moved = kernels.masked_chunk_scan(x, dt, A, B, C, h0 * 2, ancestor_mask(torch.arange(length) - 1), D)
    assert not torch.allclose(moved, tree_scan_naive(x, dt, A, B, C, h0, torch.arange(length) - 1, D))


def test_masked_chunk_scan_takes_one_mask_per_row(kernels):
    generator = torch.Generator().manual_seed(2)
    x, dt, A, B, C, h0, D = _mamba2_case((2, 7, 2, 3, 1, 5), generator)
    parents = [random_parents(7, generator) for _ in range(2)]
    masks = torch.stack([ancestor_mask(p) for p in parents])
    out = kernels.masked_chunk_scan(x, dt, A, B, C, h0, masks, D)
    for row in range(2):
        _close(
            out[row : row + 1],
            tree_scan_naive(
                *(t[row : row + 1] for t in (x, dt)),
                A,
                B[row : row + 1],
                C[row : row + 1],
                h0[row : row + 1],
                parents[row],
                D,
            ),
            f"row {row}",
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verification_scan_uses_the_kernel_and_matches_the_torch_form(kernels, dtype, monkeypatch):
    generator = torch.Generator().manual_seed(3)
    x, _, A, B, C, h0, D = _mamba2_case((1, 9, 4, 6, 2, 8), generator)
    raw_dt, dt_bias = torch.randn(1, 9, 4, generator=generator), torch.randn(4, generator=generator)
    args = (x.to(dtype), raw_dt.to(dtype), A, B.to(dtype), C.to(dtype))
    kwargs = {"D": D, "dt_bias": dt_bias, "initial_states": h0, "dt_softplus": True}
    calls = []

    class Counting:
        def masked_chunk_scan(self, *inputs):
            calls.append(inputs)
            return kernels.masked_chunk_scan(*inputs)

    monkeypatch.setattr(state_replay, "cpu_kernels", Counting)
    out = verification_scan(*args, **kwargs)
    assert calls, "the compiled kernel did not run"
    monkeypatch.setenv(cpu_module.ENVIRONMENT_SWITCH, "0")
    _close(out, verification_scan(*args, **kwargs), "kernel vs torch form")


@pytest.mark.parametrize("parents_kind", ["chain", "tree"])
@pytest.mark.parametrize("shape", [(1, 9, 11, 4), (2, 17, 33, 16), (1, 1, 5, 3)], ids=str)
def test_tree_scan_diagonal_matches_a_loop_over_each_path(kernels, shape, parents_kind):
    batch, length, channels, state = shape
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(batch, length, channels, generator=generator)
    dt = torch.nn.functional.softplus(torch.randn(batch, length, channels, generator=generator))
    A = -torch.rand(channels, state, generator=generator) * 8
    B, C = (torch.randn(batch, length, state, generator=generator) for _ in range(2))
    h0 = torch.randn(batch, channels, state, generator=generator)
    D = torch.randn(channels, generator=generator)
    parents = torch.arange(length) - 1 if parents_kind == "chain" else random_parents(length, generator)
    # the definition: each node's state is its path's recurrence from h0
    expected = torch.empty(batch, length, channels)
    states = {}
    for node, parent in enumerate(parents.tolist()):
        previous = h0 if parent < 0 else states[parent]
        states[node] = (
            torch.exp(dt[:, node, :, None] * A) * previous
            + (dt[:, node] * x[:, node])[..., None] * B[:, node, None]
        )
        expected[:, node] = (states[node] * C[:, node, None]).sum(-1) + D * x[:, node]
    _close(kernels.tree_scan_diagonal(x, dt, A, B, C, h0, parents, D), expected, "kernel")
    _close(tree_scan_diagonal(x, dt, A, B, C, h0, parents, D), expected, "dispatch")
    _close(tree_scan_diagonal_torch(x, dt, A, B, C, h0, parents, D), expected, "torch reference")
    _close(kernels.tree_scan_diagonal(x, dt, A, B, C, h0, parents, torch.empty(0)), expected - D * x, "no D")
    # negative control: another state gives other outputs
    assert not torch.allclose(kernels.tree_scan_diagonal(x, dt, A, B, C, -h0, parents, D), expected)


def test_tree_scan_diagonal_refuses_parents_out_of_order(kernels):
    x = torch.zeros(1, 3, 2)
    args = (x, x, torch.zeros(2, 4), torch.zeros(1, 3, 4), torch.zeros(1, 3, 4), torch.zeros(1, 2, 4))
    with pytest.raises(RuntimeError, match="parents"):
        kernels.tree_scan_diagonal(*args, torch.tensor([-1, 2, 0]), torch.empty(0))


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_causal_conv_matches_the_shifted_products(kernels, activation, dtype, channels_last, monkeypatch):
    generator = torch.Generator().manual_seed(5)
    channels, length, kernel = 37, 12, 4
    inputs = torch.randn(2, length, channels, generator=generator).to(dtype)
    inputs = inputs.transpose(1, 2) if channels_last else inputs.transpose(1, 2).contiguous()
    weight = torch.randn(channels, kernel, generator=generator).to(dtype)
    bias = torch.randn(channels, generator=generator).to(dtype)
    out = verification_conv(inputs, weight, bias, activation)
    # the definition, in float64
    padded = torch.nn.functional.pad(inputs.double(), (kernel - 1, 0))
    expected = sum(padded[..., k : k + length] * weight.double()[:, k : k + 1] for k in range(kernel))
    expected = (expected + bias.double()[:, None]).to(dtype)
    if activation is not None:
        expected = torch.nn.functional.silu(expected)
    assert out.shape == inputs.shape and out.dtype == dtype
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected.double(), rtol=tolerance, atol=tolerance)
    monkeypatch.setenv(cpu_module.ENVIRONMENT_SWITCH, "0")
    torch.testing.assert_close(
        out, verification_conv(inputs, weight, bias, activation), rtol=tolerance, atol=tolerance
    )


@pytest.mark.parametrize("silu", [True, False])
def test_window_conv_reads_each_positions_own_window(kernels, silu):
    generator = torch.Generator().manual_seed(7)
    channels, kernel, length = 41, 4, 9
    parents = random_parents(length, generator)
    windows = _TreePlan.build(parents).conv_windows(kernel, torch.device("cpu"))  # [T, K]
    extended = torch.randn(2, channels, kernel - 1 + length, generator=generator)
    weight = torch.randn(channels, kernel, generator=generator)
    bias = torch.randn(channels, generator=generator)
    expected = torch.einsum("bctk,ck->bct", extended[:, :, windows], weight) + bias[:, None]
    if silu:
        expected = torch.nn.functional.silu(expected)
    out = kernels.window_conv(extended, windows, weight, bias, silu)
    _close(out, expected, "window conv")
    # negative control: a window that skips the parent reads other columns
    shifted = windows.clone()
    shifted[-1] = windows[0]
    assert not torch.allclose(kernels.window_conv(extended, shifted, weight, bias, silu), expected)
    with pytest.raises(RuntimeError, match="windows"):
        kernels.window_conv(extended, windows + 100, weight, bias, silu)
    # -1 reads zeros (a causal conv's columns before the first)
    unseen = windows.clone()
    unseen[:, 0] = -1
    partial = torch.einsum("bctk,ck->bct", extended[:, :, windows[:, 1:]], weight[:, 1:]) + bias[:, None]
    _close(kernels.window_conv(extended, unseen, weight, bias, False), partial, "window with a zero column")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu", None])
def test_depthwise_conv_adds_the_bias_once_in_every_dtype_and_activation(kernels, dtype, activation):
    generator = torch.Generator().manual_seed(8)
    channels, kernel, length = 23, 4, 7
    windows = _TreePlan.build(random_parents(length, generator)).conv_windows(kernel, torch.device("cpu"))
    extended = torch.randn(1, channels, kernel - 1 + length, generator=generator).to(dtype)
    weight = torch.randn(channels, kernel, generator=generator).to(dtype)
    bias = (torch.randn(channels, generator=generator) * 4).to(dtype)
    out = cpu_module.depthwise_conv(extended, windows, weight, bias, activation)
    expected = (
        torch.einsum("bctk,ck->bct", extended.double()[:, :, windows], weight.double())
        + bias.double()[:, None]
    )
    if activation is not None:
        expected = (
            torch.nn.functional.silu(expected) if activation == "silu" else torch.nn.functional.gelu(expected)
        )
    assert out.dtype == dtype and out.shape == (1, channels, length)
    tolerance = 2e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


def test_the_kernels_stay_off_for_autograd_and_other_devices(kernels):
    x = torch.zeros(1, 2, requires_grad=True)
    with torch.enable_grad():
        assert not cpu_module.use_cpu_kernels(x)
    assert cpu_module.use_cpu_kernels(x.detach())
    assert not cpu_module.use_cpu_kernels(torch.zeros(1, device="meta"))


def test_the_references_run_when_the_kernels_are_switched_off(monkeypatch):
    monkeypatch.setenv(cpu_module.ENVIRONMENT_SWITCH, "0")
    assert cpu_module.cpu_kernels() is None and not cpu_module.use_cpu_kernels(torch.zeros(1))
    generator = torch.Generator().manual_seed(6)
    x, dt, A, B, C, h0, D = _mamba2_case((1, 5, 2, 3, 1, 4), generator)
    parents = torch.arange(5) - 1
    _close(
        tree_scan(x, dt, A, B, C, h0, ancestor_mask(parents), D),
        tree_scan_naive(x, dt, A, B, C, h0, parents, D),
        "torch path",
    )


def test_the_build_is_keyed_by_this_cpu_and_torch_install(monkeypatch):
    first = cpu_module._build_name()
    monkeypatch.setattr(cpu_module, "_cpu_signature", lambda: "x86_64 sse2")
    assert cpu_module._build_name() != first  # a cache built with other instructions is not loaded
    monkeypatch.undo()
    assert cpu_module._build_name() == first
    # another environment's torch builds beside this one instead of over it
    monkeypatch.setattr(torch, "__file__", "/elsewhere/site-packages/torch/__init__.py")
    assert cpu_module._build_name() != first


def _mixer_by_steps(
    projected, window, h0, weight, bias, dt_bias, A, D, norm_weight, groups, state, group, eps, norm_mode=0
):
    """The Mamba2 mixer between its projections, one token at a time (float64): the conv over the last
    `K - 1` window columns and the new inputs, SiLU, softplus time steps, `h = exp(Δ A) h + Δ x ⊗ B`,
    `y = C · h + D x`, then `weight · rms_norm(y · silu(gate))` per group."""
    f64 = [
        t.double() if t is not None else None for t in (projected, window, h0, weight, bias, dt_bias, A, D)
    ]
    projected, window, h, weight, bias, dt_bias, A, D = f64
    batch, length, width = projected.shape
    heads, head_dim = h.shape[1:3]
    inner, channels, kernel = heads * head_dim, weight.shape[0], weight.shape[1]
    gate = projected[..., width - heads - channels - inner : width - heads - channels]
    inputs = torch.cat(
        [
            window[..., window.shape[-1] - (kernel - 1) :],
            projected[..., width - heads - channels : width - heads].transpose(1, 2),
        ],
        dim=-1,
    )
    outputs = []
    h = h.clone()
    for t in range(length):
        column = (inputs[..., t : t + kernel] * weight).sum(-1) + (0 if bias is None else bias)  # [Bt, Cc]
        column = torch.nn.functional.silu(column)
        x = column[:, :inner].view(batch, heads, head_dim)
        B = (
            column[:, inner : inner + groups * state]
            .view(batch, groups, 1, state)
            .repeat_interleave(heads // groups, 1)
        )
        C = (
            column[:, inner + groups * state :]
            .view(batch, groups, 1, state)
            .repeat_interleave(heads // groups, 1)
        )
        delta = torch.nn.functional.softplus(projected[:, t, width - heads :] + dt_bias)[..., None, None]
        h = torch.exp(delta * A[:, None, None]) * h + delta * x[..., None] * B
        y = (h * C).sum(-1) + (0 if D is None else D[:, None] * x)
        gated = torch.nn.functional.silu(gate[:, t])
        if norm_mode == 2:  # the gate alone
            outputs.append(y.reshape(batch, inner) * gated)
            continue
        v = y.reshape(batch, inner) * (gated if norm_mode == 0 else 1.0)
        v = v.view(batch, inner // group, group)
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
        v = norm_weight.double() * v.reshape(batch, inner)
        outputs.append(v * gated if norm_mode == 1 else v)
    return torch.stack(outputs, dim=1).float()


# (Bt, T, H, P, G, N, K, window columns, norm groups, extra leading columns, conv bias)
MIXER_CASES = [
    (1, 9, 4, 8, 1, 16, 4, 4, 1, 0, True),
    (2, 5, 6, 4, 2, 8, 4, 3, 2, 3, False),
    (1, 2, 2, 3, 1, 5, 3, 7, 1, 0, True),
    (2, 17, 4, 5, 4, 6, 2, 1, 4, 1, True),
]


@pytest.mark.parametrize("norm_mode", [0, 1, 2], ids=["gate-norm", "norm-gate", "gate"])
@pytest.mark.parametrize("case", MIXER_CASES, ids=str)
def test_mamba2_verification_mixer_matches_the_mixer_step_by_step(kernels, case, norm_mode):
    batch, length, heads, head_dim, groups, state, kernel, columns, norm_groups, extra, with_bias = case
    generator = torch.Generator().manual_seed(9)
    inner = heads * head_dim
    channels = inner + 2 * groups * state
    width = extra + inner + channels + heads
    projected = torch.randn(batch, length, width, generator=generator)
    window = torch.randn(batch, channels, columns, generator=generator)
    h0 = torch.randn(batch, heads, head_dim, state, generator=generator)
    weight = torch.randn(channels, kernel, generator=generator) * 0.5
    bias = torch.randn(channels, generator=generator) if with_bias else None
    dt_bias, D = torch.randn(heads, generator=generator), torch.randn(heads, generator=generator)
    A = -torch.rand(heads, generator=generator) * 4
    norm_weight = torch.randn(inner, generator=generator)
    group, eps = inner // norm_groups, 1e-5

    def run(state_in, taps=weight):
        return kernels.mamba2_verification_mixer(
            projected,
            window,
            state_in,
            taps.t().contiguous(),
            bias if bias is not None else torch.empty(0),
            dt_bias,
            A,
            D,
            norm_weight,
            groups,
            state,
            group,
            eps,
            norm_mode,
            False,
            torch.empty(0),
            torch.empty(0),
        )[0]

    expected = _mixer_by_steps(
        projected, window, h0, weight, bias, dt_bias, A, D, norm_weight, groups, state, group, eps, norm_mode
    )
    out = run(h0)
    _close(out, expected, f"case {case}")
    assert torch.equal(window, window.clone()) and out.shape == (batch, length, inner)
    # negative controls: the carried state and the window's history both matter
    assert not torch.allclose(run(torch.zeros_like(h0)), expected, atol=1e-3)
    assert not torch.allclose(
        run(h0, weight * torch.tensor([0.0] + [1.0] * (kernel - 1))), expected, atol=1e-3
    )


def test_mamba2_verification_mixer_leaves_its_inputs_alone_and_refuses_bad_shapes(kernels):
    generator = torch.Generator().manual_seed(10)
    heads, head_dim, state, kernel = 2, 4, 3, 4
    inner, channels = heads * head_dim, heads * head_dim + 2 * state
    projected = torch.randn(1, 5, inner + channels + heads, generator=generator)
    window = torch.randn(1, channels, kernel, generator=generator)
    h0 = torch.randn(1, heads, head_dim, state, generator=generator)
    taps = torch.randn(kernel, channels, generator=generator)
    args = [torch.empty(0), torch.randn(heads), -torch.rand(heads), torch.randn(heads), torch.randn(inner)]
    saved = [t.clone() for t in (projected, window, h0)]

    def call(projected=projected, window=window, group=inner, mode=0, windows=None, mask=None):
        # empty windows and mask: a chain (causal windows and mask)
        tree = [torch.empty(0) if t is None else t for t in (windows, mask)]
        return kernels.mamba2_verification_mixer(
            projected, window, h0, taps, *args, 1, state, group, 1e-6, mode, False, *tree
        )

    call()
    assert all(torch.equal(a, b) for a, b in zip((projected, window, h0), saved))
    refusals = [
        ("narrower", {"projected": projected[..., 1:]}),
        ("window", {"window": window[..., :2]}),
        ("groups", {"group": 3}),
        ("windows", {"windows": torch.full((5, 4), 8)}),  # a tree's windows index past the columns
        ("mask", {"mask": torch.ones(4, 4).bool()}),
        ("norm_mode", {"mode": 3}),
        ("float32", {"projected": projected.double()}),
    ]
    for message, change in refusals:
        with pytest.raises(RuntimeError, match=message):
            call(**change)


def _llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's forward: float32 statistics, the cast back before the product with the weight."""
    normalized = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * normalized.to(x.dtype)


# (input shape, contiguous): odd widths, one value, rows past the one-thread grain, a strided view
RMS_NORM_CASES = [
    ((1, 9, 1024), True),
    ((3, 5, 7), True),
    ((2, 1), True),
    ((70, 1000), True),
    ((4, 6, 33), False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", RMS_NORM_CASES, ids=str)
def test_rms_norm_equals_llama_rms_norm(kernels, case, dtype):
    """`rms_norm` is LlamaRMSNorm's arithmetic: float32 to rounding; in bf16 rounded where the module
    rounds (nearly every value identical, none more than one bf16 place apart). Negative control: the
    form with `(1 + weight)` is far from it."""
    shape, contiguous = case
    generator = torch.Generator().manual_seed(sum(shape))
    scales = torch.rand(*shape[:-1], 1, generator=generator) * 50 + 0.01
    x = (torch.randn(*shape, generator=generator) * scales).to(dtype)
    if not contiguous:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
        assert not x.is_contiguous()
    weight = torch.randn(shape[-1], generator=generator).to(dtype)
    ours = kernels.rms_norm(x, weight, 1e-5)
    expected = _llama_rms_norm(x, weight, 1e-5)
    assert ours.shape == x.shape and ours.dtype == dtype
    if dtype == torch.float32:
        _close(ours, expected, "rms_norm")
    else:
        difference = (ours.float() - expected.float()).abs()
        assert bool((difference <= expected.float().abs() * 2.0**-7).all())
        assert float((difference == 0).float().mean()) >= 0.99
    shifted = _llama_rms_norm(x, 1 + weight, 1e-5)
    assert (ours.float() - shifted.float()).abs().max() > 0.5


def test_rms_norm_refuses_mismatched_inputs(kernels):
    x, weight = torch.randn(2, 8), torch.randn(8)
    refusals = [
        ("one dtype", (x, weight.bfloat16())),
        ("weight must be", (x, torch.randn(7))),
        ("float32 or bfloat16", (x.double(), weight.double())),
    ]
    for message, inputs in refusals:
        with pytest.raises(RuntimeError, match=message):
            kernels.rms_norm(*inputs, 1e-6)


def test_timed_kernels_times_this_threads_calls_and_changes_no_result(kernels):
    import threading

    x, weight = torch.randn(3, 40), torch.rand(40) + 0.5
    expected = kernels.rms_norm(x, weight, 1e-6)
    assert cpu_module.cpu_kernels() is kernels  # outside the context: the extension itself
    elsewhere: list = []
    with cpu_module.timed_kernels() as timings:
        timed = cpu_module.cpu_kernels()
        assert timed is not kernels
        assert torch.equal(timed.rms_norm(x, weight, 1e-6), expected)
        timed.rms_norm(x, weight, 1e-6)
        worker = threading.Thread(target=lambda: elsewhere.append(cpu_module.cpu_kernels()))
        worker.start()
        worker.join()
    assert set(timings) == {"rms_norm"} and timings["rms_norm"] > 0
    assert elsewhere == [kernels]  # another thread is not timed
    assert cpu_module.cpu_kernels() is kernels
