"""Distillation with a refilling batch: each answer equals its prompt decoded alone, whatever shares its batch."""

from __future__ import annotations

import collections
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hf_specssm.training.distillation import refill
from hf_specssm.training.distillation.generate import GREEDY, SAMPLED, Task, load_extras, render, task_id
from hf_specssm.training.distillation.instructions import build_broad_instructions
from hf_specssm.training.distillation.refill import RefillDecoder, refill_problem, run_tasks_refill
from hf_specssm.training.distillation.store import DistillStore
from hf_specssm.training.mamba_drafter.corpus import doc_paragraphs, python_functions

from tests.helpers.chat_models import save_chat_target, write_corpus
from tests.helpers.models import build
from tests.helpers.sampling import ALPHA, chi_square_p_value

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = write_corpus(tmp_path_factory.mktemp("corpus"))
    return list(python_functions([folder])), list(doc_paragraphs([folder]))


@pytest.fixture(scope="module")
def target(tmp_path_factory, corpus):
    """The tiny chat target with a second end token that its greedy answers reach at different steps."""
    model, tokenizer = save_chat_target(tmp_path_factory.mktemp("model"))
    functions, paragraphs = corpus
    instructions = build_broad_instructions(12, functions=functions, paragraphs=paragraphs)
    tasks = [Task(task_id(i.id, GREEDY), i, GREEDY, tuple(render(tokenizer, i))) for i in instructions]
    answers = [_alone(model, task) for task in tasks]
    # the token most answers hold somewhere after their first: rows then end at different steps
    counts = collections.Counter(token for answer in answers for token in set(answer[1:]))
    end = counts.most_common(1)[0][0]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end]
    return model, tokenizer, instructions


def _alone(model, task: Task) -> list[int]:
    """The greedy answer of `task` decoded alone by `generate`."""
    prompt = torch.tensor([task.prompt_ids])
    with torch.no_grad():
        output = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    return output[0, prompt.shape[1] :].tolist()


def _tasks(tokenizer, instructions, mode: str) -> list[Task]:
    return [Task(task_id(i.id, mode), i, mode, tuple(render(tokenizer, i))) for i in instructions]


def test_refilled_greedy_answers_and_captures_equal_each_prompt_alone(tmp_path, target, monkeypatch):
    model, tokenizer, instructions = target
    tasks = _tasks(tokenizer, instructions, GREEDY)
    joined = []
    admit = RefillDecoder.admit

    def recording_admit(self, new):
        joined.append((len(self.rows), len(new)))
        return admit(self, new)

    monkeypatch.setattr(RefillDecoder, "admit", recording_admit)
    store = DistillStore(tmp_path / "store", recipe={})
    answers, produced, _ = run_tasks_refill(
        model, tokenizer, tasks, store, batch_size=3, max_new_tokens=NEW_TOKENS, shard_records=4, top_k=4
    )
    records = {record["id"]: record for record in store.records()}
    assert answers == len(tasks) == len(records)
    # tasks joined a batch that was decoding, and no more than 3 rows were ever in flight
    assert any(in_flight > 0 for in_flight, _ in joined)
    assert all(in_flight + new <= 3 for in_flight, new in joined)
    lengths = set()
    for task in tasks:
        record = records[task.id]
        answer = record["input_ids"][record["prompt_length"] :]
        assert answer == _alone(model, task)
        assert record["finished"] == (
            len(answer) < NEW_TOKENS or answer[-1] in model.generation_config.eos_token_id
        )
        lengths.add(len(answer))
        extras = load_extras(store, record)
        with torch.no_grad():
            output = model(torch.tensor([record["input_ids"]]), output_hidden_states=True)
        positions = slice(record["prompt_length"] - 1, len(record["input_ids"]) - 1)
        expected = output.logits[0, positions].log_softmax(-1).topk(4, dim=-1)
        assert np.array_equal(extras["topk_ids"], expected.indices.numpy())
        assert np.allclose(extras["topk_logp"], expected.values.numpy(), atol=2e-3)
        assert np.allclose(extras["hidden"], output.hidden_states[-1][0, positions].numpy(), atol=2e-3)
    # answers of several lengths: rows left the batch at different steps
    assert len(lengths) >= 3
    assert produced == sum(len(r["input_ids"]) - r["prompt_length"] for r in records.values())


def test_sampled_rows_do_not_depend_on_the_rows_beside_them(tmp_path, target):
    model, tokenizer, instructions = target
    mixed = _tasks(tokenizer, instructions[:6], SAMPLED) + _tasks(tokenizer, instructions[6:], GREEDY)
    mixed = mixed[::2] + mixed[1::2]
    answers = []
    for batch_size in (1, 4):
        store = DistillStore(tmp_path / f"store{batch_size}", recipe={})
        run_tasks_refill(
            model, tokenizer, mixed, store, batch_size, max_new_tokens=NEW_TOKENS, shard_records=8
        )
        answers.append({r["id"]: r["input_ids"][r["prompt_length"] :] for r in store.records()})
    assert answers[0] == answers[1] and len(answers[1]) == len(mixed)
    for task in mixed:
        if task.mode == GREEDY:
            assert answers[1][task.id] == _alone(model, task)
    # the sampled answers are draws, not the greedy answers
    greedy = _tasks(tokenizer, instructions[:6], GREEDY)
    assert any(answers[1][task_id(task.id, SAMPLED)] != _alone(model, task) for task in greedy)


def test_sampled_first_tokens_follow_the_targets_distribution_at_its_temperature(tmp_path, target):
    _, _, instructions = target
    model, tokenizer = save_chat_target(tmp_path / "model")
    # a peaked distribution (the random head's is near uniform), so that temperature 1 is told apart
    model.lm_head.weight.data *= 12
    instruction = instructions[0]
    prompt = tuple(render(tokenizer, instruction))
    draws = 1200
    tasks = [
        Task(f"{instruction.id}-{index}@{SAMPLED}", instruction, SAMPLED, prompt) for index in range(draws)
    ]
    store = DistillStore(tmp_path / "store", recipe={})
    run_tasks_refill(model, tokenizer, tasks, store, batch_size=64, max_new_tokens=1, shard_records=draws)
    firsts = [record["input_ids"][len(prompt)] for record in store.records()]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    probs = (logits / 0.7).softmax(-1).numpy().astype(np.float64)
    counts = np.bincount(firsts, minlength=probs.size)
    assert chi_square_p_value(counts, probs / probs.sum()) > ALPHA
    # controls: the same draws reject the distribution at temperature 1 and the greedy token alone
    plain = logits.softmax(-1).numpy().astype(np.float64)
    assert chi_square_p_value(counts, plain / plain.sum()) < ALPHA
    assert counts.max() < draws


def test_a_passed_deadline_admits_nothing_and_rows_in_flight_finish(tmp_path, target, monkeypatch):
    model, tokenizer, instructions = target
    tasks = _tasks(tokenizer, instructions, GREEDY)
    store = DistillStore(tmp_path / "none", recipe={})
    assert run_tasks_refill(
        model, tokenizer, tasks, store, 3, NEW_TOKENS, shard_records=8, deadline=time.monotonic()
    )[:2] == (0, 0)
    assert list(store.records()) == []
    # a deadline that passes while the first rows decode: those rows finish, no later task joins
    clock, admit, calls = [0.0], RefillDecoder.admit, []

    def admit_then_expire(self, new):
        calls.append(len(new))
        admit(self, new)
        clock[0] = 10.0

    store = DistillStore(tmp_path / "some", recipe={})
    monkeypatch.setattr(RefillDecoder, "admit", admit_then_expire)
    monkeypatch.setattr(refill, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    answers, _, _ = run_tasks_refill(
        model, tokenizer, tasks, store, 3, NEW_TOKENS, shard_records=8, deadline=5.0
    )
    assert calls == [3] and answers == 3 == len(list(store.records()))


def test_task_supply_is_asked_again_with_the_ids_in_flight(tmp_path, target):
    model, tokenizer, instructions = target
    tasks = _tasks(tokenizer, instructions, GREEDY)
    store = DistillStore(tmp_path / "store", recipe={})
    asked = []

    def supply(busy):
        asked.append(set(busy))
        done = store.done_ids() | busy
        return [task for task in tasks if task.id not in done][:4]

    answers, _, _ = run_tasks_refill(model, tokenizer, supply, store, 3, NEW_TOKENS, shard_records=8)
    assert answers == len(tasks) == len(store.done_ids())
    # asked each time the queue ran dry (4 tasks a time), with the rows still decoding named
    assert len(asked) == len(tasks) // 4 + 1 and asked[0] == set() and all(asked[1:])


def test_an_interrupt_stores_the_answers_finished_so_far(tmp_path, target, monkeypatch):
    model, tokenizer, instructions = target
    tasks = _tasks(tokenizer, instructions, GREEDY)
    step, steps = RefillDecoder.step, []

    def interrupted(self):
        steps.append(1)
        if len(steps) == 2 * NEW_TOKENS:
            raise KeyboardInterrupt
        step(self)

    monkeypatch.setattr(RefillDecoder, "step", interrupted)
    store = DistillStore(tmp_path / "store", recipe={})
    with pytest.raises(KeyboardInterrupt):
        run_tasks_refill(model, tokenizer, tasks, store, 3, NEW_TOKENS, shard_records=100)
    records = list(store.records())
    assert 3 <= len(records) < len(tasks)
    for record in records:
        task = next(task for task in tasks if task.id == record["id"])
        assert record["input_ids"][record["prompt_length"] :] == _alone(model, task)


@pytest.mark.parametrize("kind", [pytest.param("mamba2", id="mamba2"), pytest.param("jamba", id="jamba")])
def test_recurrent_targets_are_refused_with_the_reason(kind):
    model = build(kind)
    problem = refill_problem(model)
    assert problem is not None and "not plain full attention" in problem
    assert refill_problem(build("llama")) is None


def test_the_command_refills_falls_back_to_static_batches_and_records_the_batching(
    tmp_path, corpus, capsys, monkeypatch
):
    from hf_specssm.tools.cli import main

    save_chat_target(tmp_path / "model")
    root = write_corpus(tmp_path / "corpus")
    base = ["distill", "generate", "--target", str(tmp_path / "model"), "--store", str(tmp_path / "store"),
            "--corpus-root", str(root), "--batch-size", "4", "--max-new-tokens", "6"]  # fmt: skip
    assert main([*base, "--count", "10", "--quiet"]) == 0
    assert main([*base, "--count", "14", "--batching", "static", "--quiet"]) == 0
    monkeypatch.setattr(refill, "refill_problem", lambda target: "its cache layers are X")
    assert main([*base, "--count", "18"]) == 0
    assert (
        "--batching static: LlamaForCausalLM cannot decode with a refilling batch (its cache layers are X)"
        in (capsys.readouterr().out)
    )
    runs = DistillStore(tmp_path / "store").manifest["runs"]
    assert [run["batching"] for run in runs] == ["refill", "static", "static"]
    assert all(run["answers"] > 0 for run in runs)


def test_an_interrupted_refilling_run_records_the_answers_it_stored(tmp_path, corpus, monkeypatch):
    from hf_specssm.tools.cli import main

    save_chat_target(tmp_path / "model")
    root = write_corpus(tmp_path / "corpus")
    step, steps = RefillDecoder.step, []

    def interrupted(self):
        steps.append(1)
        if len(steps) == 12:
            raise KeyboardInterrupt
        step(self)

    monkeypatch.setattr(RefillDecoder, "step", interrupted)
    argv = ["distill", "generate", "--target", str(tmp_path / "model"), "--store", str(tmp_path / "store"),
            "--corpus-root", str(root), "--batch-size", "4", "--max-new-tokens", "6", "--count", "10",
            "--quiet"]  # fmt: skip
    assert main(argv) == 130
    store = DistillStore(tmp_path / "store")
    run = store.manifest["runs"][-1]
    assert 0 < store.summary()["records"] < 10
    assert run["answers"] == store.summary()["records"]
    assert run["answer_tokens"] == store.summary()["answer_tokens"] > 0
