"""Tree drafting by state forking and tree verification on Transformer targets (greedy, lossless)."""

from __future__ import annotations

import pytest
import torch
from test_drafter_state import RecordingDrafter

import hf_specssm

from models import VOCAB, align, build
from test_cache import fresh, max_state_diff

SHAPES = [(3, 2, 2, 1, 1), (3, 3, 2, 1), (2, 2, 2, 1, 1, 1), (1, 1, 1, 1), (4,)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("drafter_kind", ["mamba", "mamba2", "falcon_mamba", "llama"])
@pytest.mark.parametrize("target_kind", ["llama", "gpt_neox"])
def test_tree_greedy_parity(target_kind, drafter_kind, shape):
    target = hf_specssm.enable(build(target_kind, seed=0))
    drafter_model = build(drafter_kind, seed=1)
    align(target, drafter_model)
    paths = []
    for length, seed in [(5, 0), (1, 1), (12, 2)]:
        prompt = torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))
        reference = target.generate(prompt, max_new_tokens=30, do_sample=False)
        drafter = hf_specssm.ModelDrafter(drafter_model, tree_shape=shape)
        output = target.generate(prompt, assistant_model=drafter, max_new_tokens=30, do_sample=False)
        assert torch.equal(output, reference), f"prompt {length}"
        paths += target.last_speculation_stats.accepted_lengths
    assert max(paths) >= min(2, len(shape))  # accepted paths go below the first level


@pytest.mark.parametrize("drafter_kind", ["mamba", "mamba2"])
def test_tree_drafter_state_matches_recompute(drafter_kind):
    target = hf_specssm.enable(build("llama", seed=0))
    drafter_model = build(drafter_kind, seed=1)
    align(target, drafter_model)
    drafter = RecordingDrafter(drafter_model, tree_shape=(3, 2, 2, 1))
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    target.generate(prompt, assistant_model=drafter, max_new_tokens=30, do_sample=False)
    cache = drafter.final_cache
    assert all(state.shape[0] == 1 for state in cache.state_tensors())
    reference, _ = fresh(drafter_model, drafter.final_sequence[:, : cache.seen_tokens])
    assert max_state_diff(cache, reference) < 5e-5


def test_tree_shape_validation_and_unsupported_modes():
    with pytest.raises(ValueError, match="tree_shape"):
        hf_specssm.DraftConfig(tree_shape=(2, 0))
    with pytest.raises(ValueError, match="tree_shape"):
        hf_specssm.DraftConfig(tree_shape=[2, 2])
    target = hf_specssm.enable(build("llama", seed=0))
    drafter = hf_specssm.ModelDrafter(build("mamba", seed=1), tree_shape=(2, 2))
    prompt = torch.randint(3, VOCAB, (1, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="greedily"):
        target.generate(prompt, assistant_model=drafter, max_new_tokens=5, do_sample=True)
    ssm_target = hf_specssm.enable(build("mamba2", seed=0))
    with pytest.raises(ValueError, match="SSM and hybrid targets"):
        ssm_target.generate(prompt, assistant_model=drafter, max_new_tokens=5)
    with pytest.raises(ValueError, match="sliding-window"):
        hf_specssm.enable(build("mistral", seed=0)).generate(
            prompt, assistant_model=drafter, max_new_tokens=5
        )
    # nothing was harmed
    assert torch.equal(
        target.generate(prompt, assistant_model=drafter, max_new_tokens=8),
        target.generate(prompt, max_new_tokens=8),
    )
