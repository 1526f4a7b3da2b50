"""The drafter's data pipeline: corpus, instructions, distillation, token streams, and the CLI stages."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_specssm.training.mamba_drafter.corpus import doc_paragraphs, python_functions, python_sources
from hf_specssm.training.mamba_drafter.data import build_token_data, load_stream, read_distilled
from hf_specssm.training.mamba_drafter.distill import distill_answers, done_ids
from hf_specssm.training.mamba_drafter.prompts import DOMAINS, build_instructions, code_instructions

from tests.helpers.chat_models import byte_tokenizer, save_chat_target, write_corpus


def test_python_functions_finds_public_documented_functions(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    found = list(python_functions([root]))
    assert [f.name for f in found] == ["area", "perimeter"]
    assert found[0].signature == "def area(width, height):"
    assert found[0].docstring.startswith("Return the area")
    assert "return result" in found[0].source
    assert len(list(python_sources([root]))) == 1


def test_doc_paragraphs_keeps_prose_once(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    paragraphs = list(doc_paragraphs([root]))
    # the duplicate paragraph, the table, the heading and the code block are dropped
    assert len(paragraphs) == 2
    assert paragraphs[0].startswith("Rectangles are") and paragraphs[1].startswith("Squares are")


def test_code_instructions_pose_stubs_and_tasks(tmp_path):
    functions = list(python_functions([write_corpus(tmp_path / "corpus")]))
    texts = [t for seed in range(8) for t in code_instructions(functions, random.Random(seed))]
    stubs = [t for t in texts if "```python" in t]
    tasks = [t for t in texts if "```python" not in t]
    assert stubs and tasks
    assert all('def area(width, height):\n    """\n    Return the area' in t for t in stubs if "area" in t)
    assert any("return the area of a rectangle" in t.lower() for t in tasks)


def test_build_instructions_is_deterministic_and_follows_the_mix(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    first = build_instructions(40, seed=3, roots=[root])
    assert first == build_instructions(40, seed=3, roots=[root])
    assert first != build_instructions(40, seed=4, roots=[root])
    counts = {domain: sum(i.domain == domain for i in first) for domain in DOMAINS}
    # only 2 functions exist: code gets 2, the other shares are as asked
    assert counts == {"code": 2, "math": 8, "chat": 10, "summary": 6}
    assert len({i.id for i in first}) == len(first)
    assert all(i.messages[0]["role"] == "user" and i.messages[0]["content"] for i in first)
    assert all(i.messages[0]["content"].startswith("Summarize: ") for i in first if i.domain == "summary")
    only_math = build_instructions(5, mix={"math": 1.0}, roots=[root])
    assert {i.domain for i in only_math} == {"math"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param({"count": 0}, "count must be", id="count"),
        pytest.param({"count": 4, "mix": {"poetry": 1.0}}, "mix must give", id="unknown-domain"),
        pytest.param({"count": 4, "mix": {"math": -1.0, "chat": 2.0}}, "mix must give", id="negative"),
    ],
)
def test_build_instructions_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_instructions(roots=[write_corpus(tmp_path / "corpus")], **kwargs)


def test_distill_answers_appends_records_and_resumes(tmp_path):
    target, tokenizer = save_chat_target(tmp_path / "target")
    instructions = build_instructions(6, seed=0, mix={"math": 1, "chat": 1}, roots=[tmp_path])
    out = tmp_path / "distilled.jsonl"
    distill_answers(target, tokenizer, instructions[:4], out, batch_size=3, max_new_tokens=7, progress=False)
    records = list(read_distilled(out))
    assert len(records) == 4 and done_ids(out) == {i.id for i in instructions[:4]}
    for record in records:
        instruction = next(i for i in instructions if i.id == record["id"])
        prompt = tokenizer.apply_chat_template(
            instruction.messages, tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert record["input_ids"][: record["prompt_length"]] == prompt_ids
        answer = record["input_ids"][record["prompt_length"] :]
        assert 1 <= len(answer) <= 7
        # the answer is the target's own greedy continuation of the unpadded prompt
        alone = target.generate(torch.tensor([prompt_ids]), max_new_tokens=len(answer), do_sample=False)
        assert alone[0, len(prompt_ids) :].tolist() == answer
        assert record["finished"] == (answer[-1] == tokenizer.eos_token_id)
    # a torn last line (an interrupted write) is ignored, and the run resumes with the rest only
    with open(out, "a") as sink:
        sink.write('{"id": "torn')
    distill_answers(target, tokenizer, instructions, out, batch_size=3, max_new_tokens=7, progress=False)
    assert sorted(r["id"] for r in read_distilled(out)) == sorted(i.id for i in instructions)


def test_build_token_data_writes_streams_and_a_heldout_set(tmp_path):
    tokenizer = byte_tokenizer()
    distilled = tmp_path / "distilled.jsonl"
    ids = [f"chat-{i}" for i in range(120)]
    with open(distilled, "w") as sink:
        for index, record_id in enumerate(ids):
            sink.write(
                json.dumps(
                    {"id": record_id, "domain": "chat", "input_ids": [65, 66, index % 50], "prompt_length": 1}
                )
                + "\n"
            )
    root = write_corpus(tmp_path / "corpus")
    meta = build_token_data(
        tmp_path / "data", tokenizer, distilled, code_tokens=10_000, doc_tokens=10_000, roots=[root]
    )
    separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    chat = load_stream(tmp_path / "data", "chat")
    held = meta["distilled_records"]["heldout"]
    assert meta["distilled_records"]["train"] + held == 120 and held >= 1
    assert chat.size == 4 * (120 - held) and (chat[3::4] == separator).all()
    code = load_stream(tmp_path / "data", "code")
    assert tokenizer.decode(code[:-1].tolist()) == (root / "shapes.py").read_text()
    assert meta["tokens"] == {
        "chat": chat.size,
        "code": code.size,
        "docs": load_stream(tmp_path / "data", "docs").size,
    }
    heldout = [
        json.loads(line)["id"] for line in (tmp_path / "data" / "heldout.jsonl").read_text().splitlines()
    ]
    assert len(heldout) == held and len(set(heldout)) == held


def test_cli_stages_end_to_end(tmp_path, capsys):
    """distill → data → train → export on a tiny chat target and a tiny corpus; the result loads and drafts."""
    import hf_specssm
    from hf_specssm.tools.cli import main

    save_chat_target(tmp_path / "target")
    root = write_corpus(tmp_path / "corpus")
    common = ["--target", str(tmp_path / "target"), "--data", str(tmp_path / "data"), "--corpus-root", str(root),
              "--out", str(tmp_path / "run"), "--export", str(tmp_path / "export"), "--quiet", "--threads", "1"]  # fmt: skip
    assert main(["train-mamba-drafter", "distill", *common, "--count", "24", "--max-new-tokens", "12"]) == 0
    # 2 code tasks (the corpus has 2 functions) + 5 math + 6 chat + 4 summaries
    assert len(list(read_distilled(tmp_path / "data" / "distilled.jsonl"))) == 17
    assert (
        main(["train-mamba-drafter", "data", *common, "--code-tokens", "5000", "--doc-tokens", "5000"]) == 0
    )
    train = ["--architecture", "tiny", "--draft-vocab", "64", "--steps", "6", "--batch-size", "2",
             "--block-length", "32", "--checkpoint-every", "3", "--warmup-steps", "1"]  # fmt: skip
    assert main(["train-mamba-drafter", "train", *common, *train]) == 0
    assert (tmp_path / "run" / "checkpoint-6").is_dir()
    # the same command again: already done, resumes at step 6 and returns
    assert main(["train-mamba-drafter", "train", *common, *train]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert main(["train-mamba-drafter", "export", *common, "--measured", "toy row"]) == 0
    export = tmp_path / "export"
    card = (export / "README.md").read_text()
    assert "library_name: transformers" in card and "6 steps" in card and "- toy row" in card
    drafter = AutoModelForCausalLM.from_pretrained(export)
    assert drafter.dtype == torch.bfloat16 and drafter.config.vocab_size == 64
    # the special tokens are always in the draft vocabulary
    tokenizer = byte_tokenizer()
    for token in ("<|endoftext|>", "<|im_end|>"):
        assert int(drafter.to_draft_ids(torch.tensor(tokenizer.convert_tokens_to_ids(token)))) > 0
    target = AutoModelForCausalLM.from_pretrained(tmp_path / "target")
    prompt = torch.tensor([tokenizer("hello")["input_ids"]])
    plain = target.generate(prompt, max_new_tokens=8, do_sample=False)
    spec = hf_specssm.generate(target, prompt, drafter=drafter.float(), max_new_tokens=8, do_sample=False)
    assert torch.equal(plain, spec)
    assert np.isfinite(json.loads((tmp_path / "data" / "meta.json").read_text())["tokens"]["docs"])
