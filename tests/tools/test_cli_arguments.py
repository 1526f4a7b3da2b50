"""The command line explains itself and refuses bad or ignored arguments before any model loads."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import hf_specssm
from hf_specssm.tools import cli
from hf_specssm.tools.bench import command as bench_command
from hf_specssm.tools.bench import tree_scan, trees
from hf_specssm.tools.cli import HelpFormatter, add_demo_arguments, main
from hf_specssm.tools.fetch import add_arguments as add_fetch_arguments


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any model load (real or toy, bench or demo) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the arguments were bad")

    monkeypatch.setattr(bench_command, "load_models", refuse)
    monkeypatch.setattr(cli, "run_offline_demo", refuse)
    monkeypatch.setattr("hf_specssm.testing.toy.demo_pair", refuse)


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def test_a_bare_command_prints_help_and_starts_nothing(capsys, nothing_loads):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: hf-specssm") and "demo" in out and "bench" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    import hf_specssm

    assert capsys.readouterr().out.startswith(f"hf-specssm {hf_specssm.__version__} (torch ")


def test_bench_tree_scan_help_names_its_program(capsys):
    with pytest.raises(SystemExit):
        main(["bench-tree-scan", "--help"])
    assert capsys.readouterr().out.startswith("usage: hf-specssm bench-tree-scan")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--head-noise", "0.2"], "--head-noise applies only to the offline demo (add --offline).", id="head-noise"),
        pytest.param(["--prompt-lengths", "5"], "--prompt-lengths applies only to the offline demo", id="prompt-lengths"),
        pytest.param(["--num-draft-tokens", "3"], "--num-draft-tokens applies only to the offline demo", id="draft-tokens"),
        pytest.param(["--schedule", "constant"], "--schedule applies only to the offline demo", id="schedule"),
        pytest.param(["--seed", "3"], "--seed applies only to the offline demo", id="seed"),
        pytest.param(["--offline", "--sets", "gsm8k"], "--sets applies only to the real-model demo (drop --offline).", id="sets"),
        pytest.param(["--offline", "--limit", "2"], "--limit applies only to the real-model demo", id="limit"),
        pytest.param(["--offline", "--dtype", "bf16"], "--dtype applies only to the real-model demo", id="dtype"),
        pytest.param(["--offline", "--out", "x"], "--out applies only to the real-model demo", id="out"),
        pytest.param(["--offline", "--redrafter-head", "x"], "--redrafter-head applies only to the real-model demo", id="head"),
        pytest.param(["--max-new-tokens", "0"], "--max-new-tokens must be at least 1; got 0.", id="no-tokens"),
    ],
)  # fmt: skip
def test_demo_refuses_options_its_mode_would_ignore(capsys, nothing_loads, monkeypatch, argv, message):
    monkeypatch.setattr(bench_command, "run", lambda args: pytest.fail("the benchmark started"))
    assert main(["demo", *argv]) == 2
    assert message in _error(capsys)


def test_demo_options_are_not_abbreviated(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--offline", "--head", "0.1"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --head" in capsys.readouterr().err


def test_the_real_demo_hands_its_dtype_to_the_benchmark(monkeypatch, tmp_path, capsys):
    seen = []
    monkeypatch.setattr(bench_command, "run", lambda args: seen.append(args) or 0)
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    assert seen[0].dtype == "auto" and seen[0].methods == [
        "hf-assisted-0.5b", "ours-0.5b", "ours-mamba", "ours-mamba-copy", "ours-redrafter-copy",
    ]  # fmt: skip
    # the head race uses the shipped head; `--redrafter-head none` leaves it out
    assert Path(seen[0].redrafter_head) == hf_specssm.shipped_drafter_path(hf_specssm.shipped.REDRAFTER_HEAD)
    assert main(["demo", "--out", str(tmp_path), "--dtype", "fp32", "--redrafter-head", "none"]) == 0
    assert seen[1].dtype == "fp32" and seen[1].redrafter_head is None
    assert seen[1].methods == ["hf-assisted-0.5b", "ours-0.5b", "ours-mamba", "ours-mamba-copy"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--methods", "ours-mamba", "nope"], "--methods: unknown method 'nope'; choose from target, hf-assisted-0.5b", id="unknown-method"),
        pytest.param(["--toy", "--target", "x"], "--target does not apply with --toy", id="toy-target"),
        pytest.param(["--toy", "--mamba-dtype", "bf16"], "--mamba-dtype does not apply with --toy", id="toy-mamba-dtype"),
        pytest.param(["--toy", "--long-context", "1024"], "--long-context needs a tokenizer", id="toy-long-context"),
        pytest.param(["--target", "no/such/folder"], "--target 'no/such/folder' is neither a model folder (with config.json) nor a fetch name", id="missing-target"),
        pytest.param(["--small-drafter", "missing"], "--small-drafter 'missing' is neither", id="missing-small"),
        pytest.param(["--mamba-drafter", "no/such/drafter"], "no Mamba drafter at 'no/such/drafter'", id="missing-mamba"),
        pytest.param(["--small-drafter", "none", "--methods", "ours-0.5b"], "--methods ours-0.5b drafts with the small drafter, but --small-drafter is none.", id="method-without-model"),
        pytest.param(["--methods", "ours-redrafter"], "--methods ours-redrafter drafts with a ReDrafter head: pass --redrafter-head FOLDER.", id="redrafter-without-head"),
        pytest.param(["--redrafter-head", "no/such/head"], "--redrafter-head no/such/head: no head folder there", id="missing-head"),
        pytest.param(["--toy", "--redrafter-head", "x"], "--redrafter-head does not apply with --toy", id="toy-head"),
        pytest.param(["--toy", "--temperature", "0.9"], "--temperature applies only to sampling: add --modes sample", id="temperature-greedy"),
        pytest.param(["--toy", "--long-context-tokens", "9"], "--long-context-tokens applies only with --long-context", id="orphan-long-context"),
        pytest.param(["--report-only", "--limit", "9"], "--report-only only rebuilds the report from --out; --limit would be ignored", id="report-only"),
        pytest.param(["--toy", "--methods", "ours-mamba", "--tree-shape", "2", "1"], "--tree-shape applies only to the tree methods", id="tree-shape"),
        pytest.param(["--toy", "--limit", "0"], "--limit must be at least 1; got 0.", id="limit"),
    ],
)  # fmt: skip
def test_bench_checks_every_argument_before_loading(capsys, nothing_loads, tmp_path, argv, message):
    assert main(["bench", "--out", str(tmp_path), *argv]) == 2
    assert message in _error(capsys)


def test_bench_refuses_a_gpu_it_does_not_have(capsys, nothing_loads, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--toy", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "--device cuda: torch sees no CUDA GPU here; use --device cpu." in _error(capsys)


def _parsers() -> dict[str, argparse.ArgumentParser]:
    parsers = {}
    for name, add in (
        ("demo", add_demo_arguments),
        ("bench", bench_command.add_arguments),
        ("bench-trees", trees.add_arguments),
        ("bench-tree-scan", tree_scan.add_arguments),
        ("fetch", add_fetch_arguments),
    ):
        parser = argparse.ArgumentParser(prog=name, formatter_class=HelpFormatter)
        add(parser)
        parsers[name] = parser
    return parsers


@pytest.mark.parametrize("name", ["demo", "bench", "bench-trees", "bench-tree-scan", "fetch"])
def test_every_option_has_help_that_shows_its_default(name):
    parser = _parsers()[name]
    # without any whitespace: argparse wraps long defaults, at spaces and after hyphens
    help_text = "".join(parser.format_help().split())
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            shown = "".join(f"(default: {action.default})".split())
            assert shown in help_text, f"{name} {action.option_strings[0]} hides its default"


def test_a_bad_real_demo_is_refused_before_the_last_results_are_dropped(tmp_path, capsys, nothing_loads):
    (tmp_path / "results.jsonl").write_text("{}\n")
    assert main(["demo", "--out", str(tmp_path), "--mamba-drafter", str(tmp_path / "nope")]) == 2
    assert "no Mamba drafter at" in _error(capsys)
    assert (tmp_path / "results.jsonl").read_text() == "{}\n"
