"""The decoding paths on CUDA: greedy parity with the target's own `generate`, and the Triton kernels inside
the loop. Marked `gpu` (skipped without CUDA); `tests/unit/test_devices.py` is their CPU stand-in.

fp32 with TF32 off (matmuls and cuDNN convolutions), so multi-token verification and one-token steps round
alike, as on the CPU.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import hf_specssm
from hf_specssm.drafters.model import ModelDrafter

from tests.helpers.models import align, build

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
PROMPT = [[5, 9, 3, 7, 4, 5, 9, 3, 5, 9]]
NEW_TOKENS = 24


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _pair(target_kind: str, device: str = DEVICE):
    target, drafter_model = build(target_kind, seed=0), build("mamba", seed=1)
    align(target, drafter_model)
    return hf_specssm.enable(target.to(device)), drafter_model.to(device)


def _chain(model):
    return ModelDrafter(model, num_draft_tokens=3, schedule="constant")


def _copy_ucb(model):
    return hf_specssm.ContextCopyDrafter(ModelDrafter(model, tree_policy=hf_specssm.UCBTreePolicy()))


def _tree(model):
    return ModelDrafter(model, tree_shape=(2, 2))


PATHS = [
    pytest.param("llama", _chain, {}, id="attention-chain"),
    pytest.param("llama", _copy_ucb, {}, id="attention-copy-ucb-trees"),
    pytest.param("llama", _tree, {}, id="attention-tree"),
    pytest.param("mamba2", _chain, {"verification": "replay"}, id="ssm-replay-chain"),
    pytest.param("mamba", _chain, {"verification": "replay"}, id="mamba1-replay-chain"),
    pytest.param("mamba2", _chain, {"verification": "joint"}, id="ssm-joint-chain"),
    pytest.param("mamba2", _tree, {}, id="ssm-tree-scan"),
    pytest.param("bamba", _copy_ucb, {}, id="hybrid-copy-ucb-trees"),
]


def check_greedy_parity(target_kind: str, make_drafter, options: dict, device: str = DEVICE) -> None:
    """Speculative greedy output on `device` equals the target's own greedy output there."""
    target, drafter_model = _pair(target_kind, device)
    prompt = torch.tensor(PROMPT, device=device)
    reference = target.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    output = target.generate(
        prompt,
        assistant_model=make_drafter(drafter_model),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        **options,
    )
    assert output.device.type == torch.device(device).type
    assert torch.equal(output, reference)


@pytest.mark.parametrize(("target_kind", "make_drafter", "options"), PATHS)
def test_greedy_parity_on_cuda(target_kind, make_drafter, options):
    check_greedy_parity(target_kind, make_drafter, options)


def check_sampling_is_reproducible(device: str = DEVICE) -> None:
    """Seeded sampling on `device`: the same text for different draft lengths and trees."""
    target, drafter_model = _pair("llama", device)
    prompt = torch.tensor(PROMPT, device=device)
    texts = set()
    for drafter in (_chain(drafter_model), ModelDrafter(drafter_model), _copy_ucb(drafter_model)):
        torch.manual_seed(11)
        output = target.generate(
            prompt, assistant_model=drafter, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=20
        )
        texts.add(tuple(output[0].tolist()))
    assert len(texts) == 1


def test_sampling_is_reproducible_on_cuda():
    check_sampling_is_reproducible()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_the_loop_runs_the_triton_kernels(monkeypatch):
    """An SSM target verifying trees uses all three kernels: the tree scan, the N-step state update (commit)
    and the state gather (the drafter's tree forks), and the output still equals plain greedy."""
    import hf_specssm.kernels.ssm_state_update.triton as nstep
    import hf_specssm.kernels.state_gather.triton as gather
    import hf_specssm.kernels.tree_scan.triton as scan

    calls: dict[str, int] = {}
    for module, name in [
        (scan, "tree_scan_triton"),
        (nstep, "selective_state_update_nstep_triton"),
        (gather, "gather_rows_triton"),
    ]:
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    check_greedy_parity("mamba2", _tree, {})
    assert set(calls) == {"tree_scan_triton", "selective_state_update_nstep_triton", "gather_rows_triton"}
