"""A byte-level tokenizer with a ChatML template and a tiny chat target saved as a model folder (offline)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Every byte is one token (ids 0–255), then the three ChatML specials (256–258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: index for index, symbol in enumerate(bytes_to_unicode().values())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIALS)})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = CHATML
    return tokenizer


def save_chat_target(folder: Path, seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A 2-layer random Llama over the byte tokenizer, saved with it to `folder` (ends turns with <|im_end|>)."""
    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def write_corpus(folder: Path) -> Path:
    """A small corpus: one Python module with documented functions and a README of prose paragraphs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shapes.py").write_text(
        '''"""Shapes."""


def area(width, height):
    """Return the area of a rectangle of the given width and height."""
    if width < 0 or height < 0:
        raise ValueError("negative size")
    result = width * height
    return result


def perimeter(width, height):
    """Return the perimeter of a rectangle of the given width and height."""
    total = 2 * (width + height)
    if total < 0:
        raise ValueError("negative size")
    return total


def _private(x):
    """Hidden helpers are skipped, however well documented they are."""
    y = x + 1
    z = y * 2
    return z


def tiny(x):
    """Too short a body to be a useful task."""
    return x
'''
    )
    paragraph = (
        "Rectangles are the simplest shapes to measure. Their area is the product of the two side "
        "lengths, and their perimeter is twice the sum of the sides. This library computes both values "
        "for any rectangle, and it refuses negative sizes with a clear error message for the caller."
    )
    (folder / "README.md").write_text(
        f"# Shapes\n\n{paragraph}\n\n| a | table |\n|---|---|\n\n{paragraph}\n\n"
        + paragraph.replace("Rectangles", "Squares")
        + "\n\n```python\narea(2, 3)\n```\n"
    )
    return folder
