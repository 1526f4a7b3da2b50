"""`hf-specssm ARGS` as one process of a launched run, recording what this process did (`test_accelerate.py`).

Run by `accelerate launch … tests/tools/accelerate_worker.py RECORD_DIR ARGS…`: each process runs the
command, then writes `RECORD_DIR/rank-<rank>.pt` with its rank, the number of processes, the rows of each
batch it trained on, the steps at which it saved a checkpoint, the losses it saw and its drafter's final
weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from hf_specssm.tools.cli import main
from hf_specssm.training.mamba_drafter import training


def run(record_dir: Path, argv: list[str]) -> int:
    rows: list[int] = []
    saves: list[int] = []
    trained: list[tuple[torch.nn.Module, list[float]]] = []
    batch_loss, save_checkpoint, train_drafter = (
        training.batch_loss,
        training.save_checkpoint,
        training.train_drafter,
    )

    def recording_loss(model, blocks, *args, **kwargs):
        rows.append(blocks.shape[0])
        return batch_loss(model, blocks, *args, **kwargs)

    def recording_save(output_dir, step, model, state, keep):
        saves.append(step)
        return save_checkpoint(output_dir, step, model, state, keep)

    def recording_train(model, *args, **kwargs):
        losses = train_drafter(model, *args, **kwargs)
        trained.append((model, losses))
        return losses

    # the command imports `train_drafter` when it runs; the loop calls the others by their module's names
    training.batch_loss, training.save_checkpoint, training.train_drafter = (
        recording_loss,
        recording_save,
        recording_train,
    )
    status = main(argv)
    model, losses = trained[-1]
    record = {
        "rank": int(os.environ.get("RANK", "0")),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "rows": rows,
        "saves": saves,
        "losses": losses,
        "weights": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
    }
    torch.save(record, record_dir / f"rank-{record['rank']}.pt")
    return status


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]), sys.argv[2:]))
