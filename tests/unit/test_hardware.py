"""The dtype the tools choose when none is given: bf16 where the hardware has it natively, fp32 elsewhere."""

from __future__ import annotations

import pytest
import torch

from hf_specssm import hardware
from hf_specssm.hardware import cpu_flags, fastest_dtype, read_cpu_flags, resolve_dtype

# the flag lines of the three kinds of machine the project runs on (abridged)
AMX_XEON = frozenset({"fpu", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"})
BF16_EPYC = frozenset({"fpu", "avx2", "avx512f", "avx512_bf16"})
AVX2_EPYC = frozenset({"fpu", "avx", "avx2", "fma"})


@pytest.mark.parametrize(
    ("flags", "name", "because"),
    [
        pytest.param(AMX_XEON, "bf16", "amx_bf16", id="xeon-amx"),
        pytest.param(BF16_EPYC, "bf16", "avx512_bf16", id="epyc-avx512-bf16"),
        pytest.param(AVX2_EPYC, "fp32", "bf16 would be emulated", id="epyc-avx2-only"),
    ],
)
def test_cpu_choice_follows_the_bf16_flags(flags, name, because):
    choice = fastest_dtype("cpu", flags=flags)
    assert choice.name == name and because in choice.reason
    assert choice.dtype is {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
    assert choice.describe().startswith(f"{name} (")


def test_unreadable_flags_fall_back_to_fp32_and_say_why(monkeypatch):
    monkeypatch.setattr(hardware, "read_cpu_flags", lambda path="/proc/cpuinfo": None)
    choice = fastest_dtype("cpu", capability="AVX512")
    assert choice.name == "fp32" and "AVX512" in choice.reason


def test_gpus_with_bf16_get_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert fastest_dtype("cuda") == hardware.DtypeChoice("bf16", "NVIDIA H200 computes in bf16 natively")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert fastest_dtype("cuda:0").name == "fp32"


def test_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert read_cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "avx512_bf16"}
    assert read_cpu_flags(str(tmp_path / "missing")) is None
    assert cpu_flags(frozenset({"fpu", "avx2", "avx512_bf16"})) == "avx512_bf16,avx2"


def test_resolve_dtype_honours_an_explicit_choice_and_refuses_others():
    assert resolve_dtype("bf16").name == "bf16" and "as asked" in resolve_dtype("bf16").reason
    assert resolve_dtype("auto") == fastest_dtype("cpu")
    with pytest.raises(ValueError, match="--dtype must be one of auto, bf16, fp32; got 'fp16'"):
        resolve_dtype("fp16")
