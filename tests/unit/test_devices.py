"""Every tensor the loop hands a model or mixes with model tensors lives on the target's device.

Without a GPU, `HostTensorGuard` (`tests/helpers/devices.py`) simulates one on the CPU: it labels the
models' tensors and the prompt as *device*, factory calls without `device=` as *host*, and records every
op that mixes the two, which is what fails on CUDA. Each decoding path runs under it: chains, trees
(ContextCopyDrafter + UCBTreePolicy, the README's recommendation), SSM targets by Activation Replay, Joint
Attainment and re-feed, the tree scan, and batches; greedy and sampling.
"""

from __future__ import annotations

import pytest
import torch

import hf_specssm
from hf_specssm.drafters.model import ModelDrafter
from hf_specssm.tree import TokenTree, compile_tree

from tests.helpers.devices import HostTensorGuard
from tests.helpers.models import align, build

PROMPT = torch.tensor([[5, 9, 3, 7, 4, 5, 9, 3]])


def _guarded(target, drafter_model, drafter, prompt=PROMPT, **kwargs) -> tuple[torch.Tensor, list[str]]:
    inputs = tuple(value for value in (prompt, kwargs.get("attention_mask")) if value is not None)
    guard = HostTensorGuard(target, drafter_model, inputs=inputs)
    with guard:
        output = target.generate(prompt, assistant_model=drafter, max_new_tokens=12, **kwargs)
    return output, guard.violations


# ---------------------------------------------------------------- the guard itself can fail


def test_guard_flags_a_host_tensor_meeting_a_model():
    model = build("llama", seed=0)
    with HostTensorGuard(model) as guard:
        model(torch.tensor([[1, 2, 3]]))
    assert any("embedding" in violation for violation in guard.violations)


def test_guard_flags_host_factories_and_allows_moves_and_host_indices():
    weight = torch.nn.Linear(3, 3).weight
    with HostTensorGuard(torch.nn.Linear(1, 1), inputs=(weight,)) as guard:
        torch.cat([weight, torch.zeros(1, 3)])
    assert len(guard.violations) == 1 and "torch.cat" in guard.violations[0]
    with HostTensorGuard(inputs=(weight,)) as guard:
        index = torch.tensor([0, 2])
        weight[index]
        torch.cat([weight, torch.zeros(1, 3, device=weight.device)])
        torch.cat([weight, torch.zeros(1, 3).to(weight.device)])
        weight * torch.tensor(2.0)  # a 0-dim host scalar, as CUDA allows
    assert guard.violations == []


def test_compile_tree_builds_on_the_given_device():
    tree = TokenTree(tokens=torch.tensor([4, 5, 6]), parents=torch.tensor([-1, -1, 0]))
    compiled = compile_tree(tree, past_length=3, chain_length=2, dtype=torch.float32, device="meta")
    assert compiled.attention_mask.device.type == "meta" and compiled.position_ids.device.type == "meta"
    assert compiled.attention_mask.shape == (1, 1, 5, 8)


# ---------------------------------------------------------------- every decoding path


def _chain(model):
    return ModelDrafter(model, num_draft_tokens=3, schedule="constant")


def _copy_ucb(model):
    return hf_specssm.ContextCopyDrafter(ModelDrafter(model, tree_policy=hf_specssm.UCBTreePolicy()))


def _tree(model):
    return ModelDrafter(model, tree_shape=(2, 2))


def _sampled_tree(model):
    return ModelDrafter(model, tree_shape=(2, 2), tree_children="sample")


PATHS = [
    pytest.param("llama", _chain, {}, id="attention-chain"),
    pytest.param("llama", _copy_ucb, {}, id="attention-copy-ucb-trees"),
    pytest.param("llama", _sampled_tree, {"do_sample": True}, id="attention-sampled-tree"),
    pytest.param("mamba2", _chain, {"verification": "replay"}, id="ssm-replay-chain"),
    pytest.param("mamba2", _chain, {"verification": "joint"}, id="ssm-joint-chain"),
    pytest.param("mamba", _chain, {"verification": "refeed", "do_sample": True}, id="ssm-refeed-sampling"),
    pytest.param("mamba2", _tree, {}, id="ssm-tree-scan"),
    pytest.param("bamba", _copy_ucb, {}, id="hybrid-copy-ucb-trees"),
]


@pytest.mark.parametrize(("target_kind", "make_drafter", "options"), PATHS)
def test_no_host_tensor_meets_the_device(target_kind, make_drafter, options):
    target = hf_specssm.enable(build(target_kind, seed=0))
    drafter_model = build("mamba", seed=1)
    align(target, drafter_model)
    output, violations = _guarded(target, drafter_model, make_drafter(drafter_model), **options)
    assert violations == []
    if not options.get("do_sample"):
        assert torch.equal(output, target.generate(PROMPT, max_new_tokens=12, do_sample=False))


@pytest.mark.slow
def test_no_host_tensor_meets_the_device_in_a_batch():
    target = hf_specssm.enable(build("mamba2", seed=0))
    drafter_model = build("mamba", seed=1)
    prompts = torch.tensor([[0, 0, 3, 4, 5, 6], [7, 8, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    _, violations = _guarded(
        target, drafter_model, _chain(drafter_model), prompt=prompts, attention_mask=mask, pad_token_id=0
    )
    assert violations == []


def test_tree_drafting_feeds_the_drafter_device_ids(monkeypatch):
    """The regression: `ModelDrafter` fed each tree level as `torch.tensor([...])` on the host."""
    target = hf_specssm.enable(build("llama", seed=0))
    drafter_model = build("mamba", seed=1)
    fed = []
    original = ModelDrafter._forward

    def recording_forward(self, tokens, rows=1, depth=0):
        fed.append(tokens)
        return original(self, tokens, rows, depth)

    monkeypatch.setattr(ModelDrafter, "_forward", recording_forward)
    guard = HostTensorGuard(target, drafter_model, inputs=(PROMPT,))
    with guard:
        target.generate(PROMPT, assistant_model=_tree(drafter_model), max_new_tokens=6)
    assert any(tokens.shape[0] > 1 for tokens in fed), "tree levels were fed"
    assert guard.violations == []
