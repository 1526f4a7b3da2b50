"""Token streams for drafter training, the draft vocabulary, and the held-out evaluation set.

`build_token_data` tokenizes three sources with the target's tokenizer into flat `uint32` streams (one file
each, documents separated by the end-of-text token), so training reads fixed-length blocks with a memory
map and a resumed run sees exactly the same data:

    <data_dir>/chat.bin   the target's answers (`distill.py`), rendered as whole chats
    <data_dir>/code.bin   Python source (`corpus.python_sources`)
    <data_dir>/docs.bin   documentation prose (`corpus.doc_paragraphs`)
    <data_dir>/heldout.jsonl   distilled records kept out of training (for the acceptance estimate)
    <data_dir>/meta.json  token counts, sources and the tokenizer
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hf_specssm.training.checkpoints import atomic_write, atomic_write_text
from hf_specssm.training.mamba_drafter.corpus import doc_paragraphs, python_sources

SOURCES = ("chat", "code", "docs")
META_FILENAME = "meta.json"
HELDOUT_FILENAME = "heldout.jsonl"


def is_heldout(record_id: str, every: int = 40) -> bool:
    """Whether a distilled record is kept out of training: a stable hash of its id, 1 in `every`."""
    return int(hashlib.sha1(record_id.encode()).hexdigest(), 16) % every == 0


def read_distilled(path: str | Path) -> Iterator[dict]:
    """The records of a distillation JSONL file (`distill.distill_answers`).

    A torn last line (a run killed mid-write, without its newline) is skipped; any other line that is
    not a JSON object raises `ValueError` naming `path:line`.
    """
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                # only the last line can lack its newline
                if not line.endswith("\n"):
                    return
                raise ValueError(f"{path}:{number}: not a JSON record ({error}).") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}.")
            yield record


def read_answers(path: str | Path) -> Iterator[dict]:
    """Distilled records from any of the three forms they come in.

    Args:
        path: a JSONL file (`train-mamba-drafter distill`), a distillation store folder or a pack folder
            (`hf-specssm distill generate` / `distill pack`).

    Raises:
        ValueError: a folder that is neither a store nor a pack.
    """
    path = Path(path)
    if not path.is_dir():
        yield from read_distilled(path)
        return
    if (path / "answers.npz").is_file():
        from hf_specssm.training.distillation.pack import read_pack

        yield from read_pack(path)
    elif (path / "manifest.json").is_file():
        from hf_specssm.training.distillation.store import DistillStore

        yield from DistillStore(path).records()
    else:
        raise ValueError(
            f"{path} is a folder but neither a distillation store (manifest.json) nor a pack (answers.npz)."
        )


def _write_stream(
    path: Path, documents: Iterable[list[int]], separator: int, limit: int | None, desc: str, progress: bool
) -> int:
    """Write documents (token lists) to `path` as uint32 with `separator` after each; stop past `limit`.

    The file appears under its name only once complete (see `checkpoints.atomic_write`).
    """
    written = 0

    def write(temporary: Path) -> None:
        nonlocal written
        bar = tqdm(total=limit, unit="tok", unit_scale=True, desc=desc, disable=not progress)
        with open(temporary, "wb") as sink, bar:
            for ids in documents:
                if not ids:
                    continue
                array = np.asarray([*ids, separator], dtype=np.uint32)
                sink.write(array.tobytes())
                written += array.size
                bar.update(array.size)
                if limit is not None and written >= limit:
                    break

    atomic_write(path, write)
    return written


def _encode_texts(tokenizer, texts: Iterable[str], batch: int = 64) -> Iterator[list[int]]:
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == batch:
            yield from tokenizer(chunk, add_special_tokens=False)["input_ids"]
            chunk = []
    if chunk:
        yield from tokenizer(chunk, add_special_tokens=False)["input_ids"]


def build_token_data(
    data_dir: str | Path,
    tokenizer,
    distilled: str | Path,
    code_tokens: int = 20_000_000,
    doc_tokens: int = 3_000_000,
    heldout_every: int = 40,
    roots: list[Path] | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize the distilled chats, Python source and documentation into `data_dir`; return the metadata.

    Args:
        data_dir: output folder (created).
        tokenizer: the target's tokenizer.
        distilled: the distilled answers: a JSONL file, a store or a pack (`read_answers`; their
            `input_ids` are used as they are).
        code_tokens: stop the code stream after about this many tokens.
        doc_tokens: likewise for documentation.
        heldout_every: one distilled record in this many goes to `heldout.jsonl` instead of training.
        roots: folders to read code and docs from (default: the standard library, `site-packages` and
            `/usr/share/doc`).
        progress: show token-count bars.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    # written last: until then the folder does not claim to hold a complete data set
    (data_dir / META_FILENAME).unlink(missing_ok=True)
    separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if separator is None or separator == tokenizer.unk_token_id:
        separator = tokenizer.eos_token_id
    train, heldout = [], []
    for record in read_answers(distilled):
        (heldout if is_heldout(record["id"], heldout_every) else train).append(record)
    if not train:
        raise ValueError(f"{distilled} holds no distilled records to train on.")
    atomic_write_text(data_dir / HELDOUT_FILENAME, "".join(json.dumps(record) + "\n" for record in heldout))
    counts = {
        "chat": _write_stream(
            data_dir / "chat.bin", (r["input_ids"] for r in train), separator, None, "chat tokens", progress
        ),
        "code": _write_stream(
            data_dir / "code.bin",
            _encode_texts(tokenizer, python_sources(roots)),
            separator,
            code_tokens,
            "code tokens",
            progress,
        ),
        "docs": _write_stream(
            data_dir / "docs.bin",
            _encode_texts(tokenizer, doc_paragraphs(roots)),
            separator,
            doc_tokens,
            "doc tokens",
            progress,
        ),
    }
    meta = {
        "tokens": counts,
        "distilled_records": {"train": len(train), "heldout": len(heldout)},
        "distilled_domains": _domain_counts(train),
        "separator": int(separator),
        "tokenizer": getattr(tokenizer, "name_or_path", None),
        "vocab_size": len(tokenizer),
    }
    atomic_write_text(data_dir / META_FILENAME, json.dumps(meta, indent=2) + "\n")
    return meta


def _domain_counts(records: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        counts[record.get("domain", "?")] = counts.get(record.get("domain", "?"), 0) + 1
    return counts


def load_stream(data_dir: str | Path, source: str) -> np.ndarray:
    """The uint32 token stream of `source` (one of `SOURCES`) as a read-only memory map."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}.")
    return np.memmap(Path(data_dir) / f"{source}.bin", dtype=np.uint32, mode="r")


def token_counts(
    streams: Iterable[np.ndarray], vocab_size: int, weights: Iterable[float] | None = None
) -> np.ndarray:
    """`[V]` token frequencies over `streams`, each scaled by its weight (default 1)."""
    streams = list(streams)
    weights = list(weights) if weights is not None else [1.0] * len(streams)
    if len(weights) != len(streams):
        raise ValueError(f"{len(streams)} streams but {len(weights)} weights.")
    total = np.zeros(vocab_size, dtype=np.float64)
    for stream, weight in zip(streams, weights):
        total += weight * np.bincount(np.asarray(stream), minlength=vocab_size)[:vocab_size]
    return total


def select_vocabulary(counts: np.ndarray, size: int, always: Iterable[int] = ()) -> torch.Tensor:
    """The `size` target ids to draft over: `always` (special tokens) first, then the most frequent.

    Returns:
        `[size]` distinct target ids, `always` first, the rest by descending count (ties by id).
    """
    always = list(dict.fromkeys(int(token) for token in always))
    if size < len(always) or size > counts.size:
        raise ValueError(f"size must lie in [{len(always)}, {counts.size}], got {size}.")
    order = np.lexsort((np.arange(counts.size), -counts))
    chosen = set(always)
    rest = [int(token) for token in order if int(token) not in chosen][: size - len(always)]
    return torch.tensor(always + rest, dtype=torch.long)


@dataclass(frozen=True)
class Mixture:
    """How often each source is drawn per training block.

    Attributes:
        chat, code, docs: relative weights of the three streams.
    """

    chat: float = 0.35
    code: float = 0.5
    docs: float = 0.15

    def weights(self) -> dict[str, float]:
        """The weights by source name, normalised to sum to 1."""
        raw = {"chat": self.chat, "code": self.code, "docs": self.docs}
        if any(value < 0 for value in raw.values()) or sum(raw.values()) <= 0:
            raise ValueError(f"mixture weights must be >= 0 and not all zero, got {raw}.")
        total = sum(raw.values())
        return {name: value / total for name, value in raw.items()}


def sample_blocks(
    streams: dict[str, np.ndarray], mixture: Mixture, batch_size: int, length: int, step: int, seed: int
) -> torch.Tensor:
    """The training batch of step `step`: `[batch_size, length + 1]` target ids, a pure function of its inputs.

    Each row picks a source by `mixture`, then a random offset in that stream (documents run on across
    the separator, as in packed pre-training). Being a function of `(seed, step)` makes resuming exact.
    """
    rng = np.random.default_rng([seed, step])
    weights = mixture.weights()
    names = [name for name in SOURCES if weights[name] > 0 and streams.get(name) is not None]
    if not names:
        raise ValueError("no token stream has a positive mixture weight.")
    probs = np.array([weights[name] for name in names])
    rows = []
    for choice in rng.choice(len(names), size=batch_size, p=probs / probs.sum()):
        stream = streams[names[choice]]
        if stream.size <= length + 1:
            raise ValueError(f"the {names[choice]} stream has {stream.size} tokens, fewer than one block.")
        start = int(rng.integers(0, stream.size - length - 1))
        rows.append(np.asarray(stream[start : start + length + 1], dtype=np.int64))
    return torch.from_numpy(np.stack(rows))
