"""Data-parallel training with accelerate: one process alone, or several under `accelerate launch` / `torchrun`.

Both trainers draw each step's *global* batch the same way in every process (a pure function of
`(seed, step)`, or a generator every process advances alike) and each process trains on its own
contiguous share of the rows (`shard_rows`). DDP (set up by `Accelerator.prepare`) averages the gradients,
so N processes take the steps one process takes with the same global batch, up to the order of
floating-point sums; the data position and the batch generator are the same in every process, so a
checkpoint resumes exactly, with any number of processes.

Only the main process writes checkpoints and files, shows progress and prints.

Started alone (no launcher) a trainer runs as it always did: on the device its model is on, with no
process group.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import torch
from accelerate import Accelerator

# what launchers (torchrun, accelerate launch, mpirun) set in each process they start
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

ONE_PROCESS_LAUNCH_NOTE = (
    "note: `accelerate launch --cpu --num_processes N` starts one process (several CPU processes need "
    "mpirun); this process trains alone. For N CPU processes on one machine run `accelerate launch "
    "--multi_gpu --num_processes N …` (with no GPU, or ACCELERATE_USE_CPU=1, each trains on the CPU) or "
    "`torchrun --nproc_per_node N -m hf_specssm.tools.cli …`."
)


def launched_processes(environ: Mapping[str, str] | None = None) -> int:
    """How many processes a launcher started for this run (1 when started alone)."""
    environ = os.environ if environ is None else environ
    for name in _WORLD_SIZE_VARIABLES:
        value = environ.get(name, "")
        if value.isdigit() and int(value) > 1:
            return int(value)
    return 1


def one_process_launch(environ: Mapping[str, str] | None = None) -> bool:
    """Whether `accelerate launch --cpu --num_processes N` (N > 1) started this process alone.

    That launcher sets `ACCELERATE_USE_CPU` and a rendezvous address (`MASTER_ADDR`, only for N > 1) but
    starts a single process without `mpirun`, so the run silently trains on one process.
    """
    environ = os.environ if environ is None else environ
    uses_cpu = environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return uses_cpu and "MASTER_ADDR" in environ and launched_processes(environ) == 1


def make_accelerator(device: str | torch.device | None = None) -> Accelerator:
    """The `Accelerator` of this process.

    Args:
        device: the device the command trains on. Under a launcher its type decides the processes':
            `cpu` (or no CUDA) makes them CPU processes (gloo), anything else gives each process its own
            GPU (`cuda:<local rank>`). Alone it changes nothing: the trainer stays where it is.

    Precision stays the trainers' own (`mixed_precision="no"`), and models are placed by the trainers
    (`device_placement=False`), so a process alone computes exactly what it did before accelerate.
    """
    if one_process_launch():
        print(ONE_PROCESS_LAUNCH_NOTE, file=sys.stderr)
    wants_cpu = not torch.cuda.is_available() or (device is not None and torch.device(device).type == "cpu")
    return Accelerator(
        # alone, `cpu=True` would only clash with an accelerator state made for a GPU earlier in the process
        cpu=wants_cpu and launched_processes() > 1,
        device_placement=False,
        mixed_precision="no",
    )


def training_device(accelerator: Accelerator, requested: str | torch.device) -> torch.device:
    """Where this process trains: `requested` when alone, the process's own device under a launcher."""
    return torch.device(requested) if accelerator.num_processes == 1 else accelerator.device


def check_global_batch(batch_size: int, accelerator: Accelerator, flag: str = "batch_size") -> None:
    """Raise `ValueError` unless the global batch splits evenly over the processes."""
    if batch_size % accelerator.num_processes:
        raise ValueError(
            f"{flag} {batch_size} is the global batch, split evenly over the {accelerator.num_processes} "
            f"processes: choose a multiple of {accelerator.num_processes}, or launch another number of processes."
        )


def shard_rows(batch: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """This process's contiguous share `[B / N, ...]` of the global batch `[B, ...]` (`B` divisible by N)."""
    share = batch.shape[0] // accelerator.num_processes
    start = accelerator.process_index * share
    return batch[start : start + share]


def loss_over_processes(loss: torch.Tensor | None, accelerator: Accelerator) -> tuple[float, int]:
    """The step's loss averaged over the processes that had one, and how many had one; the same everywhere.

    A process has no loss when none of its rows carries a label. Alone: `(float(loss), 1)`, the value a
    single-process run always logged, or `(nan, 0)`.
    """
    if accelerator.num_processes == 1:
        return (float(loss.detach()), 1) if loss is not None else (float("nan"), 0)
    value = float(loss.detach()) if loss is not None else 0.0
    totals = torch.tensor([value, float(loss is not None)], dtype=torch.float64, device=accelerator.device)
    total, count = accelerator.reduce(totals, reduction="sum").tolist()
    return (total / count if count else float("nan")), int(count)
