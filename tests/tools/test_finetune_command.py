"""`hf-specssm distill` → `hf-specssm finetune-drafter` end to end on a tiny chat target, offline."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_specssm
from hf_specssm.tools.cli import main
from hf_specssm.training.mamba_drafter.training import drafter_config, new_drafter

from tests.helpers.chat_models import save_chat_target, write_corpus


@pytest.mark.slow
def test_distill_finetune_evaluate_export_and_draft(tmp_path, capsys):
    target, tokenizer = save_chat_target(tmp_path / "target")
    corpus = write_corpus(tmp_path / "corpus")
    store = tmp_path / "store"
    assert main(["distill", "generate", "--target", str(tmp_path / "target"), "--store", str(store),
                 "--corpus-root", str(corpus), "--count", "24", "--batch-size", "8", "--max-new-tokens", "12",
                 "--quiet"]) == 0  # fmt: skip
    vocabulary = torch.arange(1, 200)
    init = new_drafter(drafter_config("tiny", 200, len(tokenizer)), vocabulary, seed=0)
    init.save_pretrained(tmp_path / "init")
    common = ["--store", str(store), "--init", str(tmp_path / "init"), "--quiet", "--eval-records", "8"]
    out, export = tmp_path / "run", tmp_path / "export"
    train = ["finetune-drafter", "train", *common, "--features", "--out", str(out), "--steps", "4",
             "--checkpoint-every", "2", "--batch-size", "2", "--k", "3"]  # fmt: skip
    assert main(train) == 0
    assert len((out / "eval.jsonl").read_text().splitlines()) == 2
    # the same command again finds the run complete; other settings are refused
    assert main(train) == 0
    assert main([*train, "--soft-weight", "0.9"]) == 2
    assert "--soft-weight" in capsys.readouterr().err
    assert (
        main(["finetune-drafter", "export", *common, "--out", str(out), "--export", str(export), "--k", "3"])
        == 0
    )
    card = (export / "README.md").read_text()
    assert "feature-conditioned" in card
    assert re.search(r"on a store of (\d+) chats \(\1 of the target's own answers\)", card)
    capsys.readouterr()
    assert main(["finetune-drafter", "evaluate", *common, "--drafter", str(export), "--k", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["features"] for line in lines] == [False, True]
    assert all(1 <= line["tau"] <= 4 for line in lines)
    # users pass the exported folder as transformers loads it; the loop reads the target's hidden states
    drafter = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    assert drafter.reads_target_hidden
    hf_specssm.enable(target)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Explain rectangles."}], add_generation_prompt=True, return_tensors="pt"
    )
    prompt = prompt["input_ids"] if not isinstance(prompt, torch.Tensor) else prompt
    plain = target.generate(prompt, max_new_tokens=16, do_sample=False)
    spec = target.generate(prompt, assistant_model=drafter, max_new_tokens=16, do_sample=False)
    assert torch.equal(plain, spec)


@pytest.mark.slow
def test_evaluate_on_benchmark_answers_keeps_them_apart(tmp_path, capsys):
    target, tokenizer = save_chat_target(tmp_path / "target")
    config = drafter_config("tiny", 200, len(tokenizer), feature_size=target.config.hidden_size)
    new_drafter(config, torch.arange(1, 200), seed=0).save_pretrained(tmp_path / "drafter")
    new_drafter(drafter_config("tiny", 200, len(tokenizer)), torch.arange(1, 200)).save_pretrained(
        tmp_path / "init"
    )
    command = ["finetune-drafter", "evaluate", "--target", str(tmp_path / "target"), "--init", str(tmp_path / "init"),
               "--drafter", str(tmp_path / "drafter"), "--bench-sets", "gsm8k", "humaneval", "--bench-limit", "2",
               "--bench-tokens", "6", "--bench-store", str(tmp_path / "answers"), "--k", "3"]  # fmt: skip
    assert main(command) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(row["set"], row["features"]) for row in rows] == [
        ("gsm8k", False), ("humaneval", False), ("gsm8k", True), ("humaneval", True)
    ]  # fmt: skip
    assert all(row["rounds"] == 2 * 5 for row in rows)
    # the answers are generated once and kept in their own store, marked for evaluation
    manifest = json.loads((tmp_path / "answers" / "manifest.json").read_text())
    assert manifest["recipe"]["use"] == "evaluation"
    assert main(command) == 0
    assert json.loads((tmp_path / "answers" / "manifest.json").read_text())["shards"] == manifest["shards"]
