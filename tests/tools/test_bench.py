"""The benchmark harness: prompt sets, rows, resume, timing split, summaries, plots and the CLI."""

from __future__ import annotations

import json
import time

import pytest
import torch

import hf_specssm
from hf_specssm.tools.bench.harness import BenchContext, ForwardTimer, peak_memory, read_rows, run_benchmark
from hf_specssm.tools.bench.long_context import long_context_table
from hf_specssm.tools.bench.methods import GenerationSettings, standard_methods
from hf_specssm.tools.bench.prompt_sets import PROMPT_SETS, BenchPrompt, load_prompt_set
from hf_specssm.tools.bench.report import markdown_tables, summarize

from tests.helpers.models import align, build

VOCAB = 64


@pytest.mark.parametrize(
    "name, count, first_id, marker",
    [
        pytest.param("humaneval", 164, "HumanEval/0", "def has_close_elements", id="humaneval"),
        pytest.param("gsm8k", 1319, "gsm8k-0", "Janet", id="gsm8k"),
        pytest.param("mt_bench", 80, "81", "Hawaii", id="mt_bench"),
        pytest.param("cnn_dm", 80, "241", "Summarize", id="cnn_dm"),
        pytest.param("outside", 16, "outside-0", "SQL query", id="outside"),
    ],
)
def test_prompt_sets_load_in_file_order(name, count, first_id, marker):
    prompts = load_prompt_set(name)
    assert len(prompts) == count
    assert prompts[0].id == first_id and marker in prompts[0].text
    assert [p.id for p in load_prompt_set(name, limit=2, offset=3)] == [p.id for p in prompts[3:5]]


def test_prompt_set_errors():
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompt_set("squad")
    with pytest.raises(ValueError, match="limit must be"):
        load_prompt_set("gsm8k", limit=0)
    assert set(PROMPT_SETS) == {"humaneval", "gsm8k", "mt_bench", "cnn_dm", "outside"}


def test_the_outside_set_holds_two_prompts_in_each_of_eight_categories_of_its_own():
    import json
    from importlib import resources

    rows = [
        json.loads(line)
        for line in resources.files("hf_specssm")
        .joinpath("data", "outside_prompts.jsonl")
        .read_text()
        .splitlines()
    ]
    assert len({row["category"] for row in rows}) == 8
    assert all(sum(row["category"] == c for row in rows) == 2 for c in {row["category"] for row in rows})
    public = {p.text for name in ("mt_bench", "cnn_dm", "gsm8k") for p in load_prompt_set(name)}
    assert not {row["turns"][0] for row in rows} & public


def test_generation_settings_validation():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationSettings(do_sample=True, temperature=0)
    assert GenerationSettings(do_sample=True).mode == "sample"


def test_forward_timer_counts_calls_and_removes_its_hooks():
    layer = torch.nn.Linear(3, 3)
    timer = ForwardTimer(layer)
    for _ in range(3):
        layer(torch.zeros(1, 3))
    assert timer.calls == 3 and timer.seconds > 0
    timer.close()
    layer(torch.zeros(1, 3))
    assert timer.calls == 3


def test_forward_timer_times_a_heads_drafting_methods():
    """A ReDrafter head drafts through `next_state` and `draft_logits`; the timer wraps them and unwraps on
    close (the class's methods show again)."""
    from hf_specssm.drafters.redrafter import ReDrafterConfig, ReDrafterHead

    head = ReDrafterHead(ReDrafterConfig(hidden_size=8, vocab_size=VOCAB, beam_width=2, beam_length=2)).eval()
    timer = ForwardTimer(head)
    assert "next_state" in vars(head) and "draft_logits" in vars(head)
    head.draft_logits(torch.zeros(1, 8), torch.zeros(1, 8))
    assert timer.calls == 1 and timer.seconds > 0
    timer.close()
    assert "next_state" not in vars(head) and "draft_logits" not in vars(head)
    head.draft_logits(torch.zeros(1, 8), torch.zeros(1, 8))
    assert timer.calls == 1


def test_peak_memory_sees_a_temporary_allocation():
    with peak_memory(torch.device("cpu")) as memory:
        buffer = torch.ones(8_000_000)  # 32 MB
        # the CPU sampler looks every 5 ms: hold the buffer for ten looks (a shorter life can be missed)
        time.sleep(0.05)
        del buffer
    assert memory["bytes"] >= 30_000_000


def _no_eos(model):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def tiny_models():
    target = _no_eos(build("llama", seed=0, vocab=VOCAB))
    small = _no_eos(build("llama", seed=1, vocab=VOCAB))
    mamba = _no_eos(build("mamba", seed=2, vocab=VOCAB))
    align(target, mamba, head_noise=0.2)
    return target, small, mamba


def _tokenize(prompt: BenchPrompt) -> torch.Tensor:
    return torch.tensor([[1 + byte % (VOCAB - 1) for byte in prompt.text.encode()[:12]]])


@pytest.mark.slow
def test_run_benchmark_writes_rows_resumes_and_summarizes(tmp_path, tiny_models):
    target, small, mamba = tiny_models
    methods = standard_methods(target, small, mamba, small_label="0.5b", tree_shape=(2, 1))
    names = [m.name for m in methods]
    assert names == [
        "target", "hf-assisted-0.5b", "hf-prompt-lookup", "ours-0.5b", "ours-mamba", "ours-mamba-tree",
        "ours-mamba-copy", "ours-mamba-copy-tree", "ours-mamba-copy-bandit", "ours-prompt-lookup",
    ]  # fmt: skip
    prompts = load_prompt_set("gsm8k", limit=2) + load_prompt_set("humaneval", limit=1)
    settings = [GenerationSettings(10), GenerationSettings(10, do_sample=True)]
    out = tmp_path / "results.jsonl"
    context = BenchContext(target="tiny", dtype="fp32", device="cpu")
    rows = run_benchmark(target, _tokenize, methods, prompts, settings, out, context, progress=False)
    assert len(rows) == len(prompts) * len(settings) * len(methods)
    row = next(r for r in rows if r["method"] == "ours-mamba" and r["mode"] == "greedy")
    assert row["new_tokens"] == 10 and row["rounds"] >= 1 and row["drafted"] >= 1
    assert row["target_s"] > 0 and row["drafter_s"] > 0
    assert row["target_s"] + row["drafter_s"] <= row["seconds"] + 1e-6
    # every accepted chain draft is counted once, at its position; no position accepts more than it reached
    assert sum(row["position_accepted"]) == row["accepted"]
    assert all(a <= r for a, r in zip(row["position_accepted"], row["position_reached"], strict=True))
    assert row["weight_bytes"] > 0
    # transformers' loops: τ from the target's forwards
    plain = next(r for r in rows if r["method"] == "target" and r["mode"] == "greedy")
    assert plain["target_forwards"] == 10 and plain["tau"] == pytest.approx(1.0)

    # fp32 greedy: every method reproduces the target alone token for token
    summaries = summarize(rows)
    greedy = [s for s in summaries if s.mode == "greedy"]
    assert {s.identical for s in greedy} == {1.0}
    assert all(s.speedup == pytest.approx(1.0) for s in summaries if s.method == "target")

    # a second run finds every row and adds none
    again = run_benchmark(target, _tokenize, methods, prompts, settings, out, context, progress=False)
    assert len(again) == len(rows)
    table = markdown_tables(summaries)
    assert "| ours-mamba |" in table and "**greedy**" in table and "**sample**" in table
    assert "Acceptance by draft position" in table and "| greedy | gsm8k | ours-mamba | " in table
    # transformers' loops report no rounds, so they have no acceptance-by-position row
    assert "hf-assisted-0.5b" not in table.split("Acceptance by draft position")[1]


def test_summary_marks_a_different_output(tmp_path):
    base = {"set": "gsm8k", "prompt_id": "a", "mode": "greedy", "max_new_tokens": 3, "rounds": 3}
    rows = [
        {**base, "method": "target", "new_tokens": 3, "seconds": 3.0, "drafter_s": 0, "target_s": 3,
         "peak_bytes": 0, "output_ids": [1, 2, 3]},
        {**base, "method": "x", "new_tokens": 3, "seconds": 1.0, "drafter_s": 0.5, "target_s": 0.5,
         "peak_bytes": 2**20, "output_ids": [1, 2, 4], "rounds": 1},
    ]  # fmt: skip
    x = next(s for s in summarize(rows) if s.method == "x")
    assert x.identical == 0.0 and x.speedup == pytest.approx(3.0) and x.tau == pytest.approx(3.0)
    assert x.peak_mib == pytest.approx(1.0)


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from hf_specssm.tools.bench.report import Summary, plot_long_context, plot_speedups

    summaries = [
        Summary("greedy", "gsm8k", method, 1, 1.0, speedup, 2.0, 0.1, 0.8, 1.0, 1.0)
        for method, speedup in (("target", 1.0), ("ours-mamba", 1.5))
    ]
    assert plot_speedups(summaries, tmp_path / "s.png").stat().st_size > 1000
    rows = [
        {"method": "ours-mamba-k5", "context_tokens": n, "length": n, "new_tokens": 10, "rounds": 4,
         "drafter_s": 0.1, "drafted": 20}
        for n in (1024, 2048)
    ]  # fmt: skip
    assert plot_long_context(rows, tmp_path / "l.png").stat().st_size > 1000
    assert "| ours-mamba-k5 | 2.50 / 5.0 | 2.50 / 5.0 |" in long_context_table(rows)


def test_long_inputs_fit_the_requested_length():
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    from hf_specssm.tools.bench.long_context import long_inputs

    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for length in (200, 800):
        inputs = long_inputs(tokenizer, length, count=2)
        assert len(inputs) == 2
        assert all(length - 40 <= len(ids) <= length for _, ids in inputs)


@pytest.mark.slow
def test_bench_cli_toy_end_to_end(tmp_path, capsys):
    from hf_specssm.tools.cli import main

    status = main(
        ["bench", "--toy", "--sets", "gsm8k", "--limit", "1", "--max-new-tokens", "6", "--methods",
         "ours-mamba", "hf-assisted-0.5b", "--out", str(tmp_path), "--threads", "1", "--quiet"]
    )  # fmt: skip
    assert status == 0
    rows = read_rows(tmp_path / "results.jsonl")
    # (plus `target-fastest` on machines whose fastest dtype is not the toy pair's fp32)
    assert {r["method"] for r in rows} - {"target-fastest"} == {"target", "ours-mamba", "hf-assisted-0.5b"}
    assert "| greedy | gsm8k | ours-mamba | 1 |" in (tmp_path / "summary.md").read_text()
    # each drafter's teacher-forced agreement with the target alone's greedy answers
    agreement = (tmp_path / "agreement.md").read_text()
    assert "| gsm8k | 0.5b | 1 |" in agreement and "| gsm8k | mamba | 1 |" in agreement
    assert len((tmp_path / "agreement.jsonl").read_text().splitlines()) == 2
    printed = capsys.readouterr().out
    assert "speed-up over the target alone" in printed
    # the report can be rebuilt without running anything
    assert main(["bench", "--report-only", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])["dtype"] == "fp32"


def test_bench_cli_names_unknown_methods(tmp_path, capsys):
    from hf_specssm.tools.cli import main

    assert main(["bench", "--toy", "--methods", "nope", "--out", str(tmp_path), "--quiet"]) == 2
    assert "--methods: unknown method 'nope'; choose from target, " in capsys.readouterr().err


def test_enable_is_not_needed_by_the_harness(tiny_models):
    target, _, _ = tiny_models
    assert not hf_specssm.is_enabled(target)


def test_time_budget_fits_the_tokens_to_the_time_left():
    from hf_specssm.tools.bench.harness import TimeBudget

    budget = TimeBudget(time.perf_counter() + 100.0)
    # 2 methods × 2 prompts: 4 prefills of 1 s leave 96 s for 2 × (0.5 + 0.5) s per token → 49 tokens
    assert 47 <= budget.fit(1.0, [0.5, 0.5], calls_per_method=2, asked=96) <= 49
    # never more than asked
    assert budget.fit(1.0, [0.01, 0.01], calls_per_method=2, asked=96) == 96
    # a spent budget still generates the floor, or what was asked when that is less
    spent = TimeBudget(time.perf_counter() - 1.0, min_new_tokens=16)
    assert spent.fit(1.0, [0.5], calls_per_method=1, asked=96) == 16
    assert spent.fit(1.0, [0.5], calls_per_method=1, asked=8) == 8


def test_run_benchmark_with_a_spent_budget_runs_the_floor(tmp_path, tiny_models):
    from hf_specssm.tools.bench.harness import TimeBudget

    target, small, mamba = tiny_models
    methods = [m for m in standard_methods(target, small, mamba) if m.name in ("target", "ours-mamba")]
    said = []
    rows = run_benchmark(
        target, _tokenize, methods, load_prompt_set("gsm8k", limit=1), [GenerationSettings(40)],
        tmp_path / "results.jsonl", BenchContext(target="tiny", dtype="fp32", device="cpu"),
        progress=False, budget=TimeBudget(time.perf_counter() - 1.0, min_new_tokens=5), say=said.append,
    )  # fmt: skip
    assert {row["max_new_tokens"] for row in rows} == {5}
    assert {row["new_tokens"] for row in rows} == {5}
    assert len(said) == 1 and "→ 5 new tokens per prompt (asked 40" in said[0]


def test_bench_cli_refuses_a_budget_it_could_not_keep(tmp_path, capsys):
    from hf_specssm.tools.cli import main

    assert main(["bench", "--toy", "--time-budget", "0", "--out", str(tmp_path)]) == 2
    assert "--time-budget must be a positive number" in capsys.readouterr().err
    assert main(["bench", "--toy", "--time-budget", "60", "--no-warmup", "--out", str(tmp_path)]) == 2
    assert "drop --no-warmup" in capsys.readouterr().err


def test_a_redrafter_head_adds_its_methods_and_they_keep_the_targets_output(tmp_path, tiny_models):
    from hf_specssm.drafters.redrafter import ReDrafterConfig, ReDrafterHead

    target = tiny_models[0]
    text = target.config.get_text_config(decoder=True)
    torch.manual_seed(0)
    config = ReDrafterConfig(hidden_size=text.hidden_size, vocab_size=VOCAB, draft_vocab_size=33,
                             beam_width=2, beam_length=3)  # fmt: skip
    head = ReDrafterHead(config).eval().attach(target)
    methods = standard_methods(target, redrafter_head=head)
    assert [m.name for m in methods] == [
        "target", "hf-prompt-lookup", "ours-redrafter", "ours-redrafter-chain", "ours-redrafter-copy",
        "ours-redrafter-copy-both", "ours-prompt-lookup",
    ]  # fmt: skip
    # a head whose default is one beam still gets beam trees in ours-redrafter (4 beams)
    one_beam = ReDrafterHead(ReDrafterConfig(hidden_size=text.hidden_size, vocab_size=VOCAB, beam_width=1,
                                             beam_length=3)).eval().attach(target)  # fmt: skip
    trees = {m.name: m for m in standard_methods(target, redrafter_head=one_beam)}["ours-redrafter"]
    assert "4 beams × 3 tokens" in trees.description
    methods = [m for m in methods if m.name != "hf-prompt-lookup"]
    rows = run_benchmark(target, _tokenize, methods, load_prompt_set("gsm8k", limit=1), [GenerationSettings(8)],
                         tmp_path / "results.jsonl", BenchContext(target="tiny", dtype="fp32", device="cpu"),
                         progress=False)  # fmt: skip
    assert {s.identical for s in summarize(rows)} == {1.0}
    assert all(row["rounds"] >= 1 for row in rows if row["method"] != "target")
    # the head's drafting is timed as the drafter's (it drafts through next_state and draft_logits); its
    # chains are gated, so this untrained head may have stopped drafting them (the copy variants then draft
    # copies only, which no model drafts); its beam trees are not gated
    head_rows = [row for row in rows if row["method"] in ("ours-redrafter", "ours-redrafter-chain")]
    assert all(row["drafted"] for row in head_rows if row["method"] == "ours-redrafter")
    assert all(row["drafter_s"] > 0 for row in head_rows if row["drafted"])
