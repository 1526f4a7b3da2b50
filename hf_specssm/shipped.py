"""Where the drafters that ship with hf_specssm are, wherever the package runs from.

A shipped drafter is a Hub-format folder (`config.json`, `model.safetensors`, the model card and the
remote code). In a source checkout it lives in `checkpoints/<name>/` next to the package; a wheel or sdist
built from the checkout installs it as data (`<prefix>/share/hf_specssm/checkpoints/<name>/`, see
`pyproject.toml`), which this module finds through the installed distribution's file list. Nothing here
depends on the working directory.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

#: the drafter a bare `shipped_drafter_path()` means: our Mamba2 drafter for the Qwen2.5 tokenizer
DEFAULT_DRAFTER = "mamba2-qwen2.5-coder"
#: the feature-conditioned Mamba2 drafter for the same target (reads its hidden states; single prompts)
FEATURE_DRAFTER = "mamba2-qwen2.5-coder-fc"
#: the ReDrafter head for the same target (reads its hidden states and shares its embedding; single prompts)
REDRAFTER_HEAD = "redrafter-qwen2.5-coder"
#: every drafter the package ships
SHIPPED_DRAFTERS = (DEFAULT_DRAFTER, FEATURE_DRAFTER, REDRAFTER_HEAD)
DISTRIBUTION = "hf_specssm"
_CHECKOUT = Path(__file__).resolve().parents[1] / "checkpoints"


def _installed_folder(name: str) -> Path | None:
    """The installed data copy of drafter `name`, from the distribution's RECORD; `None` when absent."""
    try:
        files = importlib.metadata.distribution(DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "config.json" and file.parts[-3:-1] == ("checkpoints", name):
            folder = Path(file.locate()).resolve().parent
            if folder.is_dir():
                return folder
    return None


def shipped_drafter_candidates(name: str = DEFAULT_DRAFTER) -> list[Path]:
    """The folders that may hold shipped drafter `name`, in the order they are searched.

    The source checkout (`checkpoints/<name>` beside the package) first, then the copy installed with the
    package, when there is one.
    """
    if name not in SHIPPED_DRAFTERS:
        raise ValueError(
            f"name={name!r} is not a shipped drafter; choose one of {', '.join(SHIPPED_DRAFTERS)} "
            "(or pass the folder of your own drafter instead)."
        )
    candidates = [_CHECKOUT / name]
    installed = _installed_folder(name)
    if installed is not None and installed not in candidates:
        candidates.append(installed)
    return candidates


def shipped_drafter_path(name: str = DEFAULT_DRAFTER, *, must_exist: bool = False) -> Path:
    """The folder of shipped drafter `name` (absolute), independent of the working directory.

    Args:
        name: one of `SHIPPED_DRAFTERS`.
        must_exist: raise when no candidate folder holds the drafter. When false (command-line and demo
            defaults, computed before anything is loaded), the source checkout's folder is returned then,
            so that the caller's own "not found" message names a concrete path.

    Returns:
        the first of `shipped_drafter_candidates(name)` with a `config.json`.

    Raises:
        ValueError: `name` is not a shipped drafter, or (with `must_exist`) no candidate holds it.
    """
    candidates = shipped_drafter_candidates(name)
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    if must_exist:
        searched = ", ".join(str(folder) for folder in candidates)
        raise ValueError(
            f"the shipped drafter {name!r} is in none of: {searched}. Install hf_specssm from a wheel or "
            "sdist built from its source (they carry checkpoints/), or use a source checkout."
        )
    return candidates[0]
