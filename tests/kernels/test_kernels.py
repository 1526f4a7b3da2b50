"""Kernels against their plain-torch references."""

from __future__ import annotations

import pytest
import torch

from hf_specssm.kernels import gather_rows
from hf_specssm.kernels.state_gather.reference import gather_rows_reference


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((3, 5, 7), id="conv"),
        pytest.param((2, 3, 5, 7), id="mamba2-ssm"),
        pytest.param((1, 9), id="flat"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_rows_matches_reference(shape, dtype):
    states = torch.randn(shape).to(dtype)
    indices = torch.tensor([0, 0, shape[0] - 1, 0], dtype=torch.long)
    out = gather_rows(states, indices)
    assert torch.equal(out, gather_rows_reference(states, indices))
    assert out.is_contiguous() and out.dtype == dtype
    before = states.clone()
    out.add_(1)  # a copy: the source is untouched
    assert torch.equal(states, before)
    assert not torch.equal(out[0], states[0])


def test_gather_rows_rejects_non_long_indices():
    with pytest.raises(ValueError, match="int64"):
        gather_rows(torch.zeros(2, 3), torch.tensor([0], dtype=torch.int32))
