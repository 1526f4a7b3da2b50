"""Tiny random models for tests: every family the suite covers, built from configs, no downloads."""

from __future__ import annotations

import torch
from transformers import (
    BambaConfig,
    BambaForCausalLM,
    FalconMambaConfig,
    FalconMambaForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
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
)

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
        model = MistralForCausalLM(MistralConfig(**{**_attention_kwargs(), "vocab_size": vocab}, sliding_window=12))
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
            MambaConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=2, state_size=8, tie_word_embeddings=False)
        )
    elif kind == "falcon_mamba":
        model = FalconMambaForCausalLM(
            FalconMambaConfig(
                vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=2, state_size=8, tie_word_embeddings=False
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
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    return model.eval()


_MIXER_OUTPUTS = ("o_proj", "down_proj", "dense", "dense_4h_to_h", "out_proj")


def align(
    target: PreTrainedModel, drafter: PreTrainedModel, mixer_scale: float = 0.3, head_noise: float = 0.3
) -> None:
    """Make `drafter` agree with `target` part of the time.

    Both models get the same embedding and LM head, and every mixer's output projection is scaled by
    `mixer_scale`: predictions then depend mostly on the current token (shared), and partly on each
    model's own mixers (different). `head_noise` (relative to the head's scale) is added to the drafter's
    head. Smaller values mean more agreement; the defaults give partial agreement for every pair in the
    suite. Needs equal hidden sizes.
    """
    with torch.no_grad():
        # Unit-scale, zero-mean rows: the shared path then dominates mixers whose outputs are normalised
        # (Mamba2, attention), and LayerNorm (GPT-NeoX) and RMSNorm models see the same direction.
        embedding = torch.randn_like(target.get_input_embeddings().weight)
        embedding -= embedding.mean(dim=-1, keepdim=True)
        for model in (target, drafter):
            model.get_input_embeddings().weight.copy_(embedding)
        head = target.get_output_embeddings().weight
        drafter.get_output_embeddings().weight.copy_(head + head_noise * head.std() * torch.randn_like(head))
        for model in (target, drafter):
            for name, module in model.named_modules():
                if name.split(".")[-1] in _MIXER_OUTPUTS and isinstance(module, torch.nn.Linear):
                    module.weight.mul_(mixer_scale)
