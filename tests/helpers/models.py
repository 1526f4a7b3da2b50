"""Tiny random models for tests: every family the suite covers (`hf_specssm.testing.tiny`), no downloads."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from hf_specssm.testing.tiny import TINY_HIDDEN, TINY_VOCAB, tiny_model
from hf_specssm.testing.toy import align_for_agreement

VOCAB = TINY_VOCAB
HIDDEN = TINY_HIDDEN


def build(kind: str, seed: int = 0, vocab: int = VOCAB) -> PreTrainedModel:
    """A seeded, fp32, eval-mode tiny model of family `kind`."""
    model = tiny_model(kind, seed=seed, vocab=vocab)
    if kind in ("bamba", "falcon_h1", "zamba2"):
        _amplify_ssm_inputs(model)
    return model


def _amplify_ssm_inputs(model: PreTrainedModel, factor: float = 8.0) -> None:
    """Scale the hybrids' Mamba2 input projections: at their default init a whole wrong SSM step moves the
    state by ~1e-5, below the fp32 tolerance of the state tests; ×8 makes it ~5e-3 (a correct state stays
    within ~1e-6), so those tests can fail."""
    from hf_specssm.ssm.mixers import ssm_mixers

    with torch.no_grad():
        for mixer in ssm_mixers(model):
            mixer.in_proj.weight.mul_(factor)


def align(
    target: PreTrainedModel, drafter: PreTrainedModel, mixer_scale: float = 0.3, head_noise: float = 0.3
) -> None:
    """Make `drafter` agree with `target` on about 50-70% of next tokens (see `hf_specssm.testing.toy`)."""
    align_for_agreement(target, drafter, mixer_scale=mixer_scale, head_noise=head_noise, seed=0)
