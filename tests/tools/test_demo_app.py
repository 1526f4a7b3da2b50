"""The Gradio demo without a browser: model catalog, input checks, streaming lanes, rendering, races."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("gradio", reason="the demo extra is not installed (pip install -e '.[demo]')")

from hf_specssm.tools import fetch
from hf_specssm_demo import cli
from hf_specssm_demo.app import initial_method
from hf_specssm_demo.catalog import (
    MAMBA_DRAFTER,
    REAL_DRAFTERS,
    REAL_TARGETS,
    TOY_DRAFTER,
    TOY_TARGET,
    Catalog,
    LoadedModel,
    ToyCodec,
)
from hf_specssm_demo.race import (
    BANDIT,
    CHAIN,
    COPY_BANDIT,
    COPY_CHAIN,
    DYNAMIC,
    FROM_DRAFT,
    FROM_TARGET,
    MAX_NEW_TOKENS,
    NGRAM_TABLE,
    PROMPT_LOOKUP,
    REDRAFTER,
    REDRAFTER_COPY,
    TREE,
    Lane,
    LaneView,
    Race,
    RaceSettings,
    _stream,
    available_methods,
)
from hf_specssm_demo.view import LaneRenderer, chart_rows, round_order, statistics

HAS_REDRAFTER = importlib.util.find_spec("hf_specssm.drafters.redrafter") is not None
# A small toy pair: the same construction as the demo's, a fraction of its cost.
TINY_TOY = {"hidden_size": 64, "target_layers": 2, "vocab_size": 512}


def _pretend_fetched(cache_dir: Path, name: str) -> None:
    """Leave what `hf-specssm fetch NAME` leaves behind (marker and converted config), without weights."""
    spec = fetch.MODELS[name]
    converted = cache_dir / name / fetch.CONVERTED_DIRNAME
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    marker = {"name": name, "sha256": spec.sha256, "converted": True}
    (cache_dir / name / fetch.MARKER_FILENAME).write_text(json.dumps(marker))


@pytest.fixture
def toy_catalog(tmp_path) -> Catalog:
    return Catalog(cache_dir=tmp_path, toy_options=TINY_TOY)


@pytest.fixture(scope="module")
def toy_race(tmp_path_factory) -> Race:
    return Race(
        Catalog(cache_dir=tmp_path_factory.mktemp("empty-cache"), toy_options=TINY_TOY), refresh_s=0.01
    )


def _settings(**changes) -> RaceSettings:
    values = {
        "prompt": "Hello world, hello world",
        "target": TOY_TARGET.label,
        "drafter": TOY_DRAFTER.label,
        "method": CHAIN,
        "max_new_tokens": 12,
    }
    values.update(changes)
    return RaceSettings(**values)


def test_catalog_offers_only_the_toy_pair_without_fetched_models(toy_catalog):
    assert toy_catalog.targets() == [TOY_TARGET]
    assert toy_catalog.drafters() == [TOY_DRAFTER]
    assert toy_catalog.default_target() == TOY_TARGET
    assert toy_catalog.default_drafter(TOY_TARGET) == TOY_DRAFTER


def test_catalog_prefers_the_fetched_real_pair(tmp_path):
    for name in ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"):
        _pretend_fetched(tmp_path, name)
    catalog = Catalog(cache_dir=tmp_path, repo_root=tmp_path / "repo-without-drafters")
    assert catalog.targets() == [*REAL_TARGETS, TOY_TARGET]
    assert catalog.drafters() == [*REAL_DRAFTERS, TOY_DRAFTER]
    assert catalog.default_target() == REAL_TARGETS[0]
    assert catalog.default_drafter(REAL_TARGETS[0]) == REAL_DRAFTERS[0]
    # SmolLM2 has no drafter model of its family: only model-free methods fit it.
    assert catalog.default_drafter(REAL_TARGETS[1]) is None


def test_catalog_defaults_to_our_mamba_drafter_for_the_real_pair(tmp_path):
    repo = tmp_path / "repo"
    (repo / MAMBA_DRAFTER.local_path).mkdir(parents=True)
    (repo / MAMBA_DRAFTER.local_path / "config.json").write_text("{}")
    # without a Qwen2.5 target fetched, the drafter has nothing to draft for
    assert MAMBA_DRAFTER not in Catalog(cache_dir=tmp_path, repo_root=repo).drafters()
    for name in ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"):
        _pretend_fetched(tmp_path, name)
    catalog = Catalog(cache_dir=tmp_path, repo_root=repo)
    assert catalog.drafters() == [MAMBA_DRAFTER, *REAL_DRAFTERS, TOY_DRAFTER]
    assert catalog.default_drafter(catalog.default_target()) == MAMBA_DRAFTER
    assert initial_method(catalog.default_target(), MAMBA_DRAFTER) == COPY_CHAIN
    assert initial_method(TOY_TARGET, TOY_DRAFTER) == CHAIN
    assert initial_method(catalog.default_target(), None) == PROMPT_LOOKUP
    # the target's trained head ships in the repository: the page starts with it and the copy branch
    assert catalog.head_folder(catalog.default_target()) is None
    (repo / REAL_TARGETS[0].head_path).mkdir(parents=True)
    (repo / REAL_TARGETS[0].head_path / "config.json").write_text("{}")
    assert catalog.head_folder(catalog.default_target()) == repo / REAL_TARGETS[0].head_path
    assert initial_method(catalog.default_target(), MAMBA_DRAFTER, trained_head=True) == REDRAFTER_COPY
    assert initial_method(catalog.default_target(), None, trained_head=True) == REDRAFTER_COPY


def test_catalog_takes_the_cache_folder_as_text(tmp_path):
    _pretend_fetched(tmp_path, "smollm2-135m-instruct")
    assert REAL_TARGETS[1] in Catalog(cache_dir=str(tmp_path)).targets()


def test_catalog_ignores_a_marker_for_other_bytes(tmp_path):
    _pretend_fetched(tmp_path, "smollm2-135m-instruct")
    marker_path = tmp_path / "smollm2-135m-instruct" / fetch.MARKER_FILENAME
    marker_path.write_text(json.dumps({**json.loads(marker_path.read_text()), "sha256": "0" * 64}))
    assert Catalog(cache_dir=tmp_path).targets() == [TOY_TARGET]


def test_catalog_loads_lazily_and_once(toy_catalog):
    assert toy_catalog._loaded == {}
    target = toy_catalog.load(TOY_TARGET)
    assert toy_catalog.load(TOY_TARGET) is target
    # The toy pair is built together (aligned to agree), so the drafter is there as well.
    assert toy_catalog.load(TOY_DRAFTER).model.config.vocab_size == target.model.config.vocab_size


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param({"prompt": ""}, "Type a prompt first", id="empty-prompt"),
        pytest.param({"prompt": "   \n"}, "Type a prompt first", id="blank-prompt"),
        pytest.param({"prompt": "é" * 2001}, "at most 4000", id="long-prompt"),
        pytest.param({"max_new_tokens": 10**9}, f"between 1 and {MAX_NEW_TOKENS}", id="huge-max-tokens"),
        pytest.param({"max_new_tokens": 0}, "between 1 and", id="zero-max-tokens"),
        pytest.param({"max_new_tokens": 2.5}, "whole number", id="fractional-max-tokens"),
        pytest.param({"max_new_tokens": None}, "whole number", id="missing-max-tokens"),
        pytest.param({"num_draft_tokens": 99}, "Draft tokens must lie", id="too-many-draft-tokens"),
        pytest.param({"target": "GPT-9"}, "Unknown target", id="unknown-target"),
        pytest.param({"method": "telepathy"}, "Unknown method", id="unknown-method"),
        pytest.param({"schedule": "sometimes"}, "Unknown schedule", id="unknown-schedule"),
        pytest.param({"drafter": None}, "pick a drafter model", id="chain-without-drafter"),
        pytest.param({"do_sample": True, "temperature": 0.0}, "Temperature", id="zero-temperature"),
        pytest.param({"do_sample": True, "top_p": 0.0}, "Top-p", id="zero-top-p"),
    ],
)
def test_bad_input_gets_a_message(toy_catalog, changes, message):
    assert message in _settings(**changes).check(toy_catalog)


def test_mismatched_pair_gets_a_message(tmp_path):
    _pretend_fetched(tmp_path, "smollm2-135m-instruct")
    catalog = Catalog(cache_dir=tmp_path)
    problem = _settings(target="SmolLM2-135M-Instruct").check(catalog)
    assert problem.startswith("Mismatched pair") and PROMPT_LOOKUP in problem
    assert (
        _settings(target="SmolLM2-135M-Instruct", method=PROMPT_LOOKUP, drafter=None).check(catalog) is None
    )


def test_bad_input_stops_before_loading_models(toy_catalog):
    frames = list(Race(toy_catalog).run(_settings(prompt="")))
    assert len(frames) == 1 and frames[0].error and frames[0].finished
    assert frames[0].status == "Type a prompt first."
    assert toy_catalog._loaded == {}


def test_redrafter_is_offered_only_when_importable():
    assert (REDRAFTER in available_methods()) == (REDRAFTER_COPY in available_methods()) == HAS_REDRAFTER


@pytest.mark.skipif(not HAS_REDRAFTER, reason="hf_specssm.drafters.redrafter is not there")
def test_redrafter_races_use_the_targets_trained_head(tmp_path, toy_catalog):
    """A target with a head folder (the Qwen2.5-Coder-1.5B entry names the shipped one) drafts with those
    weights, loaded once; the copy method drafts one beam inside `ContextCopyDrafter`; a target without
    one gets an untrained head."""
    from hf_specssm.drafters.redrafter import ReDrafterConfig, ReDrafterDrafter, ReDrafterHead
    from hf_specssm_demo.race import build_drafter

    assert REAL_TARGETS[0].head_path == "checkpoints/redrafter-qwen2.5-coder"
    toy = toy_catalog.load(TOY_TARGET)
    config = toy.model.config.get_text_config(decoder=True)
    torch.manual_seed(3)
    trained = ReDrafterHead(ReDrafterConfig(hidden_size=config.hidden_size, vocab_size=config.vocab_size))
    trained.save_pretrained(tmp_path / "head")
    loaded = LoadedModel(toy.model, toy.codec, head_folder=tmp_path / "head")
    drafter = build_drafter(_settings(method=REDRAFTER), loaded, None)
    assert isinstance(drafter, ReDrafterDrafter) and drafter.head is loaded.redrafter_head
    for name, tensor in trained.state_dict().items():
        assert torch.equal(loaded.redrafter_head.state_dict()[name], tensor), name
    copying = build_drafter(_settings(method=REDRAFTER_COPY), loaded, None)
    assert copying.inner.head is loaded.redrafter_head and copying.inner.beam_width == 1
    untrained = LoadedModel(toy.model, toy.codec)
    build_drafter(_settings(method=REDRAFTER), untrained, None)
    assert not torch.equal(untrained.redrafter_head.lm_head.weight, trained.lm_head.weight)


def test_lane_skips_the_prompt_and_labels_each_round():
    lane = Lane()
    lane.start()
    lane.put(torch.tensor([[5, 6, 7]]))  # the prompt
    for token in (11, 12, 13):
        lane.put(torch.tensor([token]))
    lane.on_round(2, 3)
    lane.put(torch.tensor([14]))
    lane.on_round(0, 1)
    lane.end()
    view = lane.snapshot()
    assert view.token_ids == [11, 12, 13, 14]
    assert view.sources == [FROM_DRAFT, FROM_DRAFT, FROM_TARGET, FROM_TARGET]
    assert view.rounds == [(2, 3), (0, 1)]
    assert view.done and view.mean_accepted_length == 2.0


def test_renderer_keeps_characters_split_across_runs_whole():
    # Byte-level ids: "é" is two bytes, and the run boundary falls between them.
    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")

    text = "ca fé!"
    ids = list(text.encode("utf-8"))
    split = ids.index(0xC3) + 1
    view = LaneView(ids, [FROM_DRAFT] * split + [FROM_TARGET] * (len(ids) - split))
    runs = LaneRenderer(decode).runs(view)
    assert "".join(run for run, _ in runs) == text
    assert [source for _, source in runs] == [FROM_DRAFT, FROM_TARGET]


def test_chart_rows_stack_draft_and_target_tokens_per_round():
    view = LaneView([1] * 25, rounds=[(3, 4), (0, 1)] * 5)
    rows = chart_rows(view)
    assert rows.shape == (20, 3)
    assert rows.groupby("source")["tokens"].sum().to_dict() == {FROM_DRAFT: 15, FROM_TARGET: 10}
    assert round_order(view)[:3] == ["1", "2", "3"] and round_order(view)[-1] == "10"
    assert chart_rows(LaneView()).dtypes["tokens"] == "int64"


def test_toy_codec_round_trips_nothing_but_is_readable():
    codec = ToyCodec()
    assert codec.encode("hi").tolist() == [[ord("h") + 1, ord("i") + 1]]
    assert codec.decode([0, 70, 511]).count(" ") == 3


@pytest.mark.parametrize(
    "method",
    [
        pytest.param(CHAIN, id="chain"),
        pytest.param(TREE, id="tree"),
        pytest.param(BANDIT, id="bandit"),
        pytest.param(COPY_BANDIT, id="copy-bandit"),
        pytest.param(COPY_CHAIN, id="copy-chain"),
        pytest.param(DYNAMIC, id="dynamic-tree"),
        pytest.param(PROMPT_LOOKUP, id="prompt-lookup"),
        pytest.param(NGRAM_TABLE, id="ngram-table"),
        pytest.param(
            REDRAFTER,
            id="redrafter",
            marks=pytest.mark.skipif(not HAS_REDRAFTER, reason="hf_specssm.drafters.redrafter is not there"),
        ),
        pytest.param(
            REDRAFTER_COPY,
            id="redrafter-copy",
            marks=pytest.mark.skipif(not HAS_REDRAFTER, reason="hf_specssm.drafters.redrafter is not there"),
        ),
    ],
)
def test_greedy_race_streams_both_sides_and_they_agree(toy_race, method):
    frames = list(toy_race.run(_settings(method=method)))
    final = frames[-1]
    assert final.finished and not final.error, final.status
    assert final.identical is True
    assert len(final.plain.token_ids) == len(final.speculative.token_ids) == 12
    assert all(source in (FROM_DRAFT, FROM_TARGET) for source in final.speculative.sources)
    assert sum(committed for _, committed in final.speculative.rounds) == 12
    assert final.stats is not None and final.stats.new_tokens == 12
    # Streaming: the plain side was shown before the speculative side started.
    assert any(frame.plain.token_ids and not frame.speculative.token_ids for frame in frames)
    table = statistics(final)
    assert "Greedy outputs identical: yes" in table and "Speed-up" in table and "τ" in table


def test_closing_the_stream_stops_decoding(toy_race):
    target = toy_race.catalog.load(TOY_TARGET).model
    lane = Lane()

    def run(lane: Lane) -> None:
        target.generate(
            torch.tensor([[1, 2, 3]]),
            max_new_tokens=400,
            streamer=lane,
            stopping_criteria=lane.stopping_criteria(),
        )

    stream = _stream(run, lane, refresh_s=0.01)
    while not next(stream).token_ids:
        pass
    stream.close()  # what Gradio does when the page goes away
    deadline = time.monotonic() + 30
    while lane.ended_at is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lane.ended_at is not None and len(lane.token_ids) < 400


def test_sampling_race_finishes_without_an_identity_claim(toy_race):
    final = list(toy_race.run(_settings(do_sample=True, temperature=0.8, top_p=0.9, seed=3)))[-1]
    assert final.finished and not final.error, final.status
    assert final.identical is None
    assert "differ by design" in statistics(final)


def test_build_app_has_analytics_off(toy_catalog):
    from hf_specssm_demo.app import build_app

    app = build_app(toy_catalog)
    assert app.analytics_enabled is False
    # Building the page loads no model.
    assert toy_catalog._loaded == {}


def test_launcher_binds_to_localhost_by_default():
    args = cli.build_parser().parse_args([])
    assert args.host == "127.0.0.1"


def test_space_entry_point_builds_the_page(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("HF_SPECSSM_CACHE", str(tmp_path))
    path = Path(__file__).parents[2] / "app.py"
    spec = importlib.util.spec_from_file_location("space_app", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(path.parent))
    spec.loader.exec_module(module)
    assert module.demo.analytics_enabled is False
