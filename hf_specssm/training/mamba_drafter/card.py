"""The model card (`README.md`) written next to an exported Mamba drafter."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DrafterCardFacts:
    """What the card reports; everything measured, nothing assumed.

    Attributes:
        target: the target the drafter was distilled from (name or Hub id).
        tokenizer: the tokenizer reference (Hub id) the drafter's ids belong to.
        architecture: a one-line description of the network.
        parameters: parameter count (tied weights once).
        size_bytes: bytes of `model.safetensors`.
        draft_vocab: draft vocabulary entries ('other' included) and the target's vocabulary size.
        data: a description of the training data (sources, token counts).
        steps: optimiser steps; `tokens`: tokens trained on (0: not recorded, left out); `compute`: where
            and how long.
        heldout: teacher-forced agreement on held-out distilled answers (`{"top1": …, "tau": …, "k": …}`).
        measured: end-to-end rows (benchmark, method, τ, speed-up), with the command that produced them.
    """

    target: str
    tokenizer: str
    architecture: str
    parameters: int
    size_bytes: int
    draft_vocab: tuple[int, int]
    data: str
    steps: int
    tokens: int
    compute: str
    heldout: dict[str, float] = field(default_factory=dict)
    measured: list[str] = field(default_factory=list)


def model_card(facts: DrafterCardFacts) -> str:
    """The card's Markdown, with Hub metadata (YAML front matter)."""
    heldout = (
        f"top-1 agreement {facts.heldout['top1']:.3f}; simulated τ {facts.heldout['tau']:.2f} for chains of "
        f"{int(facts.heldout['k'])}"
        if facts.heldout
        else "not measured"
    )
    rows = [
        ("target", f"`{facts.target}`"),
        ("tokenizer", f"`{facts.tokenizer}` (ids are the target's; no tokenizer is needed to draft)"),
        ("architecture", facts.architecture),
        ("parameters", f"{facts.parameters / 1e6:.1f} M ({facts.size_bytes / 2**20:.1f} MiB)"),
        (
            "draft vocabulary",
            f"{facts.draft_vocab[0]} entries of the target's {facts.draft_vocab[1]} (the most frequent in the "
            "training data, plus an 'other' slot); the logits cover the full vocabulary with zero probability "
            "outside, so speculative sampling stays exact",
        ),
        ("training data", facts.data),
        (
            "training",
            f"{facts.steps} steps, "
            + (f"{facts.tokens / 1e6:.1f} M tokens; " if facts.tokens else "")
            + facts.compute,
        ),
        ("held-out answers (teacher forced)", heldout),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    measured = "\n".join(f"- {line}" for line in facts.measured) or "- not measured yet"
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
base_model: {facts.target}
# no Hub dataset: the training data was built offline from the target's own answers and local
# Python source and documentation (see "training data" below)
datasets: []
tags:
- speculative-decoding
- mamba2
- drafter
- hf_specssm
- custom_code
---

# Mamba2 drafter for {facts.target}

A small Mamba2 language model that drafts tokens for speculative decoding of
[{facts.target}](https://huggingface.co/{facts.target}) with the
`hf_specssm` package (lossless: the target verifies every token). Its state has a fixed size, so a draft
step costs the same at any context length, and tree drafts fork the state along the batch axis.

| | |
|---|---|
{table}

## Use

The folder carries its own code (`configuration_mamba_drafter.py`, `modeling_mamba_drafter.py`, named in
`config.json`'s `auto_map`), so it loads with transformers alone:

```python
from transformers import AutoModelForCausalLM

drafter = AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)
```

With `hf_specssm` imported, the classes are registered and plain `from_pretrained` works too (for the
drafters that ship with hf_specssm, `hf_specssm.shipped_drafter_path(name)` is the folder wherever the
package is installed; the default name is `mamba2-qwen2.5-coder`):

```python
import hf_specssm
from transformers import AutoModelForCausalLM

drafter = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
target = hf_specssm.enable(AutoModelForCausalLM.from_pretrained("{facts.target}"))
out = target.generate(input_ids, assistant_model=drafter, max_new_tokens=256)
```

Its inputs are the target's token ids and its logits cover the target's whole vocabulary. Speculative
decoding with it needs `hf_specssm.enable` (or `hf_specssm.generate`): transformers' own assisted
decoding cannot roll a Mamba assistant's state back and fails in its second round.

## Measured

{measured}

## Limits

Trained on a few million tokens on a CPU: it drafts well where the target's answers are formulaic
(code, step-by-step arithmetic) and less well on open-ended prose. It is specific to the target's
tokenizer; another target with the same tokenizer works, with lower acceptance.
"""
