"""The public prompt sets the benchmark runs on, shipped in `hf_specssm/data/` with their licenses.

Each prompt becomes one user message; the target's chat template renders it (or, for models without a
template, the raw text is used). Only the first turn of multi-turn sets is used.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib import resources

#: the four public sets the benchmark runs by default
PUBLIC_SETS = ("humaneval", "gsm8k", "mt_bench", "cnn_dm")
#: ... and `outside`: our own prompts in categories none of them covers (SQL, shell, regular expressions,
#: e-mail, JSON, translation, unit tests, explanations), written for this project, never trained on
PROMPT_SETS = (*PUBLIC_SETS, "outside")

_FILES = {
    "humaneval": "HumanEval.jsonl.gz",
    "gsm8k": "gsm8k_test.jsonl",
    "mt_bench": "mt_bench_question.jsonl",
    "cnn_dm": "cnn_dm_summarization.jsonl",
    "outside": "outside_prompts.jsonl",
}


@dataclass(frozen=True)
class BenchPrompt:
    """One benchmark prompt.

    Attributes:
        set: the prompt set (`PROMPT_SETS`).
        id: its id within the set (`HumanEval/0`, `gsm8k-12`, `81`, …).
        text: the user message.
    """

    set: str
    id: str
    text: str


def _rows(name: str) -> list[dict]:
    data = resources.files("hf_specssm").joinpath("data", _FILES[name]).read_bytes()
    if _FILES[name].endswith(".gz"):
        data = gzip.decompress(data)
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def load_prompt_set(name: str, limit: int | None = None, offset: int = 0) -> list[BenchPrompt]:
    """The prompts of set `name`, from `offset`, at most `limit` of them (in file order)."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; choose from {PROMPT_SETS}.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}.")
    rows = _rows(name)[offset:]
    rows = rows[:limit] if limit is not None else rows
    prompts = []
    for index, row in enumerate(rows, start=offset):
        if name == "humaneval":
            text = f"Complete the following Python function:\n```python\n{row['prompt']}```"
            prompts.append(BenchPrompt(name, row["task_id"], text))
        elif name == "gsm8k":
            prompts.append(BenchPrompt(name, f"gsm8k-{index}", row["question"]))
        else:
            prompts.append(BenchPrompt(name, str(row["question_id"]), row["turns"][0]))
    return prompts


def render(tokenizer, prompt: BenchPrompt) -> list[int]:
    """Token ids of `prompt` as the target sees it: the chat template with the generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt.text}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt.text)["input_ids"]
