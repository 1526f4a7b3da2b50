"""Tiny random models built from configs: every model family hf_specssm is tested on, no downloads.

Vocabulary 64 and hidden size 32 by default, fp32, seeded, eval mode. They back the test suite and the
toy targets of `hf-specssm train-redrafter`; they are not language models.
"""

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

TINY_KINDS = (
    "llama", "qwen2", "mistral", "gpt_neox", "mamba", "falcon_mamba", "mamba2", "bamba", "jamba", "falcon_h1",
    "zamba2",
)  # fmt: skip


TINY_VOCAB = 64
TINY_HIDDEN = 32


def _attention_kwargs() -> dict:
    return dict(
        vocab_size=TINY_VOCAB,
        hidden_size=TINY_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def tiny_model(kind: str, seed: int = 0, vocab: int = TINY_VOCAB) -> PreTrainedModel:
    """A seeded, fp32, eval-mode tiny random model of family `kind` (one of `TINY_KINDS`)."""
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
                hidden_size=TINY_HIDDEN,
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
                hidden_size=TINY_HIDDEN,
                num_hidden_layers=2,
                state_size=8,
                tie_word_embeddings=False,
            )
        )
    elif kind == "falcon_mamba":
        model = FalconMambaForCausalLM(
            FalconMambaConfig(
                vocab_size=vocab,
                hidden_size=TINY_HIDDEN,
                num_hidden_layers=2,
                state_size=8,
                tie_word_embeddings=False,
            )
        )
    elif kind == "mamba2":
        model = Mamba2ForCausalLM(
            Mamba2Config(
                vocab_size=vocab,
                hidden_size=TINY_HIDDEN,
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
                hidden_size=TINY_HIDDEN,
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
                hidden_size=TINY_HIDDEN,
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
                hidden_size=TINY_HIDDEN,
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
                hidden_size=TINY_HIDDEN,
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
        raise ValueError(f"unknown model kind {kind!r}; choose one of {TINY_KINDS}.")
    return model.eval()
