"""Chains on SSM and hybrid targets by the cheaper of two exact paths: the choice from measured round
times, and lossless output whichever path a round takes."""

from __future__ import annotations

import pytest
import torch

import hf_specssm
from hf_specssm import targets as verification
from hf_specssm.targets.chain_paths import CHAIN_PATHS, ChainPathCosts, chain_path_costs, draft_bucket

from tests.helpers.models import VOCAB, align, build
from tests.helpers.sampling import no_eos
from tests.helpers.states import fresh, max_state_diff

STATE_ATOL = 1e-4


@pytest.mark.parametrize(
    ("drafts", "bucket"),
    [pytest.param(0, 1, id="0"), (1, 1), (2, 2), (3, 2), (4, 3), (8, 4), (15, 4), (16, 5), (40, 5)],
)
def test_draft_buckets(drafts, bucket):
    assert draft_bucket(drafts) == bucket


def test_each_path_is_tried_then_the_cheaper_one_taken_and_the_other_retried():
    costs = ChainPathCosts(CHAIN_PATHS, warmup=1, samples=2, retry_every=4)
    seconds = {"forward": 3.0, "tree": 1.0}
    chosen = []
    for _ in range(14):
        path = costs.choose(8)
        chosen.append(path)
        costs.record(path, 8, seconds[path])
    # warm-up + 2 counted rounds per path, then the cheaper one, with every 4th exploited round retrying
    assert chosen[:6] == ["forward"] * 3 + ["tree"] * 3
    assert chosen[6:] == ["tree", "tree", "tree", "forward", "tree", "tree", "tree", "forward"]
    assert costs.estimates()[("tree", 4)] == pytest.approx(1.0)
    # another bucket is measured on its own
    assert costs.choose(2) == "forward"


def test_warm_up_rounds_are_not_counted_and_a_cost_that_changes_is_followed():
    costs = ChainPathCosts(("forward", "tree"), warmup=1, samples=1, memory=0.5, retry_every=2)
    costs.record("forward", 4, 100.0)  # a first round with allocations: not counted
    costs.record("forward", 4, 2.0)
    costs.record("tree", 4, 100.0)
    costs.record("tree", 4, 1.0)
    assert costs.estimates() == {("forward", 3): 2.0, ("tree", 3): 1.0}
    assert costs.choose(4) == "tree"  # first exploited round
    chosen = []
    for _ in range(4):  # the tree path got slower; every 2nd exploited round retries the other path
        path = costs.choose(4)
        chosen.append(path)
        costs.record(path, 4, 5.0 if path == "tree" else 2.0)
    # retry (forward), tree (now 3.0), retry (tree: forward is cheaper now), forward
    assert chosen == ["forward", "tree", "tree", "forward"]
    assert costs.estimates() == {("forward", 3): 2.0, ("tree", 3): 4.0}


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"paths": ()}, id="no-paths"),
        pytest.param({"paths": ("forward", "scan")}, id="unknown-path"),
        pytest.param({"paths": CHAIN_PATHS, "samples": 0}, id="samples"),
        pytest.param({"paths": CHAIN_PATHS, "memory": 1.0}, id="memory"),
        pytest.param({"paths": CHAIN_PATHS, "retry_every": 1}, id="retry"),
    ],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        ChainPathCosts(**kwargs)


def test_costs_are_kept_per_model_and_dtype_across_calls():
    model = build("mamba", seed=0)
    first = chain_path_costs(model, CHAIN_PATHS)
    assert chain_path_costs(model, CHAIN_PATHS) is first
    assert chain_path_costs(model.to(torch.float64), CHAIN_PATHS) is not first
    assert chain_path_costs(build("mamba", seed=0), CHAIN_PATHS) is not first


def test_a_target_without_a_tree_scan_cannot_take_the_tree_path():
    model = build("mamba2", seed=0)
    with pytest.raises(ValueError, match="chains cannot take the tree scan"):
        verification.RecurrentTarget(model, tree_problem="no scan", chain_paths=ChainPathCosts(("tree",)))


@pytest.mark.parametrize("target_kind", ["mamba", "mamba2", "jamba", "bamba"])
def test_a_chain_through_the_tree_scan_scores_and_commits_like_the_forward(target_kind):
    """The same round on both paths: equal logits, and the kept prefix's state equals a fresh recompute
    (keeping one token fewer does not: the state check can fail)."""
    model = build(target_kind, seed=0)
    sequence = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    results = {}
    with torch.no_grad():
        for path in CHAIN_PATHS:
            target = verification.make_target(model, None)
            target.chain_paths = ChainPathCosts((path,))
            target.score(sequence[:, :5], sequence[:, 5:6])  # a first round from the prompt
            target.keep(6)  # its draft kept; the next round feeds the bonus token 6 before the drafts
            logits = target.score(sequence[:, :7], sequence[:, 7:12])  # 1 pending + 5 drafts
            target.keep(10)
            results[path] = (logits, target)
        recomputed, _ = fresh(model, sequence[:, :10])
        shorter, _ = fresh(model, sequence[:, :9])
    forward_logits, _ = results["forward"]
    tree_logits, tree_target = results["tree"]
    assert (forward_logits - tree_logits).abs().max() < 1e-4
    assert tree_target.consumed == 10
    assert max_state_diff(tree_target.cache, recomputed) < STATE_ATOL
    ssm_gap = max(
        (a - b).abs().max().item()
        for a, b in zip(shorter.state_tensors(), recomputed.state_tensors(), strict=True)
    )
    assert ssm_gap > 10 * STATE_ATOL


@pytest.mark.parametrize("target_kind", ["mamba", "mamba2", "bamba"])
def test_greedy_output_is_unchanged_whichever_path_the_rounds_take(target_kind):
    """Through `generate` the chooser explores both paths (both are used) and output equals plain greedy."""
    target = hf_specssm.enable(no_eos(build(target_kind, seed=0)))  # every call runs all 40 tokens
    drafter_model = build("mamba2", seed=1)
    align(target, drafter_model)
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    reference = target.generate(prompt, max_new_tokens=40, do_sample=False)
    drafter = hf_specssm.ModelDrafter(drafter_model, num_draft_tokens=3, schedule="constant")
    costs = chain_path_costs(target, CHAIN_PATHS)
    costs.warmup, costs.samples, costs.retry_every = 0, 1, 2  # both paths within a few rounds
    output = target.generate(prompt, assistant_model=drafter, max_new_tokens=40, do_sample=False)
    assert torch.equal(output, reference)
    seen = chain_path_costs(target, CHAIN_PATHS)._seen
    assert seen.get(("forward", 2), 0) > 0 and seen.get(("tree", 2), 0) > 0
