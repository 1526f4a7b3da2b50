"""Tiny configs of the families beyond `hf_specssm.testing.tiny`'s: Qwen3-Next and Qwen3.5 (Gated DeltaNet), LFM2
(short convolutions), Nemotron-H and GraniteMoeHybrid (Mamba2 layout)."""

from __future__ import annotations

from transformers import (
    GraniteMoeHybridConfig,
    Lfm2Config,
    NemotronHConfig,
    PretrainedConfig,
    Qwen3NextConfig,
)
from transformers.models.qwen3_5 import Qwen3_5TextConfig

FAMILY_KINDS = ("qwen3_next", "qwen3_5", "lfm2", "nemotron_h", "granitemoehybrid")

VOCAB = 64
_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "eos_token_id": None,
    "pad_token_id": None,
    "bos_token_id": None,
}


def family_config(kind: str) -> PretrainedConfig:
    """A tiny config of `kind` (one of `FAMILY_KINDS`): vocabulary `VOCAB`, hidden size 64, 4 layers."""
    if kind == "qwen3_next":
        return Qwen3NextConfig(
            **_COMMON,
            num_hidden_layers=4,
            intermediate_size=128,
            head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        )
    if kind == "qwen3_5":
        return Qwen3_5TextConfig(
            **_COMMON,
            num_hidden_layers=4,
            intermediate_size=128,
            head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        )
    if kind == "lfm2":
        return Lfm2Config(
            **_COMMON,
            num_hidden_layers=4,
            intermediate_size=128,
            layer_types=["conv", "conv", "full_attention", "conv"],
        )
    if kind == "nemotron_h":
        return NemotronHConfig(
            **_COMMON,
            num_hidden_layers=4,
            intermediate_size=128,
            mamba_num_heads=4,
            mamba_head_dim=16,
            ssm_state_size=16,
            n_groups=1,
            chunk_size=8,
            hybrid_override_pattern="M*M-",
        )
    if kind == "granitemoehybrid":
        return GraniteMoeHybridConfig(
            **_COMMON,
            num_hidden_layers=4,
            intermediate_size=128,
            layer_types=["mamba", "attention", "mamba", "mamba"],
            mamba_n_heads=4,
            mamba_d_head=32,
            mamba_d_state=16,
            mamba_n_groups=1,
            mamba_chunk_size=8,
            num_local_experts=0,
            num_experts_per_tok=0,
            shared_intermediate_size=128,
        )
    raise ValueError(f"unknown kind {kind!r}; choose from {FAMILY_KINDS}.")
