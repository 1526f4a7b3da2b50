"""`mamba-ssm` as an optional accelerator (GPU machines): its `MambaLMHeadModel` as a drafter.

`mamba-ssm` needs CUDA to import, so nothing here imports it at module level, and everything works
without it:

- **Its kernels.** transformers' own mixers already pick up `mamba-ssm`'s fused kernels (chunk scan,
  selective state update, `causal-conv1d`) when the package is installed, for prefill, chain verification
  and Activation Replay. The tree verification path has no `mamba-ssm` counterpart (no tree scan there, and
  its state update takes one step), so it uses this package's Triton kernels on CUDA
  (`hf_specssm.kernels.tree_scan`, `hf_specssm.kernels.ssm_state_update`).
- **Its models.** `drafter_from_mamba_ssm(model)` turns a `mamba_ssm.models.mixer_seq_simple.MambaLMHeadModel`
  (pure Mamba or Mamba2 stacks) into the equivalent transformers model, on the same device and dtype
  and with the same weights, and wraps it in a `ModelDrafter`: the drafter then forks, checkpoints and
  rolls back through `ForkableCache` like any other.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from typing import Any

import torch
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM, PreTrainedModel


def mamba_ssm_available() -> bool:
    """Whether `mamba_ssm` imports here (it needs CUDA; an import that fails for that reason is `False`)."""
    if importlib.util.find_spec("mamba_ssm") is None:
        return False
    try:
        importlib.import_module("mamba_ssm")
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def _config_dict(config: Any) -> dict:
    """`MambaLMHeadModel.config` (a dataclass in mamba-ssm) as a plain dict."""
    if isinstance(config, dict):
        return dict(config)
    return {key: getattr(config, key) for key in dir(config) if not key.startswith("_") and not callable(getattr(config, key))}  # fmt: skip


def to_transformers(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers `MambaForCausalLM` / `Mamba2ForCausalLM` computing what a mamba-ssm
    `MambaLMHeadModel` computes, with its weights (same device and dtype), in eval mode.

    Only pure stacks convert: models with MLP blocks (`d_intermediate > 0`) or attention layers
    (`attn_layer_idx`) raise `ValueError`.

    Args:
        model: a `MambaLMHeadModel` (any object with its `config` and `state_dict()` layout).
    """
    config = _config_dict(model.config)
    ssm = dict(config.get("ssm_cfg") or {})
    if config.get("d_intermediate", 0) or config.get("attn_layer_idx"):
        raise ValueError(
            "only pure Mamba / Mamba2 MambaLMHeadModels convert; this one has MLP or attention layers."
        )
    state = model.state_dict()
    weights = {
        key.replace("backbone.embedding.", "backbone.embeddings."): value for key, value in state.items()
    }
    embedding = weights["backbone.embeddings.weight"]
    vocab, hidden = embedding.shape
    layers = int(config["n_layer"])
    tie = bool(config.get("tie_embeddings", True))
    if tie or "lm_head.weight" not in weights:
        weights["lm_head.weight"] = embedding
    common = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, tie_word_embeddings=tie,
        residual_in_fp32=bool(config.get("residual_in_fp32", True)), layer_norm_epsilon=1e-5,
        use_conv_bias=bool(ssm.get("conv_bias", True)), use_bias=bool(ssm.get("bias", False)),
        conv_kernel=int(ssm.get("d_conv", 4)), expand=int(ssm.get("expand", 2)),
    )  # fmt: skip
    if ssm.get("layer", "Mamba1") == "Mamba2":
        head_dim = int(ssm.get("headdim", 64))
        num_heads = weights["backbone.layers.0.mixer.A_log"].shape[0]
        converted: PreTrainedModel = Mamba2ForCausalLM(
            Mamba2Config(
                **common,
                state_size=int(ssm.get("d_state", 128)),
                head_dim=head_dim,
                num_heads=num_heads,
                n_groups=int(ssm.get("ngroups", 1)),
                chunk_size=int(ssm.get("chunk_size", 256)),
                time_step_limit=tuple(ssm.get("dt_limit", (0.0, float("inf")))),
            )
        )
    else:
        rank = weights["backbone.layers.0.mixer.dt_proj.weight"].shape[1]
        converted = MambaForCausalLM(
            MambaConfig(
                **common,
                state_size=int(ssm.get("d_state", 16)),
                time_step_rank=rank if rank != math.ceil(hidden / 16) else "auto",
            )
        )
    missing, unexpected = converted.load_state_dict(weights, strict=False)
    missing = [key for key in missing if key != "lm_head.weight" or not tie]
    if missing or unexpected:
        raise ValueError(f"weights do not map onto {type(converted).__name__}: missing {missing}, unexpected {unexpected}.")  # fmt: skip
    return converted.to(device=embedding.device, dtype=embedding.dtype).eval()
