"""Tiny random models for tests: every family the suite covers, built from configs, no downloads."""

from __future__ import annotations

import torch
from transformers import (
    BambaConfig,
    BambaForCausalLM,
    FalconH1Config,
    FalconH1ForCausalLM,
    FalconMambaConfig,
    FalconMambaForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    JambaConfig,
    JambaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Zamba2Config,
    Zamba2ForCausalLM,
)

from hf_specssm.toy import align_for_agreement

VOCAB = 64
HIDDEN = 32


def _attention_kwargs() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def build(kind: str, seed: int = 0, vocab: int = VOCAB) -> PreTrainedModel:
    """A seeded, fp32, eval-mode tiny model of family `kind`."""
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{**_attention_kwargs(), "vocab_size": vocab}))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**{**_attention_kwargs(), "vocab_size": vocab}))
    elif kind == "mistral":
        # A window shorter than the test sequences exercises sliding-window rollback.
        model = MistralForCausalLM(
            MistralConfig(**{**_attention_kwargs(), "vocab_size": vocab}, sliding_window=12)
        )
    elif kind == "gpt_neox":
        model = GPTNeoXForCausalLM(
            GPTNeoXConfig(
                vocab_size=vocab,
                hidden_size=HIDDEN,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=512,
                tie_word_embeddings=False,
            )
        )
    elif kind == "mamba":
        model = MambaForCausalLM(
            MambaConfig(
                vocab_size=vocab,
                hidden_size=HIDDEN,
                num_hidden_layers=2,
                state_size=8,
                tie_word_embeddings=False,
            )
        )
    elif kind == "falcon_mamba":
        model = FalconMambaForCausalLM(
            FalconMambaConfig(
                vocab_size=vocab,
                hidden_size=HIDDEN,
                num_hidden_layers=2,
                state_size=8,
                tie_word_embeddings=False,
            )
        )
    elif kind == "mamba2":
        model = Mamba2ForCausalLM(
            Mamba2Config(
                vocab_size=vocab,
                hidden_size=HIDDEN,
                num_hidden_layers=2,
                num_heads=4,
                head_dim=16,
                state_size=8,
                n_groups=1,
                expand=2,
                chunk_size=8,
                tie_word_embeddings=False,
            )
        )
    elif kind == "bamba":
        model = BambaForCausalLM(
            BambaConfig(
                vocab_size=vocab,
                hidden_size=HIDDEN,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                attn_layer_indices=[1],
                mamba_n_heads=4,
                mamba_d_head=16,
                mamba_n_groups=1,
                mamba_d_state=8,
                mamba_chunk_size=8,
                tie_word_embeddings=False,
            )
        )
    elif kind == "jamba":
        model = JambaForCausalLM(
            JambaConfig(
                vocab_size=vocab,
                hidden_size=HIDDEN,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                attn_layer_period=3,
                attn_layer_offset=1,
                expert_layer_period=100,
                num_experts=1,
                mamba_d_state=8,
                mamba_d_conv=4,
                mamba_expand=2,
                tie_word_embeddings=False,
            )
        )
    elif kind == "falcon_h1":
        model = FalconH1ForCausalLM(
            FalconH1Config(
                vocab_size=vocab,
                hidden_size=HIDDEN,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                mamba_n_heads=4,
                mamba_d_head=16,
                mamba_d_ssm=64,
                mamba_n_groups=1,
                mamba_d_state=8,
                mamba_d_conv=4,
                mamba_expand=2,
                mamba_chunk_size=8,
                tie_word_embeddings=False,
            )
        )
    elif kind == "zamba2":
        model = Zamba2ForCausalLM(
            Zamba2Config(
                vocab_size=vocab,
                hidden_size=HIDDEN,
                num_hidden_layers=4,
                layers_block_type=["mamba", "hybrid", "mamba", "mamba"],
                num_attention_heads=4,
                num_key_value_heads=4,
                attention_head_dim=16,
                mamba_d_state=8,
                mamba_ngroups=1,
                mamba_headdim=16,
                n_mamba_heads=4,
                chunk_size=8,
                num_mem_blocks=1,
                use_shared_attention_adapter=False,
                use_mem_rope=True,
                tie_word_embeddings=False,
            )
        )
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    if kind in ("bamba", "falcon_h1", "zamba2"):
        _amplify_ssm_inputs(model)
    return model.eval()


def _amplify_ssm_inputs(model: PreTrainedModel, factor: float = 8.0) -> None:
    """Scale the hybrids' Mamba2 input projections: at their default init a whole wrong SSM step moves the
    state by ~1e-5, below the fp32 tolerance of the state tests; ×8 makes it ~5e-3 (a correct state stays
    within ~1e-6), so those tests can fail."""
    from hf_specssm.mixers import ssm_mixers

    with torch.no_grad():
        for mixer in ssm_mixers(model):
            mixer.in_proj.weight.mul_(factor)


def align(
    target: PreTrainedModel, drafter: PreTrainedModel, mixer_scale: float = 0.3, head_noise: float = 0.3
) -> None:
    """Make `drafter` agree with `target` on about 50-70% of next tokens (see `hf_specssm.toy`)."""
    align_for_agreement(target, drafter, mixer_scale=mixer_scale, head_noise=head_noise, seed=0)
