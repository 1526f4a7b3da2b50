"""Random-weight model pairs that agree part of the time, for offline demos and tests.

Untrained random models almost never agree on the next token, so speculative decoding with them accepts
nothing and shows nothing. `align_for_agreement` makes a drafter agree with a target on a controllable
fraction of tokens without any training. These are demonstration models, not language models.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM, PreTrainedModel

_MIXER_OUTPUTS = ("o_proj", "down_proj", "dense", "dense_4h_to_h", "out_proj")


@torch.no_grad()
def align_for_agreement(
    target: PreTrainedModel,
    drafter: PreTrainedModel,
    mixer_scale: float = 0.3,
    head_noise: float = 0.3,
    seed: int = 0,
) -> None:
    """Make `drafter` agree with `target` on part of the next-token predictions (in place).

    Both models get one shared unit-scale, zero-mean embedding; the drafter gets the target's LM head plus
    noise of relative size `head_noise`; every mixer's output projection in both models is scaled by
    `mixer_scale`. Predictions then depend mostly on the current token (shared) and partly on each model's
    own mixers and head noise (not shared). Smaller values mean more agreement. Needs equal hidden sizes.
    """
    generator = torch.Generator().manual_seed(seed)
    target_embedding = target.get_input_embeddings().weight
    if drafter.get_input_embeddings().weight.shape != target_embedding.shape:
        raise ValueError("align_for_agreement needs equal vocabulary and hidden sizes.")
    # Unit-scale, zero-mean rows: the shared path then dominates mixers with normalised outputs (Mamba2,
    # attention), and LayerNorm (GPT-NeoX) and RMSNorm models see the same direction.
    embedding = torch.randn(target_embedding.shape, generator=generator)
    embedding -= embedding.mean(dim=-1, keepdim=True)
    for model in (target, drafter):
        model.get_input_embeddings().weight.copy_(embedding)
    head = target.get_output_embeddings().weight
    noise = torch.randn(head.shape, generator=generator)
    drafter.get_output_embeddings().weight.copy_(head + head_noise * head.std() * noise)
    for model in (target, drafter):
        for name, module in model.named_modules():
            if name.split(".")[-1] in _MIXER_OUTPUTS and isinstance(module, torch.nn.Linear):
                module.weight.mul_(mixer_scale)


def demo_pair(
    vocab_size: int = 512,
    hidden_size: int = 768,
    target_layers: int = 16,
    head_noise: float = 0.05,
    seed: int = 0,
) -> tuple[LlamaForCausalLM, MambaForCausalLM]:
    """A Llama target (about 110M parameters with the defaults) and a much cheaper 2-layer Mamba drafter
    that agree on most next tokens. Random weights: `head_noise` sets how often they disagree."""
    torch.manual_seed(seed)
    target = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=target_layers,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            eos_token_id=None,
            bos_token_id=None,
            pad_token_id=0,
        )
    ).eval()
    drafter = MambaForCausalLM(
        MambaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=2,
            state_size=16,
            tie_word_embeddings=False,
            eos_token_id=None,
            bos_token_id=None,
            pad_token_id=0,
        )
    ).eval()
    align_for_agreement(target, drafter, mixer_scale=0.003, head_noise=head_noise, seed=seed)
    target.generation_config.eos_token_id = None
    target.generation_config.pad_token_id = 0
    return target, drafter


@torch.no_grad()
def demo_transformer_drafter(
    target: LlamaForCausalLM, num_layers: int = 2, head_noise: float = 0.05, seed: int = 1
) -> LlamaForCausalLM:
    """A small Llama drafter for a `demo_pair` target: the target's embedding, its head plus noise, and mixer
    outputs scaled down like the pair's, so it agrees with the target about as often as the pair's Mamba.
    The target is left untouched."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**target.config.to_dict(), "num_hidden_layers": num_layers})
    drafter = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    drafter.get_input_embeddings().weight.copy_(target.get_input_embeddings().weight)
    head = target.get_output_embeddings().weight
    noise = torch.randn(head.shape, generator=generator)
    drafter.get_output_embeddings().weight.copy_(head + head_noise * head.std() * noise)
    for name, module in drafter.named_modules():
        if name.split(".")[-1] in _MIXER_OUTPUTS and isinstance(module, torch.nn.Linear):
            module.weight.mul_(0.003)
    drafter.generation_config.eos_token_id = None
    drafter.generation_config.pad_token_id = 0
    return drafter
