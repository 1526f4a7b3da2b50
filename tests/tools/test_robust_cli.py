"""Every `hf-specssm` command reports errors alike: one `error: …` line, 2 for bad input, 1 for failures,
`--debug` for the traceback, 130 and a resume hint for Ctrl-C."""

from __future__ import annotations

import json

import pytest

from hf_specssm.tools import cli
from hf_specssm.tools.cli import main


def _redrafter(tmp_path, data) -> list[str]:
    return [
        "train-redrafter", "--target", "toy-llama", "--data", str(data), "--out", str(tmp_path / "out"),
        "--steps", "2", "--eval-prompts", "0", "--quiet", "--threads", "1",
    ]  # fmt: skip


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def test_a_missing_data_file_is_named(tmp_path, capsys):
    assert main(_redrafter(tmp_path, tmp_path / "missing.jsonl")) == 2
    assert _one_error_line(capsys) == f"error: --data {tmp_path / 'missing.jsonl'}: no such file."


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        pytest.param(
            ['{"input_ids": [1, 2, 3]}', "", '{"input_ids": [1, 2'],
            "corpus.jsonl:3: not valid JSON (Expecting ',' delimiter at column 20).",
            id="non-json-line",
        ),
        pytest.param(
            ['{"input_ids": [1, 2, 3]}', '{"input_ids": [1, 64, 3]}'],
            "corpus.jsonl:2: token id 64 is outside the target's vocabulary (0–63)",
            id="id-past-the-vocabulary",
        ),
        pytest.param(
            ['{"input_ids": [1, "a"]}'], "corpus.jsonl:1: input_ids must be a list of integer", id="not-ids"
        ),
        pytest.param(["[1, 2]"], "corpus.jsonl:1: expected a JSON object, got list.", id="not-an-object"),
    ],
)
def test_a_bad_corpus_line_is_named_with_its_file_and_line(tmp_path, capsys, lines, message):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    assert main(_redrafter(tmp_path, corpus)) == 2
    assert _one_error_line(capsys).startswith(f"error: {tmp_path / message}")


def test_ctrl_c_exits_130_with_a_resume_hint(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_demo", interrupted)
    assert main(["demo", "--offline"]) == 130
    assert capsys.readouterr().err == "interrupted; resume with the same command\n"


def test_sigterm_stops_a_command_as_ctrl_c_does_and_the_handler_is_restored(monkeypatch, capsys):
    import os
    import signal
    import time

    unwound = []

    def terminated(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        finally:
            unwound.append(True)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "run_demo", terminated)
    assert main(["demo", "--offline"]) == 130
    assert unwound == [True]
    assert capsys.readouterr().err == "interrupted; resume with the same command\n"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_bug_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    def broken(args):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(cli, "run_demo", broken)
    assert main(["demo", "--offline"]) == 1
    assert _one_error_line(capsys) == (
        "error: TypeError: unsupported operand (run with --debug for the traceback)"
    )
    assert main(["demo", "--offline", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith(
        "(run with --debug for the traceback)\n"
    )


def test_an_os_error_names_its_path(monkeypatch, capsys, tmp_path):
    def full(args):
        raise OSError(28, "No space left on device", str(tmp_path / "checkpoint-5"))

    monkeypatch.setattr(cli, "run_demo", full)
    assert main(["demo", "--offline"]) == 1
    assert _one_error_line(capsys) == f"error: No space left on device: {tmp_path / 'checkpoint-5'}"


def test_export_without_a_checkpoint_is_bad_input(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({}))
    args = ["train-mamba-drafter", "export", "--data", str(data), "--out", str(tmp_path / "run")]
    assert main([*args, "--export", str(tmp_path / "export")]) == 2
    assert (
        _one_error_line(capsys)
        == f"error: no intact checkpoint in --out {tmp_path / 'run'}: run the train stage first."
    )


def test_the_data_stage_needs_the_distilled_answers(tmp_path, capsys):
    args = ["train-mamba-drafter", "data", "--data", str(tmp_path / "data"), "--target", str(tmp_path)]
    assert main(args) == 2
    assert (
        "distilled.jsonl does not exist: run `hf-specssm train-mamba-drafter distill` first, or pass "
        "--distilled with a store or pack of `hf-specssm distill`." in _one_error_line(capsys)
    )
