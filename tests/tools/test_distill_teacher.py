"""Teacher-forced chats: built deterministically from the machine's functions and prose, stored as unlabelled
`teacher` records the label pass completes, trained on with the target's top-1 as the hard label (never
the text's own token), kept out of packs and of the chains simulated for evaluation."""

from __future__ import annotations

import json
import re

import pytest
import torch

from hf_specssm.training.distillation.generate import render
from hf_specssm.training.distillation.store import GREEDY, TEACHER, DistillStore
from hf_specssm.training.distillation.teacher import (
    TEACH_DOMAINS,
    add_teacher_chats,
    end_of_turn_ids,
    teacher_chats,
    teacher_record,
)
from hf_specssm.training.mamba_drafter.corpus import doc_paragraphs, python_functions
from hf_specssm.training.mamba_drafter.finetune import (
    Example,
    FinetuneConfig,
    draw_indices,
    load_examples,
    make_batch,
)
from hf_specssm.training.redrafter.store_training import head_rows, store_vocabulary

from tests.helpers.chat_models import byte_tokenizer, save_chat_target, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = write_corpus(tmp_path_factory.mktemp("corpus"))
    return list(python_functions([folder])), list(doc_paragraphs([folder]))


def test_chats_cover_both_kinds_are_deterministic_and_grow_without_changing(corpus):
    functions, paragraphs = corpus
    chats = teacher_chats(6, functions, paragraphs, code_share=0.5)
    assert {chat.instruction.domain for chat in chats} == set(TEACH_DOMAINS)
    assert chats == teacher_chats(6, functions, paragraphs, code_share=0.5)
    assert chats != teacher_chats(6, functions, paragraphs, code_share=0.5, seed=1)
    for chat in chats:
        if chat.instruction.domain == "teach-code":
            # the answer is a function of the corpus, fenced as the target writes code
            assert chat.answer.startswith("```python\ndef ") and chat.answer.endswith("\n```")
            assert any(function.source in chat.answer for function in functions)
        else:
            assert any(paragraph in chat.answer for paragraph in paragraphs)
    bigger = {chat.instruction.id: chat for chat in teacher_chats(12, functions, paragraphs, code_share=0.5)}
    assert all(bigger[chat.instruction.id] == chat for chat in chats)


def test_each_code_prompt_asks_for_the_function_that_answers_it():
    """Functions whose docstring gives no task sentence get no one-line task; the prompts after them must
    not shift onto other functions' sources."""
    from hf_specssm.training.mamba_drafter.corpus import DocumentedFunction

    functions = []
    for n in range(40):
        name = f"f_marker{n}x"
        doc = "." if n % 2 else f"Compute marker{n}x values for the caller. More detail follows here."
        functions.append(DocumentedFunction(name, f"def {name}(a):", doc, f"def {name}(a):\n    return a"))
    chats = teacher_chats(40, functions, [], code_share=1.0)
    # some docstrings gave no task (the one-line form was drawn for them): those functions were skipped
    assert 20 < len(chats) < 40
    for chat in chats:
        marker = re.search(r"marker\d+x", chat.answer).group()
        assert marker in chat.instruction.messages[0]["content"], chat


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"count": 0}, "count must be >= 1", id="count"),
        pytest.param({"code_share": 1.5}, r"code_share must lie in \[0, 1\]", id="share"),
        pytest.param({"functions": [], "paragraphs": []}, "no documented functions", id="empty"),
    ],
)
def test_bad_settings_are_refused(corpus, kwargs, message):
    functions, paragraphs = corpus
    arguments = {"count": 4, "functions": functions, "paragraphs": paragraphs, **kwargs}
    with pytest.raises(ValueError, match=message):
        teacher_chats(**arguments)


def test_a_record_is_the_rendered_prompt_then_the_text_and_the_end_of_turn(corpus):
    tokenizer = byte_tokenizer()
    (end,) = end_of_turn_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(end) == "<|im_end|>"
    chat = teacher_chats(1, *corpus, code_share=1.0)[0]
    record = teacher_record(tokenizer, chat, max_answer_tokens=10_000, end_ids=[end])
    prompt = render(tokenizer, chat.instruction)
    text = tokenizer(chat.answer, add_special_tokens=False)["input_ids"]
    assert record["mode"] == TEACHER and record["finished"] and record["prompt_length"] == len(prompt)
    assert record["input_ids"] == [*prompt, *text, end]
    cut = teacher_record(tokenizer, chat, max_answer_tokens=7, end_ids=[end])
    assert not cut["finished"] and cut["input_ids"] == [*prompt, *text[:7]]


def test_adding_appends_only_new_chats_and_skips_long_prompts(tmp_path, corpus):
    tokenizer = byte_tokenizer()
    store = DistillStore(tmp_path / "store", recipe={"--top-k": 4})
    chats = teacher_chats(6, *corpus)
    assert len(chats) >= 4
    added, tokens = add_teacher_chats(
        store, tokenizer, chats[:-2], max_answer_tokens=50, max_prompt_tokens=10_000
    )
    assert added == len(chats) - 2 and tokens == sum(
        len(r["input_ids"]) - r["prompt_length"] for r in store.records()
    )
    assert add_teacher_chats(store, tokenizer, chats, max_answer_tokens=50, max_prompt_tokens=10_000)[0] == 2
    assert add_teacher_chats(store, tokenizer, chats, max_answer_tokens=50, max_prompt_tokens=10_000)[0] == 0
    other = DistillStore(tmp_path / "other", recipe={"--top-k": 4})
    assert add_teacher_chats(other, tokenizer, chats, max_answer_tokens=50, max_prompt_tokens=5) == (0, 0)


def _teacher_example(answer: int = 8) -> Example:
    """A teacher-forced chat whose text never equals the target's top-1 (text ids even, top-1 odd)."""
    text = torch.arange(answer) * 2 + 10
    top1 = text + 1
    return Example(
        ids=torch.cat([torch.tensor([1, 2, 3]), text]),
        prompt_length=3,
        mode=TEACHER,
        topk_ids=torch.stack([top1, text], dim=1),
        topk_logp=torch.tensor([[-0.1, -2.4]]).expand(answer, 2).clone(),
        hidden=torch.randn(answer, 8).to(torch.float16),
    )


def test_training_reads_the_text_and_learns_the_targets_top1():
    teacher = _teacher_example()
    written = Example(**{**teacher.__dict__, "mode": GREEDY})
    assert torch.equal(teacher.answer_labels(), teacher.topk_ids[:, 0])
    assert torch.equal(written.answer_labels(), written.ids[3:])
    # ReDrafter rows: the recurrence reads the text, each step learns the top-1 (-100 past the end)
    rows = head_rows([teacher], steps=3)
    text, top1 = teacher.ids[3:], teacher.topk_ids[:, 0]
    for j in range(len(rows)):
        assert rows.tokens[j].tolist() == [int(text[j + s]) if j + s < 8 else -100 for s in range(4)]
        assert rows.labels[j].tolist() == [int(top1[j + s]) if j + s < 8 else -100 for s in range(1, 4)]
    assert torch.equal(head_rows([written], steps=3).labels, head_rows([written], steps=3).tokens[:, 1:])
    # the reduced vocabulary counts what is learned: odd ids here, the text's even ones for a written chat
    assert set(store_vocabulary([teacher], 64, 8).tolist()) == set(top1.tolist())
    assert set(store_vocabulary([written], 64, 8).tolist()) == set(text.tolist())
    # Mamba drafter batches: position t reads the text and learns the target's choice of token t + 1
    config = FinetuneConfig(steps=1, max_length=64)
    batch = make_batch([teacher], config, torch.Generator().manual_seed(0), use_features=False)
    assert torch.equal(batch.labels, top1[1:])
    assert torch.equal(batch.ids[0, batch.positions], teacher.ids[3:-1])
    batch = make_batch([written], config, torch.Generator().manual_seed(0), use_features=False)
    assert torch.equal(batch.labels, text[1:])


def test_labelled_teacher_chats_train_unlabelled_ones_wait_and_packs_leave_them_out(tmp_path, corpus):
    from hf_specssm.training.distillation.label import label_store
    from hf_specssm.training.distillation.pack import pack_store

    model, tokenizer = save_chat_target(tmp_path / "model")
    store = DistillStore(tmp_path / "store", recipe={"--top-k": 4})
    add_teacher_chats(store, tokenizer, teacher_chats(4, *corpus), max_answer_tokens=40,
                      max_prompt_tokens=10_000, end_ids=end_of_turn_ids(tokenizer))  # fmt: skip
    # without the target's predictions a teacher chat teaches nothing: it is not an example yet
    with pytest.raises(ValueError, match="no usable"):
        load_examples(store, "all")
    with pytest.raises(ValueError, match="no answers of the target to pack"):
        pack_store(store, tmp_path / "pack")
    label_store(model, store, batch_tokens=400)
    examples = load_examples(store, "all", need_hidden=True)
    assert len(examples) == 4 and {e.mode for e in examples} == {TEACHER}
    for example in examples:
        # the stored top-1 is the target's own argmax after the text's prefix
        with torch.no_grad():
            logits = model(example.ids[None]).logits[0, example.prompt_length - 1 : -1]
        assert torch.equal(example.answer_labels(), logits.argmax(-1))
    written = {"id": "qa-0", "domain": "qa", "mode": GREEDY, "input_ids": [5, 6, 7, 8], "prompt_length": 2,
               "finished": True}  # fmt: skip
    store.append([written])
    pack = pack_store(store, tmp_path / "pack")
    assert (pack / "records.json").read_text().count('"id"') == 1
    assert "teach-" not in (pack / "README.md").read_text()
    assert json.loads((pack / "manifest.json").read_text())["modes"] == {GREEDY: 1}


def test_the_teach_command_adds_once_refuses_another_target_and_feeds_label(tmp_path, capsys):
    from hf_specssm.tools.cli import main

    save_chat_target(tmp_path / "model")
    save_chat_target(tmp_path / "other", seed=1)
    root = write_corpus(tmp_path / "corpus")
    store = tmp_path / "store"
    base = ["distill", "teach", "--store", str(store), "--corpus-root", str(root), "--count", "4", "--code-share", "0.5",
            "--max-new-tokens", "40", "--quiet"]  # fmt: skip
    assert main([*base, "--target", str(tmp_path / "model"), "--code-share", "2"]) == 2
    assert "--code-share must lie in [0, 1]" in capsys.readouterr().err
    assert main([*base, "--target", str(tmp_path / "model")]) == 0
    summary = DistillStore(store).summary()
    assert summary["modes"] == {TEACHER: 4} and set(summary["domains"]) == set(TEACH_DOMAINS)
    assert main([*base, "--target", str(tmp_path / "model")]) == 0
    assert DistillStore(store).summary()["records"] == 4
    assert main([*base, "--target", str(tmp_path / "other")]) == 2
    assert "not the target the store" in capsys.readouterr().err
    label = ["distill", "label", "--store", str(store), "--target", str(tmp_path / "model"), "--quiet",
             "--dtype", "fp32"]  # fmt: skip
    status = ["distill", "status", "--store", str(store)]
    assert main(status) == 0
    assert json.loads(capsys.readouterr().out)["unlabelled"] == 4
    assert main(label) == 0
    assert len(load_examples(DistillStore(store), "all", need_hidden=True)) == 4
    assert main(status) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["unlabelled"] == 0 and shown["label_runs"][0]["chats"] == 4
    # a Mamba drafter trains on them; with no greedy chat held out there is nothing to simulate, and no
    # τ of 1.00 over zero rounds is logged as if measured
    from hf_specssm.training.mamba_drafter.training import drafter_config, new_drafter

    init = new_drafter(drafter_config("tiny", 200, len(byte_tokenizer())), torch.arange(1, 200), seed=0)
    init.save_pretrained(tmp_path / "init")
    train = ["finetune-drafter", "train", "--store", str(store), "--init", str(tmp_path / "init"), "--features",
             "--out", str(tmp_path / "run"), "--steps", "2", "--checkpoint-every", "2", "--batch-size", "2",
             "--bf16"]  # fmt: skip
    assert main(train) == 0
    assert "no held-out greedy chat to simulate" in capsys.readouterr().out
    assert not (tmp_path / "run" / "eval.jsonl").exists()
    # evaluating or exporting against such a store is refused rather than reporting τ over zero rounds
    assert (
        main(["finetune-drafter", "evaluate", "--store", str(store), "--init", str(tmp_path / "init")]) == 2
    )
    assert "no held-out greedy answer" in capsys.readouterr().err
    export = ["finetune-drafter", "export", "--store", str(store), "--init", str(tmp_path / "init"), "--out",
              str(tmp_path / "run"), "--export", str(tmp_path / "export")]  # fmt: skip
    assert main(export) == 2
    assert "no held-out greedy answer" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize(
    ("modes", "expected"),
    [
        pytest.param({GREEDY: 3, "t0.7": 1}, "4 of the target's own answers", id="written"),
        pytest.param(
            {TEACHER: 2}, "2 teacher-forced chats of documentation and source the target read", id="teacher"
        ),
        pytest.param(
            {GREEDY: 1, TEACHER: 2},
            "1 of the target's own answers and 2 teacher-forced chats of documentation and source the target read",
            id="both",
        ),
    ],
)
def test_a_heads_card_says_what_its_store_held(modes, expected):
    from hf_specssm.training.distillation.store import chat_kinds

    assert chat_kinds({"modes": modes}) == expected


@pytest.mark.parametrize("flag, value", [("--bf16", True), ("--teacher-share", 0.4)])
def test_a_new_option_enters_a_runs_fingerprint_only_when_set(flag, value):
    """Runs started before the option existed resume (no new key); a run with it is not resumed without."""
    import argparse

    from hf_specssm.training.mamba_drafter.finetune_command import _fingerprint, add_arguments
    from hf_specssm.training.redrafter.command import add_arguments as redrafter_arguments
    from hf_specssm.training.redrafter.command import store_fingerprint

    given = [flag] if value is True else [flag, str(value)]
    finetune = add_arguments(argparse.ArgumentParser())
    plain = _fingerprint(finetune.parse_args(["train", "--init", "toy"]))
    assert flag not in plain
    assert _fingerprint(finetune.parse_args(["train", "--init", "toy", *given])) == {**plain, flag: value}
    head = argparse.ArgumentParser()
    redrafter_arguments(head)
    base = ["--target", "toy-llama", "--store", "s", "--out", "o"]
    plain = store_fingerprint(head.parse_args(base))
    assert flag not in plain
    assert store_fingerprint(head.parse_args([*base, *given])) == {**plain, flag: value}


def test_a_teacher_share_fixes_each_batchs_mix_and_leaves_the_default_draw_alone():
    teacher = torch.tensor([True] * 90 + [False] * 10)
    # no share: the draw runs made before the option drew, so they resume exactly
    default = draw_indices(teacher, 64, torch.Generator().manual_seed(3))
    assert torch.equal(default, torch.randint(100, (64,), generator=torch.Generator().manual_seed(3)))
    for share in (0.0, 0.25, 0.5, 1.0):
        index = draw_indices(teacher, 64, torch.Generator().manual_seed(3), share)
        assert index.shape == (64,)
        assert int(teacher[index].sum()) == round(share * 64)  # whatever the pool's own 90%
        assert torch.equal(index, draw_indices(teacher, 64, torch.Generator().manual_seed(3), share))
    # the written 10% are all reached, not one repeated
    assert teacher[draw_indices(teacher, 400, torch.Generator().manual_seed(0), 0.0)].sum() == 0
    assert draw_indices(teacher, 400, torch.Generator().manual_seed(0), 0.0).unique().numel() == 10
    with pytest.raises(ValueError, match="--teacher-share must lie in"):
        FinetuneConfig(teacher_share=1.5)
    with pytest.raises(ValueError, match="holds no labelled one"):
        draw_indices(torch.zeros(5, dtype=torch.bool), 4, torch.Generator(), 0.5)
    with pytest.raises(ValueError, match="only teacher-forced"):
        draw_indices(torch.ones(5, dtype=torch.bool), 4, torch.Generator(), 0.5)
    # a share of 0 on a store without teacher chats, or of 1 on one with only those, is fine
    assert draw_indices(torch.zeros(5, dtype=torch.bool), 4, torch.Generator(), 0.0).shape == (4,)
    assert draw_indices(torch.ones(5, dtype=torch.bool), 4, torch.Generator(), 1.0).shape == (4,)


def test_head_rows_mark_teacher_chats_and_training_refuses_a_share_they_cannot_give(tmp_path):
    from hf_specssm.training.mamba_drafter.finetune import finetune_drafter
    from hf_specssm.training.redrafter.store_training import HeadFinetuneConfig, finetune_head

    teacher = _teacher_example(8)
    written = Example(**{**_teacher_example(5).__dict__, "mode": GREEDY})
    rows = head_rows([teacher, written], steps=3)
    assert rows.teacher.tolist() == [True] * 7 + [False] * 4
    with pytest.raises(ValueError, match="only teacher-forced"):
        finetune_head(None, head_rows([teacher], steps=3), tmp_path / "h",
                      HeadFinetuneConfig(steps=1, progress=False, teacher_share=0.5))  # fmt: skip
    with pytest.raises(ValueError, match="holds no labelled one"):
        finetune_drafter(None, [written], tmp_path / "d",
                         FinetuneConfig(steps=1, use_features=False, progress=False, teacher_share=0.5))  # fmt: skip
    assert not (tmp_path / "h").exists() and not (tmp_path / "d").exists()


def test_a_trained_head_continues_on_a_store_with_its_weights_and_vocabulary(tmp_path, capsys):
    from hf_specssm.drafters.redrafter import ReDrafterHead
    from hf_specssm.tools.cli import main

    save_chat_target(tmp_path / "model")
    root = write_corpus(tmp_path / "corpus")
    store, model = str(tmp_path / "store"), str(tmp_path / "model")
    assert main(["distill", "teach", "--store", store, "--corpus-root", str(root), "--count", "4",
                 "--code-share", "0.5", "--max-new-tokens", "40", "--target", model, "--quiet"]) == 0  # fmt: skip
    assert main(["distill", "label", "--store", store, "--target", model, "--quiet", "--dtype", "fp32"]) == 0
    base = ["train-redrafter", "--store", store, "--target", model, "--draft-vocab-size", "24", "--exit-dim",
            "48", "--batch-size", "32", "--beam-length", "3", "--checkpoint-every", "1", "--threads", "1",
            "--quiet", "--steps", "1"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "first")]) == 0
    first = ReDrafterHead.from_pretrained(tmp_path / "first", dtype=torch.float32)
    # a learning rate of ~0 keeps --init's weights: the run started from them, not from a new head
    still = [*base, "--init", str(tmp_path / "first"), "--learning-rate", "1e-12"]
    assert main([*still, "--out", str(tmp_path / "continued")]) == 0
    continued = ReDrafterHead.from_pretrained(tmp_path / "continued", dtype=torch.float32)
    fresh = [*base, "--learning-rate", "1e-12", "--out", str(tmp_path / "fresh"), "--seed", "1"]
    assert main(fresh) == 0
    again = ReDrafterHead.from_pretrained(tmp_path / "fresh", dtype=torch.float32)
    assert torch.equal(continued.draft_to_target, first.draft_to_target)
    assert torch.allclose(continued.lm_head.weight, first.lm_head.weight, atol=1e-2)
    assert not torch.allclose(again.lm_head.weight, first.lm_head.weight, atol=1e-2)
    assert continued.config.training_data.startswith("continued from ")
    # its architecture is the init's: another value is refused by name, and so is a second way to start
    assert main([*still, "--out", str(tmp_path / "x"), "--exit-dim", "64"]) == 2
    assert "--exit-dim is 64, but --init" in capsys.readouterr().err
    assert main([*still, "--out", str(tmp_path / "y"), "--init-from-target"]) == 2
    assert "pass one of them" in capsys.readouterr().err
    assert main([*still[:1], *still[3:], "--out", str(tmp_path / "z")]) == 2
    assert "--init continues a head on a --store" in capsys.readouterr().err
    assert main([*still[:1], *still[3:7], "--out", str(tmp_path / "w"), "--teacher-share", "0.5"]) == 2
    assert "--teacher-share mixes a --store's chats" in capsys.readouterr().err
    assert main([*still[:-2], "--out", str(tmp_path / "v"), "--teacher-share", "1.5"]) == 2
    assert "--teacher-share must lie in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()  # refused before --out is claimed
