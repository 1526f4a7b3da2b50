"""The model card (`README.md`) saved with a ReDrafter head: what it drafts for and how well."""

from __future__ import annotations

import os
import re
from pathlib import Path

from hf_specssm.drafters.redrafter.configuration import ReDrafterConfig

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _format_tau(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "not measured"


def model_card(config: ReDrafterConfig) -> str:
    """The card's Markdown: Hub metadata (YAML front matter), the target, data, steps and acceptance."""
    target = config.target_name or "unrecorded target"
    metadata = ["library_name: hf_specssm", "tags:", "- speculative-decoding", "- redrafter", "- draft-head"]
    is_hub_id = bool(config.target_name and _HUB_ID.match(config.target_name)) and not os.path.exists(target)
    # `base_model` must be a Hub id; local paths and toy targets are only named in the text
    if is_hub_id:
        metadata.append(f"base_model: {config.target_name}")
    loadable = is_hub_id or os.path.isdir(target)
    rows = [
        ("target", f"`{target}`" + (f" ({config.target_model_type})" if config.target_model_type else "")),
        ("target hidden size / vocabulary", f"{config.hidden_size} / {config.vocab_size}"),
        (
            "head",
            f"{'RNN' if config.rnn else 'running-sum'} state, {config.num_draft_layers} residual blocks of "
            f"width {config.head_width}",
        ),
        ("beam search", f"{config.beam_width} beams × {config.beam_length} tokens"),
        ("training data", config.training_data or "not recorded"),
        ("training steps", str(config.training_steps)),
        (
            "mean accepted length τ (greedy, tokens per target forward)",
            f"{_format_tau(config.mean_accepted_length)} trained vs "
            f"{_format_tau(config.untrained_mean_accepted_length)} untrained",
        ),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""---
{chr(10).join(metadata)}
---

# ReDrafter head for `{target}`

A recurrent draft head ([ReDrafter](https://arxiv.org/abs/2403.09919)) for lossless speculative decoding
of `{target}` with `hf_specssm`. It drafts from the target's own last hidden state
and token embedding (the embedding is shared with the target at run time and is not stored here), with a
beam search whose beams are merged into one token tree and verified in one target forward.

| | |
|---|---|
{table}

τ counts the target's own token: 1.0 means no draft token was ever accepted.

## Usage

```python
import hf_specssm
from hf_specssm import ReDrafterDrafter, ReDrafterHead
from transformers import AutoModelForCausalLM

target = hf_specssm.enable(AutoModelForCausalLM.from_pretrained("{target if loadable else "<the target>"}"))
head = ReDrafterHead.from_pretrained("<this repository or folder>")
drafter = ReDrafterDrafter(head, target)     # raises ValueError for a target of another size
out = target.generate(input_ids, assistant_model=drafter, max_new_tokens=128)
```
"""


def write_model_card(folder: str | os.PathLike, config: ReDrafterConfig) -> Path:
    """Write `model_card(config)` to `folder/README.md`; returns its path."""
    path = Path(folder) / "README.md"
    path.write_text(model_card(config), encoding="utf-8")
    return path
