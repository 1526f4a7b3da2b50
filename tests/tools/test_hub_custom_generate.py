"""`custom_generate/` is a Hub repository in transformers' `custom_generate` layout, loaded the way the Hub
loads it: `generate(custom_generate=<folder>, trust_remote_code=True)` (transformers 5.17 and 5.23 share
`GenerationMixin.load_custom_generate`: `has_file`, the import check, `check_python_requirements`)."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from packaging.requirements import Requirement
from transformers.dynamic_module_utils import get_imports
from transformers.utils.import_utils import split_package_version

import hf_specssm
from hf_specssm._compat import MIN_TRANSFORMERS

from tests.helpers.models import VOCAB, align, build

FOLDER = Path(__file__).resolve().parents[2] / "custom_generate"
RECIPE = FOLDER / "custom_generate" / "generate.py"
REQUIREMENTS = FOLDER / "custom_generate" / "requirements.txt"
# the sections transformers' custom_generate convention asks of a recipe's README, in its order
SECTIONS = (
    "Description",
    "Base model",
    "Model compatibility",
    "Additional Arguments",
    "Output Type changes",
    "Example usage",
)


def test_readme_is_a_custom_generate_card():
    card = ModelCard.load(FOLDER / "README.md")
    assert "custom_generate" in card.data.tags
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    headings = re.findall(r"^## (.+)$", card.text, flags=re.MULTILINE)
    assert [heading for heading in headings if heading in SECTIONS] == list(SECTIONS)


def _requirements() -> list[Requirement]:
    lines = REQUIREMENTS.read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]


def test_requirements_name_only_what_package_indexes_serve():
    """Each line is one of hf_specssm's own PyPI dependencies with one bound (transformers reads one per
    line); hf_specssm itself, which no index serves, is not named."""
    pyproject = (FOLDER.parent / "pyproject.toml").read_text()
    for requirement in _requirements():
        assert requirement.url is None and requirement.name != "hf_specssm"
        assert f'"{requirement.name}{requirement.specifier}' in pyproject
        # what transformers' requirement check reads of the line is the whole requirement
        name, operator, version = split_package_version(str(requirement))
        assert (name, f"{operator}{version}") == (requirement.name, str(requirement.specifier))
    transformers_bound = next(r for r in _requirements() if r.name == "transformers").specifier
    assert str(transformers_bound) == f">={MIN_TRANSFORMERS.major}.{MIN_TRANSFORMERS.minor}"


def test_transformers_import_check_does_not_ask_for_hf_specssm():
    # transformers answers a missing top-level import with `pip install <name>`; hf_specssm is not on an index
    assert "hf_specssm" not in get_imports(RECIPE)


def test_without_hf_specssm_the_recipe_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "hf_specssm", None)
    with pytest.raises(
        ImportError, match=r"hf_specssm is not on a package index: install it from its source"
    ):
        runpy.run_path(str(RECIPE))


@pytest.fixture
def pair():
    target = build("llama", seed=0)
    drafter = build("mamba", seed=1)
    align(target, drafter)
    return target, drafter


@pytest.fixture
def prompt():
    # repeats, so that prompt lookup finds matches
    return torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0)).repeat(1, 3)


@pytest.mark.parametrize(
    "drafting",
    [
        pytest.param({"assistant_model": "drafter"}, id="assistant_model"),
        pytest.param({"drafter": "drafter"}, id="drafter"),
        pytest.param({"prompt_lookup_num_tokens": 3}, id="prompt-lookup"),
    ],
)
def test_the_folder_runs_our_loop_through_generate(pair, prompt, drafting):
    target, drafter = pair
    drafting = {key: drafter if value == "drafter" else value for key, value in drafting.items()}
    reference = target.generate(prompt, max_new_tokens=20)
    output = target.generate(
        prompt, max_new_tokens=20, custom_generate=str(FOLDER), trust_remote_code=True, **drafting
    )
    assert torch.equal(output, reference)
    assert target.last_speculation_stats.rounds > 0
    assert not hf_specssm.is_enabled(target)


def test_the_folder_needs_trust_remote_code(pair, prompt):
    target, drafter = pair
    with pytest.raises(ValueError, match="trust_remote_code"):
        target.generate(
            prompt,
            max_new_tokens=5,
            custom_generate=str(FOLDER),
            trust_remote_code=False,
            assistant_model=drafter,
        )
