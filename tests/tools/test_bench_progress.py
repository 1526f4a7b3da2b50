"""The benchmark moves its progress bar every round or token, and always measures the target alone in
this machine's fastest dtype too."""

from __future__ import annotations

import copy
from typing import ClassVar

import pytest
import torch

from hf_specssm.hardware import DtypeChoice
from hf_specssm.tools.bench import command as bench_command
from hf_specssm.tools.bench import harness
from hf_specssm.tools.bench.command import BenchModels
from hf_specssm.tools.bench.harness import BenchContext, TokenProgress, read_rows, run_benchmark, run_one
from hf_specssm.tools.bench.methods import FASTEST_TARGET, GenerationSettings, standard_methods
from hf_specssm.tools.bench.prompt_sets import BenchPrompt, load_prompt_set
from hf_specssm.tools.bench.report import markdown_tables, summarize
from hf_specssm.tools.cli import main

from tests.helpers.models import align, build

VOCAB = 64


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


class RecordingBar:
    """A stand-in for tqdm that keeps every update."""

    bars: ClassVar[list] = []

    def __init__(self, *args, total=None, desc=None, disable=False, **kwargs) -> None:
        self.total, self.desc, self.updates = total, desc, []
        self.items = list(args[0]) if args else None
        RecordingBar.bars.append(self)

    def __iter__(self):
        return iter(self.items)

    def update(self, n: int = 1) -> None:
        self.updates.append(n)

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def test_token_progress_counts_every_committed_token_as_it_comes(tiny_models):
    target, small, mamba = tiny_models
    methods = {m.name: m for m in standard_methods(target, small, mamba)}
    input_ids = torch.tensor([[1, 2, 3, 4, 5]])
    for name in ("target", "hf-assisted-0.5b", "ours-mamba"):
        bar = RecordingBar()
        streamer = TokenProgress(bar)
        row = run_one(methods[name], target, input_ids, GenerationSettings(12), seed=0, streamer=streamer)
        assert streamer.tokens == sum(bar.updates) == row["new_tokens"] == 12, name
        # moved during the call, not once at its end
        assert len(bar.updates) >= row["rounds"] > 1, name


def test_the_bench_bar_counts_tokens_not_calls(tiny_models, tmp_path, monkeypatch):
    target, small, mamba = tiny_models
    methods = [m for m in standard_methods(target, small, mamba) if m.name in ("target", "ours-mamba")]
    monkeypatch.setattr(harness, "tqdm", RecordingBar)
    RecordingBar.bars = []
    prompts = load_prompt_set("gsm8k", limit=2)
    context = BenchContext("tiny", "fp32", "cpu")
    run_benchmark(
        target, _tokenize, methods, prompts, [GenerationSettings(10)], tmp_path / "r.jsonl", context
    )
    bench = next(bar for bar in RecordingBar.bars if bar.desc == "bench")
    assert bench.total == sum(bench.updates) == 2 * 2 * 10
    assert len(bench.updates) > 4 * 2  # several moves per call, 4 calls


def test_summary_gives_speedups_over_the_fastest_target_alone_too():
    base = {"set": "gsm8k", "prompt_id": "a", "mode": "greedy", "max_new_tokens": 3, "drafter_s": 0,
            "target_s": 1, "peak_bytes": 0, "rounds": 3, "new_tokens": 3}  # fmt: skip
    rows = [
        {**base, "method": "target", "seconds": 3.0, "output_ids": [1, 2, 3]},
        {**base, "method": FASTEST_TARGET, "seconds": 1.5, "output_ids": [1, 2, 4], "dtype": "bf16"},
        {**base, "method": "ours-mamba", "seconds": 1.0, "output_ids": [1, 2, 3], "rounds": 1},
    ]
    summaries = {s.method: s for s in summarize(rows)}
    assert summaries["ours-mamba"].speedup == pytest.approx(3.0)
    assert summaries["ours-mamba"].speedup_vs_fastest == pytest.approx(1.5)
    # another dtype may round differently: its output is not held against the target's
    assert summaries[FASTEST_TARGET].identical is None
    table = markdown_tables(list(summaries.values()), ("target", FASTEST_TARGET, "ours-mamba"))
    assert "speed-up over `target-fastest`, the target alone in this machine's fastest dtype" in table
    assert "| ours-mamba | 1.50× |" in table
    # without such rows the report is as before
    plain = summarize([r for r in rows if r["method"] != FASTEST_TARGET])
    assert all(s.speedup_vs_fastest is None for s in plain)
    assert "target-fastest" not in markdown_tables(plain)


def _bench(tmp_path, dtype: str) -> list[str]:
    return [
        "bench", "--toy", "--dtype", dtype, "--methods", "ours-mamba", "--sets", "gsm8k", "--limit", "1",
        "--max-new-tokens", "4", "--out", str(tmp_path), "--quiet", "--threads", "1", "--no-warmup",
    ]  # fmt: skip


@pytest.mark.parametrize(("fastest", "reference_rows"), [("bf16", 1), ("fp32", 0)])
def test_the_target_alone_also_runs_in_the_fastest_dtype(
    tiny_models, tmp_path, monkeypatch, capsys, fastest, reference_rows
):
    target, small, mamba = tiny_models

    def fake_load(args, choice):
        assert choice.name == "fp32"
        reference = None
        if fastest != "fp32":
            reference = copy.deepcopy(target).to(torch.bfloat16)
        return BenchModels(target, None, _tokenize, small, mamba, "tiny", reference)

    choice = DtypeChoice(fastest, "the CPU has amx_bf16" if fastest == "bf16" else "AVX2 only")
    monkeypatch.setattr(bench_command, "fastest_dtype", lambda device: choice)
    monkeypatch.setattr(bench_command, "load_models", fake_load)
    assert main(_bench(tmp_path, "fp32")) == 0
    out = capsys.readouterr().out
    assert "dtype: fp32 (as asked (--dtype))" in out
    rows = read_rows(tmp_path / "results.jsonl")
    reference = [row for row in rows if row["method"] == FASTEST_TARGET]
    assert len(reference) == reference_rows
    if reference_rows:
        assert "this machine's fastest dtype for the target alone is bf16 (the CPU has amx_bf16)" in out
        assert reference[0]["dtype"] == "bf16" and reference[0]["new_tokens"] == 4
        assert reference[0]["target_forwards"] == 4  # timed on the bf16 copy, not on the fp32 target
        assert "speed-up over `target-fastest`" in out
