"""Training checkpoints and run records shared by the drafter trainers, all written crash-safe.

A checkpoint folder `checkpoint-<step>/` holds the model in Hub format (`save_pretrained`),
`trainer_state.pt` (optimizer, schedule, step, losses, …) and `checkpoint.json` (the size of every file).
It is assembled as a hidden `.checkpoint-<step>.partial/` folder, synced, and renamed into place, so a
kill at any moment leaves either the whole checkpoint or none. Resuming takes the newest checkpoint
whose files are all there at their recorded sizes (and whose headers parse), and says which it skipped.

Every other file a trainer keeps (data caches, run records, the final model) goes through
`atomic_write`: a temporary file in the same folder, `fsync`, then `os.replace`.

A run record (`run.json`) holds the fingerprint of what a run trains: its target, data and settings.
`claim_output_dir` compares it with the current command's, so a different `--target` or `--data` never
silently resumes someone else's checkpoints or cached data.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.pt"
MANIFEST = "checkpoint.json"
RUN_FILE = "run.json"

# damaged checkpoints already reported in this process (the commands and the loops both look)
_reported: set[tuple[str, str]] = set()


def _fsync_path(path: Path) -> None:
    """Flush `path` (a file, or a folder's entries) to disk; folders cannot be opened on every OS."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Create or replace `path` crash-safe: `write(temporary)` in the same folder, fsync, then rename.

    Args:
        path: the file to write.
        write: writes the whole content to the path it is given.

    Returns:
        `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        _fsync_path(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj, path)`, crash-safe (see `atomic_write`)."""
    return atomic_write(path, lambda temporary: torch.save(obj, temporary))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`Path(path).write_text(text)`, crash-safe (see `atomic_write`)."""
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def atomic_save_pretrained(model: Any, folder: str | Path) -> Path:
    """`model.save_pretrained(folder)` with each file renamed into `folder` only once written and synced.

    `folder` may hold other things (checkpoints, data): only the files `save_pretrained` writes are
    replaced, each atomically.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".save-{os.getpid()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        for path in sorted(staging.iterdir()):
            _fsync_path(path)
            os.replace(path, folder / path.name)
        _fsync_path(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def replace_folder(folder: str | Path, write: Callable[[Path], None]) -> Path:
    """Create or replace the folder `folder` crash-safe: `write(staging)` fills a hidden sibling folder,
    whose files are synced before it is renamed to `folder` (the old one is removed just before)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write(staging)
        for path in staging.rglob("*"):
            _fsync_path(path)
        _fsync_path(staging)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_path(folder.parent)
    return folder


def _step_of(path: Path) -> int | None:
    suffix = path.name[len(CHECKPOINT_PREFIX) :]
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoint folders in `output_dir` that hold a trainer state, oldest first (intact or not)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [
        path
        for path in folder.iterdir()
        if path.is_dir() and _step_of(path) is not None and (path / TRAINER_STATE).exists()
    ]
    return sorted(found, key=_step_of)


def checkpoint_step(folder: str | Path) -> int:
    """The step a `checkpoint-<step>` folder was saved at."""
    step = _step_of(Path(folder))
    if step is None:
        raise ValueError(f"{folder} is not a {CHECKPOINT_PREFIX}<step> folder.")
    return step


def checkpoint_problem(folder: str | Path) -> str | None:
    """What makes a checkpoint folder unusable (a truncated or missing file), or `None` if it is intact.

    Folders with a `checkpoint.json` are checked against the sizes it records; older folders without
    one by loading their trainer state. Every safetensors header must parse.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{MANIFEST} is unreadable"
        for name, size in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes instead of {size} (truncated?)"
    else:
        try:
            torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=False, mmap=True)
        # a truncated zip fails to open (RuntimeError); a damaged pickle inside fails to unpickle
        except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as error:
            return f"{TRAINER_STATE} does not load ({type(error).__name__}: {error})"
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as error:
            return f"{path.name} does not load ({error})"
    return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest intact checkpoint folder in `output_dir`, or `None`.

    Damaged newer folders (a kill during an old-style in-place save, a full disk) are skipped with a
    line on stderr naming the folder and what is wrong with it.
    """
    for folder in reversed(checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        key = (str(folder), problem)
        if key not in _reported:
            _reported.add(key)
            print(f"warning: skipping the damaged checkpoint {folder}: {problem}", file=sys.stderr)
    return None


def save_checkpoint(output_dir: str | Path, step: int, model: Any, state: dict[str, Any], keep: int) -> Path:
    """Save `model` (`save_pretrained`) and `state` as `checkpoint-<step>/`, crash-safe; prune old folders.

    Keeps the newest `keep` folders up to `step`; folders past `step` are left over from a run resumed
    from an older checkpoint (their successor is this save) and are removed.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # staging folders of saves that were killed (one trainer writes to a folder at a time)
    for leftover in output_dir.glob(f".{CHECKPOINT_PREFIX}*.partial"):
        shutil.rmtree(leftover, ignore_errors=True)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        torch.save(state, staging / TRAINER_STATE)
        files = {path.name: path.stat().st_size for path in sorted(staging.iterdir()) if path.is_file()}
        (staging / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2) + "\n")

    folder = replace_folder(output_dir / f"{CHECKPOINT_PREFIX}{step}", write)
    found = checkpoints(output_dir)
    stale = [path for path in found if checkpoint_step(path) > step]
    kept = [path for path in found if checkpoint_step(path) <= step]
    for old in stale + kept[:-keep]:
        shutil.rmtree(old)
    return folder


def load_trainer_state(folder: str | Path) -> dict[str, Any]:
    """The `trainer_state.pt` of a checkpoint folder."""
    return torch.load(Path(folder) / TRAINER_STATE, weights_only=False)


def file_fingerprint(path: str | Path) -> str:
    """`<resolved path> (sha256 <first 16 hex digits>)` of a data file: changes when its content does."""
    path = Path(path)
    hasher = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(8 * 1024 * 1024):
            hasher.update(chunk)
    return f"{path.resolve()} (sha256 {hasher.hexdigest()[:16]})"


def model_fingerprint(spec: str) -> str:
    """A model folder's identity (its path, `config.json` hash and weight sizes); other specs as given."""
    folder = Path(spec)
    if not folder.is_dir():
        return spec
    config = folder / "config.json"
    config_hash = hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.is_file() else "none"
    weights = sum(
        path.stat().st_size for pattern in ("*.safetensors", "*.bin") for path in folder.glob(pattern)
    )
    return f"{folder.resolve()} (config sha256 {config_hash}, {weights} weight bytes)"


def fingerprint_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`"--flag: was A, now B"` for every entry that differs between two fingerprints."""
    names = sorted(set(recorded) | set(current))
    return [
        f"{name}: was {recorded.get(name)!r}, now {current.get(name)!r}"
        for name in names
        if recorded.get(name) != current.get(name)
    ]


def read_fingerprint(folder: str | Path, filename: str = RUN_FILE) -> dict[str, Any] | None:
    """The fingerprint recorded in `folder`, or `None` (none recorded, or unreadable)."""
    try:
        record = json.loads((Path(folder) / filename).read_text())
    except (OSError, ValueError):
        return None
    return record.get("fingerprint") if isinstance(record, dict) else None


def write_fingerprint(
    folder: str | Path, fingerprint: dict[str, Any], command: str, filename: str = RUN_FILE
) -> Path:
    """Record `fingerprint` (what `command` trains from) in `folder/filename`, crash-safe."""
    payload = {"command": command, "fingerprint": fingerprint}
    return atomic_write_text(Path(folder) / filename, json.dumps(payload, indent=2) + "\n")


def claim_output_dir(
    folder: str | Path,
    fingerprint: dict[str, Any],
    command: str,
    has_progress: bool,
    derived: Sequence[str] = (),
    filename: str = RUN_FILE,
    folder_flag: str = "--out",
) -> list[str]:
    """Make `folder` belong to the run described by `fingerprint`, or refuse.

    - Same fingerprint (or an empty folder): nothing to do. A folder with results but no record (written
      before records existed) counts as different: what it was made from cannot be checked.
    - Different fingerprint (or none recorded) and `has_progress` (checkpoints exist): `ValueError`
      naming each difference and the two ways out (`--restart`, another `--out`).
    - Different fingerprint without progress: the `derived` files and folders (data caches built from
      the old settings) are deleted, and the differences are returned so the caller can say so.

    The fingerprint is recorded before returning.

    Args:
        folder: the output folder.
        fingerprint: flag name → value (files and models by content, see `file_fingerprint`).
        command: the command name, for the record and the message.
        has_progress: whether `folder` holds trained state that resuming would continue.
        derived: names in `folder` computed from the fingerprinted inputs (deleted when they are stale).
        filename: the record's name in `folder`.
        folder_flag: the option that named `folder`, for the message.

    Returns:
        the differences that invalidated `derived` (empty when there were none).
    """
    folder = Path(folder)
    recorded = read_fingerprint(folder, filename)
    leftovers = [name for name in derived if (folder / name).exists()]
    if recorded is None:
        # made before runs were recorded (or the record was deleted): what it used cannot be checked
        unknown = has_progress or leftovers
        changes = [f"its inputs were not recorded (no {filename})"] if unknown else []
    else:
        changes = fingerprint_changes(recorded, fingerprint)
    if changes and has_progress:
        what = (
            f"whose inputs were not recorded (no {filename})"
            if recorded is None
            else f"with other inputs or settings ({'; '.join(changes)})"
        )
        raise ValueError(
            f"{folder} holds a {command} run {what}. Resuming it could mix two runs: pass --restart to "
            f"discard it and start over, or choose another {folder_flag}."
        )
    if changes:
        for name in leftovers:
            path = folder / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    write_fingerprint(folder, fingerprint, command, filename)
    return changes if leftovers else []


def check_steps(requested: int, checkpoint: Path | None) -> None:
    """Raise `ValueError` when `--steps` asks for fewer steps than `checkpoint` has already trained."""
    if checkpoint is None:
        return
    done = checkpoint_step(checkpoint)
    if requested < done:
        raise ValueError(
            f"--steps {requested} is below the {done} steps already trained ({checkpoint}): pass --steps "
            f"{done} or more to continue that run, or --restart to train {requested} steps from scratch."
        )


def load_schedule(schedule: torch.optim.lr_scheduler.LambdaLR, state: dict[str, Any]) -> None:
    """Restore a saved schedule's position, with the learning rates of *this* run's schedule at it.

    The optimizer's saved learning rates are those of the saving run's schedule; a run resumed with more
    `--steps` has another cosine, and would otherwise take its first step at the old rate.
    """
    schedule.load_state_dict(state)
    for group, base, factor in zip(schedule.optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
        group["lr"] = base * factor(schedule.last_epoch)


def check_counts(options: object, names: tuple[str, ...]) -> None:
    """Raise `ValueError` naming the first of the attributes `names` of `options` (a training config) that is
    not an integer >= 1 (steps, batch sizes, checkpoint intervals, …)."""
    for name in names:
        value = getattr(options, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
