"""The console commands run end to end (tiny settings)."""

from __future__ import annotations

import re

import pytest
import torch

from hf_specssm.kernels.packed_linear import packed_linear_available
from hf_specssm.tools.cli import main


def test_demo_runs_and_reports_identity(capsys):
    assert main(["demo", "--offline", "--max-new-tokens", "6", "--prompt-lengths", "5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "greedy output identical to plain decoding: yes" in out
    assert "transformers' own assisted decoding" in out
    assert "| 5 |" in out


def test_bench_ssm_runs(capsys):
    args = ["bench-ssm", "--models", "mamba2-8M", "--repeats", "1", "--prompts", "1", "--threads", "1"]
    args += ["--alphas", "0.7", "--oracle-k", "2", "--max-new-tokens", "6", "--prompt-bytes", "40"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for part in (
        "## mamba2-8M",
        "| ours: multi-token forward |",
        "| ours: chain as a one-branch tree (tree scan) |",
        "| state update |",
        "tree verification",
        "oracle drafter",
        "| speed-up, first call | speed-up, warm | decoding |",
        "prompt lookup",
        "peak process memory",
    ):
        assert part in out
    assert "| NO |" not in out
    # the split is of wall time (the compiled CPU kernels are invisible to the profiler): shares in [0, 1]
    split = re.search(r"matrix products take (\d+)% of the k=8 verification .* and (\d+)% of a step", out)
    assert split is not None and all(0 <= int(share) <= 100 for share in split.groups())
    inside = re.search(r"SSM mixers' forwards apart from their linears take (\d+)% of a step", out)
    assert inside is not None and 0 < int(inside.group(1)) <= 100
    assert re.search(r"(compiled CPU kernels|CPU kernels (switched off|unavailable))", out)
    floor = re.search(r"compute floor of that rest .*?: (\d+)% of a step \(([^)]*)\)", out)
    assert floor is not None and 0 <= int(floor.group(1)) <= 100
    if "; compiled CPU kernels" in out:  # mamba2-8M verifies through the fused mixer kernel
        assert "mamba2_verification_mixer" in floor.group(2)


def test_the_oracle_part_compares_decoding_without_the_shared_prefill():
    from hf_specssm.tools.bench.ssm import PlainTiming, decoding_speedup

    # 10 s plain and 6 s speculative of which 2 s are the prompt's prefill: decoding is 8 s against 4 s
    assert decoding_speedup(10.0, 6.0, 2.0) == pytest.approx(2.0)
    assert decoding_speedup(10.0, 6.0, 0.0) == pytest.approx(10 / 6)
    timing = PlainTiming(torch.zeros(1, 9, dtype=torch.long), total_s=3.0, prefill_s=1.0, new_tokens=5)
    assert timing.step_s == pytest.approx(0.5)  # 4 tokens after the first in 2 s


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_bench_ssm_refuses_cuda_without_a_gpu(capsys):
    assert main(["bench-ssm", "--models", "mamba2-8M", "--device", "cuda"]) == 2
    assert "--device cuda needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_ssm_runs_on_cuda(capsys):
    """Every part on the GPU: the timers synchronise, trees stay on the CPU, outputs match plain decoding."""
    args = ["bench-ssm", "--models", "mamba2-8M", "--repeats", "1", "--prompts", "1", "--device", "cuda"]
    args += ["--alphas", "0.7", "--oracle-k", "2", "--max-new-tokens", "6", "--prompt-bytes", "40"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for part in ("| ours: multi-token forward |", "tree verification", "oracle drafter", "peak GPU memory"):
        assert part in out
    assert "| NO |" not in out


@pytest.mark.parametrize("flag", ["--repeats", "--oracle-repeats"])
def test_bench_ssm_refuses_a_count_below_one(flag, capsys):
    assert main(["bench-ssm", "--models", "mamba2-8M", flag, "0"]) == 2
    assert f"{flag} must be >= 1, got 0." in capsys.readouterr().err


@pytest.mark.skipif(
    not packed_linear_available(torch.float32), reason="this torch build has no oneDNN linear"
)
def test_bench_ssm_with_packed_linears_reports_the_stock_baseline_too(capsys, monkeypatch):
    """`--pack-linears`: the decision is printed, every part runs packed and the oracle part also times
    plain `generate` stock. The measurement is fixed to one that packs (a tiny model's timings are noise)."""
    from hf_specssm.kernels.packed_linear import PackingMeasurement, packing

    packs = PackingMeasurement((8, 8), torch.float32, (1, 9), (2e-3, 4e-3), (1e-3, 1e-3))
    monkeypatch.setattr(packing, "measure_packing", lambda *args: packs)
    args = ["bench-ssm", "--models", "mamba2-8M", "--repeats", "1", "--threads", "1", "--parts", "verify"]
    args += ["oracle", "--alphas", "0.7", "--oracle-k", "2", "--max-new-tokens", "6", "--pack-linears"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "linears: packed from 1 row(s) on" in out
    assert "tok/s stock" in out and "| over stock |" in out
    assert "| NO |" not in out


@pytest.mark.slow
def test_bench_trees_runs(capsys):
    assert main(["bench-trees", "--max-new-tokens", "6", "--prompt-lengths", "5"]) == 0
    out = capsys.readouterr().out
    assert "| tree (3,2,2,1,1) |" in out and "| NO |" not in out


def test_bench_tree_scan_runs(capsys):
    args = ["bench-tree-scan", "--parts", "a", "--nodes", "4", "--sizes", "64x2", "--repeats", "1"]
    assert main([*args, "--threads", "1"]) == 0
    assert "| Mamba2 h=64 L=2 | 4 |" in capsys.readouterr().out


def test_bench_ssm_lookup_repeats_alternate_and_keep_the_first_pass_apart():
    import hf_specssm
    from hf_specssm.tools.bench.ssm import byte_prompts, lookup_run
    from hf_specssm.tools.bench.ssm_models import build_target

    model = hf_specssm.enable(build_target("mamba2-8M"))
    calls = []
    generate = model.generate

    def counting_generate(self, *args, **kwargs):
        calls.append("lookup" if "prompt_lookup_num_tokens" in kwargs else "plain")
        return generate(*args, **kwargs)

    model.generate = counting_generate.__get__(model)
    result = lookup_run(model, byte_prompts(1, 24), max_new_tokens=4, lookup=3, repeats=2)
    assert calls == ["plain", "lookup", "plain", "lookup"]
    assert result["identical"] and result["speedup"] > 0 and result["steady_speedup"] > 0


def test_bench_ssm_targets_start_from_trained_style_time_steps():
    """bench-ssm's random targets get Δ log-uniform in [0.001, 0.1] where transformers leaves `dt_bias = 1`
    (Bamba's init: Δ ≈ 1.3, denormal states); a `dt_bias` already set (Mamba2's own init) is kept."""
    import torch.nn.functional as F

    from hf_specssm.tools.bench.ssm_models import _trained_style_time_steps

    from tests.helpers.models import build

    bamba, mamba2 = build("bamba", seed=0), build("mamba2", seed=0)
    mixers = [m for m in bamba.modules() if isinstance(getattr(m, "dt_bias", None), torch.nn.Parameter)]
    assert mixers and all(bool((m.dt_bias == 1).all()) for m in mixers)  # what transformers gives
    kept = [m.dt_bias.detach().clone() for m in mamba2.modules() if hasattr(m, "dt_bias")]
    _trained_style_time_steps(bamba, seed=0)
    _trained_style_time_steps(mamba2, seed=0)
    for mixer in mixers:
        steps = F.softplus(mixer.dt_bias.detach().double())
        assert bool((steps >= 1e-3 - 1e-9).all()) and bool((steps <= 1e-1 + 1e-9).all())
        assert steps.unique().numel() == steps.numel()  # drawn, not one value
    assert all(
        torch.equal(a, m.dt_bias)
        for a, m in zip(kept, [m for m in mamba2.modules() if hasattr(m, "dt_bias")])
    )
    # Mamba v1 mixers: Jamba's zero `dt_proj` bias moves, Mamba's own (mamba_ssm-style) init stays
    jamba, mamba = build("jamba", seed=0), build("mamba", seed=0)
    zeros = [m.dt_proj.bias for m in jamba.modules() if hasattr(m, "A_log")]
    assert zeros and all(not bool(b.any()) for b in zeros)
    mamba_bias = [m.dt_proj.bias.detach().clone() for m in mamba.modules() if hasattr(m, "A_log")]
    _trained_style_time_steps(jamba, seed=0)
    _trained_style_time_steps(mamba, seed=0)
    for bias in zeros:
        steps = F.softplus(bias.detach().double())
        assert bool((steps >= 1e-3 - 1e-9).all()) and bool((steps <= 1e-1 + 1e-9).all())
    assert all(
        torch.equal(a, m.dt_proj.bias)
        for a, m in zip(mamba_bias, [m for m in mamba.modules() if hasattr(m, "A_log")])
    )
