"""transformers' generation settings: the table in docs/compatibility.md covers every `GenerationConfig`
field, and the assisted-decoding settings map onto `DraftConfig` as that table says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import GenerationConfig

from hf_specssm import DraftConfig
from hf_specssm.config import ASSISTED_SCHEDULES, draft_config_from_assisted_settings
from hf_specssm.inputs import REFUSED_SETTINGS, assisted_settings, user_set

DOC = Path(__file__).resolve().parents[2] / "docs" / "compatibility.md"
STATUSES = {"honoured", "mapped", "refused", "ignored"}
MAPPED = {
    "num_assistant_tokens",
    "num_assistant_tokens_schedule",
    "assistant_confidence_threshold",
    "prompt_lookup_num_tokens",
    "max_matching_ngram_size",
}


def settings_table() -> dict[str, tuple[str, str]]:
    """`{setting: (status, what hf_specssm does)}` from the generation-settings table of the docs."""
    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.fullmatch(r"\| `(\w+)` \| (\w+) \| (.+) \|", line)
        if match:
            rows[match[1]] = (match[2], match[3])
    return rows


def generation_config_fields() -> set[str]:
    return {name for name in vars(GenerationConfig()) if not name.startswith("_")}


def test_every_generation_config_field_is_in_the_table():
    missing = generation_config_fields() - settings_table().keys()
    assert not missing, f"docs/compatibility.md does not say what happens to {sorted(missing)}"


def test_the_table_uses_the_four_statuses():
    table = settings_table()
    assert {status for status, _ in table.values()} <= STATUSES
    assert {name for name, (status, _) in table.items() if status == "mapped"} == MAPPED


def test_the_table_names_every_refusal_in_the_code():
    table = settings_table()
    for name in REFUSED_SETTINGS:
        status, what = table[name]
        assert status == "refused" or "refused" in what, name


def test_the_schedule_row_names_every_accepted_schedule():
    _, what = settings_table()["num_assistant_tokens_schedule"]
    assert all(f'`"{schedule}"`' in what for schedule in ASSISTED_SCHEDULES)


@pytest.mark.parametrize(
    "settings, expected",
    [
        pytest.param({}, DraftConfig(), id="nothing-set"),
        pytest.param(
            dict(num_assistant_tokens=3), DraftConfig(num_draft_tokens=3, schedule="constant"), id="tokens"
        ),
        pytest.param(
            dict(num_assistant_tokens_schedule="constant"),
            DraftConfig(schedule="constant"),
            id="constant",
        ),
        pytest.param(
            dict(num_assistant_tokens=3, num_assistant_tokens_schedule="heuristic"),
            DraftConfig(num_draft_tokens=3, schedule="heuristic"),
            id="heuristic",
        ),
        pytest.param(
            dict(num_assistant_tokens_schedule="heuristic_transient"),
            DraftConfig(schedule="heuristic"),
            id="transient",
        ),
        pytest.param(
            dict(num_assistant_tokens=24, num_assistant_tokens_schedule="heuristic"),
            DraftConfig(num_draft_tokens=24, schedule="heuristic", max_draft_tokens=24),
            id="bounds-widened",
        ),
        pytest.param(
            dict(num_assistant_tokens=4, num_assistant_tokens_schedule="adaptive"),
            DraftConfig(num_draft_tokens=4, schedule="adaptive"),
            id="adaptive",
        ),
        pytest.param(
            dict(assistant_confidence_threshold=0.3), DraftConfig(confidence_stop=0.3), id="threshold"
        ),
        pytest.param(dict(assistant_confidence_threshold=0), DraftConfig(), id="threshold-off"),
    ],
)
def test_assisted_settings_map_onto_draft_config(settings, expected):
    assert draft_config_from_assisted_settings(DraftConfig(), **settings) == expected


@pytest.mark.parametrize(
    "settings, message",
    [
        pytest.param(dict(num_assistant_tokens=0), "num_assistant_tokens", id="zero"),
        pytest.param(dict(num_assistant_tokens=2.5), "num_assistant_tokens", id="float"),
        pytest.param(
            dict(num_assistant_tokens_schedule="bogus"), "num_assistant_tokens_schedule", id="bogus"
        ),
        pytest.param(dict(assistant_confidence_threshold=1.0), "assistant_confidence_threshold", id="one"),
        pytest.param(
            dict(assistant_confidence_threshold=-0.1), "assistant_confidence_threshold", id="negative"
        ),
    ],
)
def test_invalid_assisted_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        draft_config_from_assisted_settings(DraftConfig(), **settings)


def test_transformers_defaults_are_not_user_set():
    # what generate writes into every call's config when nobody set these
    merged = GenerationConfig(
        num_assistant_tokens=20, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.4
    )
    assert assisted_settings(merged, None) == {}
    assert user_set(merged, "num_assistant_tokens") is None
    merged.num_assistant_tokens = 7
    assert user_set(merged, "num_assistant_tokens") == 7


def test_the_call_wins_over_the_assistant_config():
    call = GenerationConfig(num_assistant_tokens=3)
    assistant = GenerationConfig(num_assistant_tokens=5, num_assistant_tokens_schedule="heuristic")
    assert assisted_settings(call, assistant) == {
        "num_assistant_tokens": 3,
        "num_assistant_tokens_schedule": "heuristic",
    }
    assert assisted_settings({"assistant_confidence_threshold": 0.2}, None) == {
        "assistant_confidence_threshold": 0.2
    }
