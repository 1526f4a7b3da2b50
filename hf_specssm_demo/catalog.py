"""Which models the demo can offer here, and loading each of them lazily, once.

The random-weight toy pair (`hf_specssm.testing.toy.demo_pair`) always exists. Real models appear only when
`hf-specssm fetch NAME` has already put a converted copy in the fetch cache: the demo never downloads.
Our Mamba2 drafter for the Qwen2.5 tokenizer ships in the repository (`drafters/`) and is offered, first,
whenever a Qwen2.5 target is.
Models that share a tokenizer share a `family`; a drafter model must come from its target's family.
Real targets and Transformer drafters load in this machine's fastest dtype for the target alone
(`hf_specssm.hardware.fastest_dtype`: bf16 with AMX or AVX512-BF16 or on a GPU, fp32 on AVX2-only CPUs)
unless the catalog is given a dtype; our 18M Mamba drafter and the toy pair stay in fp32.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

import hf_specssm  # registers our Mamba drafter with the Auto classes
from hf_specssm.hardware import DtypeChoice, resolve_dtype
from hf_specssm.testing.toy import demo_pair
from hf_specssm.tools import fetch

TOY_FAMILY = "toy"


@dataclass(frozen=True)
class ModelChoice:
    """One entry of a model dropdown.

    Attributes:
        label: what the dropdown shows (and the key the demo passes around).
        family: models of one family share a tokenizer and vocabulary.
        random_weights: a demonstration model, not a language model.
        fetch_name: its name in `hf_specssm.tools.fetch.MODELS`; `None` for the toy models.
        local_path: a model folder in the repository (our trained drafters), relative to its root.
        head_path: a target's trained ReDrafter head in the repository (relative to its root), if one ships.
    """

    label: str
    family: str
    random_weights: bool = False
    fetch_name: str | None = None
    local_path: str | None = None
    head_path: str | None = None


TOY_TARGET = ModelChoice("Toy Llama 110M · random weights", TOY_FAMILY, random_weights=True)
TOY_DRAFTER = ModelChoice("Toy Mamba 2-layer · random weights", TOY_FAMILY, random_weights=True)
REAL_TARGETS = (
    ModelChoice(
        "Qwen2.5-Coder-1.5B-Instruct",
        "qwen2.5",
        fetch_name="qwen2.5-coder-1.5b-instruct",
        head_path="checkpoints/redrafter-qwen2.5-coder",
    ),
    ModelChoice("SmolLM2-135M-Instruct", "smollm2", fetch_name="smollm2-135m-instruct"),
)
MAMBA_DRAFTER = ModelChoice(
    "Mamba2 drafter 18M (hf_specssm, trained for Qwen2.5)",
    "qwen2.5",
    local_path="checkpoints/mamba2-qwen2.5-coder",
)
REAL_DRAFTERS = (
    ModelChoice("Qwen2.5-Coder-0.5B-Instruct", "qwen2.5", fetch_name="qwen2.5-coder-0.5b-instruct"),
)
# the folder holding `checkpoints/`: the source checkout, or the data an installed wheel put under `share/`
REPO_ROOT = hf_specssm.shipped_drafter_path().parents[1]


class ToyCodec:
    """Text ↔ ids for the random-weight toy models, which have no tokenizer.

    A prompt becomes its UTF-8 bytes (id = byte + 1, so 0 stays the pad id). Generated ids are spelled as
    pseudo-words of one or two syllables, so that they can be read and compared; they mean nothing.
    """

    _SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")
    eos_token_ids: tuple[int, ...] = ()

    def encode(self, prompt: str) -> torch.Tensor:
        """`[1, L]` ids of `prompt`."""
        return torch.tensor([[byte + 1 for byte in prompt.encode("utf-8")]])

    def decode(self, token_ids: list[int]) -> str:
        """Each id as a space and a pseudo-word."""
        words = []
        for token_id in token_ids:
            high, low = divmod(token_id, len(self._SYLLABLES))
            words.append(
                " " + self._SYLLABLES[low] + (self._SYLLABLES[high % len(self._SYLLABLES)] if high else "")
            )
        return "".join(words)


class TokenizerCodec:
    """Text ↔ ids with a real model's tokenizer; instruct models get the prompt as one user turn."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, prompt: str) -> torch.Tensor:
        """`[1, L]` ids of `prompt` (through the chat template when the tokenizer has one)."""
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            # transformers 5 returns a BatchEncoding here; older releases a plain list.
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            return torch.tensor([list(ids)])
        return self.tokenizer(prompt, return_tensors="pt").input_ids

    def decode(self, token_ids: list[int]) -> str:
        """The text of `token_ids`, special tokens dropped."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


@dataclass
class LoadedModel:
    """A model ready for `generate`, with the codec of its family.

    Attributes:
        model: the causal LM, in eval mode.
        codec: its text ↔ ids conversion.
        redrafter_head: the ReDrafter head made for this model, once a race asked for one.
        head_folder: the trained head that ships for this model (`None`: races use an untrained one).
    """

    model: PreTrainedModel
    codec: ToyCodec | TokenizerCodec
    redrafter_head: Any = None
    head_folder: Path | None = None


@dataclass
class Catalog:
    """The models on offer and the ones already loaded.

    Args:
        cache_dir: the fetch cache to look in (default: `hf_specssm.tools.fetch.default_cache_dir()`).
        toy_options: keyword arguments for `hf_specssm.testing.toy.demo_pair` (tests build a smaller pair).
        repo_root: where `local_path` drafters are looked for (default: this repository).
        dtype: `"auto"` (this machine's fastest for the target alone), `"bf16"` or `"fp32"`: the dtype of
            real targets and Transformer drafters.
    """

    cache_dir: str | os.PathLike[str] | None = None
    toy_options: dict[str, Any] = field(default_factory=dict)
    repo_root: str | os.PathLike[str] = REPO_ROOT
    dtype: str = "auto"
    _loaded: dict[str, LoadedModel] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _dtype_choice: DtypeChoice = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir).expanduser()
        # resolved once (and checked: a bad dtype is a ValueError here, not at the first race)
        self._dtype_choice = resolve_dtype(self.dtype)

    def dtype_choice(self) -> DtypeChoice:
        """The dtype real targets and Transformer drafters load in, and why."""
        return self._dtype_choice

    def _fetched(self, choice: ModelChoice) -> bool:
        """Whether `choice` can load without a download: a verified, converted copy in the fetch cache, or
        (a repository drafter) its folder."""
        if choice.local_path is not None:
            return (Path(self.repo_root) / choice.local_path / "config.json").is_file()
        spec = fetch.MODELS[choice.fetch_name]
        model_dir = (self.cache_dir or fetch.default_cache_dir()) / spec.name
        try:
            marker = json.loads((model_dir / fetch.MARKER_FILENAME).read_text())
        except (OSError, ValueError):
            return False
        converted = model_dir / fetch.CONVERTED_DIRNAME / "config.json"
        return marker.get("sha256") == spec.sha256 and bool(marker.get("converted")) and converted.is_file()

    def targets(self) -> list[ModelChoice]:
        """Target choices: fetched real models first, then the toy target."""
        return [choice for choice in REAL_TARGETS if self._fetched(choice)] + [TOY_TARGET]

    def drafters(self) -> list[ModelChoice]:
        """Drafter model choices: our Mamba drafter (when a target of its family is there), fetched real
        drafters, then the toy drafter."""
        families = {choice.family for choice in self.targets()}
        ours = [MAMBA_DRAFTER] if MAMBA_DRAFTER.family in families and self._fetched(MAMBA_DRAFTER) else []
        return ours + [choice for choice in REAL_DRAFTERS if self._fetched(choice)] + [TOY_DRAFTER]

    def find(self, label: str) -> ModelChoice | None:
        """The available choice called `label`, or `None`."""
        return next((choice for choice in self.targets() + self.drafters() if choice.label == label), None)

    def default_target(self) -> ModelChoice:
        """The real target (Qwen2.5-Coder-1.5B) when fetched, else the toy target."""
        return self.targets()[0] if REAL_TARGETS[0] in self.targets() else TOY_TARGET

    def default_drafter(self, target: ModelChoice) -> ModelChoice | None:
        """The first drafter model of `target`'s family, or `None` (then only model-free methods fit)."""
        return next((choice for choice in self.drafters() if choice.family == target.family), None)

    def load(self, choice: ModelChoice) -> LoadedModel:
        """`choice` loaded on the CPU (real models in `dtype_choice()`, our Mamba drafter and the toy pair in
        fp32); the first call loads, later calls return the same object."""
        with self._lock:
            if choice.label not in self._loaded:
                if choice.family == TOY_FAMILY:
                    # One call builds both toy models: they are made to agree with each other.
                    target, drafter = demo_pair(**self.toy_options)
                    self._loaded[TOY_TARGET.label] = LoadedModel(target, ToyCodec())
                    self._loaded[TOY_DRAFTER.label] = LoadedModel(drafter, ToyCodec())
                else:
                    self._loaded[choice.label] = self._load_fetched(choice)
            return self._loaded[choice.label]

    def _load_fetched(self, choice: ModelChoice) -> LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if choice.local_path is not None:
            # our drafter has no tokenizer of its own: its ids are its family's target's
            model = AutoModelForCausalLM.from_pretrained(
                Path(self.repo_root) / choice.local_path, dtype=torch.float32
            ).eval()
            family_target = next(t for t in REAL_TARGETS if t.family == choice.family)
            folder = fetch.fetch_model(family_target.fetch_name, cache_dir=self.cache_dir, progress=False)
            return LoadedModel(model, TokenizerCodec(AutoTokenizer.from_pretrained(folder)))
        # Already present (see `_fetched`), so this returns the folder without downloading.
        folder = fetch.fetch_model(choice.fetch_name, cache_dir=self.cache_dir, progress=False)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=self._dtype_choice.dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
        return LoadedModel(model, TokenizerCodec(tokenizer), head_folder=self.head_folder(choice))

    def head_folder(self, choice: ModelChoice) -> Path | None:
        """The trained ReDrafter head that ships for `choice` in this installation, or `None`."""
        if choice.head_path is None:
            return None
        head = Path(self.repo_root) / choice.head_path
        return head if (head / "config.json").is_file() else None
