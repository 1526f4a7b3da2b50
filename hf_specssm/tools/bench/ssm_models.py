"""Random-weight SSM and hybrid targets built from the published configs of real checkpoints.

Cost does not depend on the weights, so these measure what verification costs at real sizes (no download).
Each entry names the checkpoint whose config it copies; fields a config does not fix are transformers'
defaults. `chunk_size` is the published one (256 for the Mamba2 family) unless the caller overrides it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    BambaConfig,
    FalconH1Config,
    GraniteMoeHybridConfig,
    JambaConfig,
    Lfm2Config,
    Mamba2Config,
    MambaConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3NextConfig,
    Zamba2Config,
)

_NO_SPECIAL_TOKENS = {"eos_token_id": None, "pad_token_id": None, "bos_token_id": None}


def _mamba2(hidden: int, layers: int, chunk_size: int) -> PretrainedConfig:
    # state-spaces/mamba2-*: d_state 128, headdim 64, ngroups 1, expand 2, vocab 50280 (padded 50288)
    return Mamba2Config(
        vocab_size=50288,
        hidden_size=hidden,
        num_hidden_layers=layers,
        head_dim=64,
        num_heads=2 * hidden // 64,
        state_size=128,
        n_groups=1,
        expand=2,
        chunk_size=chunk_size,
        tie_word_embeddings=True,
        **_NO_SPECIAL_TOKENS,
    )


def _tiny_mamba2(chunk_size: int) -> PretrainedConfig:
    return _mamba2(128, 4, chunk_size)


def _mamba_790m(chunk_size: int) -> PretrainedConfig:
    # state-spaces/mamba-790m: d_model 1536, 48 layers, d_state 16, expand 2, dt_rank 96 (no chunked scan)
    return MambaConfig(
        vocab_size=50288,
        hidden_size=1536,
        num_hidden_layers=48,
        state_size=16,
        expand=2,
        time_step_rank=96,
        tie_word_embeddings=True,
        **_NO_SPECIAL_TOKENS,
    )


def _jamba_900m(chunk_size: int) -> PretrainedConfig:
    # pszemraj/jamba-900M-v0.13-KIx2 (a community Jamba pretrained from scratch): d 1024, 12 layers, attention
    # every 4th from layer 2, 8 experts (top 2) every 2nd layer from layer 1, Mamba v1 mixers with d_state
    # 16, dt_rank 256, expand 2 (no chunked scan)
    return JambaConfig(
        vocab_size=65024,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=12,
        num_attention_heads=32,
        num_key_value_heads=8,
        attn_layer_offset=2,
        attn_layer_period=4,
        expert_layer_offset=1,
        expert_layer_period=2,
        num_experts=8,
        num_experts_per_tok=2,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_dt_rank=256,
        mamba_expand=2,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        **_NO_SPECIAL_TOKENS,
    )


def _bamba_hybrid(chunk_size: int) -> PretrainedConfig:
    # a Bamba-style hybrid at Mamba2-370M width: 24 layers, d 1024, attention every 6th layer
    return BambaConfig(
        vocab_size=50288,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=4,
        attn_layer_indices=list(range(5, 24, 6)),
        mamba_n_heads=32,
        mamba_d_head=64,
        mamba_n_groups=1,
        mamba_d_state=128,
        mamba_chunk_size=chunk_size,
        tie_word_embeddings=True,
        **_NO_SPECIAL_TOKENS,
    )


def _falcon_h1_05b(chunk_size: int) -> PretrainedConfig:
    # tiiuae/Falcon-H1-0.5B: 36 layers, d 1024, 8 attention heads (2 KV), 24 Mamba heads of 64, state 128;
    # attention and Mamba run in parallel in every layer
    return FalconH1Config(
        vocab_size=32784,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=36,
        num_attention_heads=8,
        num_key_value_heads=2,
        mamba_d_ssm=1536,
        mamba_n_heads=24,
        mamba_d_head=64,
        mamba_n_groups=1,
        mamba_d_state=128,
        mamba_chunk_size=chunk_size,
        tie_word_embeddings=False,
        **_NO_SPECIAL_TOKENS,
    )


def _zamba2_12b(chunk_size: int) -> PretrainedConfig:
    # Zyphra/Zamba2-1.2B: d 2048, 38 Mamba2 layers (64 heads of 64, state 64), one shared attention block
    # applied every 6th layer
    layers = 38
    return Zamba2Config(
        vocab_size=32000,
        hidden_size=2048,
        num_hidden_layers=layers,
        layers_block_type=["hybrid" if i % 6 == 5 else "mamba" for i in range(layers)],
        mamba_d_state=64,
        mamba_ngroups=1,
        n_mamba_heads=64,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=8192,
        num_mem_blocks=1,
        chunk_size=chunk_size,
        tie_word_embeddings=True,
        **_NO_SPECIAL_TOKENS,
    )


def _granite_4_h(chunk_size: int) -> PretrainedConfig:
    # ibm-granite/granite-4.0-h-1b (Granite 4.0 Nano hybrid): d 1536, 40 layers, attention at 5, 15, 25,
    # 35, 48 Mamba2 heads of 64, state 128, dense MLP (no experts)
    layers = 40
    return GraniteMoeHybridConfig(
        vocab_size=100352,
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=layers,
        num_attention_heads=12,
        num_key_value_heads=4,
        layer_types=["attention" if i % 10 == 5 else "mamba" for i in range(layers)],
        mamba_n_heads=48,
        mamba_d_head=64,
        mamba_n_groups=1,
        mamba_d_state=128,
        mamba_chunk_size=chunk_size,
        num_local_experts=0,
        num_experts_per_tok=0,
        shared_intermediate_size=4096,
        tie_word_embeddings=True,
        **_NO_SPECIAL_TOKENS,
    )


def _qwen3_next_style(chunk_size: int) -> PretrainedConfig:
    # Qwen/Qwen3-Next-80B-A3B's layer shapes (d 2048; Gated DeltaNet with 16 key heads and 32 value heads of
    # 128, conv 4; gated attention with 16 heads of 256, 2 KV heads; three Gated DeltaNet layers per
    # attention layer), scaled to 20 layers and ~2B parameters: a dense MLP of 5632 (about the active
    # width of its 10 routed + 1 shared experts of 512) instead of 512 experts
    layers = 20
    return Qwen3NextConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        layer_types=["full_attention" if i % 4 == 3 else "linear_attention" for i in range(layers)],
        mlp_only_layers=list(range(layers)),
        num_experts=0,
        tie_word_embeddings=False,
        **_NO_SPECIAL_TOKENS,
    )


def _lfm2_12b(chunk_size: int) -> PretrainedConfig:
    # LiquidAI/LFM2-1.2B: d 2048, 16 layers (short convolutions of width 3, attention at 2, 5, 8, 10, 12, 14;
    # 32 heads, 8 KV heads), feed-forward 12288 auto-adjusted to 8192, vocab 65536
    layers = 16
    return Lfm2Config(
        vocab_size=65536,
        hidden_size=2048,
        intermediate_size=12288,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        conv_L_cache=3,
        layer_types=["full_attention" if i in (2, 5, 8, 10, 12, 14) else "conv" for i in range(layers)],
        tie_word_embeddings=True,
        **_NO_SPECIAL_TOKENS,
    )


#: name -> (what it copies, config builder taking the Mamba2 chunk size)
TARGET_CONFIGS: dict[str, tuple[str, Callable[[int], PretrainedConfig]]] = {
    "mamba2-8M": ("a tiny Mamba2 (d 128, 4 layers) for smoke tests", _tiny_mamba2),
    "mamba2-370m": ("state-spaces/mamba2-370m", lambda chunk: _mamba2(1024, 48, chunk)),
    "mamba2-1.3b": ("state-spaces/mamba2-1.3b", lambda chunk: _mamba2(2048, 48, chunk)),
    "mamba-790m": ("state-spaces/mamba-790m", _mamba_790m),
    "bamba-hybrid": ("Bamba-style hybrid, 24 layers, d 1024, attention every 6th", _bamba_hybrid),
    "jamba-900m": ("pszemraj/jamba-900M-v0.13-KIx2 (Jamba: Mamba v1, attention, MoE)", _jamba_900m),
    "falcon-h1-0.5b": ("tiiuae/Falcon-H1-0.5B", _falcon_h1_05b),
    "zamba2-1.2b": ("Zyphra/Zamba2-1.2B", _zamba2_12b),
    "granite-4.0-h-1b": ("ibm-granite/granite-4.0-h-1b", _granite_4_h),
    "qwen3-next-2b": (
        "Qwen3-Next-style (Qwen3-Next-80B-A3B's layer shapes), 20 layers, dense MLP",
        _qwen3_next_style,
    ),
    "lfm2-1.2b": ("LiquidAI/LFM2-1.2B", _lfm2_12b),
}


def build_target(
    name: str, dtype: torch.dtype = torch.float32, chunk_size: int = 256, seed: int = 0
) -> PreTrainedModel:
    """A random-weight causal LM from `TARGET_CONFIGS[name]`, in `dtype`, eval mode, no special tokens."""
    if name not in TARGET_CONFIGS:
        raise ValueError(f"unknown target {name!r}; choose from {sorted(TARGET_CONFIGS)}.")
    torch.manual_seed(seed)
    config = TARGET_CONFIGS[name][1](chunk_size)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    _trained_style_time_steps(model, seed)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


def _trained_style_time_steps(model: PreTrainedModel, seed: int) -> None:
    """Give every mixer whose `dt_bias` transformers leaves at 1 (or, for Mamba v1 mixers, whose `dt_proj`
    bias it leaves at 0: Jamba) the step sizes its training code starts from: Δ log-uniform in [0.001, 0.1]
    through the inverse softplus (mamba_ssm's init, which transformers' own Mamba, Mamba2 and Zamba2 inits
    follow).

    Why: with `dt_bias = 1` (Bamba, Falcon-H1, GraniteMoeHybrid, Qwen3-Next in transformers) Δ ≈ 1.3, every
    head forgets within a token or two and the states fill with denormal floats, which x86 multiplies in
    microcode: the Bamba-style hybrid's own bf16 step took 99.6 ms against 84.9 ms with denormals flushed
    (2-core AMX VM), a cost no trained checkpoint pays. Weights stay random; only the time scales move.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        bias = getattr(module, "dt_bias", None)
        if not isinstance(bias, torch.nn.Parameter) or not bool((bias == 1).all()):
            # Mamba v1 mixers carry Δ's bias in `dt_proj`; Jamba's init leaves it at 0 (Δ ≈ 0.69)
            projection = getattr(module, "dt_proj", None)
            bias = getattr(projection, "bias", None) if hasattr(module, "A_log") else None
            if not isinstance(bias, torch.nn.Parameter) or bool(bias.any()):
                continue
        low, high = math.log(1e-3), math.log(1e-1)
        dt = torch.exp(torch.rand(bias.shape, generator=generator, dtype=torch.float64) * (high - low) + low)
        dt = dt.clamp_min(1e-4)
        with torch.no_grad():
            bias.copy_((dt + torch.log(-torch.expm1(-dt))).to(bias.dtype))
