"""accelerate: the training commands run data-parallel under `accelerate launch`; `device_map` targets decode.

The launched tests start two CPU processes (`accelerate launch --multi_gpu --num_processes 2` with no
GPU visible: `--cpu --num_processes 2` would start one process, see `distributed.ONE_PROCESS_LAUNCH_NOTE`).
They check what data parallelism promises:

- train-redrafter (fp32): two processes on halves of each batch take the steps one process takes on the
  whole batch (weights equal to 1e-6), resuming a one-process checkpoint (batch order and step carry over).
- train-mamba-drafter (bf16 autocast, so equal only to bf16 tolerance): each rank ran and trained on its
  half of each batch, the ranks hold identical weights (gradients were averaged), only rank 0 saved, and the
  loss falls as in one process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_specssm
from hf_specssm.tools.cli import main
from hf_specssm.training.checkpoints import checkpoints, load_trainer_state
from hf_specssm.training.distributed import (
    check_global_batch,
    launched_processes,
    loss_over_processes,
    one_process_launch,
    shard_rows,
)
from hf_specssm.training.mamba_drafter.training import DrafterTrainingConfig, train_drafter

from tests.helpers.models import VOCAB, align, build
from tests.tools.test_robust_training import _mamba, drafter_data  # noqa: F401 - drafter_data is a fixture

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("accelerate_worker.py")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(*command: str) -> subprocess.CompletedProcess:
    """`accelerate launch` two CPU processes running `command` (a script and its arguments, or `-m module …`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
    ]  # fmt: skip
    result = subprocess.run(
        [*launcher, *command], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.parametrize(
    ("environ", "processes", "one_process"),
    [
        pytest.param({}, 1, False, id="alone"),
        pytest.param({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, 2, False, id="torchrun"),
        pytest.param({"OMPI_COMM_WORLD_SIZE": "4"}, 4, False, id="mpirun"),
        pytest.param(
            {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}, 1, True, id="cpu-launch-of-2"
        ),
        pytest.param({"ACCELERATE_USE_CPU": "True"}, 1, False, id="cpu-launch-of-1"),
    ],
)
def test_launchers_are_recognised(environ, processes, one_process):
    assert launched_processes(environ) == processes
    assert one_process_launch(environ) is one_process


def test_each_process_takes_its_contiguous_share_of_the_global_batch():
    batch = torch.arange(12).reshape(6, 2)
    shares = [shard_rows(batch, SimpleNamespace(num_processes=3, process_index=rank)) for rank in range(3)]
    assert torch.equal(torch.cat(shares), batch) and all(share.shape == (2, 2) for share in shares)
    alone = SimpleNamespace(num_processes=1, process_index=0)
    assert torch.equal(shard_rows(batch, alone), batch)
    with pytest.raises(ValueError, match=r"--batch-size 6 is the global batch.*a multiple of 4"):
        check_global_batch(6, SimpleNamespace(num_processes=4), "--batch-size")


def test_a_process_alone_logs_its_own_loss():
    alone = SimpleNamespace(num_processes=1)
    assert loss_over_processes(torch.tensor(0.25), alone) == (0.25, 1)
    loss, count = loss_over_processes(None, alone)
    assert count == 0 and loss != loss


def test_the_drafter_loop_refuses_a_batch_that_does_not_split(tmp_path):
    three = SimpleNamespace(num_processes=3, process_index=0, is_main_process=True)
    config = DrafterTrainingConfig(steps=1, batch_size=4, block_length=8, progress=False)
    with pytest.raises(
        ValueError, match="batch_size 4 is the global batch, split evenly over the 3 processes"
    ):
        train_drafter(torch.nn.Linear(1, 1), tmp_path, tmp_path / "run", config, accelerator=three)


def test_only_the_train_stage_runs_under_a_launcher(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train-mamba-drafter", "export", "--out", str(tmp_path)]) == 2
    assert "the export stage runs in one process, not 2" in capsys.readouterr().err


@pytest.mark.slow
def test_train_redrafter_under_accelerate_launch_takes_the_steps_of_one_process(tmp_path, capsys):
    common = [
        "train-redrafter", "--target", "toy-llama", "--device", "cpu", "--threads", "1", "--quiet",
        "--distill-samples", "16", "--distill-new-tokens", "10", "--eval-prompts", "0",
        "--checkpoint-every", "3", "--batch-size", "4",
    ]  # fmt: skip
    assert main([*common, "--steps", "6", "--out", str(tmp_path / "one")]) == 0
    # the first 3 steps in one process, the rest in two: resuming carries the batch order across
    assert main([*common, "--steps", "3", "--out", str(tmp_path / "two")]) == 0
    capsys.readouterr()
    launched = _launch("-m", "hf_specssm.tools.cli", *common, "--steps", "6", "--out", str(tmp_path / "two"))
    # the main process alone prints
    assert launched.stdout.count(f"resuming from {tmp_path / 'two' / 'checkpoint-3'}") == 1
    assert launched.stdout.count("saved to") == 1
    one, two = (load_trainer_state(tmp_path / name / "checkpoint-6") for name in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert torch.allclose(two["losses"], one["losses"], rtol=1e-6)
    weights = [load_file(tmp_path / name / "checkpoint-6" / "model.safetensors") for name in ("one", "two")]
    for name, tensor in weights[0].items():
        assert torch.allclose(weights[1][name], tensor, atol=1e-6), name
    assert [folder.name for folder in checkpoints(tmp_path / "two")] == ["checkpoint-3", "checkpoint-6"]
    assert not [path.name for path in (tmp_path / "two").iterdir() if path.name.startswith(".")]


@pytest.mark.slow
def test_train_mamba_drafter_under_accelerate_launch_keeps_ranks_in_sync(drafter_data, tmp_path):  # noqa: F811
    def command(out: str, steps: int) -> list[str]:
        return _mamba(drafter_data, "--batch-size", "4", "--out", out, "--steps", str(steps))

    assert main(command(str(tmp_path / "one"), 4)) == 0
    one = load_trainer_state(tmp_path / "one" / "checkpoint-4")
    assert main(command(str(tmp_path / "two"), 2)) == 0
    records = tmp_path / "records"
    records.mkdir()
    _launch(str(WORKER), str(records), *command(str(tmp_path / "two"), 4))
    ranks = [torch.load(records / f"rank-{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert [(rank["rank"], rank["world_size"]) for rank in ranks] == [(0, 2), (1, 2)]
    # each rank trained on its half of every 4-block batch
    assert ranks[0]["rows"] == ranks[1]["rows"] == [2, 2]
    # gradients were averaged: both ranks took the same steps
    assert ranks[0]["losses"] == ranks[1]["losses"]
    for name, tensor in ranks[0]["weights"].items():
        assert torch.equal(ranks[1]["weights"][name], tensor), name
    # only the main process saved
    assert (ranks[0]["saves"], ranks[1]["saves"]) == ([4], [])
    two = load_trainer_state(tmp_path / "two" / "checkpoint-4")
    assert two["processes"] == 2 and two["losses"][-1] < 0.5 * two["losses"][0]
    # bf16 autocast rounds the half batches differently from the whole one
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-2)


def _split_over_cpu_and_disk(model: torch.nn.Module) -> dict[str, str]:
    """A device map with the first decoder layer (and everything outside the layers) on the CPU and the
    other layers offloaded to disk: accelerate's hooks load them for each forward."""
    layers = next(
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers")
    )
    base = layers.rsplit(".", 1)[0]
    placement = {name: "cpu" for name, _ in model.named_children() if name != base}
    placement.update(
        {
            f"{base}.{name}": "cpu"
            for name, _ in model.get_submodule(base).named_children()
            if name != "layers"
        }
    )
    placement.update(
        {
            f"{layers}.{index}": "cpu" if index == 0 else "disk"
            for index in range(len(model.get_submodule(layers)))
        }
    )
    return placement


@pytest.mark.parametrize(
    ("kind", "placement"),
    [
        pytest.param(kind, placement, id=f"{kind}-{placement}")
        for kind in ("llama", "jamba", "mamba2")
        for placement in ("auto", "cpu-and-disk")
    ],
)
def test_device_map_targets_keep_greedy_parity(tmp_path, kind, placement):
    reference_model = build(kind, seed=0)
    drafter = build("mamba2", seed=1)
    align(reference_model, drafter)
    reference_model.save_pretrained(tmp_path / "target")
    device_map = "auto" if placement == "auto" else _split_over_cpu_and_disk(reference_model)
    target = AutoModelForCausalLM.from_pretrained(
        tmp_path / "target", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    if placement != "auto":
        assert "disk" in target.hf_device_map.values()
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0)).to(target.device)
    mask = torch.ones_like(prompt)
    reference = reference_model.to(target.device).generate(
        prompt, attention_mask=mask, max_new_tokens=20, do_sample=False
    )
    output = hf_specssm.generate(
        target,
        prompt,
        attention_mask=mask,
        drafter=drafter.to(target.device),
        max_new_tokens=20,
        do_sample=False,
    )
    assert torch.equal(output, reference)
    assert any(length > 0 for length in target.last_speculation_stats.accepted_lengths)
