"""Training state survives kills, and `--out` never silently resumes another run's state.

Crash safety: checkpoints appear whole or not at all, and resuming skips a damaged newest checkpoint.
Fingerprints: `train-redrafter` and `train-mamba-drafter train` refuse to resume with another target,
data or settings (naming what differs) unless `--restart`, rebuild stale data caches when nothing was
trained yet, and refuse `--steps` below the steps already trained.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_specssm.drafters.redrafter import ReDrafterConfig, ReDrafterHead
from hf_specssm.tools.cli import main
from hf_specssm.training import checkpoints as checkpoint_module
from hf_specssm.training.checkpoints import (
    atomic_torch_save,
    checkpoint_problem,
    checkpoints,
    latest_checkpoint,
    save_checkpoint,
)
from hf_specssm.training.mamba_drafter.data import read_distilled
from hf_specssm.training.redrafter.command import toy_target
from hf_specssm.training.redrafter.training import TrainingConfig, distill, random_prompts, train_head

from tests.helpers.chat_models import save_chat_target
from tests.helpers.models import HIDDEN, VOCAB


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_reports(monkeypatch):
    """Each test sees its own damaged-checkpoint warnings."""
    monkeypatch.setattr(checkpoint_module, "_reported", set())


def new_head(seed: int = 0) -> ReDrafterHead:
    torch.manual_seed(seed)
    return ReDrafterHead(ReDrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, beam_width=2, beam_length=2))


@pytest.fixture(scope="module")
def toy_data():
    target = toy_target("toy-llama")
    return target, distill(target, random_prompts(VOCAB, 8, 4, seed=1), 6, progress=False)


def _truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("legacy", [pytest.param(False, id="manifest"), pytest.param(True, id="no-manifest")])
def test_resume_skips_a_truncated_newest_checkpoint(tmp_path, toy_data, capsys, legacy):
    target, data = toy_data
    config = TrainingConfig(steps=6, batch_size=2, checkpoint_every=3, progress=False)
    straight = train_head(new_head(), target, data, config)
    train_head(new_head(), target, data, config, output_dir=tmp_path)
    assert [folder.name for folder in checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-6"]
    if legacy:
        # folders written before checkpoint.json existed are checked by loading their state
        for folder in checkpoints(tmp_path):
            (folder / checkpoint_module.MANIFEST).unlink()
    # a kill during an in-place write of the newest trainer state
    _truncate(tmp_path / "checkpoint-6" / "trainer_state.pt")

    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    err = capsys.readouterr().err
    assert f"skipping the damaged checkpoint {tmp_path / 'checkpoint-6'}: trainer_state.pt" in err
    resumed = train_head(new_head(seed=5), target, data, config, output_dir=tmp_path)
    assert resumed == straight
    assert checkpoint_problem(tmp_path / "checkpoint-6") is None


def test_a_killed_checkpoint_save_leaves_the_previous_one(tmp_path, monkeypatch):
    head = new_head()
    save_checkpoint(tmp_path, 1, head, {"step": 1}, keep=2)

    def killed(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a state")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, head, {"step": 2}, keep=2)
    assert [folder.name for folder in checkpoints(tmp_path)] == ["checkpoint-1"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert not any(path.name.endswith(".partial") for path in tmp_path.iterdir())


def test_a_killed_cache_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "training_data.pt"
    atomic_torch_save({"version": 1}, path)

    def killed(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"torn")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"version": 2}, path)
    assert torch.load(path) == {"version": 1}
    assert [entry.name for entry in tmp_path.iterdir()] == ["training_data.pt"]


def _write_corpus(path: Path, seed: int, count: int = 12, length: int = 12) -> Path:
    generator = torch.Generator().manual_seed(seed)
    with open(path, "w") as sink:
        for _ in range(count):
            sink.write(
                json.dumps({"input_ids": torch.randint(0, VOCAB, (length,), generator=generator).tolist()})
            )
            sink.write("\n")
    return path


def _redrafter(out: Path, *extra: str) -> list[str]:
    return [
        "train-redrafter", "--out", str(out), "--threads", "1", "--quiet", "--batch-size", "2",
        "--eval-prompts", "0", "--checkpoint-every", "2", "--seq-length", "8", "--beam-width", "2",
        "--beam-length", "2", *extra,
    ]  # fmt: skip


def test_train_redrafter_refuses_another_target_data_or_settings(tmp_path, capsys):
    out = tmp_path / "head"
    corpus = _write_corpus(tmp_path / "corpus.jsonl", seed=0)
    first = ["--target", "toy-llama", "--data", str(corpus)]
    assert main(_redrafter(out, *first, "--steps", "4")) == 0
    assert json.loads((out / "run.json").read_text())["fingerprint"]["--target"] == "toy-llama"
    capsys.readouterr()

    assert main(_redrafter(out, "--target", "toy-mamba2", "--data", str(corpus), "--steps", "6")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--target: was 'toy-llama', now 'toy-mamba2'" in err and "--restart" in err

    _write_corpus(corpus, seed=1)
    assert main(_redrafter(out, *first, "--steps", "6")) == 2
    assert re.search(r"--data: was '.*corpus.jsonl \(sha256 \w+\)', now", capsys.readouterr().err)
    _write_corpus(corpus, seed=0)

    assert main(_redrafter(out, *first, "--steps", "6", "--learning-rate", "0.1")) == 2
    assert "--learning-rate: was 0.003, now 0.1" in capsys.readouterr().err

    assert main(_redrafter(out, *first, "--steps", "2")) == 2
    err = capsys.readouterr().err
    assert "--steps 2 is below the 4 steps already trained" in err and "--restart" in err

    # the same inputs resume; --restart starts over with new ones
    assert main(_redrafter(out, *first, "--steps", "6")) == 0
    assert f"resuming from {out / 'checkpoint-4'}" in capsys.readouterr().out
    assert (
        main(_redrafter(out, "--target", "toy-mamba2", "--steps", "2", "--distill-samples", "8", "--restart"))
        == 0
    )
    assert [folder.name for folder in checkpoints(out)] == ["checkpoint-2"]
    assert ReDrafterConfig.from_pretrained(out).target_name == "toy-mamba2"


def test_train_redrafter_rebuilds_stale_data_after_an_error(tmp_path, capsys, monkeypatch):
    from hf_specssm.training.redrafter import command

    out = tmp_path / "head"
    corpus = _write_corpus(tmp_path / "corpus.jsonl", seed=0)
    args = _redrafter(out, "--target", "toy-llama", "--data", str(corpus), "--steps", "2")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # the data is cached, then training is interrupted before its first checkpoint
    monkeypatch.setattr(command, "train_head", interrupted)
    assert main(args) == 130
    assert capsys.readouterr().err.strip() == "interrupted; resume with the same command"
    cached = torch.load(out / "training_data.pt")["input_ids"]
    monkeypatch.undo()

    # the corrected corpus is picked up without --restart: nothing was trained on the old one
    _write_corpus(corpus, seed=7)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "note: the data cached in" in printed and "--data: was" in printed
    assert not torch.equal(torch.load(out / "training_data.pt")["input_ids"], cached)


@pytest.fixture
def drafter_data(tmp_path):
    """A target folder and a token-data folder as the `distill` and `data` stages leave them (tiny)."""
    save_chat_target(tmp_path / "target")
    data = tmp_path / "data"
    data.mkdir()
    pattern = np.tile(np.array([65, 66, 67, 68, 258], dtype=np.uint32), 200)
    for source in ("chat", "code", "docs"):
        pattern.tofile(data / f"{source}.bin")
    record = {"id": "chat-0", "input_ids": [65, 66, 67, 68, 258, 65, 66], "prompt_length": 2}
    (data / "heldout.jsonl").write_text(json.dumps(record) + "\n")
    meta = {"tokens": {"chat": 1000, "code": 1000, "docs": 1000}, "separator": 256}
    (data / "meta.json").write_text(json.dumps(meta))
    return tmp_path


def _mamba(root: Path, *extra: str) -> list[str]:
    return [
        "train-mamba-drafter", "train", "--target", str(root / "target"), "--data", str(root / "data"),
        "--out", str(root / "run"), "--architecture", "tiny", "--draft-vocab", "16", "--batch-size", "2",
        "--block-length", "16", "--checkpoint-every", "2", "--warmup-steps", "1", "--eval-records", "0",
        "--quiet", "--threads", "1", *extra,
    ]  # fmt: skip


def test_train_mamba_drafter_refuses_other_inputs_and_fewer_steps(drafter_data, capsys):
    assert main(_mamba(drafter_data, "--steps", "4")) == 0
    capsys.readouterr()
    assert main(_mamba(drafter_data, "--steps", "6", "--draft-vocab", "20")) == 2
    err = capsys.readouterr().err
    assert "--draft-vocab: was 16, now 20" in err and "--restart" in err
    meta = drafter_data / "data" / "meta.json"
    meta.write_text(meta.read_text().replace("1000", "1001"))
    assert main(_mamba(drafter_data, "--steps", "6")) == 2
    assert "--data: was" in capsys.readouterr().err
    assert main(_mamba(drafter_data, "--steps", "6", "--restart")) == 0
    assert main(_mamba(drafter_data, "--steps", "2")) == 2
    assert "--steps 2 is below the 6 steps already trained" in capsys.readouterr().err


def test_train_mamba_drafter_names_token_ids_outside_the_vocabulary(drafter_data, capsys):
    np.full(100, 500, dtype=np.uint32).tofile(drafter_data / "data" / "code.bin")
    assert main(_mamba(drafter_data, "--steps", "2")) == 2
    err = capsys.readouterr().err
    assert f"error: {drafter_data / 'data' / 'code.bin'} holds token id 500, outside" in err


def test_distilled_records_report_a_bad_line_and_skip_only_a_torn_tail(tmp_path):
    path = tmp_path / "distilled.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "inp')
    assert [record["id"] for record in read_distilled(path)] == ["a", "b"]
    path.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not a JSON record")):
        list(read_distilled(path))


def test_distill_refuses_to_append_answers_of_another_run(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "distilled.jsonl").write_text('{"id": "chat-0", "input_ids": [1, 2], "prompt_length": 1}\n')
    args = ["train-mamba-drafter", "distill", "--data", str(data), "--target", str(tmp_path / "target")]
    # answers whose making was not recorded (an older version): they cannot be checked
    assert main([*args, "--max-new-tokens", "8"]) == 2
    err = capsys.readouterr().err
    assert "whose inputs were not recorded (no distill-run.json)" in err and "another --data" in err
    record = {"fingerprint": {"--target": "elsewhere", "--max-new-tokens": 8, "--dtype": "bf16", "--seed": 0}}
    (data / "distill-run.json").write_text(json.dumps(record))
    assert main([*args, "--max-new-tokens", "8"]) == 2
    assert f"--target: was 'elsewhere', now '{tmp_path / 'target'}'" in capsys.readouterr().err
    assert (data / "distilled.jsonl").read_text().count("\n") == 1
