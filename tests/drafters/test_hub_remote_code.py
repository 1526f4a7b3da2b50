"""Drafter and head folders are Hub-native: their remote code loads them where hf_specssm is not installed,
and with hf_specssm imported the registered classes load them without `trust_remote_code`."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.dynamic_module_utils import get_class_from_dynamic_module

import hf_specssm
from hf_specssm.drafters import configuration_mamba_drafter, modeling_mamba_drafter
from hf_specssm.drafters.mamba import MambaDrafterConfig, MambaDrafterForCausalLM
from hf_specssm.drafters.redrafter import ReDrafterConfig, ReDrafterHead
from hf_specssm.drafters.redrafter import card as redrafter_card
from hf_specssm.drafters.redrafter import configuration as redrafter_configuration
from hf_specssm.drafters.redrafter import modeling as redrafter_modeling
from hf_specssm.training.mamba_drafter.card import DrafterCardFacts, model_card
from hf_specssm.training.mamba_drafter.training import drafter_config, new_drafter

from tests.helpers.models import HIDDEN, VOCAB, build

MAMBA_CODE = (configuration_mamba_drafter, modeling_mamba_drafter)
HEAD_CODE = (redrafter_configuration, redrafter_modeling, redrafter_card)
MAMBA_AUTO_MAP = {
    "AutoConfig": "configuration_mamba_drafter.MambaDrafterConfig",
    "AutoModel": "modeling_mamba_drafter.MambaDrafterForCausalLM",
    "AutoModelForCausalLM": "modeling_mamba_drafter.MambaDrafterForCausalLM",
}
HEAD_AUTO_MAP = {"AutoConfig": "configuration.ReDrafterConfig", "AutoModel": "modeling.ReDrafterHead"}
IDS = [[2, 5, 8, 8, 40, 1]]


def tiny_drafter() -> MambaDrafterForCausalLM:
    return new_drafter(drafter_config("tiny", 24, 48), torch.arange(2, 48, 2), seed=0).eval()


def tiny_head() -> ReDrafterHead:
    torch.manual_seed(0)
    return ReDrafterHead(
        ReDrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, beam_width=2, beam_length=2)
    ).eval()


def _source(module) -> Path:
    return Path(module.__file__)


@pytest.mark.parametrize("module", [*MAMBA_CODE, *HEAD_CODE], ids=lambda module: module.__name__)
def test_remote_code_imports_nothing_from_hf_specssm(module):
    """transformers copies a module and its relative imports from the same folder, nothing else."""
    path = _source(module)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1 and (path.parent / f"{node.module}.py").is_file()
        else:
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) else []
            assert not [name for name in names if name.split(".")[0] == "hf_specssm"], path


@pytest.mark.parametrize("name", hf_specssm.shipped.SHIPPED_DRAFTERS)
def test_shipped_folders_carry_the_package_source_and_auto_map(name):
    folder = hf_specssm.shipped_drafter_path(name, must_exist=True)
    config = json.loads((folder / "config.json").read_text())
    code, auto_map = (
        (HEAD_CODE, HEAD_AUTO_MAP) if config["model_type"] == "redrafter" else (MAMBA_CODE, MAMBA_AUTO_MAP)
    )
    for module in code:
        copy = folder / _source(module).name
        assert copy.read_bytes() == _source(module).read_bytes(), (
            f"{copy} differs from {_source(module)}: copy the package's file into the shipped folder"
        )
    assert config["auto_map"] == auto_map


def test_drafter_save_pretrained_writes_auto_map_and_remote_code(tmp_path):
    tiny_drafter().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == MAMBA_AUTO_MAP
    for module in MAMBA_CODE:
        assert (tmp_path / _source(module).name).read_bytes() == _source(module).read_bytes()


def test_head_save_pretrained_writes_auto_map_and_remote_code(tmp_path):
    tiny_head().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == HEAD_AUTO_MAP
    for module in HEAD_CODE:
        assert (tmp_path / _source(module).name).read_bytes() == _source(module).read_bytes()


def test_registered_classes_load_the_shipped_drafter_without_remote_code():
    """After `import hf_specssm`, plain `from_pretrained` (no `trust_remote_code`) uses the package's classes."""
    folder = hf_specssm.shipped_drafter_path(must_exist=True)
    assert type(AutoConfig.from_pretrained(folder)) is MambaDrafterConfig
    for auto_class in (AutoModelForCausalLM, AutoModel):
        model = auto_class.from_pretrained(folder)
        assert type(model) is MambaDrafterForCausalLM
        assert model.config.target_vocab_size == 151936


def test_the_shipped_feature_conditioned_drafter_loads_as_a_feature_drafter():
    """`assistant_model=` gets a `FeatureDrafter` for the shipped fc folder: it reads Qwen2.5-1.5B's hidden
    states (1536) through its head MLP, and the folder stays within the repository's 40 MiB per drafter."""
    from hf_specssm.drafters.assistant import as_drafter
    from hf_specssm.drafters.feature import FeatureDrafter

    folder = hf_specssm.shipped_drafter_path(hf_specssm.shipped.FEATURE_DRAFTER, must_exist=True)
    assert (folder / "model.safetensors").stat().st_size <= 40 * 2**20
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.reads_target_hidden and model.fuses_head_input
    assert model.config.feature_size == 1536 and model.config.target_vocab_size == 151936
    assert isinstance(as_drafter(model), FeatureDrafter)


def test_the_shipped_head_loads_as_a_redrafter_drafter():
    """`assistant_model=AutoModelForCausalLM.from_pretrained(head folder)` drafts with `ReDrafterDrafter`: the
    shipped head reads Qwen2.5-1.5B's hidden states (1536) and drafts from a reduced vocabulary of its ids,
    within the repository's 40 MiB per drafter."""
    from hf_specssm.drafters.assistant import as_drafter
    from hf_specssm.drafters.redrafter import ReDrafterDrafter

    folder = hf_specssm.shipped_drafter_path(hf_specssm.shipped.REDRAFTER_HEAD, must_exist=True)
    assert (folder / "model.safetensors").stat().st_size <= 40 * 2**20
    head = AutoModelForCausalLM.from_pretrained(folder)
    assert type(head) is ReDrafterHead
    assert head.config.hidden_size == 1536 and head.config.vocab_size == 151936
    assert head.config.draft_vocab_size is not None and head.config.simulated_tau > 1
    # the draft vocabulary maps to distinct target ids ('other' is slot 0)
    ids = head.draft_to_target[1:]
    assert ids.unique().numel() == ids.numel() and int(ids.max()) < 151936
    assert isinstance(as_drafter(head), ReDrafterDrafter)


def test_a_drafter_loaded_through_its_remote_code_drafts_for_hf_specssm(tmp_path):
    """The folder's own classes (what a Hub user without hf_specssm gets) work as hf_specssm drafters.

    With hf_specssm imported, the Auto classes prefer its registered classes even with
    `trust_remote_code=True`, so the remote class is loaded the way they load it.
    """
    tiny_drafter().save_pretrained(tmp_path)
    assert (
        type(AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True))
        is MambaDrafterForCausalLM
    )
    remote_class = get_class_from_dynamic_module(MAMBA_AUTO_MAP["AutoModelForCausalLM"], str(tmp_path))
    assert remote_class is not MambaDrafterForCausalLM
    remote = remote_class.from_pretrained(tmp_path).eval()
    target = build("llama", seed=0, vocab=48)
    target.generation_config.eos_token_id = None
    prompt = torch.tensor([[2, 4, 6, 8, 10, 12]])
    plain = target.generate(prompt, max_new_tokens=16, do_sample=False)
    spec = hf_specssm.generate(target, prompt, drafter=remote, max_new_tokens=16, do_sample=False)
    assert torch.equal(spec, plain) and target.last_speculation_stats.rounds > 0


_LOAD_WITHOUT_HF_SPECSSM = textwrap.dedent(
    """
    import sys


    class Refuse:
        # every `hf_specssm` import fails, wherever the package is installed or checked out
        def find_spec(self, name, path=None, target=None):
            if name == "hf_specssm" or name.startswith("hf_specssm."):
                raise ImportError(f"{name} is blocked in this test")


    sys.meta_path.insert(0, Refuse())
    try:
        import hf_specssm  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker let hf_specssm through")

    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    shipped, drafter, head, out = sys.argv[1:]
    ids = torch.tensor(__IDS__)
    results = {}
    model = AutoModelForCausalLM.from_pretrained(shipped, trust_remote_code=True)
    results["shipped"] = model(ids).logits
    results["shipped_auto_model"] = AutoModel.from_pretrained(shipped, trust_remote_code=True)(ids).logits
    results["drafter"] = AutoModelForCausalLM.from_pretrained(drafter, trust_remote_code=True)(ids).logits
    loaded_head = AutoModel.from_pretrained(head, trust_remote_code=True)
    results["head"] = {name: tensor.clone() for name, tensor in loaded_head.state_dict().items()}
    results["classes"] = [type(model).__module__, type(loaded_head).__module__]
    results["hf_specssm_modules"] = sorted(name for name in sys.modules if name.startswith("hf_specssm"))
    torch.save(results, out)
    """
).replace("__IDS__", repr(IDS))


@pytest.mark.slow
def test_folders_load_without_hf_specssm(tmp_path):
    """A fresh interpreter where `import hf_specssm` fails loads the shipped drafter, a saved drafter and a
    saved head through their remote code, and they compute what the package's classes compute."""
    shipped = hf_specssm.shipped_drafter_path(must_exist=True)
    drafter, head = tiny_drafter(), tiny_head()
    drafter.save_pretrained(tmp_path / "drafter")
    head.save_pretrained(tmp_path / "head")
    script = tmp_path / "load.py"
    script.write_text(_LOAD_WITHOUT_HF_SPECSSM)
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": "",
    }
    args = [shipped, tmp_path / "drafter", tmp_path / "head", tmp_path / "out.pt"]
    run = subprocess.run(
        [sys.executable, str(script), *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")
    assert results["hf_specssm_modules"] == []
    assert all(module.startswith("transformers_modules.") for module in results["classes"])
    ids = torch.tensor(IDS)
    with torch.no_grad():
        reference = MambaDrafterForCausalLM.from_pretrained(shipped)(ids).logits
        torch.testing.assert_close(results["shipped"], reference)
        torch.testing.assert_close(results["shipped_auto_model"], reference)
        torch.testing.assert_close(results["drafter"], drafter(ids).logits)
    assert results["head"].keys() == head.state_dict().keys()
    for name, tensor in head.state_dict().items():
        assert torch.equal(results["head"][name], tensor)


def _links(markdown: str) -> list[str]:
    return re.findall(r"\]\((https?://[^)\s]*)\)", markdown)


@pytest.mark.parametrize("name", hf_specssm.shipped.SHIPPED_DRAFTERS)
def test_shipped_card_has_hub_metadata_and_real_links(name):
    folder = hf_specssm.shipped_drafter_path(name, must_exist=True)
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    config = json.loads((folder / "config.json").read_text())
    target = config.get("tokenizer_reference") or config["target_name"]
    assert data["license"] == "apache-2.0" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation" and data["base_model"] == target
    # the training data was built offline: no Hub dataset to name, and the field says so
    assert data["datasets"] == [] and "custom_code" in data["tags"]
    # every link goes somewhere (the old card linked to a bare https://github.com/)
    assert _links(card.text) and all(re.match(r"https://[^/]+/.+", link) for link in _links(card.text))
    assert "trust_remote_code=True" in card.text


def _sections(markdown: str) -> tuple[str, str]:
    """The front matter and the `## Use` section."""
    front_matter = markdown.split("---\n")[1]
    use = markdown[markdown.index("## Use\n") : markdown.index("## Measured")]
    return front_matter, use


def test_export_writes_the_card_the_shipped_folder_has():
    """The next `train-mamba-drafter export` keeps the shipped card's metadata and usage."""
    folder = hf_specssm.shipped_drafter_path(must_exist=True)
    facts = DrafterCardFacts(
        target="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        tokenizer="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        architecture="Mamba2",
        parameters=1,
        size_bytes=1,
        draft_vocab=(16384, 151936),
        data="offline",
        steps=1,
        tokens=1,
        compute="a CPU",
    )
    assert _sections(model_card(facts)) == _sections((folder / "README.md").read_text())


@pytest.mark.parametrize(
    ("training_data", "datasets"),
    [
        pytest.param("someone/chat-data", ["someone/chat-data"], id="hub-dataset"),
        pytest.param("chat.jsonl (120 documents)", [], id="local-file"),
    ],
)
def test_head_card_names_only_hub_datasets(tmp_path, training_data, datasets):
    head = tiny_head()
    head.config.training_data = training_data
    head.config.target_name = "someone/target"
    head.save_pretrained(tmp_path)
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    # a local file is no Hub id: the field is present and empty (the card's text describes the data)
    assert data["datasets"] == datasets
    assert data["base_model"] == "someone/target" and data["license"] == "apache-2.0"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"redrafter", "speculative-decoding"} <= set(data["tags"])
