"""Triton kernels against their plain-torch references.

CPU tier: the kernels run under `TRITON_INTERPRET=1`, which must be set before Triton is imported, so each
case runs in a subprocess and the rest of the suite is unaffected. GPU tier (`gpu` mark): the same cases,
compiled, on CUDA; skipped without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.kernel_cases import CASES

REPO_ROOT = Path(__file__).resolve().parents[2]

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_reference_under_the_interpreter(case):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    code = f"from tests.helpers import kernel_cases; kernel_cases.CASES[{case!r}]('cpu')"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,  # the subprocess imports `tests.helpers` from here
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_kernel_matches_reference(case, dtype):
    CASES[case]("cuda", dtype)


@pytest.mark.gpu
@needs_triton
def test_dispatch_picks_triton_on_cuda(monkeypatch):
    from hf_specssm.kernels.tree_scan import dispatch

    calls = []
    import hf_specssm.kernels.tree_scan.triton as triton_module

    original = triton_module.tree_scan_triton
    monkeypatch.setattr(triton_module, "tree_scan_triton", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(1, 3, 2, 4, device="cuda")
    dispatch.tree_scan(
        x, torch.rand(1, 3, 2, device="cuda"), -torch.rand(2, device="cuda"), torch.randn(1, 3, 1, 5, device="cuda"),
        torch.randn(1, 3, 1, 5, device="cuda"), torch.randn(1, 2, 4, 5, device="cuda"),
        torch.ones(3, 3, dtype=torch.bool, device="cuda").tril(),
    )  # fmt: skip
    assert calls
