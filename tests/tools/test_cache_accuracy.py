"""`hf-specssm cache-accuracy`: the bf16 model cache against the GGUF's fp32 dequantization.

Offline: a tiny Llama written as a GGUF (the writer of `test_fetch.py`) and converted as `fetch` does.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from hf_specssm.tools import cache_accuracy, fetch
from hf_specssm.tools.cache_accuracy import compare_chat, select_chats, summarize
from hf_specssm.tools.cli import main as cli_main
from hf_specssm.tools.fetch import ModelSpec

from tests.tools.test_fetch import _write_tiny_llama_gguf

pytest.importorskip("gguf")


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    return LlamaForCausalLM(config).eval()


def test_a_model_against_itself_agrees_everywhere():
    model = _tiny_llama()
    ids = torch.randint(0, 97, (20,)).tolist()
    chat = compare_chat(model, model, ids, prompt_length=5)
    assert chat.positions == 15 and chat.agree == 15
    assert max(chat.kl) == pytest.approx(0.0, abs=1e-7) and chat.max_logit_diff == 0.0
    assert chat.reference_departs == chat.cache_departs


def test_the_comparison_sees_a_changed_model_and_where_its_greedy_path_departs():
    model = _tiny_llama()
    # the text is the model's own greedy continuation, so the model itself never departs from it
    prompt = torch.randint(0, 97, (1, 4))
    text = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)[0].tolist()
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.lm_head.weight.add_(torch.randn_like(perturbed.lm_head.weight))
    chat = compare_chat(perturbed, model, text, prompt_length=4)
    assert chat.cache_departs == 12
    assert chat.reference_departs < 12
    assert chat.agree < 12 and min(chat.kl) >= 0.0 and sum(chat.kl) > 0.0
    report = summarize("tiny", "fp32", [chat], seconds=0.0)
    assert report.chats_where_reference_departs_first == 1
    assert report.top1_agreement == chat.agree / 12


def test_select_chats_cuts_answers_and_skips_empty_ones():
    records = [
        {"input_ids": [1, 2, 3], "prompt_length": 3},
        {"input_ids": list(range(10)), "prompt_length": 2},
        {"input_ids": list(range(6)), "prompt_length": 1},
    ]
    assert select_chats(records, limit=5, max_answer_tokens=4) == [
        ([0, 1, 2, 3, 4, 5], 2),
        ([0, 1, 2, 3, 4], 1),
    ]
    assert len(select_chats(records, limit=1, max_answer_tokens=4)) == 1
    with pytest.raises(ValueError, match="no chats"):
        summarize("tiny", "fp32", [], seconds=0.0)


@pytest.fixture
def cached_tiny(tmp_path, monkeypatch) -> Path:
    """A cache holding `tiny-llama`'s GGUF and its bf16 conversion, as `fetch` leaves it."""
    model_dir = tmp_path / "cache" / "tiny-llama"
    model_dir.mkdir(parents=True)
    gguf_path = model_dir / "tiny-llama.gguf"
    _write_tiny_llama_gguf(gguf_path)
    fetch.convert_gguf(gguf_path, model_dir / fetch.CONVERTED_DIRNAME, "bf16")
    spec = ModelSpec("tiny-llama", "tiny", (), gguf_path.stat().st_size, "0" * 64)
    monkeypatch.setitem(fetch.MODELS, spec.name, spec)
    return model_dir


def test_the_command_compares_the_bf16_cache_with_the_gguf(tmp_path, cached_tiny, capsys):
    answers = tmp_path / "answers.jsonl"
    chats = [{"input_ids": [1, 2, 3, 257, 40, 41, 42, 43], "prompt_length": 3}] * 2
    answers.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    out = tmp_path / "report.json"
    argv = ["cache-accuracy", "tiny-llama", "--answers", str(answers)]
    status = cli_main([*argv, "--cache-dir", str(cached_tiny.parent), "--out", str(out)])
    assert status == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["chats"] == 2 and report["positions"] == 10
    # bf16 rounding of the weights moves the logits (so the comparison is not of a model with itself) …
    assert 0.0 < report["max_logit_diff"] < 0.5
    # … by a rounding's worth: the distributions stay close
    assert report["mean_kl"] < 1e-2
    assert "top-1 agreement with the fp32 GGUF" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--limit", "0", "--limit must be ≥ 1"), ("--answers", "/nonexistent/answers", "does not exist")],
)
def test_bad_arguments_are_refused_before_any_model_loads(monkeypatch, capsys, option, value, message):
    monkeypatch.setattr(cache_accuracy, "load_pair", lambda *a: pytest.fail("a model was loaded"))
    argv = ["cache-accuracy", "qwen2.5-coder-0.5b-instruct", option, value]
    if option != "--answers":
        argv += ["--answers", __file__]
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_missing_cache_names_the_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf-specssm fetch"):
        cache_accuracy.load_pair(tmp_path / "absent", "absent.gguf", torch.float32)
