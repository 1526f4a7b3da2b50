"""Every code block of README.md runs as written.

Python blocks are executed, in order, with tiny random models standing in for the real ones: the real
names they use (fetch names, Hub ids, the shipped drafter) are mapped to tiny model folders built here,
and every quoted `org/name` in a block must have such a mapping. A block preceded by
`<!-- readme-test: session=NAME -->` shares its namespace with the earlier blocks of that session (as a
reader's Python session would); others start afresh. Shell blocks are checked without running anything
long: `make` targets must exist, `hf-specssm` command lines must parse, test paths must exist.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

import hf_specssm
from hf_specssm.testing.tiny import tiny_model
from hf_specssm.tools import fetch

from tests.helpers.chat_models import byte_tokenizer

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SESSION = re.compile(r"<!-- readme-test: session=([\w-]+) -->\s*$")
MODEL_ID = re.compile(r"""["']([\w.-]+/[\w.-]+)["']""")


def code_blocks(text: str) -> list[tuple[int, str, str, str | None]]:
    """`(line, language, code, session)` of every fenced block of `text`."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").splitlines()
        session = SESSION.match(before[-1].strip()) if before else None
        line = text[: match.start()].count("\n") + 1
        blocks.append((line, match.group(1), match.group(2), session.group(1) if session else None))
    return blocks


def _save(model, folder: Path, with_tokenizer: bool = True) -> Path:
    tokenizer = byte_tokenizer()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    if with_tokenizer:
        tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    """Real model name → a tiny random model folder over the byte tokenizer (259 tokens)."""
    from hf_specssm.drafters.redrafter import ReDrafterConfig, ReDrafterHead

    root = tmp_path_factory.mktemp("readme-models")
    vocab = len(byte_tokenizer())
    head = ReDrafterHead(ReDrafterConfig(hidden_size=32, vocab_size=vocab, beam_width=2, beam_length=3))
    head.save_pretrained(root / "head")
    return {
        "qwen2.5-coder-1.5b-instruct": _save(tiny_model("qwen2", seed=0, vocab=vocab), root / "qwen-1.5b"),
        "qwen2.5-coder-0.5b-instruct": _save(tiny_model("qwen2", seed=1, vocab=vocab), root / "qwen-0.5b"),
        "shipped drafter": _save(tiny_model("mamba2", seed=2, vocab=vocab), root / "mamba2", False),
        "state-spaces/mamba-790m-hf": _save(tiny_model("mamba", seed=3, vocab=vocab), root / "mamba-790m"),
        "state-spaces/mamba-130m-hf": _save(tiny_model("mamba", seed=4, vocab=vocab), root / "mamba-130m"),
        "heads/my-head": root / "head",
    }


def _substitute(code: str, stand_ins: dict[str, Path]) -> str:
    """`code` with every quoted Hub id or head folder replaced by its stand-in's folder."""
    unknown = sorted({name for name in MODEL_ID.findall(code) if name not in stand_ins})
    assert not unknown, f"README names models the test has no stand-in for: {unknown}"
    return MODEL_ID.sub(lambda match: repr(str(stand_ins[match.group(1)])), code)


def test_the_readme_has_python_and_shell_blocks():
    """Negative control: the extraction finds the blocks (an empty list would pass the tests below)."""
    languages = [language for _, language, _, _ in code_blocks(README.read_text())]
    assert languages.count("python") >= 5 and languages.count("bash") >= 3
    assert set(languages) <= {"python", "bash"}, "a block without a language, or one the test cannot check"


@pytest.mark.slow  # ~40 s on 2 cores: every block with real generate calls (trees on a Mamba2 drafter)
def test_python_blocks_run_as_written(stand_ins, monkeypatch, capsys):
    def fetched(name: str, *args, **kwargs) -> Path:
        fetch.get_spec(name)  # an unknown name fails as it would for a reader
        return stand_ins[name]

    monkeypatch.setattr(fetch, "fetch_model", fetched)

    def shipped(name: str = hf_specssm.shipped.DEFAULT_DRAFTER, **kwargs) -> Path:
        head = name == hf_specssm.shipped.REDRAFTER_HEAD
        return stand_ins["heads/my-head"] if head else stand_ins["shipped drafter"]

    monkeypatch.setattr(hf_specssm, "shipped_drafter_path", shipped)
    sessions: dict[str, dict] = {}
    ran = 0
    for line, language, code, session in code_blocks(README.read_text()):
        if language != "python":
            continue
        namespace = sessions.setdefault(session, {}) if session else {}
        torch.manual_seed(0)
        try:
            exec(compile(_substitute(code, stand_ins), f"README.md:{line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"the Python block at README.md:{line} fails: {error!r}") from error
        ran += 1
    assert ran >= 5
    assert "τ" in capsys.readouterr().out  # the summary line was printed


def _make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def _check_shell_line(line: str) -> None:
    from hf_specssm.tools.cli import build_parser
    from hf_specssm_demo.cli import build_parser as build_demo_parser

    words = shlex.split(line, comments=True)
    if not words:
        return
    program, arguments = words[0], words[1:]
    if program == "make":
        targets = [word for word in arguments if "=" not in word]
        missing = [target for target in targets if target not in _make_targets()]
        assert not missing, f"`{line}`: no make target {missing}"
    elif program in ("hf-specssm", ".venv/bin/hf-specssm"):
        build_parser().parse_args(arguments)
    elif program in ("hf-specssm-demo", ".venv/bin/hf-specssm-demo"):
        build_demo_parser().parse_args(arguments)
    elif program.endswith("/python") and arguments[:2] == ["-m", "pytest"]:
        paths = [word for word in arguments[2:] if word.startswith("tests")]
        assert all((ROOT / path.split("::")[0]).exists() for path in paths), f"`{line}`: no such test path"
    else:
        raise AssertionError(f"`{line}`: the README test does not know how to check {program!r}")


def test_shell_blocks_name_commands_that_exist(monkeypatch):
    for line_number, language, code, _ in code_blocks(README.read_text()):
        if language != "bash":
            continue
        for offset, line in enumerate(code.splitlines()):
            try:
                _check_shell_line(line)
            except SystemExit as exited:
                raise AssertionError(
                    f"README.md:{line_number + 1 + offset}: `{line}` does not parse"
                ) from exited


def test_the_checks_can_fail():
    with pytest.raises(AssertionError, match="no make target"):
        _check_shell_line("make launch")
    with pytest.raises(SystemExit):
        _check_shell_line("hf-specssm bench --no-such-option")
    with pytest.raises(AssertionError, match="no stand-in"):
        _substitute('AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3-8B")', {})
