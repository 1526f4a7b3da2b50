"""mamba-ssm as an optional accelerator: import guard, and `MambaLMHeadModel` → transformers twin → drafter.

`mamba-ssm` needs CUDA to import, so the CPU tests convert a stand-in with `MambaLMHeadModel`'s config and
state-dict layout (written from mamba-ssm 2.x's `mixer_seq_simple.py` naming); the `gpu` test converts a
real one and compares logits.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

import hf_specssm
from hf_specssm.drafters.assistant import drafter_from_mamba_ssm
from hf_specssm.drafters.mamba_ssm import mamba_ssm_available, to_transformers

from tests.helpers.models import VOCAB, align, build


class MambaLMHeadModel(torch.nn.Module):
    """Stand-in: mamba-ssm's config fields and parameter names around a transformers model's weights."""

    def __init__(self, hf_model, ssm_cfg: dict) -> None:
        super().__init__()
        config = hf_model.config
        self.config = SimpleNamespace(
            d_model=config.hidden_size, d_intermediate=0, n_layer=config.num_hidden_layers,
            vocab_size=config.vocab_size, ssm_cfg=ssm_cfg, attn_layer_idx=[], rms_norm=True,
            residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=False,
        )  # fmt: skip
        self._weights = {
            key.replace("backbone.embeddings.", "backbone.embedding."): value.clone()
            for key, value in hf_model.state_dict().items()
        }

    def state_dict(self, *args, **kwargs):
        return dict(self._weights)


CASES = [
    pytest.param("mamba", {"layer": "Mamba1", "d_state": 8}, id="mamba1"),
    pytest.param("mamba2", {"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 1, "chunk_size": 8}, id="mamba2"),
]  # fmt: skip


def test_import_guard_without_cuda():
    if importlib.util.find_spec("mamba_ssm") is None or not torch.cuda.is_available():
        assert mamba_ssm_available() is False


@pytest.mark.parametrize(("kind", "ssm_cfg"), CASES)
def test_converted_model_computes_the_same_logits(kind, ssm_cfg):
    reference = build(kind, seed=3)
    converted = to_transformers(MambaLMHeadModel(reference, ssm_cfg))
    assert type(converted) is type(reference)
    tokens = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(converted(tokens).logits, reference(tokens).logits)


@pytest.mark.parametrize(("kind", "ssm_cfg"), CASES)
def test_mamba_ssm_model_drafts_chains_and_trees(kind, ssm_cfg):
    target = hf_specssm.enable(build("mamba2", seed=0))
    drafter_model = build(kind, seed=1)
    align(target, drafter_model)
    prompt = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    reference = target.generate(prompt, max_new_tokens=20, do_sample=False)
    for options in ({"num_draft_tokens": 3}, {"tree_shape": (2, 2, 1)}):
        drafter = drafter_from_mamba_ssm(MambaLMHeadModel(drafter_model, ssm_cfg), **options)
        output = target.generate(prompt, assistant_model=drafter, max_new_tokens=20, do_sample=False)
        assert torch.equal(output, reference)
        assert sum(target.last_speculation_stats.accepted_lengths) > 0


@pytest.mark.parametrize(("kind", "ssm_cfg"), CASES)
def test_mamba_ssm_model_passes_straight_as_assistant_model(kind, ssm_cfg):
    target = hf_specssm.enable(build("llama", seed=0))
    drafter_model = build(kind, seed=1)
    align(target, drafter_model)
    prompt = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
    reference = target.generate(prompt, max_new_tokens=16, do_sample=False)
    output = target.generate(
        prompt, assistant_model=MambaLMHeadModel(drafter_model, ssm_cfg), max_new_tokens=16, do_sample=False
    )
    assert torch.equal(output, reference)
    assert sum(target.last_speculation_stats.accepted_lengths) > 0


def test_hybrid_mamba_ssm_models_are_refused():
    model = MambaLMHeadModel(build("mamba", seed=0), {"layer": "Mamba1"})
    model.config.attn_layer_idx = [1]
    with pytest.raises(ValueError, match="only pure Mamba"):
        to_transformers(model)


@pytest.mark.gpu
@pytest.mark.skipif(not mamba_ssm_available(), reason="needs mamba-ssm (CUDA)")
@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_real_mamba_ssm_model_converts(layer):
    from mamba_ssm.models.config_mamba import MambaConfig as SSMConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel as RealModel

    torch.manual_seed(0)
    ssm_cfg = {"layer": layer, **({"headdim": 16, "chunk_size": 64} if layer == "Mamba2" else {})}
    real = RealModel(SSMConfig(d_model=64, n_layer=2, vocab_size=96, ssm_cfg=ssm_cfg), device="cuda").eval()
    converted = to_transformers(real)
    tokens = torch.randint(0, 96, (1, 17), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(converted(tokens).logits, real(tokens).logits, rtol=1e-3, atol=1e-3)
