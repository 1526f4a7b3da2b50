"""The demo's panes keep the text's layout; its API exposes no anonymous endpoint; the real pair loads in
the machine's fastest dtype; the Space has its card, its requirements and no forced offline mode."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest

from hf_specssm.hardware import fastest_dtype
from hf_specssm.tools import fetch

from tests.helpers.chat_models import byte_tokenizer, save_chat_target

ROOT = Path(__file__).resolve().parents[2]
CODE = 'def area(w, h):\n    """Width × height."""\n    if w < 0 and h > 0:\n        return 0\n\n\treturn w * h\n'


def _text_of(markup: str) -> str:
    """What a browser shows for `markup` (tags dropped, entities decoded)."""
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def test_lane_html_keeps_newlines_indentation_and_escapes(monkeypatch):
    pytest.importorskip("gradio")
    from hf_specssm_demo.race import FROM_DRAFT, FROM_TARGET, LaneView
    from hf_specssm_demo.view import LaneRenderer, lane_html

    tokenizer = byte_tokenizer()
    ids = tokenizer(CODE).input_ids
    # sources alternate in rounds of three tokens: runs cut through indentation and newlines
    sources = [FROM_DRAFT if (index // 3) % 2 == 0 else FROM_TARGET for index in range(len(ids))]
    runs = LaneRenderer(tokenizer.decode).runs(LaneView(ids, sources))
    markup = lane_html(runs)

    assert "white-space: pre-wrap" in markup
    assert _text_of(markup) == CODE  # every newline, space and tab where the model put it
    assert "&lt;" in markup and "&gt;" in markup  # escaped: a raw `< 0 and h >` would read as a tag
    # one highlighted span per run of one source, not one box per token
    assert markup.count('class="from-draft"') + markup.count('class="from-target"') == len(runs)
    assert len(runs) < len(ids)


def test_whitespace_runs_stay_visible_and_plain_text_is_unmarked():
    pytest.importorskip("gradio")
    from hf_specssm_demo.race import FROM_DRAFT
    from hf_specssm_demo.view import lane_html, legend_html

    markup = lane_html([("x = 1", None), ("\n    ", FROM_DRAFT), ("y", None)])
    assert '<span class="from-draft"' in markup and ">\n    </span>" in markup
    assert _text_of(markup) == "x = 1\n    y"
    assert _text_of(lane_html([("a\n  b", None)])) == "a\n  b" and "<span" not in lane_html([("a", None)])
    assert "accepted draft" in legend_html() and "target" in legend_html()


def test_the_page_has_no_anonymous_endpoint(tmp_path):
    pytest.importorskip("gradio")
    from hf_specssm_demo.app import build_app
    from hf_specssm_demo.catalog import Catalog

    app = build_app(Catalog(cache_dir=tmp_path))
    functions = {fn.name: fn for fn in app.fns.values()}
    assert "<lambda>" not in functions
    public = {fn.api_name for fn in functions.values() if fn.api_visibility == "public"}
    assert public == {"race"}
    assert functions["target_changed"].api_visibility == "private"


def _fake_fetched_target(cache: Path) -> None:
    """A tiny chat model where the fetch cache keeps the converted Qwen2.5-Coder-1.5B target."""
    spec = fetch.MODELS["qwen2.5-coder-1.5b-instruct"]
    save_chat_target(cache / spec.name / fetch.CONVERTED_DIRNAME)
    marker = {"name": spec.name, "sha256": spec.sha256, "converted": True}
    (cache / spec.name / fetch.MARKER_FILENAME).write_text(json.dumps(marker))


@pytest.mark.parametrize("dtype", ["bf16", "fp32", "auto"])
def test_real_models_load_in_the_chosen_or_fastest_dtype(tmp_path, dtype):
    pytest.importorskip("gradio")
    from hf_specssm_demo.app import _model_note
    from hf_specssm_demo.catalog import REAL_TARGETS, Catalog

    _fake_fetched_target(tmp_path)
    catalog = Catalog(cache_dir=tmp_path, dtype=dtype)
    expected = fastest_dtype("cpu") if dtype == "auto" else catalog.dtype_choice()
    assert catalog.dtype_choice().name == expected.name
    loaded = catalog.load(REAL_TARGETS[0])
    assert loaded.model.dtype == expected.dtype
    note = _model_note(catalog, REAL_TARGETS[0].label)
    assert note == f"Real model, {expected.name} on this machine ({expected.reason})."


def test_a_bad_dtype_is_refused_when_the_catalog_is_made(tmp_path):
    pytest.importorskip("gradio")
    from hf_specssm_demo.catalog import Catalog

    with pytest.raises(ValueError, match="--dtype must be one of auto, bf16, fp32; got 'fp8'"):
        Catalog(cache_dir=tmp_path, dtype="fp8")


@pytest.mark.parametrize(
    ("environ", "offline"),
    [
        pytest.param({}, "1", id="local"),
        pytest.param({"SPACE_ID": "me/demo"}, None, id="space"),
        pytest.param({"HF_HUB_OFFLINE": "0"}, "0", id="told-otherwise"),
    ],
)
def test_offline_mode_only_where_the_hub_is_not_expected(environ, offline):
    from hf_specssm_demo.cli import configure_environment

    environ = dict(environ)
    configure_environment(environ)
    assert environ.get("HF_HUB_OFFLINE") == offline
    assert environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_the_demo_launcher_takes_a_dtype():
    from hf_specssm_demo.cli import build_parser

    assert build_parser().parse_args([]).dtype == "auto"
    assert build_parser().parse_args(["--dtype", "fp32"]).dtype == "fp32"


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _front_matter(card: Path) -> dict:
    yaml = pytest.importorskip("yaml")
    text = card.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_space_card_declares_a_gradio_app():
    from packaging.specifiers import SpecifierSet

    meta = _front_matter(ROOT / "space" / "README.md")
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert (ROOT / meta["app_file"]).is_file()
    assert meta["license"] == "apache-2.0" and len(meta["short_description"]) <= 60
    # the Space runs the Gradio the demo extra allows
    extras = _pyproject()["project"]["optional-dependencies"]
    gradio_range = next(req for req in extras["demo"] if req.startswith("gradio"))
    assert meta["sdk_version"] in SpecifierSet(gradio_range.removeprefix("gradio"))


def test_root_requirements_install_what_the_package_needs():
    from packaging.requirements import Requirement

    lines = (ROOT / "requirements.txt").read_text().splitlines()
    required = {
        Requirement(line).name: Requirement(line)
        for line in lines
        if line.strip() and not line.startswith(("#", "-"))
    }
    project = _pyproject()["project"]
    for dependency in map(Requirement, project["dependencies"]):
        assert dependency.name in required, f"requirements.txt lacks {dependency.name}"
        if dependency.name == "torch":
            # pinned there (the CPU wheel), within the package's range
            pinned = next(iter(required["torch"].specifier)).version
            assert pinned in dependency.specifier
        else:
            assert required[dependency.name].specifier == dependency.specifier, dependency.name


def test_make_space_assembles_a_deployable_folder(tmp_path):
    from hf_specssm_demo.space import assemble, main

    folder = assemble(tmp_path / "space")
    assert (folder / "README.md").read_text() == (ROOT / "space" / "README.md").read_text()
    for name in ("app.py", "requirements.txt", "LICENSE", "hf_specssm/__init__.py", "hf_specssm_demo/app.py"):
        assert (folder / name).is_file(), name
    assert list(folder.glob("checkpoints/*/config.json"))
    assert not list(folder.rglob("__pycache__")) and not (tmp_path / "space.partial").exists()
    # again: replaced, not merged
    (folder / "stale.txt").write_text("old")
    assert main([str(folder)]) == 0 and not (folder / "stale.txt").exists()
    with pytest.raises(FileNotFoundError, match="assemble the Space from a source checkout"):
        assemble(tmp_path / "other", root=tmp_path / "nowhere")
