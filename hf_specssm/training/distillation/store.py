"""A sharded, resumable store of the target's answers that grows across sessions.

Layout of a store folder:

    manifest.json          what the store holds: its recipe, the sealed shards (records, answer tokens,
                           sha256) and the generation speed of each run
    shard-00000.jsonl.gz   sealed shards: one JSON record per line, gzip-compressed, never rewritten
    open.jsonl             records of the shard being filled, appended (and fsynced) batch by batch
    extras/<batch>.npz     per-batch arrays the records point to: the target's top-k log-probabilities
                           and its last hidden state at every answer token (large; never committed)
    labels.jsonl           extras computed after the fact (`hf-specssm distill label`, a teacher-forced
                           pass over chats unpacked without them): one `{"id", "extras", "offset",
                           "labels_dtype"}` line per chat, appended (and fsynced) after its extras file

A record:

    {"id": "code-17", "domain": "code", "mode": "greedy", "input_ids": [...prompt and answer...],
     "prompt_length": 41, "finished": true, "dtype": "fp32", "extras": "b-3f2a….npz", "offset": 120}

`mode` is `greedy` or `t0.7` (sampled at temperature 0.7). Answer token `s` (`input_ids[prompt_length + s]`)
was chosen from the distribution whose top-k entries are row `offset + s` of the extras arrays.

Crash safety: a batch's extras file is written atomically before its records are appended; sealing writes
the shard atomically, then the manifest atomically, then empties `open.jsonl`. Opening a store repairs
whatever a kill left between those steps (a torn last line, records both sealed and still open, a shard
file the manifest does not name), so a killed run loses at most its current batch. Sealed shards are never
rewritten: extras computed later live in `labels.jsonl` and `records()` lays them over the chats that have
none.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from hf_specssm.training.checkpoints import atomic_write, atomic_write_text, fingerprint_changes

#: A record's `mode`: the target's greedy answer.
GREEDY = "greedy"
#: The sampled mode: temperature 0.7, no top-k or top-p truncation.
SAMPLED = "t0.7"
#: Teacher-forced chats (`teacher.py`): text the target read as its answer, never generated.
TEACHER = "teacher"

MANIFEST = "manifest.json"
OPEN_SHARD = "open.jsonl"
LABELS = "labels.jsonl"
EXTRAS = "extras"
FORMAT = 1


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.jsonl.gz"


def _answer_tokens(record: dict[str, Any]) -> int:
    return len(record["input_ids"]) - int(record["prompt_length"])


def _read_lines(path: Path) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                # only an unsealed file's last line can be torn (repaired on open)
                raise ValueError(f"{path}:{number}: not a JSON record.") from None
            yield record


def _labelled(record: dict[str, Any], labels: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`record` with the extras `labels` holds for it when it has none of its own."""
    if record.get("extras") is None and record["id"] in labels:
        return {**record, **labels[record["id"]]}
    return record


class DistillStore:
    """The store in `root` (created when missing).

    Args:
        root: the store folder.
        recipe: what every record of this store was made with (target, answer length, sampling
            temperature, …). A new store records it; an existing one must match it, or `ValueError`
            names each difference (use another folder for another recipe).
    """

    def __init__(self, root: str | Path, recipe: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / EXTRAS).mkdir(exist_ok=True)
        manifest_path = self.root / MANIFEST
        if manifest_path.is_file():
            self.manifest = json.loads(manifest_path.read_text())
            if self.manifest.get("format") != FORMAT:
                raise ValueError(f"{manifest_path}: unknown store format {self.manifest.get('format')!r}.")
            if recipe is not None:
                changes = fingerprint_changes(self.manifest["recipe"], recipe)
                if changes:
                    raise ValueError(
                        f"the store {self.root} was made with another recipe ({'; '.join(changes)}): "
                        "give another folder, or the recipe it records."
                    )
        else:
            if recipe is None:
                raise ValueError(f"{self.root} holds no {MANIFEST}: not a distillation store.")
            self.manifest = {"format": FORMAT, "recipe": recipe, "shards": [], "runs": []}
            self._write_manifest()
        self._repair()

    @property
    def recipe(self) -> dict[str, Any]:
        """The recipe every record was made with."""
        return self.manifest["recipe"]

    def _write_manifest(self) -> None:
        atomic_write_text(self.root / MANIFEST, json.dumps(self.manifest, indent=1) + "\n")

    def _repair(self) -> None:
        """Undo what a kill between two steps left: see the module docstring."""
        open_path = self.root / OPEN_SHARD
        for path in (open_path, self.root / LABELS):
            if path.is_file() and path.stat().st_size:
                with open(path, "rb+") as handle:
                    data = handle.read()
                    if not data.endswith(b"\n"):
                        handle.truncate(data.rfind(b"\n") + 1)
        named = {shard["name"] for shard in self.manifest["shards"]}
        for path in self.root.glob("shard-*.jsonl.gz"):
            if path.name not in named:
                # sealed but not yet named: its records are still in open.jsonl
                path.unlink()
        sealed = self.sealed_ids()
        if open_path.is_file():
            kept = [record for record in _read_lines(open_path) if record["id"] not in sealed]
            if len(kept) != sum(1 for _ in _read_lines(open_path)):
                self._rewrite_open(kept)

    def _rewrite_open(self, records: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(record) + "\n" for record in records)
        atomic_write_text(self.root / OPEN_SHARD, text)

    def sealed_ids(self) -> set[str]:
        """Ids of the records in sealed shards."""
        ids: set[str] = set()
        for shard in self.manifest["shards"]:
            ids.update(record["id"] for record in _read_lines(self.root / shard["name"]))
        return ids

    def open_records(self) -> list[dict[str, Any]]:
        """The records not yet sealed into a shard."""
        path = self.root / OPEN_SHARD
        return list(_read_lines(path)) if path.is_file() else []

    def labels(self) -> dict[str, dict[str, Any]]:
        """Extras computed after the fact, by record id: `{"extras", "offset", "labels_dtype"}`."""
        path = self.root / LABELS
        return {entry.pop("id"): entry for entry in _read_lines(path)} if path.is_file() else {}

    def add_labels(self, entries: Iterable[dict[str, Any]]) -> None:
        """Append `{"id", "extras", "offset", "labels_dtype"}` entries for records that have no extras (call
        after their extras file is written; one batch: all or, after a kill, a torn tail)."""
        self._append_lines(LABELS, entries)

    def records(self) -> Iterator[dict[str, Any]]:
        """Every record: the sealed shards in order, then the open one; extras added later laid over."""
        labels = self.labels()
        for shard in self.manifest["shards"]:
            for record in _read_lines(self.root / shard["name"]):
                yield _labelled(record, labels)
        for record in self.open_records():
            yield _labelled(record, labels)

    def done_ids(self) -> set[str]:
        """Ids of every record in the store."""
        return self.sealed_ids() | {record["id"] for record in self.open_records()}

    def extras_path(self, name: str) -> Path:
        """The path of the extras file `name` (as records name it)."""
        return self.root / EXTRAS / name

    def write_extras(self, name: str, write) -> Path:
        """Write one batch's extras file atomically (`write(temporary_path)` saves it)."""
        return atomic_write(self.extras_path(name), write)

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append records to the open shard and fsync (one batch: all or, after a kill, a torn tail)."""
        self._append_lines(OPEN_SHARD, records)

    def _append_lines(self, name: str, entries: Iterable[dict[str, Any]]) -> None:
        text = "".join(json.dumps(entry) + "\n" for entry in entries)
        with open(self.root / name, "a", encoding="utf-8") as sink:
            sink.write(text)
            sink.flush()
            os.fsync(sink.fileno())

    def seal(self, min_records: int = 1) -> Path | None:
        """Seal the open records into the next shard when there are at least `min_records`.

        Returns:
            The new shard's path, or None when too few records were open.
        """
        records = self.open_records()
        if len(records) < max(min_records, 1):
            return None
        name = _shard_name(len(self.manifest["shards"]))
        payload = "".join(json.dumps(record) + "\n" for record in records).encode()

        def write(temporary: Path) -> None:
            # mtime=0: the same records always give the same bytes (and sha256)
            with open(temporary, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as sink:
                sink.write(payload)

        path = atomic_write(self.root / name, write)
        self.manifest["shards"].append(
            {
                "name": name,
                "records": len(records),
                "answer_tokens": sum(_answer_tokens(record) for record in records),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
        )
        self._write_manifest()
        (self.root / OPEN_SHARD).write_bytes(b"")
        return path

    def add_run(self, run: dict[str, Any], kind: str = "runs") -> None:
        """Record one run's settings and speed in the manifest: a generation run (`kind="runs"`) or a
        labelling run (`kind="label_runs"`)."""
        if kind not in ("runs", "label_runs"):
            raise ValueError(f"kind must be 'runs' or 'label_runs', got {kind!r}.")
        self.manifest.setdefault(kind, []).append(run)
        self._write_manifest()

    def summary(self) -> dict[str, Any]:
        """Counts by domain and mode, and answer tokens, over every record (`summarize`)."""
        return summarize(self.records())


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """`{"records", "answer_tokens", "domains": {domain: count}, "modes": {mode: count}}` of `records`."""
    by_domain: dict[str, int] = {}
    by_mode: dict[str, int] = {}
    tokens = count = 0
    for record in records:
        count += 1
        tokens += _answer_tokens(record)
        by_domain[record["domain"]] = by_domain.get(record["domain"], 0) + 1
        by_mode[record["mode"]] = by_mode.get(record["mode"], 0) + 1
    return {"records": count, "answer_tokens": tokens, "domains": by_domain, "modes": by_mode}


def chat_kinds(summary: dict[str, Any]) -> str:
    """What a store's chats are (from `summarize`), for model cards: the target's own answers, teacher-forced
    text or both."""
    modes = dict(summary.get("modes", {}))
    teacher = modes.pop(TEACHER, 0)
    written = sum(modes.values())
    parts = [f"{written} of the target's own answers"] if written else []
    if teacher:
        parts.append(f"{teacher} teacher-forced chats of documentation and source the target read")
    return " and ".join(parts) or "no chats"
