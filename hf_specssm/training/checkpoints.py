"""Training checkpoints shared by the drafter trainers: `checkpoint-<step>/` folders, newest resumed.

A checkpoint folder holds the model in Hub format (`save_pretrained`) and `trainer_state.pt` (optimizer,
schedule, step, losses, …). The state file is written last, so a folder without it is an interrupted
save and is never resumed from.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.pt"


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoint folders in `output_dir`, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [
        path
        for path in folder.iterdir()
        if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and (path / TRAINER_STATE).exists()
    ]
    return sorted(found, key=lambda path: int(path.name[len(CHECKPOINT_PREFIX) :]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder in `output_dir`, or `None`."""
    found = checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(output_dir: str | Path, step: int, model: Any, state: dict[str, Any], keep: int) -> Path:
    """Save `model` (`save_pretrained`) and `state` as `checkpoint-<step>/`; keep the newest `keep` folders."""
    output_dir = Path(output_dir)
    folder = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    model.save_pretrained(folder)
    torch.save(state, folder / TRAINER_STATE)
    for old in checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)
    return folder


def load_trainer_state(folder: str | Path) -> dict[str, Any]:
    """The `trainer_state.pt` of a checkpoint folder."""
    return torch.load(Path(folder) / TRAINER_STATE, weights_only=False)
