"""The model card (`README.md`) saved with a ReDrafter head: what it drafts for and how well."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

# relative, not `hf_specssm.…`: this module is part of the head folders' remote code (see modeling.py)
from .configuration import ReDrafterConfig

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: tags every head's card carries (transformers' `push_to_hub(tags=...)` adds to them)
CARD_TAGS = ("speculative-decoding", "redrafter", "draft-head", "hf_specssm", "custom_code")


def _format_tau(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "not measured"


def _is_hub_id(name: str | None) -> bool:
    """Whether `name` reads as a Hub repository id (`org/name`) rather than a local path or a toy name."""
    return bool(name and _HUB_ID.match(name)) and not os.path.exists(name)


def front_matter(config: ReDrafterConfig, tags: Iterable[str] = (), license: str = "apache-2.0") -> list[str]:
    """The card's Hub metadata, one YAML line each (without the `---` fences).

    `base_model` and `datasets` must be Hub ids: a target or training data named otherwise (a local path,
    a toy model, a file) is named only in the card's text.
    """
    lines = [f"license: {license}", "library_name: transformers", "pipeline_tag: text-generation"]
    if _is_hub_id(config.target_name):
        lines.append(f"base_model: {config.target_name}")
    if _is_hub_id(config.training_data):
        lines += ["datasets:", f"- {config.training_data}"]
    else:
        lines += ["# no Hub dataset: the training data is described in the card's text", "datasets: []"]
    lines.append("tags:")
    for tag in dict.fromkeys([*CARD_TAGS, *tags]):
        # JSON strings are YAML scalars: a tag with ':' or '#' stays one string
        lines.append(f"- {tag}" if re.fullmatch(r"[\w.-]+", tag) else f"- {json.dumps(tag)}")
    return lines


def model_card(config: ReDrafterConfig, tags: Iterable[str] = (), license: str = "apache-2.0") -> str:
    """The card's Markdown: Hub metadata (YAML front matter), the target, data, steps and acceptance.

    Args:
        config: the head's config (what it was trained for and on, and how well it drafts).
        tags: Hub tags beyond `CARD_TAGS`.
        license: the license of the head's weights (Hub license id).
    """
    target = config.target_name or "unrecorded target"
    metadata = front_matter(config, tags, license)
    loadable = _is_hub_id(config.target_name) or os.path.isdir(target)
    rows = [
        ("target", f"`{target}`" + (f" ({config.target_model_type})" if config.target_model_type else "")),
        ("target hidden size / vocabulary", f"{config.hidden_size} / {config.vocab_size}"),
        (
            "head",
            f"{'RNN' if config.rnn else 'running-sum'} state, {config.num_draft_layers} residual blocks of "
            f"width {config.head_width}",
        ),
        (
            "draft vocabulary",
            "the target's"
            if config.draft_vocab_size is None
            else f"{config.draft_vocab_size - 1:,} target tokens (and an 'other' class, never drafted)",
        ),
        (
            "drafting (default)",
            f"{config.beam_width} beams × {config.beam_length} tokens"
            if config.beam_width > 1
            else f"one beam: chains of {config.beam_length} tokens",
        ),
        ("training data", config.training_data or "not recorded"),
        ("training steps", str(config.training_steps)),
    ]
    if config.mean_accepted_length is not None or config.untrained_mean_accepted_length is not None:
        rows.append(
            (
                "mean accepted length τ (greedy, tokens per target forward)",
                f"{_format_tau(config.mean_accepted_length)} trained vs "
                f"{_format_tau(config.untrained_mean_accepted_length)} untrained",
            )
        )
    if config.simulated_tau is not None:
        rows.append(
            (
                f"simulated τ (greedy chains of {config.beam_length} on held-out answers of the target)",
                _format_tau(config.simulated_tau),
            )
        )
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

With hf_specssm, pass the head as the assistant model (after `import hf_specssm` the Auto classes load it
and `generate` drafts with `ReDrafterDrafter`: beam trees on Transformer targets, the best beam as a chain
on SSM and hybrid targets):

```python
import hf_specssm
from transformers import AutoModelForCausalLM

target = hf_specssm.enable(AutoModelForCausalLM.from_pretrained("{target if loadable else "<the target>"}"))
head = AutoModelForCausalLM.from_pretrained("<this repository or folder>")
out = target.generate(input_ids, assistant_model=head, max_new_tokens=128)
```

or choose the drafting yourself: one beam (a chain of {config.beam_length}, the fastest on CPUs), or one beam that
copies prompt-lookup matches instead where the context has them:

```python
from hf_specssm import ContextCopyDrafter, ReDrafterDrafter

drafter = ContextCopyDrafter(ReDrafterDrafter(head, target, beam_width=1))  # ValueError for another target
out = target.generate(input_ids, assistant_model=drafter, max_new_tokens=128)
```

The folder carries its own code (`configuration.py`, `modeling.py`, `card.py`), so the head also loads
without hf_specssm, e.g. to inspect or fine-tune it:

```python
from transformers import AutoModel

head = AutoModel.from_pretrained("<this repository or folder>", trust_remote_code=True)
```
"""


def write_model_card(
    folder: str | os.PathLike, config: ReDrafterConfig, tags: Iterable[str] = (), license: str = "apache-2.0"
) -> Path:
    """Write `model_card(config, tags, license)` to `folder/README.md` (atomically); returns its path."""
    path = Path(folder) / "README.md"
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(model_card(config, tags, license), encoding="utf-8")
    partial.replace(path)
    return path
