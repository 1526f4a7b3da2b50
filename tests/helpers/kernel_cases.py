"""Kernel-vs-reference cases shared by the interpreter tier (CPU, `TRITON_INTERPRET=1`, run in a subprocess
by tests/kernels/test_kernels_triton.py) and the `gpu` tier (compiled kernels on CUDA). Odd sizes throughout."""

from __future__ import annotations

import torch

# (rtol, atol) per dtype of the kernel's inputs
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """`torch.testing.assert_close` with this suite's tolerance for inputs of `dtype`."""
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.float().cpu(), expected.float().cpu(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


def random_parents(size: int, generator: torch.Generator) -> torch.Tensor:
    """`[size]` parents of a random tree in topological order (`-1`: the committed state)."""
    parents = [-1]
    for node in range(1, size):
        parents.append(int(torch.randint(-1, node, (1,), generator=generator)))
    return torch.tensor(parents)


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """`[T, T]` bool ancestor-or-self mask of `parents`."""
    mask = torch.eye(parents.shape[0], dtype=torch.bool)
    for node, parent in enumerate(parents.tolist()):
        if parent >= 0:
            mask[node] |= mask[parent]
    return mask


TREE_SCAN_SHAPES = [(1, 9, 3, 5, 1, 7), (2, 13, 4, 17, 2, 19), (1, 33, 2, 3, 1, 5)]  # Bt, T, H, P, G, N


def check_tree_scan(device: str, dtype: torch.dtype = torch.float32) -> None:
    """Triton tree scan vs the loop definition and the torch masked-SSD form."""
    from hf_specssm.kernels.tree_scan.reference import tree_scan_naive, tree_scan_torch
    from hf_specssm.kernels.tree_scan.triton import tree_scan_triton

    generator = torch.Generator().manual_seed(0)
    for batch, length, heads, head_dim, groups, state in TREE_SCAN_SHAPES:
        parents = random_parents(length, generator)

        def rand(*shape):
            # rounded to the kernel's dtype, so the float32 references see the kernel's inputs
            return torch.randn(*shape, generator=generator).to(dtype).float()

        x = rand(batch, length, heads, head_dim)
        dt = torch.nn.functional.softplus(rand(batch, length, heads)).to(dtype).float()
        A = (-torch.rand(heads, generator=generator) * 2).to(dtype).float()
        B, C = rand(batch, length, groups, state), rand(batch, length, groups, state)
        s0 = rand(batch, heads, head_dim, state)
        D = rand(heads)
        expected = tree_scan_naive(x, dt, A, B, C, s0, parents, D)
        assert_close(tree_scan_torch(x, dt, A, B, C, s0, ancestor_mask(parents), D), expected, dtype, "torch")
        moved = [t.to(device=device, dtype=dtype) for t in (x, dt, A, B, C, s0, D)]
        mask = ancestor_mask(parents).to(device)
        for with_d in (True, False):
            args = [*moved[:6], mask, moved[6] if with_d else None]
            reference = tree_scan_naive(x, dt, A, B, C, s0, parents, D if with_d else None)
            assert_close(tree_scan_triton(*args), reference, dtype, f"triton {length} nodes, D={with_d}")
        # a per-row mask (batched trees) gives the same result
        batched = mask[None].expand(batch, -1, -1).contiguous()
        assert_close(tree_scan_triton(*moved[:6], batched, moved[6]), expected, dtype, "batched mask")


NSTEP_SHAPES = [(2, 5, 3, 7, 1, 9), (3, 4, 4, 5, 2, 11)]  # Bt, L, H, P, G, N


def check_nstep(device: str, dtype: torch.dtype = torch.float32) -> None:
    """Triton N-step state update vs the loop reference: outputs and the mutated state."""
    from hf_specssm.kernels.ssm_state_update.reference import selective_state_update_nstep_reference
    from hf_specssm.kernels.ssm_state_update.triton import selective_state_update_nstep_triton

    generator = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(dtype).float()

    def softplus(tensor):
        return torch.nn.functional.softplus(tensor).to(dtype).float()

    def negative(*shape):
        return (-torch.rand(*shape, generator=generator)).to(dtype).float()

    cases = []
    for batch, length, heads, head_dim, groups, state in NSTEP_SHAPES:
        # Mamba2 layout: per-head Δ and A, expanded (stride 0) over P and N
        dt = softplus(rand(batch, length, heads))[..., None].expand(-1, -1, -1, head_dim)
        A = negative(heads)[:, None, None].expand(heads, head_dim, state)
        cases.append(
            (rand(batch, heads, head_dim, state), rand(batch, length, heads, head_dim), dt, A,
             rand(batch, length, groups, state), rand(batch, length, groups, state), rand(heads, head_dim))
        )  # fmt: skip
    # Mamba v1 layout: state [Bt, D, N] seen as [Bt, 1, D, N], per-channel Δ and per-(channel, state) A
    channels, state, length = 13, 5, 6
    cases.append(
        (rand(2, 1, channels, state), rand(2, length, 1, channels),
         softplus(rand(2, length, 1, channels)), negative(1, channels, state),
         rand(2, length, 1, state), rand(2, length, 1, state), rand(1, channels))
    )  # fmt: skip
    for state0, x, dt, A, B, C, D in cases:
        batch, length = x.shape[:2]
        steps = torch.tensor([length, 0, max(length - 2, 1)][:batch])
        for with_c, with_d, num_steps in [(True, True, None), (True, False, steps), (False, False, steps)]:
            expected_state = state0.clone()
            expected = selective_state_update_nstep_reference(
                expected_state, x, dt, A, B, C if with_c else None, D if with_d else None, num_steps
            )
            live = state0.to(device=device, dtype=dtype)
            out = selective_state_update_nstep_triton(
                live,
                x.to(device=device, dtype=dtype),
                dt.to(device=device, dtype=dtype),
                A.to(device=device, dtype=dtype),
                B.to(device=device, dtype=dtype),
                C.to(device=device, dtype=dtype) if with_c else None,
                D.to(device=device, dtype=dtype) if with_d else None,
                num_steps.to(device) if num_steps is not None else None,
            )
            what = f"shape {tuple(x.shape)} C={with_c} D={with_d} steps={num_steps is not None}"
            assert_close(live, expected_state, dtype, f"mutated state, {what}")
            if with_c:
                assert_close(out, expected, dtype, f"outputs, {what}")
            else:
                assert out is None
        # rows asked for 0 steps keep their state bit for bit
        live = state0.to(device=device, dtype=dtype)
        before = live.clone()
        selective_state_update_nstep_triton(
            live, x.to(device, dtype), dt.to(device, dtype), A.to(device, dtype), B.to(device, dtype),
            num_steps=torch.zeros(batch, dtype=torch.long, device=device),
        )  # fmt: skip
        assert torch.equal(live, before)


def check_gather(device: str, dtype: torch.dtype = torch.float32) -> None:
    """Triton row gather vs the loop reference, and a preallocated destination."""
    from hf_specssm.kernels.state_gather.reference import gather_rows_reference
    from hf_specssm.kernels.state_gather.triton import gather_rows_triton

    generator = torch.Generator().manual_seed(2)
    for shape in [(3, 5, 7), (2, 3, 5, 7), (5, 9)]:
        states = torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
        indices = torch.tensor([0, 0, shape[0] - 1, 1, 0], dtype=torch.long, device=device)
        expected = gather_rows_reference(states, indices)
        out = gather_rows_triton(states, indices)
        assert torch.equal(out, expected)
        slot = torch.empty_like(expected)
        assert gather_rows_triton(states, indices, out=slot) is slot and torch.equal(slot, expected)


CASES = {"tree_scan": check_tree_scan, "nstep": check_nstep, "gather": check_gather}


def require_cpu_kernels():
    """The compiled CPU kernels (`hf_specssm.kernels.cpu`) for a test that needs them. Skips only where they
    cannot be had by design — switched off (`HF_SPECSSM_CPU_KERNELS=0`) or no C++ compiler; a compiler
    that is present but fails the build fails the test (CI has gcc, so the kernels' tests always run)."""
    import pytest

    from hf_specssm.kernels import cpu

    if cpu.cpu_kernels_disabled():
        pytest.skip(f"{cpu.ENVIRONMENT_SWITCH}=0")
    module = cpu.cpu_kernels()
    if module is None:
        failure = cpu.cpu_kernels_failure()
        if failure == cpu.NO_COMPILER:
            pytest.skip(f"the CPU kernels need a C++ compiler: {failure}")
        pytest.fail(f"a C++ compiler is here but the CPU kernels failed to build: {failure}")
    return module
