"""transformers' RMSNorms through the compiled kernel while fused mixers verify (`hf_specssm.ssm.lean_norm`)."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers.models.mamba2.modeling_mamba2 import Mamba2RMSNorm
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm

from hf_specssm import targets as verification
from hf_specssm.kernels.cpu import cpu_kernels
from hf_specssm.ssm import lean_norm
from hf_specssm.ssm.lean_norm import lean_norm_modules, lean_norm_problem, lean_norms

from tests.helpers.kernel_cases import require_cpu_kernels
from tests.helpers.models import build


class _NormSpy:
    """The compiled CPU kernels with `rms_norm` counted by weight (and, as a negative control, run with its
    epsilon raised to 1 with `wrong_eps`)."""

    def __init__(self, real, wrong_eps: bool = False) -> None:
        self.real, self.wrong_eps, self.weights = real, wrong_eps, []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def rms_norm(self, x, weight, eps):
        self.weights.append(weight)
        return self.real.rms_norm(x, weight, 1.0 if self.wrong_eps else eps)


class _GemmaStyleNorm(torch.nn.Module):
    """Gemma's form, `x / rms(x) · (1 + weight)` in float32: one weight, one input, another function."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(width))
        self.eps = 1e-6

    def forward(self, hidden_states):
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * (1.0 + self.weight.float())).type_as(hidden_states)


class _BiasedNorm(Mamba2RMSNorm):
    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.bias = torch.nn.Parameter(torch.zeros(width))


class _Bf16ArithmeticNorm(Mamba2RMSNorm):
    """LlamaRMSNorm's formula with its statistics in the input's dtype (no float32 upcast)."""

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _randomised(module: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_()
    return module.to(dtype)


ADMISSION_CASES = [
    pytest.param(lambda: _randomised(Mamba2RMSNorm(48)), None, id="llama-form-fp32"),
    pytest.param(lambda: _randomised(Mamba2RMSNorm(48), torch.bfloat16), None, id="llama-form-bf16"),
    pytest.param(lambda: _randomised(Qwen3NextRMSNorm(48)), "not weight · x / rms(x)", id="qwen3-next"),
    pytest.param(lambda: _randomised(_GemmaStyleNorm(48)), "not weight · x / rms(x)", id="gemma-form"),
    pytest.param(lambda: torch.nn.LayerNorm(48, bias=False), "not weight · x / rms(x)", id="layernorm"),
    pytest.param(
        lambda: _randomised(_Bf16ArithmeticNorm(300), torch.bfloat16), "rounded as", id="bf16-statistics"
    ),
    pytest.param(lambda: _randomised(_BiasedNorm(48)), "one 1-D weight", id="bias"),
    pytest.param(lambda: _randomised(Mamba2RMSNorm(48), torch.float64), "float32 or bf16", id="float64"),
    pytest.param(lambda: torch.nn.Linear(4, 4), "one 1-D weight", id="linear"),
]


@pytest.mark.parametrize("make, problem", ADMISSION_CASES)
def test_norms_are_admitted_by_agreeing_with_the_kernel(make, problem):
    """Only LlamaRMSNorm's form (one weight, one input, float32 statistics) is admitted; other norms with the
    same attributes fail the seeded comparison with their own forward, and say why."""
    require_cpu_kernels()
    verdict = lean_norm_problem(make())
    if problem is None:
        assert verdict is None
    else:
        assert verdict is not None and problem in verdict


def test_gated_norms_are_refused_by_their_signature():
    require_cpu_kernels()
    model = build("mamba2", seed=0)
    gated = model.backbone.layers[0].mixer.norm
    assert "more than one input" in lean_norm_problem(gated)
    assert gated not in lean_norm_modules(model)
    assert model.backbone.layers[0].norm in lean_norm_modules(model)


def test_the_verdict_is_kept_until_the_weight_changes(monkeypatch):
    require_cpu_kernels()
    norm = _randomised(Mamba2RMSNorm(16))
    checks = []
    original = lean_norm._agreement_problem

    def counted(module, kernels):
        checks.append(module)
        return original(module, kernels)

    monkeypatch.setattr(lean_norm, "_agreement_problem", counted)
    assert lean_norm_problem(norm) is None and lean_norm_problem(norm) is None
    assert len(checks) == 1
    with torch.no_grad():
        norm.weight.mul_(2)
    assert lean_norm_problem(norm) is None
    assert len(checks) == 2


def test_lean_norms_serve_this_thread_without_autograd_and_restore_the_forward(monkeypatch):
    """Inside the context an admitted norm runs the kernel for CPU inputs of its dtype without autograd;
    calls with autograd, in another dtype or from another thread run its own forward; on exit the module has
    its class forward again."""
    require_cpu_kernels()
    spy = _NormSpy(cpu_kernels())
    monkeypatch.setattr(lean_norm, "cpu_kernels", lambda: spy)
    norm = _randomised(Mamba2RMSNorm(24))
    x = torch.randn(2, 3, 24)
    expected = Mamba2RMSNorm.forward(norm, x)
    other_thread = []
    with lean_norms([norm]):
        with torch.no_grad():
            torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)
        assert len(spy.weights) == 1
        assert norm(x.requires_grad_()).requires_grad  # autograd: the module's own forward
        norm(x.detach().double())  # another dtype
        thread = threading.Thread(target=lambda: other_thread.append(norm(x.detach())))
        thread.start()
        thread.join()
        assert len(spy.weights) == 1
    assert "forward" not in norm.__dict__
    with torch.no_grad():
        norm(x.detach())
    assert len(spy.weights) == 1
    torch.testing.assert_close(other_thread[0], expected)


@pytest.mark.parametrize("target_kind", ["mamba2", "bamba", "zamba2"])
def test_fused_verifications_run_every_admitted_norm_through_the_kernel(target_kind, monkeypatch):
    """A fused target's verification runs each of the model's LlamaRMSNorm-form norms (block, attention-layer
    and final norms) through the kernel, and its logits equal transformers' unfused forward from a fresh
    cache; a kernel norm with the wrong epsilon (negative control) moves them past the tolerance."""
    require_cpu_kernels()
    model = build(target_kind, seed=0)
    target = verification.make_target(model, None)
    norms = target.state_recorder.norms
    assert norms and set(norms) == set(lean_norm_modules(model))
    sequence = torch.randint(3, model.config.vocab_size, (1, 14), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(sequence, use_cache=False).logits[0, 7:].float()

    def verification_logits(wrong_eps: bool) -> torch.Tensor:
        spy = _NormSpy(cpu_kernels(), wrong_eps)
        monkeypatch.setattr(lean_norm, "cpu_kernels", lambda: spy)
        fresh_target = verification.make_target(model, None)
        with torch.no_grad():
            logits = fresh_target.score(sequence[:, :8], sequence[:, 8:14])[0].float()
        assert {id(weight) for weight in spy.weights} == {id(norm.weight) for norm in norms}
        return logits

    assert (verification_logits(False) - expected).abs().max() < 1e-4
    assert (verification_logits(True) - expected).abs().max() > 1e-2
