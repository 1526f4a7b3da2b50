"""Teacher-forced chats: text the target did not write, read by the target as if it were its answer.

Generation is the slow half of self-distillation on a CPU (~95k answer tokens an hour for the 1.5B target
here), while the teacher-forced pass of `label.py` labels ~577k answer tokens an hour (bf16, AMX). A drafter
learns what the target predicts next, so the target's top-k distribution at every position of *any*
answer-like text is a correct soft label for that prefix: a draft head conditioned on the target's
hidden state and on the tokens so far is trained on exactly the function it computes during decoding
(EAGLE and Medusa train on fixed chat data the same way). Only the text's own next token is not the
target's choice, so a teacher-forced chat's hard labels are the target's top-1 tokens
(`hf_specssm.training.mamba_drafter.finetune.Example.answer_labels`), never the text's.

The chats are built from material on this machine, as the instructions are (never from benchmark prompts):

- **teach-code**: a documented function of the standard library or an installed package, asked for with
  the prompts of the `code` domain (a stub to complete, or a one-line task), answered with its source in
  a fenced block as the target writes code;
- **teach-prose**: one to three consecutive documentation paragraphs, asked for as an explanation,
  a documentation section or an answer about a word they use.

Records carry mode `teacher` (`store.TEACHER`); evaluation, follow-ups and digests use greedy answers only,
so these never stand in for what the target wrote. Their extras come from `hf-specssm distill label`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hf_specssm.training.distillation.generate import render
from hf_specssm.training.distillation.store import TEACHER, DistillStore
from hf_specssm.training.mamba_drafter.corpus import DocumentedFunction
from hf_specssm.training.mamba_drafter.prompts import Instruction, code_instructions

TEACH_DOMAINS = ("teach-code", "teach-prose")

_PROSE_PROMPTS = [
    "Explain {word} in a few paragraphs.",
    "Write a short documentation section about {word}.",
    "What should a user know about {word}? Answer in prose, without lists.",
    "Describe {word} for the documentation of a software project.",
    "Can you explain what {word} means here and how it is used?",
]


@dataclass(frozen=True)
class TeacherChat:
    """A first turn and the text that stands as its answer.

    Attributes:
        instruction: the user turn (id `teach-code-<i>` or `teach-prose-<i>`).
        answer: the text the target reads as its answer.
    """

    instruction: Instruction
    answer: str


def _keyword(text: str, rng: random.Random) -> str:
    """A longer content word of `text` (the subject a prose prompt asks about)."""
    words = [word.strip(".,;:()[]\"'`") for word in text.split()]
    words = [word for word in words if len(word) >= 6 and word.isalpha()]
    return rng.choice(words) if words else "this topic"


def teacher_chats(
    count: int,
    functions: Sequence[DocumentedFunction],
    paragraphs: Sequence[str],
    code_share: float = 0.6,
    seed: int = 0,
) -> list[TeacherChat]:
    """`count` teacher-forced chats, deterministic for a seed and the same pools.

    Each domain draws from its own generator and its pool in a seeded order, so a larger `count` keeps
    the earlier chats (ids and texts) and adds more: a store grows by asking for more.

    Args:
        count: how many chats (about `code_share` of them code; fewer where a pool runs out, or a
            function's docstring gives no task sentence).
        functions: documented functions (`corpus.python_functions`).
        paragraphs: documentation paragraphs (`corpus.doc_paragraphs`).
        code_share: the share of `teach-code` chats, in [0, 1].
        seed: seeds the pools' order and the prompts.

    Raises:
        ValueError: `count` < 1, `code_share` outside [0, 1], or an empty pool a share needs.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}.")
    if not 0 <= code_share <= 1:
        raise ValueError(f"code_share must lie in [0, 1], got {code_share}.")
    code_count = min(round(count * code_share), len(functions))
    prose_count = min(count - round(count * code_share), len(paragraphs))
    if code_count == 0 and prose_count == 0:
        raise ValueError("no documented functions or documentation paragraphs to build teacher chats from.")
    chats: list[TeacherChat] = []
    rng = random.Random(f"{seed}:teach-code")
    pool = list(functions)
    rng.shuffle(pool)
    index = 0
    for function in pool[:code_count]:
        # one function at a time: `code_instructions` yields nothing for a docstring without a task
        # sentence, and a prompt must stay with the function it asks for
        prompt = next(code_instructions([function], rng), None)
        if prompt is None:
            continue
        answer = f"```python\n{function.source}\n```"
        chats.append(_chat(f"teach-code-{index}", "teach-code", prompt, answer))
        index += 1
    rng = random.Random(f"{seed}:teach-prose")
    order = list(range(len(paragraphs)))
    rng.shuffle(order)
    for index, start in enumerate(order[:prose_count]):
        text = "\n\n".join(paragraphs[start : start + rng.randint(1, 3)])
        prompt = rng.choice(_PROSE_PROMPTS).format(word=_keyword(text, rng))
        chats.append(_chat(f"teach-prose-{index}", "teach-prose", prompt, text))
    random.Random(f"{seed}:teach-order").shuffle(chats)
    return chats


def _chat(identifier: str, domain: str, prompt: str, answer: str) -> TeacherChat:
    return TeacherChat(Instruction(identifier, domain, [{"role": "user", "content": prompt}]), answer)


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token the chat template puts after an assistant turn (`[]` when it puts none).

    A generated answer that finished ends with the target's end-of-turn token; a teacher-forced answer gets
    the same token so that drafters learn where answers end from these chats too.
    """
    marker = "\u00a7\u00a7"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if marker not in text:
        return []
    tail = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return tail[:1] if tail and tail[0] in special else []


def teacher_record(
    tokenizer, chat: TeacherChat, max_answer_tokens: int, end_ids: Sequence[int] = ()
) -> dict[str, Any]:
    """A store record of `chat`: its rendered prompt then its answer's tokens (no extras yet).

    Args:
        tokenizer: the target's tokenizer (its chat template renders the prompt).
        chat: the chat.
        max_answer_tokens: answers are cut to this many tokens (`finished` is false then).
        end_ids: appended after an answer that was not cut (the template's end-of-turn token), so that
            drafters learn where the target's answers end, as they do from generated ones.

    Returns:
        `{"id", "domain", "mode": "teacher", "input_ids", "prompt_length", "finished", "dtype": None}`.
    """
    prompt = render(tokenizer, chat.instruction)
    answer = tokenizer(chat.answer, add_special_tokens=False)["input_ids"]
    finished = len(answer) + len(end_ids) <= max_answer_tokens
    answer = [*answer, *end_ids] if finished else answer[:max_answer_tokens]
    return {
        "id": chat.instruction.id,
        "domain": chat.instruction.domain,
        "mode": TEACHER,
        "input_ids": [*prompt, *answer],
        "prompt_length": len(prompt),
        "finished": finished,
        "dtype": None,
    }


def add_teacher_chats(
    store: DistillStore,
    tokenizer,
    chats: Sequence[TeacherChat],
    max_answer_tokens: int,
    max_prompt_tokens: int,
    end_ids: Sequence[int] = (),
) -> tuple[int, int]:
    """Append the chats the store does not hold yet (by id), as unlabelled `teacher` records.

    Chats whose prompt is longer than `max_prompt_tokens`, or whose answer has fewer than two tokens,
    are skipped.

    Returns:
        `(records, answer tokens)` appended.
    """
    done = store.done_ids()
    records = []
    for chat in chats:
        if chat.instruction.id in done:
            continue
        record = teacher_record(tokenizer, chat, max_answer_tokens, end_ids)
        answer = len(record["input_ids"]) - record["prompt_length"]
        if record["prompt_length"] > max_prompt_tokens or answer < 2:
            continue
        records.append(record)
    store.append(records)
    return len(records), sum(len(r["input_ids"]) - r["prompt_length"] for r in records)
