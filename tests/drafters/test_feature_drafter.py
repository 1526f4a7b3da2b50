"""The feature-conditioned Mamba drafter: zero start, the feature path, Hub format, lossless decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_specssm
from hf_specssm.drafters.assistant import as_drafter
from hf_specssm.drafters.feature import FeatureDrafter
from hf_specssm.drafters.mamba import MambaDrafterForCausalLM
from hf_specssm.drafters.model import ModelDrafter
from hf_specssm.training.mamba_drafter.training import drafter_config, new_drafter

from tests.helpers.models import HIDDEN, build
from tests.helpers.sampling import ALPHA, chi_square_p_value, exact_distribution, no_eos, sample_continuations

TARGET_VOCAB = 48
DRAFT_IDS = torch.arange(2, TARGET_VOCAB, 2)


def feature_drafter(
    seed: int = 0, live: bool = True, draft_ids=DRAFT_IDS, target_vocab=TARGET_VOCAB, mlp: int | None = None
):
    """A tiny feature-conditioned drafter reading hidden states of size HIDDEN (with a head-input MLP of
    width `mlp`); `live`: random feature weights (large enough to change drafts), else the zero start."""
    config = drafter_config(
        "tiny", draft_ids.numel() + 1, target_vocab, feature_size=HIDDEN, feature_mlp_size=mlp
    )
    model = new_drafter(config, draft_ids, seed=seed).eval()
    if live:
        generator = torch.Generator().manual_seed(seed + 100)
        live_weights = ["feature_proj", "depth_embedding"] + (["feature_mlp_down"] if mlp else [])
        with torch.no_grad():
            for name in live_weights:
                weight = getattr(model, name).weight
                weight.copy_(torch.randn(weight.shape, generator=generator))
    return model


def test_the_zero_start_drafts_like_the_token_only_drafter():
    token_only = new_drafter(drafter_config("tiny", DRAFT_IDS.numel() + 1, TARGET_VOCAB), DRAFT_IDS, seed=3)
    featured = feature_drafter(seed=3, live=False)
    missing = featured.load_state_dict(token_only.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["depth_embedding.weight", "feature_norm.weight", "feature_proj.weight"]
    ids = torch.tensor([[2, 4, 7, 10]])
    features = torch.randn(1, 1, HIDDEN)
    expected = token_only(ids).logits
    assert torch.equal(featured(ids).logits, expected)
    assert torch.equal(featured(ids, target_features=features, draft_depth=2).logits, expected)


def test_the_zero_start_of_a_drafter_with_a_head_mlp_drafts_like_the_token_only_drafter():
    token_only = new_drafter(drafter_config("tiny", DRAFT_IDS.numel() + 1, TARGET_VOCAB), DRAFT_IDS, seed=3)
    featured = feature_drafter(seed=3, live=False, mlp=32)
    missing = featured.load_state_dict(token_only.state_dict(), strict=False).missing_keys
    assert sorted(missing) == [
        "depth_embedding.weight",
        "feature_mlp_down.weight",
        "feature_mlp_up.weight",
        "feature_norm.weight",
        "feature_proj.weight",
    ]
    featured.zero_feature_terms()
    # the input weights are random (so the output weights can learn), the output weights zero
    assert featured.feature_mlp_up.weight.abs().sum() > 0 and not featured.feature_mlp_down.weight.any()
    ids = torch.tensor([[2, 4, 7, 10]])
    expected = token_only(ids).logits
    assert torch.equal(featured(ids).logits, expected)
    assert torch.equal(
        featured(ids, target_features=torch.randn(1, 1, HIDDEN), draft_depth=2).logits, expected
    )


def test_the_head_mlp_applies_with_and_without_a_feature():
    """The MLP transforms the head's input in every forward: before the first verification (no feature) too."""
    linear, fused = feature_drafter(seed=4), feature_drafter(seed=4, mlp=32)
    with torch.no_grad():
        for name in ("feature_proj", "depth_embedding"):
            getattr(fused, name).weight.copy_(getattr(linear, name).weight)
    ids = torch.tensor([[2, 4, 7, 10]])
    features = torch.randn(1, 1, HIDDEN)
    hidden = fused.draft_hidden(fused.to_draft_ids(ids))
    without = fused.lm_head(fused.fuse_head_input(hidden))
    with_feature = fused.lm_head(fused.fuse_head_input(hidden + fused.feature_bias(features, 1)))
    assert torch.allclose(fused(ids).logits[..., DRAFT_IDS], without[..., 1:], atol=1e-5)
    assert torch.allclose(
        fused(ids, target_features=features, draft_depth=1).logits[..., DRAFT_IDS],
        with_feature[..., 1:],
        atol=1e-5,
    )
    # negative control: the same weights without the MLP give other logits
    assert not torch.allclose(fused(ids).logits, linear(ids).logits, atol=1e-3)
    assert not torch.allclose(
        fused(ids, target_features=features, draft_depth=1).logits,
        linear(ids, target_features=features, draft_depth=1).logits,
        atol=1e-3,
    )
    # nothing is left on the head after a call
    head = fused.get_output_embeddings()
    assert head._feature_bias is None and head._fuse_head_input is None


def test_a_head_mlp_needs_a_feature_conditioned_drafter():
    with pytest.raises(ValueError, match="feature_mlp_size"):
        drafter_config("tiny", DRAFT_IDS.numel() + 1, TARGET_VOCAB, feature_mlp_size=32)
    with pytest.raises(ValueError, match="feature_mlp_size"):
        drafter_config("tiny", DRAFT_IDS.numel() + 1, TARGET_VOCAB, feature_size=HIDDEN, feature_mlp_size=0)


def test_the_feature_and_the_depth_change_the_logits():
    model = feature_drafter()
    ids = torch.tensor([[2, 4, 7, 10]])
    plain = model(ids).logits
    one = model(ids, target_features=torch.randn(1, 1, HIDDEN), draft_depth=0).logits
    other = model(ids, target_features=torch.randn(1, 1, HIDDEN), draft_depth=0).logits
    deeper = model(ids, target_features=torch.ones(1, 1, HIDDEN), draft_depth=3).logits
    shallow = model(ids, target_features=torch.ones(1, 1, HIDDEN), draft_depth=0).logits
    assert not torch.allclose(plain, one) and not torch.allclose(one, other)
    assert not torch.allclose(deeper, shallow)
    # outside the draft vocabulary the probability stays exactly zero
    outside = torch.ones(TARGET_VOCAB, dtype=torch.bool)
    outside[DRAFT_IDS] = False
    assert torch.equal(torch.softmax(one, -1)[..., outside], torch.zeros_like(one[..., outside]))
    # no feature is left behind for the next call
    assert torch.equal(model(ids).logits, plain)


def test_per_position_features_and_depths_match_one_position_at_a_time():
    model = feature_drafter()
    ids = torch.tensor([[2, 4, 7, 10, 12]])
    features = torch.randn(1, 5, HIDDEN)
    depths = torch.tensor([[0, 1, 2, 0, 9]])  # 9 is past max_draft_depth: the last offset is used
    hidden = model.draft_hidden(model.to_draft_ids(ids))
    together = model.lm_head(hidden + model.feature_bias(features, depths))
    for position in range(5):
        alone = model(
            ids[:, : position + 1],
            target_features=features[:, position : position + 1],
            draft_depth=int(depths[0, position]),
        ).logits[0, -1]
        assert torch.allclose(alone[DRAFT_IDS], together[0, position, 1:], atol=1e-5)


@pytest.mark.parametrize("mlp", [None, 32], ids=["linear", "head-mlp"])
def test_hub_format_round_trip_loads_a_feature_drafter(tmp_path, mlp):
    model = feature_drafter(mlp=mlp)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, MambaDrafterForCausalLM) and loaded.reads_target_hidden
    assert loaded.config.feature_size == HIDDEN and loaded.config.feature_mlp_size == mlp
    assert loaded.fuses_head_input == bool(mlp)
    ids = torch.tensor([[2, 4, 7]])
    features = torch.randn(1, 1, HIDDEN)
    # equal weights; the loaded ones may sit in another memory layout (last-bit differences)
    assert torch.allclose(
        loaded(ids, target_features=features, draft_depth=1).logits[..., DRAFT_IDS],
        model(ids, target_features=features, draft_depth=1).logits[..., DRAFT_IDS],
        atol=1e-5,
    )
    assert not torch.allclose(
        loaded(ids, target_features=features, draft_depth=1).logits[..., DRAFT_IDS],
        loaded(ids).logits[..., DRAFT_IDS],
        atol=1e-3,
    )
    assert isinstance(as_drafter(loaded), FeatureDrafter)


def test_token_only_models_are_refused_by_feature_drafter():
    token_only = new_drafter(drafter_config("tiny", DRAFT_IDS.numel() + 1, TARGET_VOCAB), DRAFT_IDS)
    assert type(as_drafter(token_only)) is ModelDrafter
    with pytest.raises(ValueError, match="does not read the target's hidden state"):
        FeatureDrafter(token_only)


def test_a_target_of_another_hidden_size_is_refused():
    config = drafter_config("tiny", DRAFT_IDS.numel() + 1, TARGET_VOCAB, feature_size=HIDDEN + 8)
    drafter = FeatureDrafter(new_drafter(config, DRAFT_IDS).eval())
    target = no_eos(build("llama", vocab=TARGET_VOCAB))
    hf_specssm.enable(target)
    with pytest.raises(ValueError, match="hidden size"):
        target.generate(torch.tensor([[2, 4]]), assistant_model=drafter, max_new_tokens=4, do_sample=False)


class _Recording(FeatureDrafter):
    """Keeps every hidden state the loop hands over, with the committed length at that moment."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[torch.Tensor] = []

    def observe_target_hidden(self, hidden: torch.Tensor) -> None:
        self.seen.append(hidden.clone())
        super().observe_target_hidden(hidden)


def test_the_drafter_reads_the_hidden_state_that_chose_the_last_committed_token():
    target = no_eos(build("llama", vocab=TARGET_VOCAB))
    hf_specssm.enable(target)
    drafter = _Recording(feature_drafter(), num_draft_tokens=3, schedule="constant")
    prompt = torch.tensor([[2, 4, 6, 8]])
    output = target.generate(prompt, assistant_model=drafter, max_new_tokens=16, do_sample=False)
    with torch.no_grad():
        hidden = target(output, output_hidden_states=True).hidden_states[-1][0]
    # every observed state is the final hidden state at some position whose logits chose a kept token
    assert drafter.seen
    for observed in drafter.seen:
        distances = (hidden[prompt.shape[1] - 1 :] - observed).abs().amax(-1)
        assert float(distances.min()) < 1e-4


@pytest.mark.parametrize(
    "target_kind, options",
    [
        pytest.param("llama", {}, id="llama-chain"),
        pytest.param("llama", {"tree_shape": (3, 2, 1)}, id="llama-tree"),
        pytest.param(
            "llama", {"tree_policy": hf_specssm.DynamicTreePolicy(depth=3, top_k=2)}, id="llama-dynamic"
        ),
        pytest.param("mamba2", {}, id="mamba2-chain"),
        pytest.param("bamba", {"tree_shape": (2, 2)}, id="bamba-tree"),
        pytest.param("llama", {"mlp": 32}, id="llama-chain-head-mlp"),
        pytest.param("mamba2", {"mlp": 32, "tree_shape": (2, 2)}, id="mamba2-tree-head-mlp"),
    ],
)
def test_greedy_output_equals_the_target_alone(target_kind, options):
    target = no_eos(build(target_kind, seed=0, vocab=TARGET_VOCAB))
    hf_specssm.enable(target)
    prompt = torch.tensor([[2, 4, 6, 8, 10, 12]])
    plain = target.generate(prompt, max_new_tokens=24, do_sample=False)
    options = dict(options)
    model = feature_drafter(seed=1, mlp=options.pop("mlp", None))
    drafter = FeatureDrafter(model, num_draft_tokens=3, schedule="constant", **options)
    spec = target.generate(prompt, assistant_model=drafter, max_new_tokens=24, do_sample=False)
    assert torch.equal(plain, spec)
    assert target.last_speculation_stats.rounds > 0


def test_a_plain_from_pretrained_model_is_drafted_with_features(tmp_path):
    """Users pass the loaded model as `assistant_model`; the loop picks `FeatureDrafter` and hands it states."""
    feature_drafter(seed=1).save_pretrained(tmp_path)
    assistant = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    target = no_eos(build("llama", vocab=TARGET_VOCAB))
    hf_specssm.enable(target)
    prompt = torch.tensor([[2, 4, 6, 8]])
    plain = target.generate(prompt, max_new_tokens=20, do_sample=False)
    calls = []
    original = MambaDrafterForCausalLM.forward

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("target_features") is not None)
        return original(self, *args, **kwargs)

    MambaDrafterForCausalLM.forward = spy
    try:
        spec = target.generate(prompt, assistant_model=assistant, max_new_tokens=20, do_sample=False)
    finally:
        MambaDrafterForCausalLM.forward = original
    assert torch.equal(plain, spec)
    # the first round has no hidden state yet; later ones read it
    assert not calls[0] and any(calls)


@pytest.mark.slow
def test_sampling_keeps_the_target_distribution():
    vocab = 5
    target = no_eos(build("llama", seed=0, vocab=vocab))
    model = no_eos(feature_drafter(seed=2, draft_ids=torch.tensor([1, 3, 4]), target_vocab=vocab))
    hf_specssm.enable(target)
    prompt = torch.tensor([[1, 3, 4]])
    probs = exact_distribution(target, prompt)
    counts, accepted = sample_continuations(
        target,
        model,
        prompt,
        samples=2500,
        seed=11,
        vocab=vocab,
        wrap=lambda _: FeatureDrafter(model, num_draft_tokens=2, schedule="constant"),
    )
    assert chi_square_p_value(counts, probs) > ALPHA
    assert 0 in accepted and max(accepted) >= 1
    drafter_probs = exact_distribution(model, prompt)
    wrong = np.random.default_rng(0).multinomial(int(counts.sum()), drafter_probs / drafter_probs.sum())
    assert chi_square_p_value(wrong.astype(float), probs) < ALPHA


def test_batches_draft_from_tokens_alone_and_stay_exact():
    """Batched verification hands no hidden states over: the drafter drafts from its tokens (not refused)."""
    target = no_eos(build("llama", vocab=TARGET_VOCAB))
    hf_specssm.enable(target)
    prompts = torch.tensor([[2, 4, 6, 8], [10, 12, 14, 16]])
    mask = torch.ones_like(prompts)
    plain = target.generate(prompts, attention_mask=mask, max_new_tokens=12, do_sample=False)
    drafter = _Recording(feature_drafter(), num_draft_tokens=3, schedule="constant")
    spec = target.generate(
        prompts, attention_mask=mask, assistant_model=drafter, max_new_tokens=12, do_sample=False
    )
    assert torch.equal(plain, spec)
    assert target.last_speculation_stats.rounds > 0


def test_the_copy_branch_passes_hidden_states_to_the_feature_drafter():
    target = no_eos(build("llama", vocab=TARGET_VOCAB))
    hf_specssm.enable(target)
    inner = _Recording(feature_drafter(), num_draft_tokens=3, schedule="constant")
    drafter = hf_specssm.ContextCopyDrafter(inner)
    assert drafter.wants_target_hidden
    prompt = torch.tensor([[2, 4, 6, 8, 2, 4, 6]])
    plain = target.generate(prompt, max_new_tokens=16, do_sample=False)
    spec = target.generate(prompt, assistant_model=drafter, max_new_tokens=16, do_sample=False)
    assert torch.equal(plain, spec)
    assert inner.seen
