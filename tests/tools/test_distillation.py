"""Self-distillation data: the broad instruction set, the sharded store, capture of soft labels and states."""

from __future__ import annotations

import gzip
import json
import re

import numpy as np
import pytest
import torch

from hf_specssm.training.distillation.generate import (
    GREEDY,
    SAMPLED,
    Task,
    answer_batch,
    load_extras,
    render,
    task_id,
)
from hf_specssm.training.distillation.instructions import (
    DEFAULT_MIX,
    build_broad_instructions,
    digest_instructions,
    followup_instructions,
    listed_requests,
    selfinstruct_instructions,
)
from hf_specssm.training.distillation.store import DistillStore
from hf_specssm.training.mamba_drafter.corpus import doc_paragraphs, python_functions

from tests.helpers.chat_models import save_chat_target, write_corpus

BENCHMARK_MARKERS = ("from typing import List\n\n\ndef ", "Natalia sold clips", "(CNN)")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = write_corpus(tmp_path_factory.mktemp("corpus"))
    return list(python_functions([folder])), list(doc_paragraphs([folder]))


def test_instructions_cover_every_domain_and_are_deterministic(corpus):
    functions, paragraphs = corpus
    first = build_broad_instructions(200, seed=1, functions=functions, paragraphs=paragraphs)
    again = build_broad_instructions(200, seed=1, functions=functions, paragraphs=paragraphs)
    assert [(i.id, i.messages) for i in first] == [(i.id, i.messages) for i in again]
    domains = {i.domain for i in first}
    assert domains == set(DEFAULT_MIX)
    assert len({i.id for i in first}) == len(first)
    texts = [i.messages[0]["content"] for i in first]
    assert not any(marker in text for marker in BENCHMARK_MARKERS for text in texts)
    assert any(text.startswith(("Translate", "Please translate", "How would you say")) for text in texts)
    assert any(
        "Passage" in text or "Context" in text or "excerpt" in text or "Read the text" in text
        for text in texts
    )
    by_domain = {i.domain: i.messages[0]["content"] for i in first}
    assert "news" in by_domain["article"] or "journalist" in by_domain["article"]
    assert "per line" in by_domain["brainstorm"].lower()


def test_a_larger_count_extends_every_domain_without_changing_earlier_texts(corpus):
    functions, paragraphs = corpus
    small = {
        i.id: i.messages for i in build_broad_instructions(100, functions=functions, paragraphs=paragraphs)
    }
    large = {
        i.id: i.messages for i in build_broad_instructions(300, functions=functions, paragraphs=paragraphs)
    }
    # code draws from a pool of two functions here: it cannot grow; every other domain must keep its texts
    shared = [key for key in small if not key.startswith("code")]
    assert shared and all(large[key] == small[key] for key in shared)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param({"count": 0}, "count must be >= 1", id="count"),
        pytest.param({"count": 5, "mix": {"poetry": 1.0}}, "mix must give", id="unknown-domain"),
        pytest.param({"count": 5, "mix": {"code": -1.0}}, "mix must give", id="negative"),
        pytest.param({"count": 5, "mix": {"rag": 1.0}, "paragraphs": []}, "no documentation", id="no-docs"),
    ],
)
def test_bad_instruction_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_broad_instructions(functions=[], **kwargs)


def test_followups_continue_the_targets_own_answer(corpus):
    functions, paragraphs = corpus
    instructions = build_broad_instructions(60, functions=functions, paragraphs=paragraphs)
    pairs = [(instruction, f"answer to {instruction.id}") for instruction in instructions]
    followups = followup_instructions(pairs, share=0.5)
    assert 10 < len(followups) < 50
    by_id = {i.id: i for i in instructions}
    for followup in followups:
        first = by_id[followup.id.removeprefix("followup-")]
        assert followup.domain == "followup"
        assert followup.messages[:1] == first.messages
        assert followup.messages[1] == {"role": "assistant", "content": f"answer to {first.id}"}
        assert followup.messages[2]["role"] == "user"
    # the choice of a record does not depend on the others
    assert {f.id for f in followup_instructions(pairs[:30], share=0.5)} <= {f.id for f in followups}


def test_digests_quote_the_targets_own_article_and_skip_the_rest(corpus):
    functions, paragraphs = corpus
    instructions = build_broad_instructions(200, functions=functions, paragraphs=paragraphs)
    articles = [i for i in instructions if i.domain == "article"]
    other = next(i for i in instructions if i.domain == "chat")
    story = "Residents of Porto cheered on Monday as the new bridge opened. " * 5
    pairs = [(articles[0], story), (articles[1], "Too short."), (other, story)]
    digests = digest_instructions(pairs)
    assert [d.id for d in digests] == [f"digest-{articles[0].id}"]
    assert digests[0].domain == "digest" and story.strip() in digests[0].messages[0]["content"]
    assert digests == digest_instructions(pairs)  # the request chosen is seeded by the id


@pytest.mark.parametrize(
    "answer, expected",
    [
        pytest.param(
            "1. How do I write a polite reminder email?\n2) Draft a thank-you note to my team.\n",
            ["How do I write a polite reminder email?", "Draft a thank-you note to my team."],
            id="numbered",
        ),
        pytest.param(
            "Here are some ideas:\n- Plan a 3-day trip to Kyoto on a budget\n* What should I pack for Iceland?",
            ["Plan a 3-day trip to Kyoto on a budget", "What should I pack for Iceland?"],
            id="bullets-and-heading",
        ),
        pytest.param(
            '"Explain the causes of the First World War."\nshort\n\n'
            '"Explain the causes of the First World War."\n**Budget:** How can I save for a car?',
            ["Explain the causes of the First World War.", "Budget: How can I save for a car?"],
            id="quotes-duplicates-bold",
        ),
    ],
)
def test_listed_requests_are_the_lines_of_a_list(answer, expected):
    assert listed_requests(answer) == expected


def test_selfinstruct_turns_each_listed_request_into_a_first_turn(corpus):
    functions, paragraphs = corpus
    instructions = build_broad_instructions(200, functions=functions, paragraphs=paragraphs)
    lists = [i for i in instructions if i.domain == "brainstorm"][:2]
    answer = "\n".join(f"{n}. Request number {n} about something useful" for n in range(1, 9))
    pairs = [(lists[0], answer), (lists[1], "nothing listed")]
    made = selfinstruct_instructions(pairs, per_list=3)
    assert [m.id for m in made] == [f"selfinstruct-{lists[0].id}-{n}" for n in range(3)]
    assert made[2].messages == [{"role": "user", "content": "Request number 3 about something useful"}]
    assert {m.domain for m in made} == {"selfinstruct"}
    # a request listed before (case and punctuation aside) is not asked twice; the index stays the line's
    repeated = (lists[1], "- request number 2 about something useful!\n- A new request that is long enough")
    again = selfinstruct_instructions([*pairs[:1], repeated], per_list=3)
    assert [m.id for m in again] == [*(m.id for m in made), f"selfinstruct-{lists[1].id}-1"]
    # brainstorm lists get no follow-up ("make that shorter" after a list of requests)
    assert not followup_instructions([(lists[0], answer)] * 3, share=1.0)


def test_the_task_list_puts_what_the_targets_answers_allow_first(tmp_path, corpus):
    from argparse import Namespace

    from hf_specssm.training.distillation.command import _tasks as command_tasks

    functions, paragraphs = corpus
    _, tokenizer = save_chat_target(tmp_path / "model")
    instructions = build_broad_instructions(200, functions=functions, paragraphs=paragraphs)
    article = next(i for i in instructions if i.domain == "article")
    brainstorm = next(i for i in instructions if i.domain == "brainstorm")
    store = DistillStore(tmp_path / "store", recipe={})
    answers = {article: "The mayor of Accra opened a new library on Friday. " * 6,
               brainstorm: "- How do I boil an egg perfectly?\n- Suggest a quick vegan dinner for two."}  # fmt: skip
    for instruction, text in answers.items():
        prompt = render(tokenizer, instruction)
        ids = prompt + tokenizer(text, add_special_tokens=False)["input_ids"]
        record = {"id": task_id(instruction.id, GREEDY), "domain": instruction.domain, "mode": GREEDY,
                  "input_ids": ids, "prompt_length": len(prompt), "finished": True}  # fmt: skip
        store.append([record])
    args = Namespace(sample_share=0.0, followup_share=0.0, seed=0, max_prompt_tokens=10_000)
    tasks, _ = command_tasks(args, tokenizer, store, instructions)
    ids = [task.id for task in tasks]
    assert ids[0] == task_id(f"digest-{article.id}", GREEDY)
    assert ids[1:3] == [task_id(f"selfinstruct-{brainstorm.id}-{n}", GREEDY) for n in range(2)]
    assert tasks[1].instruction.messages[0]["content"] == "How do I boil an egg perfectly?"
    assert task_id(article.id, GREEDY) not in ids and task_id(brainstorm.id, GREEDY) not in ids
    assert len(ids) == len(set(ids)) == 3 + len(instructions) - 2


def test_the_store_seals_shards_and_repairs_what_a_kill_leaves(tmp_path):
    store = DistillStore(tmp_path, recipe={"--target": "t"})
    records = [{"id": f"r{i}", "domain": "code", "mode": GREEDY, "input_ids": [1, 2, 3], "prompt_length": 1}
               for i in range(5)]  # fmt: skip
    store.append(records[:3])
    store.seal(min_records=3)
    store.append(records[3:])
    assert store.done_ids() == {f"r{i}" for i in range(5)}
    shard = tmp_path / store.manifest["shards"][0]["name"]
    with gzip.open(shard, "rt") as handle:
        assert [json.loads(line)["id"] for line in handle] == ["r0", "r1", "r2"]
    # a kill mid-append leaves a torn line; a kill after sealing but before emptying leaves duplicates;
    # a kill after writing a shard but before the manifest leaves an unnamed shard
    with open(tmp_path / "open.jsonl", "a") as handle:
        handle.write(json.dumps(records[0]) + "\n" + '{"id": "torn", "dom')
    (tmp_path / "shard-00001.jsonl.gz").write_bytes(b"garbage")
    reopened = DistillStore(tmp_path, recipe={"--target": "t"})
    assert [r["id"] for r in reopened.records()] == ["r0", "r1", "r2", "r3", "r4"]
    assert not (tmp_path / "shard-00001.jsonl.gz").exists()
    assert reopened.summary()["answer_tokens"] == 10


def test_another_recipe_is_refused(tmp_path):
    DistillStore(tmp_path, recipe={"--target": "a", "--top-k": 8})
    with pytest.raises(ValueError, match="--target: was 'a', now 'b'"):
        DistillStore(tmp_path, recipe={"--target": "b", "--top-k": 8})
    with pytest.raises(ValueError, match="not a distillation store"):
        DistillStore(tmp_path / "empty")


def _tasks(tokenizer, instructions, mode):
    return [Task(task_id(i.id, mode), i, mode, tuple(render(tokenizer, i))) for i in instructions]


def test_greedy_answers_and_their_captures_match_the_target(tmp_path, corpus):
    functions, paragraphs = corpus
    model, tokenizer = save_chat_target(tmp_path / "model")
    instructions = build_broad_instructions(6, functions=functions, paragraphs=paragraphs)
    store = DistillStore(tmp_path / "store", recipe={})
    tasks = _tasks(tokenizer, instructions, GREEDY)
    produced = answer_batch(model, tokenizer, tasks, store, max_new_tokens=8, top_k=4)
    records = list(store.records())
    assert produced == sum(len(r["input_ids"]) - r["prompt_length"] for r in records) > 0
    for task, record in zip(tasks, records):
        prompt = torch.tensor([task.prompt_ids])
        alone = model.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()
        assert record["input_ids"] == alone[: len(record["input_ids"])]
        extras = load_extras(store, record)
        ids = torch.tensor([record["input_ids"]])
        with torch.no_grad():
            output = model(ids, output_hidden_states=True)
        answer = slice(record["prompt_length"] - 1, len(record["input_ids"]) - 1)
        logp = output.logits[0, answer].log_softmax(-1)
        expected = logp.topk(4, dim=-1)
        assert np.array_equal(extras["topk_ids"], expected.indices.numpy())
        assert np.allclose(extras["topk_logp"], expected.values.numpy(), atol=2e-3)
        assert np.allclose(extras["hidden"], output.hidden_states[-1][0, answer].numpy(), atol=2e-3)
        # the first top-k entry of a greedy answer is the answer token
        assert extras["topk_ids"][:, 0].tolist() == record["input_ids"][record["prompt_length"] :]


def test_sampled_batches_are_reproducible_and_differ_from_greedy(tmp_path, corpus):
    functions, paragraphs = corpus
    model, tokenizer = save_chat_target(tmp_path / "model")
    instructions = build_broad_instructions(4, functions=functions, paragraphs=paragraphs)
    answers = []
    for run in range(2):
        store = DistillStore(tmp_path / f"store{run}", recipe={})
        answer_batch(model, tokenizer, _tasks(tokenizer, instructions, SAMPLED), store, max_new_tokens=12)
        answers.append([r["input_ids"] for r in store.records()])
    assert answers[0] == answers[1]
    greedy = DistillStore(tmp_path / "greedy", recipe={})
    answer_batch(model, tokenizer, _tasks(tokenizer, instructions, GREEDY), greedy, max_new_tokens=12)
    assert [r["input_ids"] for r in greedy.records()] != answers[0]
    assert {r["id"].split("@")[1] for r in store.records()} == {SAMPLED}


def test_mixed_modes_in_one_batch_are_refused(tmp_path, corpus):
    functions, paragraphs = corpus
    model, tokenizer = save_chat_target(tmp_path / "model")
    instructions = build_broad_instructions(10, functions=functions, paragraphs=paragraphs)
    tasks = _tasks(tokenizer, instructions[:1], GREEDY) + _tasks(tokenizer, instructions[1:2], SAMPLED)
    with pytest.raises(ValueError, match="one mode"):
        answer_batch(model, tokenizer, tasks, DistillStore(tmp_path / "s", recipe={}), max_new_tokens=4)


def test_the_command_resumes_and_grows(tmp_path, corpus, capsys):
    from hf_specssm.tools.cli import main

    save_chat_target(tmp_path / "model")
    root = write_corpus(tmp_path / "corpus")
    base = ["distill", "generate", "--target", str(tmp_path / "model"), "--store", str(tmp_path / "store"),
            "--corpus-root", str(root), "--batch-size", "4", "--max-new-tokens", "6", "--shard-records", "8",
            "--quiet"]  # fmt: skip
    assert main([*base, "--count", "10"]) == 0
    first = DistillStore(tmp_path / "store").summary()["records"]
    assert first >= 10
    assert main([*base, "--count", "10"]) == 0
    assert DistillStore(tmp_path / "store").summary()["records"] == first
    assert main([*base, "--count", "20"]) == 0
    grown = DistillStore(tmp_path / "store")
    assert grown.summary()["records"] > first
    assert len(grown.manifest["runs"]) == 3
    assert (
        main([*base[:1], "pack", "--store", str(tmp_path / "store"), "--pack-out", str(tmp_path / "pack")])
        == 0
    )
    assert main([*base, "--count", "20", "--max-new-tokens", "7"]) == 2
    assert "another recipe" in capsys.readouterr().err


def test_an_interrupted_run_records_the_batches_it_stored(tmp_path, corpus, monkeypatch):
    from hf_specssm.tools.cli import main
    from hf_specssm.training.distillation import generate

    save_chat_target(tmp_path / "model")
    root = write_corpus(tmp_path / "corpus")
    answer_batch, calls = generate.answer_batch, []

    def interrupted_after_one(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return answer_batch(*args, **kwargs)

    monkeypatch.setattr(generate, "answer_batch", interrupted_after_one)
    argv = ["distill", "generate", "--target", str(tmp_path / "model"), "--store", str(tmp_path / "store"),
            "--corpus-root", str(root), "--batch-size", "4", "--max-new-tokens", "6", "--count", "10",
            "--batching", "static", "--quiet"]  # fmt: skip
    assert main(argv) == 130
    store = DistillStore(tmp_path / "store")
    run = store.manifest["runs"][-1]
    assert store.summary()["records"] == 4
    assert run["answers"] == 4 and run["answer_tokens"] == store.summary()["answer_tokens"] > 0


def test_a_pack_round_trips_the_chats_and_refuses_damage_and_size(tmp_path):
    from hf_specssm.training.distillation.pack import pack_store, read_pack

    store = DistillStore(tmp_path / "store", recipe={"--target": "t"})
    records = [{"id": f"r{i}", "domain": "math", "mode": GREEDY, "input_ids": list(range(i, i + 9 + i)),
                "prompt_length": 4, "finished": i % 2 == 0} for i in range(7)]  # fmt: skip
    store.append(records)
    store.seal()
    folder = pack_store(store, tmp_path / "pack")
    assert [{k: r[k] for k in records[0]} for r in read_pack(folder)] == records
    assert "Licences" in (folder / "README.md").read_text()
    with pytest.raises(ValueError, match="over the limit"):
        pack_store(store, tmp_path / "pack", max_bytes=100)
    assert list(read_pack(folder))  # the old pack is intact
    # a folder holding anything else (the packs' parent, say) is never replaced
    (tmp_path / "parent" / "other-target").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds other-target, not a pack"):
        pack_store(store, tmp_path / "parent")
    assert (tmp_path / "parent" / "other-target").is_dir()
    assert pack_store(store, folder) == folder  # a pack's own folder is replaced
    data = bytearray((folder / "answers.npz").read_bytes())
    data[-5] ^= 1
    (folder / "answers.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        list(read_pack(folder))


def test_the_data_stage_reads_a_store_a_pack_or_jsonl_alike(tmp_path):
    from hf_specssm.training.distillation.pack import pack_store
    from hf_specssm.training.mamba_drafter.data import read_answers

    store = DistillStore(tmp_path / "store", recipe={})
    records = [{"id": f"r{i}", "domain": "qa", "mode": SAMPLED, "input_ids": [i, i + 1, i + 2],
                "prompt_length": 1, "finished": True} for i in range(3)]  # fmt: skip
    store.append(records)
    pack = pack_store(store, tmp_path / "pack")
    jsonl = tmp_path / "answers.jsonl"
    jsonl.write_text("".join(json.dumps(record) + "\n" for record in records))
    keys = ("id", "input_ids", "prompt_length")
    for source in (tmp_path / "store", pack, jsonl):
        assert [{k: r[k] for k in keys} for r in read_answers(source)] == [
            {k: r[k] for k in keys} for r in records
        ]
    with pytest.raises(ValueError, match="neither a distillation store"):
        list(read_answers(tmp_path))


@pytest.mark.parametrize(
    "option, value, message",
    [
        pytest.param("--batch-size", "0", "--batch-size must be >= 1", id="batch"),
        pytest.param("--sample-share", "1.5", r"--sample-share must lie in \[0, 1\]", id="share"),
        pytest.param("--hours", "0", "--hours must be > 0", id="hours"),
        pytest.param("--top-k", "0", "--top-k must be >= 1", id="top-k"),
        pytest.param("--mix", "poetry=1", "--mix takes domain=share items", id="mix-domain"),
        pytest.param("--mix", "article=-1", "--mix takes domain=share items", id="mix-negative"),
        pytest.param("--mix", "article=0", "--mix needs a positive share", id="mix-zero"),
    ],
)
def test_bad_options_are_refused_before_anything_loads(tmp_path, capsys, option, value, message):
    from hf_specssm.tools.cli import main

    store = tmp_path / "store"
    assert (
        main(
            [
                "distill",
                "generate",
                "--target",
                str(tmp_path / "missing"),
                "--store",
                str(store),
                option,
                value,
            ]
        )
        == 2
    )
    assert re.search(message, capsys.readouterr().err)
    assert not store.exists()


def test_an_unpacked_pack_lets_generation_continue_and_trains_on_hard_labels(tmp_path):
    from hf_specssm.training.distillation.pack import pack_store, unpack_into_store
    from hf_specssm.training.mamba_drafter.finetune import load_examples

    store = DistillStore(tmp_path / "store", recipe={"--top-k": 3})
    records = [{"id": f"r{i}", "domain": "qa", "mode": GREEDY, "input_ids": [5, 6, 7 + i, 8, 9],
                "prompt_length": 2, "finished": True} for i in range(4)]  # fmt: skip
    store.append(records)
    run = {
        "answers": 4,
        "answer_tokens": 12,
        "seconds": 6.0,
        "tokens_per_hour": 7200,
        "dtype": "fp32",
        "device": "cpu",
        "batch_size": 4,
        "threads": 1,
        "count": 4,
    }
    store.add_run(run)
    pack = pack_store(store, tmp_path / "pack")
    fresh = DistillStore(tmp_path / "later", recipe={"--top-k": 3})
    assert unpack_into_store(pack, fresh) == 4
    assert unpack_into_store(pack, fresh) == 0
    assert fresh.done_ids() == {f"r{i}" for i in range(4)}
    # the pack's runs come along once, so a pack rewritten from this store keeps its history
    assert fresh.manifest["runs"] == [run]
    examples = load_examples(fresh, "all")
    example = examples[0]
    assert example.hidden is None and example.topk_ids.shape == (3, 3)
    assert example.topk_ids[:, 0].tolist() == example.ids[2:].tolist()
    assert torch.softmax(example.topk_logp, -1)[:, 0].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="no usable"):
        load_examples(fresh, "all", need_hidden=True)


def _labelled_pair(tmp_path, corpus, recipe):
    """A store generated with extras, and the same chats unpacked from its pack into a second store."""
    from hf_specssm.training.distillation.pack import pack_store, unpack_into_store

    functions, paragraphs = corpus
    model, tokenizer = save_chat_target(tmp_path / "model")
    instructions = build_broad_instructions(6, functions=functions, paragraphs=paragraphs)
    made = DistillStore(tmp_path / "made", recipe=recipe)
    for mode in (GREEDY, SAMPLED):
        answer_batch(
            model, tokenizer, _tasks(tokenizer, instructions, mode), made, max_new_tokens=10, top_k=4
        )
    made.seal()
    later = DistillStore(tmp_path / "later", recipe=recipe)
    unpack_into_store(pack_store(made, tmp_path / "pack"), later)
    return model, made, later


def test_labelling_unpacked_chats_recovers_what_generation_captured(tmp_path, corpus):
    from hf_specssm.training.distillation.label import label_store, unlabelled
    from hf_specssm.training.mamba_drafter.finetune import load_examples

    model, made, later = _labelled_pair(tmp_path, corpus, {"--top-k": 4})
    count = made.summary()["records"]
    assert len(unlabelled(later)) == count >= 12
    assert all(load_extras(later, record) == {} for record in later.records())
    # a small token budget: several batches of different widths
    chats, tokens, _ = label_store(model, later, batch_tokens=200)
    assert chats == count and tokens == made.summary()["answer_tokens"]
    assert unlabelled(later) == [] and len({r["extras"] for r in later.records()}) > 2
    originals = {record["id"]: load_extras(made, record) for record in made.records()}
    for record in later.records():
        got, want = load_extras(later, record), originals[record["id"]]
        assert set(got) == {"topk_ids", "topk_logp", "hidden"}
        assert np.array_equal(got["topk_ids"], want["topk_ids"])
        assert np.allclose(got["topk_logp"], want["topk_logp"], atol=2e-3)
        assert np.allclose(got["hidden"], want["hidden"], atol=2e-3)
    assert len(load_examples(later, "all", need_hidden=True)) == len(load_examples(made, "all"))


def test_labelling_resumes_after_a_kill_and_labels_each_chat_once(tmp_path, corpus):
    from hf_specssm.training.distillation.label import label_store, unlabelled

    model, made, later = _labelled_pair(tmp_path, corpus, {"--top-k": 4})
    count = made.summary()["records"]
    assert label_store(model, later, batch_tokens=200, limit=5)[0] == 5
    assert len(unlabelled(later)) == count - 5
    # a kill while appending a batch's entries leaves a torn line: reopening drops it, the chat stays to do
    with open(later.root / "labels.jsonl", "a") as sink:
        sink.write('{"id": "' + unlabelled(later)[0]["id"] + '", "extras": "l-')
    reopened = DistillStore(later.root)
    assert len(unlabelled(reopened)) == count - 5
    assert label_store(model, reopened, batch_tokens=200)[0] == count - 5
    lines = (later.root / "labels.jsonl").read_text().splitlines()
    assert len(lines) == count and unlabelled(reopened) == []
    # chats that kept their extras from generation are never relabelled
    assert label_store(model, made)[0] == 0


def test_the_label_command_labels_refuses_another_target_and_records_its_run(tmp_path, corpus, capsys):
    from hf_specssm.tools.cli import main
    from hf_specssm.training.mamba_drafter.command import _target_fingerprint

    save_chat_target(tmp_path / "model")
    recipe = {"--target": _target_fingerprint(str(tmp_path / "model")), "--top-k": 4}
    _, _, later = _labelled_pair(tmp_path, corpus, recipe)
    save_chat_target(tmp_path / "other", seed=1)
    base = [
        "distill",
        "label",
        "--store",
        str(later.root),
        "--quiet",
        "--dtype",
        "fp32",
        "--batch-tokens",
        "300",
    ]
    assert main([*base, "--target", str(tmp_path / "other")]) == 2
    assert "not the target the store" in capsys.readouterr().err
    assert main([*base, "--target", str(tmp_path / "model"), "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err
    assert main([*base, "--target", str(tmp_path / "model")]) == 0
    store = DistillStore(later.root)
    (run,) = store.manifest["label_runs"]
    assert (
        run["chats"] == store.summary()["records"]
        and run["answer_tokens"] == store.summary()["answer_tokens"]
    )
    assert all(record["labels_dtype"] == "fp32" for record in store.records())
    assert main([*base[:-2], "--target", str(tmp_path / "model")]) == 0
    assert len(DistillStore(later.root).manifest["label_runs"]) == 1


def test_labelling_refuses_a_chat_without_a_prompt_and_a_store_without_top_k(tmp_path):
    from hf_specssm.training.distillation.label import label_batch, label_store

    store = DistillStore(tmp_path / "store", recipe={"--top-k": 2})
    chat = {"id": "r0", "domain": "qa", "mode": GREEDY, "input_ids": [1, 2, 3], "prompt_length": 0}
    with pytest.raises(ValueError, match="has no prompt"):
        label_batch(torch.nn.Linear(1, 1), [chat], store, top_k=2)
    assert not list((store.root / "extras").iterdir()) and store.labels() == {}
    with pytest.raises(ValueError, match="records no --top-k"):
        label_store(torch.nn.Linear(1, 1), DistillStore(tmp_path / "bare", recipe={}))
    with pytest.raises(ValueError, match="--batch-tokens"):
        label_store(torch.nn.Linear(1, 1), store, batch_tokens=0)
