"""A broad, built set of instructions for self-distillation, never from benchmark prompts.

A drafter is accepted when it predicts what the *target* writes, over what users ask. So the instructions
cover the kinds of requests a chat model gets, each built here from templates and from material on this
machine (Python source, documentation prose), seeded and deterministic:

- **code**, **math**, **chat**, **summary**: as in `mamba_drafter.prompts` (documented functions as stubs or
  tasks, templated word problems, open questions and writing, "Summarize: …" over doc paragraphs);
- **translation**: a sentence or short paragraph of documentation prose into one of several languages;
- **qa**: short factual and how-to questions (about topics, and about Python functions by name);
- **rag**: a documentation passage followed by a question to answer from it;
- **article**: a short news report on an invented local event (built from actors, places and happenings), so
  that the target's own news prose is there to be summarised;
- **brainstorm**: the target lists requests users send to an assistant in a category (writing, role-play,
  reasoning, extraction, advice, …): self-instruct, which widens the first turns beyond these templates;
- **followup**: a second user turn after the target's own first answer (`followup_instructions`, built once
  first answers exist: "make it shorter", "add tests", "explain step 2", …);
- **digest**: a summary, highlights or key facts of the target's own article (`digest_instructions`): news
  summarisation whose answer copies names and numbers from the passage;
- **selfinstruct**: each request of a finished brainstorm list, asked as a first turn of its own
  (`selfinstruct_instructions`).

Derived instructions (followup, digest, selfinstruct) exist only after the answers they start from, so
`hf-specssm distill generate` builds them from the store's finished greedy answers at each pass
(`distillation.command._tasks`).

The four public benchmark sets (HumanEval, GSM8K, MT-Bench, CNN/DM) are never read; the templates were
written for this module.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from hf_specssm.training.mamba_drafter.corpus import DocumentedFunction, doc_paragraphs, python_functions
from hf_specssm.training.mamba_drafter.prompts import (
    _TOPICS,
    Instruction,
    _math_problem,
    chat_instruction,
    code_instructions,
    summary_instruction,
)

#: Domains of first-turn instructions, with their default shares.
DEFAULT_MIX: dict[str, float] = {
    "code": 0.30,
    "math": 0.15,
    "chat": 0.17,
    "summary": 0.10,
    "translation": 0.08,
    "qa": 0.10,
    "rag": 0.10,
    "article": 0.08,
    "brainstorm": 0.07,
}
#: domains built from the target's own answers (`followup_instructions`, `digest_instructions`,
#: `selfinstruct_instructions`)
DERIVED_DOMAINS = ("followup", "digest", "selfinstruct")
DOMAINS = (*DEFAULT_MIX, *DERIVED_DOMAINS)

_LANGUAGES = [
    "French",
    "German",
    "Spanish",
    "Italian",
    "Portuguese",
    "Chinese",
    "Japanese",
    "Russian",
    "Dutch",
]
_TRANSLATE = [
    "Translate the following text into {lang}:\n\n{text}",
    "Please translate this into {lang}.\n\n{text}",
    'How would you say this in {lang}? "{text}"',
    "Translate to {lang}, keeping technical terms in English where that is usual:\n{text}",
]
_QA_TOPIC = [
    "What is {t}?",
    "Why is {t} important?",
    "How does {t} work?",
    "Who are some key figures associated with {t}?",
    "What is a common mistake beginners make with {t}?",
    "In one paragraph, what should I know about {t}?",
    "What is the difference between {t} and {u}?",
    "Is {t} still relevant today? Answer briefly.",
]
_QA_PYTHON = [
    "What does `{name}` do in Python?",
    "When would I use `{name}`? Give a short example.",
    "What arguments does `{name}` take, and what does it return?",
    "Is there a simpler alternative to `{name}` in Python?",
]
_RAG = [
    "Answer the question using only the passage below.\n\nPassage:\n{text}\n\nQuestion: {question}",
    "Read the text and answer.\n\n{text}\n\n{question}",
    'Context:\n"""\n{text}\n"""\n\nBased on the context above, {question_lower}',
    "Here is an excerpt from some documentation:\n\n{text}\n\nQ: {question}\nA:",
]
_RAG_QUESTIONS = [
    "What is the main point of this passage?",
    "What does the passage say about {word}?",
    "List the key facts the passage gives.",
    "Who is this text written for, and how can you tell?",
    "What would a reader need to do, according to the passage?",
    "Explain {word} as it is used in the passage.",
]
_PLACES = [
    "Lyon",
    "Manchester",
    "Osaka",
    "Nairobi",
    "Toronto",
    "Melbourne",
    "Bergen",
    "Porto",
    "Austin",
    "Krakow",
    "Cape Town",
    "Valparaiso",
    "Hanoi",
    "Edinburgh",
    "Denver",
    "Seville",
    "Gdansk",
    "Auckland",
    "Montreal",
    "Bristol",
    "Accra",
    "Tampere",
    "Cordoba",
    "Pune",
]
_ACTORS = [
    "the city council of {place}",
    "a hospital in {place}",
    "researchers at a university in {place}",
    "a football club from {place}",
    "police in {place}",
    "a small technology start-up in {place}",
    "the public transport operator of {place}",
    "farmers near {place}",
    "a museum in {place}",
    "residents of a neighbourhood in {place}",
    "a group of secondary-school students from {place}",
    "firefighters in {place}",
    "a supermarket chain based in {place}",
    "an airline operating from {place}",
    "environmental campaigners in {place}",
    "the owner of a family bakery in {place}",
    "scientists at a marine research station near {place}",
    "the mayor of {place}",
    "a public library in {place}",
    "a car manufacturer with a factory in {place}",
]
_HAPPENINGS = [
    "approved a plan to build a new bridge over the river",
    "decided to close the old town centre to cars at weekends",
    "announced that it will hire two hundred more staff",
    "warned that a heatwave could last into next week",
    "reported that visitor numbers doubled over the past year",
    "found the remains of a centuries-old ship during building work",
    "won a national award for cutting energy use",
    "was criticised after a computer failure delayed thousands of people",
    "celebrated its hundredth anniversary with a free open day",
    "launched an investigation after a series of thefts",
    "said a rare bird species has returned to the area after decades",
    "cut ticket prices for students and pensioners",
    "began a programme to plant ten thousand trees",
    "postponed a major festival because of safety concerns",
    "reported that air pollution fell by a fifth since last year",
    "opened a new centre offering free lessons to adults",
    "raised money for a family who lost their home in a fire",
    "announced a partnership to test driverless buses",
    "recalled a product after customers reported faults",
    "set a new regional record",
]
_ARTICLE = [
    "Write a news article of about 150 words reporting that {event}. Include a quote from a named person.",
    "Write a short newspaper report (120 to 180 words): {event}.",
    "You are a journalist. Write a brief news story about this: {event}. Invent plausible names, numbers and "
    "details, and keep it under 200 words.",
    "Write a local news item (about 150 words) with a headline, reporting that {event}.",
]
_DIGEST = [
    "Summarize the following article in three sentences.\n\n{article}",
    "Write three or four short highlights of this news story, one per line.\n\n{article}",
    "Give a one-paragraph summary of this article:\n\n{article}",
    "Article:\n{article}\n\nTL;DR:",
    "What are the key facts in this report? Answer briefly.\n\n{article}",
    "Summarize this for someone who has thirty seconds:\n\n{article}",
]
_CATEGORIES = [
    "writing emails, letters and messages",
    "creative writing (stories, poems, song lyrics)",
    "role-play and imaginary scenarios",
    "logic puzzles and reasoning questions",
    "mathematics problems at school level",
    "science and engineering explanations",
    "history, philosophy and the arts",
    "extracting facts from a short text (quote the text inside each request)",
    "cooking and recipes",
    "travel planning",
    "health, fitness and sleep",
    "personal finance and budgeting",
    "programming and software tools",
    "business, marketing and careers",
    "comparisons and product recommendations",
    "rewriting, shortening or editing the user's own text",
    "learning languages",
    "parenting and education",
    "law and everyday rights (general information)",
    "the environment and climate",
]
_BRAINSTORM = [
    "Write {n} different requests that users might send to an AI assistant about {category}. Make them varied "
    "and specific. Output one request per line, with no numbering and no other text.",
    "Brainstorm {n} realistic questions people ask a chatbot about {category}{angle}. One per line, nothing "
    "else.",
    "List {n} diverse tasks a user could give a helpful assistant in the area of {category}{angle}. Write each "
    "task as the user would type it, one per line, without numbers.",
]
_ANGLES = ["", " at work", " for a school project", " as a complete beginner", " in a hurry", " for a family"]
_FOLLOWUPS = {
    "code": [
        "Can you add a few unit tests for this?",
        "Please add type hints and a docstring.",
        "Can you make it more efficient?",
        "Explain how your code works, step by step.",
        "Rewrite it without using any imports.",
    ],
    "math": [
        "Can you check your answer another way?",
        "Explain the second step in more detail.",
        "What if the numbers were doubled?",
        "Write the solution as a short Python program.",
    ],
    "any": [
        "Can you make that shorter?",
        "Summarize your answer in three bullet points.",
        "Can you give an example?",
        "Explain that as if I were ten years old.",
        "What are the limitations of what you just said?",
        "Thanks! Can you expand on the most important point?",
        "Please rewrite that in a more formal tone.",
    ],
}


def _sentences(paragraph: str, rng: random.Random) -> str:
    """One to three consecutive sentences of `paragraph` (at most ~400 characters)."""
    parts = [part for part in re.split(r"(?<=[.!?])\s+", paragraph) if part]
    if not parts:
        return paragraph[:400]
    start = rng.randrange(len(parts))
    return " ".join(parts[start : start + rng.randint(1, 3)])[:400]


def _keyword(text: str, rng: random.Random) -> str:
    """A content word of `text` to ask about (a longer word, not a stop word)."""
    words = [word.strip(".,;:()[]\"'`") for word in text.split()]
    words = [word for word in words if len(word) >= 6 and word.isalpha()]
    return rng.choice(words) if words else "it"


def translation_instruction(paragraphs: Sequence[str], rng: random.Random) -> str:
    """Translate a few sentences of documentation prose into one of `_LANGUAGES`."""
    text = _sentences(rng.choice(paragraphs), rng)
    return rng.choice(_TRANSLATE).format(lang=rng.choice(_LANGUAGES), text=text)


def qa_instruction(functions: Sequence[DocumentedFunction], rng: random.Random) -> str:
    """A short question about a topic or (when functions are known) about a Python function by name."""
    if functions and rng.random() < 0.35:
        return rng.choice(_QA_PYTHON).format(name=rng.choice(functions).name)
    topic, other = rng.sample(_TOPICS, 2)
    return rng.choice(_QA_TOPIC).format(t=topic, u=other)


def rag_instruction(paragraphs: Sequence[str], rng: random.Random) -> str:
    """A passage (one or two doc paragraphs) followed by a question to answer from it."""
    start = rng.randrange(len(paragraphs))
    text = "\n\n".join(paragraphs[start : start + rng.randint(1, 2)])[:1500]
    question = rng.choice(_RAG_QUESTIONS).format(word=_keyword(text, rng))
    template = rng.choice(_RAG)
    return template.format(text=text, question=question, question_lower=question[0].lower() + question[1:])


def article_instruction(rng: random.Random) -> str:
    """A short news report on an invented event: an actor in a city and what happened."""
    actor = rng.choice(_ACTORS).format(place=rng.choice(_PLACES))
    event = f"{actor} {rng.choice(_HAPPENINGS)}"
    return rng.choice(_ARTICLE).format(event=event)


def brainstorm_instruction(rng: random.Random) -> str:
    """Ask the target for a list of user requests in one category (self-instruct)."""
    return rng.choice(_BRAINSTORM).format(
        n=rng.randint(5, 8), category=rng.choice(_CATEGORIES), angle=rng.choice(_ANGLES)
    )


def build_broad_instructions(
    count: int,
    seed: int = 0,
    mix: dict[str, float] | None = None,
    functions: list[DocumentedFunction] | None = None,
    paragraphs: list[str] | None = None,
    roots: list[Path] | None = None,
) -> list[Instruction]:
    """`count` first-turn instructions across `DEFAULT_MIX`'s domains, deterministic for a seed and machine.

    Ids are `<domain>-<index>`. Each domain draws from its own generator, so a later call with a larger
    `count` (same seed, mix and pools) extends every domain's list and keeps the earlier ids and texts:
    a distillation store grows across sessions by asking for more.

    Args:
        count: how many instructions.
        seed: seeds every choice (each domain draws from its own generator, so one domain's quota does
            not change another domain's texts).
        mix: the share of each domain (default `DEFAULT_MIX`).
        functions: documented functions for code and qa (default: `python_functions(roots)`).
        paragraphs: documentation paragraphs for summary, translation and rag (default: `doc_paragraphs(roots)`).
        roots: folders to search (default: the standard library, `site-packages` and `/usr/share/doc`).

    Raises:
        ValueError: a bad `count` or `mix`, or no paragraphs for the domains that need them.
    """
    mix = dict(mix or DEFAULT_MIX)
    unknown = set(mix) - set(DEFAULT_MIX)
    if unknown or not mix or any(share < 0 for share in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"mix must give non-negative shares of {tuple(DEFAULT_MIX)}, got {mix!r}.")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}.")
    total = sum(mix.values())
    quota = {domain: round(count * mix.get(domain, 0) / total) for domain in DEFAULT_MIX}
    needs_functions = quota["code"] or quota["qa"]
    needs_paragraphs = quota["summary"] or quota["translation"] or quota["rag"]
    pool = functions if functions is not None else (list(python_functions(roots)) if needs_functions else [])
    docs = paragraphs if paragraphs is not None else (list(doc_paragraphs(roots)) if needs_paragraphs else [])
    if needs_paragraphs and not docs:
        raise ValueError("no documentation paragraphs were found for summary, translation or rag prompts.")

    def rng_for(domain: str) -> random.Random:
        return random.Random(f"{seed}:{domain}")

    instructions: list[Instruction] = []

    def add(domain: str, texts: Iterable[str]) -> None:
        for index, text in enumerate(texts):
            instructions.append(Instruction(f"{domain}-{index}", domain, [{"role": "user", "content": text}]))

    if quota["code"]:
        rng = rng_for("code")
        shuffled = list(pool)
        rng.shuffle(shuffled)
        add("code", code_instructions(shuffled[: quota["code"]], rng))
    rng = rng_for("math")
    add("math", (_math_problem(rng) for _ in range(quota["math"])))
    rng = rng_for("chat")
    add("chat", (chat_instruction(rng, _TOPICS) for _ in range(quota["chat"])))
    rng = rng_for("summary")
    add("summary", (summary_instruction(docs, rng) for _ in range(quota["summary"])))
    rng = rng_for("translation")
    add("translation", (translation_instruction(docs, rng) for _ in range(quota["translation"])))
    rng = rng_for("qa")
    add("qa", (qa_instruction(pool, rng) for _ in range(quota["qa"])))
    rng = rng_for("rag")
    add("rag", (rag_instruction(docs, rng) for _ in range(quota["rag"])))
    rng = rng_for("article")
    add("article", (article_instruction(rng) for _ in range(quota["article"])))
    rng = rng_for("brainstorm")
    add("brainstorm", (brainstorm_instruction(rng) for _ in range(quota["brainstorm"])))
    random.Random(f"{seed}:order").shuffle(instructions)
    return instructions


def _chosen(record_id: str, share: float) -> bool:
    """Whether a record gets a follow-up: a stable hash of its id, about `share` of them."""
    return int(hashlib.sha1(f"followup:{record_id}".encode()).hexdigest(), 16) % 10_000 < share * 10_000


def followup_instructions(
    first_turns: Iterable[tuple[Instruction, str]], share: float = 0.3, seed: int = 0
) -> list[Instruction]:
    """Second-turn instructions after the target's own first answers.

    Args:
        first_turns: `(instruction, answer_text)` pairs; only finished answers should be passed.
        share: about this share of the pairs gets a follow-up (chosen by a hash of the id, so the choice
            does not depend on which other records exist).
        seed: seeds which follow-up question each gets.

    Returns:
        Instructions with id `followup-<first id>`, domain `followup` and three messages
        (user, the target's answer, the follow-up).
    """
    out = []
    for instruction, answer in first_turns:
        if instruction.domain in ("followup", "brainstorm") or not _chosen(instruction.id, share):
            continue
        rng = random.Random(f"{seed}:followup:{instruction.id}")
        questions = _FOLLOWUPS.get(instruction.domain, []) + _FOLLOWUPS["any"]
        messages = [
            *instruction.messages,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": rng.choice(questions)},
        ]
        out.append(Instruction(f"followup-{instruction.id}", "followup", messages))
    return out


def digest_instructions(first_turns: Iterable[tuple[Instruction, str]], seed: int = 0) -> list[Instruction]:
    """A summary, highlights or key facts of each of the target's own finished articles.

    Args:
        first_turns: `(instruction, answer_text)` pairs; those of domain `article` are used.
        seed: seeds which summary request each article gets.

    Returns:
        Instructions with id `digest-<article id>`, domain `digest`, one user message quoting the article.
    """
    out = []
    for instruction, answer in first_turns:
        article = answer.strip()
        if instruction.domain != "article" or len(article) < 200:
            continue
        rng = random.Random(f"{seed}:digest:{instruction.id}")
        text = rng.choice(_DIGEST).format(article=article)
        out.append(Instruction(f"digest-{instruction.id}", "digest", [{"role": "user", "content": text}]))
    return out


_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]+|\(?\d{1,2}[.):]|[a-z][.)])\s*")


def listed_requests(answer: str, limit: int = 5) -> list[str]:
    """The requests of a brainstorm answer: its lines without list markers or quotes, at most `limit`.

    Lines shorter than 15 or longer than 400 characters, headings (ending in `:`) and lines without a
    letter are skipped; duplicates are kept once.
    """
    requests: list[str] = []
    for line in answer.splitlines():
        text = _LIST_MARKER.sub("", line.replace("**", "")).strip().strip('"\u201c\u201d').strip()
        if not 15 <= len(text) <= 400 or text.endswith(":") or not re.search(r"[A-Za-z]", text):
            continue
        if text not in requests:
            requests.append(text)
        if len(requests) == limit:
            break
    return requests


def selfinstruct_instructions(
    first_turns: Iterable[tuple[Instruction, str]], per_list: int = 5
) -> list[Instruction]:
    """Each request of the target's own finished brainstorm lists, as a first turn of its own.

    Args:
        first_turns: `(instruction, answer_text)` pairs; those of domain `brainstorm` are used.
        per_list: at most this many requests per list (the first ones).

    Returns:
        Instructions with id `selfinstruct-<brainstorm id>-<i>`, domain `selfinstruct`. A request already
        listed by an earlier pair (same words, case and punctuation aside) is left out: small targets repeat
        themselves across lists.
    """
    out = []
    seen: set[str] = set()
    for instruction, answer in first_turns:
        if instruction.domain != "brainstorm":
            continue
        for index, request in enumerate(listed_requests(answer, per_list)):
            key = " ".join(re.findall(r"[a-z0-9]+", request.lower()))
            if key in seen:
                continue
            seen.add(key)
            out.append(
                Instruction(
                    f"selfinstruct-{instruction.id}-{index}",
                    "selfinstruct",
                    [{"role": "user", "content": request}],
                )
            )
    return out
