"""A run resumed with more `steps` takes the steps of a run that asked for that many from the start.

The learning rate of every step follows the resumed run's schedule, not the rate the saving run's shorter
schedule had left in the optimizer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_specssm.training.mamba_drafter.training import DrafterTrainingConfig, train_drafter
from hf_specssm.training.redrafter.command import toy_target
from hf_specssm.training.redrafter.training import TrainingConfig, distill, random_prompts, train_head

from tests.drafters.test_mamba_drafter import tiny_drafter
from tests.helpers.models import VOCAB
from tests.tools.test_robust_training import new_head


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_drafter_run_resumed_with_more_steps_follows_the_longer_schedule(tmp_path):
    np.tile(np.array([2, 4, 6, 8, 10, 12], dtype=np.uint32), 100).tofile(tmp_path / "chat.bin")
    options = {"batch_size": 2, "block_length": 12, "warmup_steps": 1, "checkpoint_every": 2, "bf16": False}
    straight = tiny_drafter(seed=0)
    expected = train_drafter(
        straight, tmp_path, tmp_path / "straight", DrafterTrainingConfig(steps=5, progress=False, **options)
    )
    resumed = tiny_drafter(seed=0)
    train_drafter(
        resumed, tmp_path, tmp_path / "resumed", DrafterTrainingConfig(steps=2, progress=False, **options)
    )
    losses = train_drafter(
        resumed, tmp_path, tmp_path / "resumed", DrafterTrainingConfig(steps=5, progress=False, **options)
    )
    assert losses == pytest.approx(expected, abs=1e-6)


def test_a_head_run_resumed_with_more_steps_follows_the_longer_schedule(tmp_path):
    target = toy_target("toy-llama")
    data = distill(target, random_prompts(VOCAB, 16, 4, seed=1), 6, progress=False)
    options = {"batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2, "progress": False}
    expected = train_head(new_head(), target, data, TrainingConfig(steps=5, **options))
    train_head(new_head(), target, data, TrainingConfig(steps=2, **options), output_dir=tmp_path)
    losses = train_head(
        new_head(seed=9), target, data, TrainingConfig(steps=5, **options), output_dir=tmp_path
    )
    assert losses == pytest.approx(expected, abs=1e-6)
