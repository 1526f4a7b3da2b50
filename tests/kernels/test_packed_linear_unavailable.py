"""`pack_linears` where this torch build cannot prepack (no oneDNN, or a wrong probe result): nothing is
packed, the handle says why, and the model computes as before. Runs on every build (the packed tests skip
where oneDNN is missing)."""

from __future__ import annotations

import torch
from torch import nn

from hf_specssm import _compat
from hf_specssm.kernels import packed_linear
from hf_specssm.kernels.packed_linear import pack_linears


def test_a_build_that_cannot_pack_leaves_the_model_alone(monkeypatch):
    monkeypatch.setattr(packed_linear.packing, "packed_linear_available", lambda dtype=torch.float32: False)
    model = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8))
    inputs = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(inputs)
    for mode in ("auto", "always"):
        handle = pack_linears(model, mode=mode)
        assert not handle.packed and handle.modules == [] and handle.extra_bytes == 0
        assert "cannot pack torch.float32 linears" in handle.reason
        assert not any(_compat.has_instance_forward(layer) for layer in model if isinstance(layer, nn.Linear))
        with torch.no_grad():
            assert torch.equal(model(inputs), expected)
