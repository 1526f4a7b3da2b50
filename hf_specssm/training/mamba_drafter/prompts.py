"""Instructions for distilling a target into a drafter, built offline and never from benchmark prompts.

A drafter is accepted when it predicts what the *target* writes. So most of the drafter's data is the
target's own answers to instructions that look like what users ask (and what the benchmarks hold: code,
grade-school math, open questions and writing, summaries), built here from material on this machine:

- **code**: documented functions of the standard library and installed packages, posed either as a stub
  to complete (signature + docstring) or as a one-sentence task from the docstring's first line;
- **math**: word problems from templates with random names, objects and numbers;
- **chat**: open questions and writing tasks, templates × a topic list (and module docstrings' topics);
- **summary**: "Summarize: …" over documentation paragraphs.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hf_specssm.training.mamba_drafter.corpus import DocumentedFunction, doc_paragraphs, python_functions

DOMAINS = ("code", "math", "chat", "summary")


@dataclass(frozen=True)
class Instruction:
    """One distillation prompt.

    Attributes:
        id: stable identifier (domain and index), used to resume a distillation run.
        domain: one of `DOMAINS`.
        messages: the chat, `[{"role": "user", "content": ...}]`.
    """

    id: str
    domain: str
    messages: list[dict[str, str]] = field(hash=False)


def _first_sentence(docstring: str) -> str:
    text = " ".join(docstring.strip().split("\n\n", 1)[0].split())
    end = text.find(". ")
    return (text[: end + 1] if end > 0 else text).rstrip()


def code_instructions(functions: Iterable[DocumentedFunction], rng: random.Random) -> Iterator[str]:
    """Stub completions and one-line tasks from documented functions (alternating at random)."""
    for function in functions:
        if rng.random() < 0.55:
            indent = "    "
            doc = "\n".join(indent + line if line else "" for line in function.docstring.splitlines())
            stub = f'{function.signature}\n{indent}"""\n{doc}\n{indent}"""\n'
            opener = rng.choice(
                [
                    "Complete the following Python function:",
                    "Implement this Python function:",
                    "Write the body of this function.",
                    "Finish the implementation below.",
                ]
            )
            yield f"{opener}\n```python\n{stub}```"
        else:
            task = _first_sentence(function.docstring).rstrip(".")
            if not task:
                continue
            task = task[0].lower() + task[1:]
            yield rng.choice(
                [
                    f"Write a Python function `{function.name}` that does the following: {task}.",
                    f"In Python, how would I write a function to {task.lower()}?",
                    f"Write a Python function named {function.name}. Its job: {task}. Include a short example.",
                ]
            )


_NAMES = [
    "Ava",
    "Ben",
    "Carla",
    "Dev",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jamal",
    "Kira",
    "Liam",
    "Mei",
    "Noah",
    "Olga",
    "Pedro",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
    "Umar",
    "Vera",
    "Wes",
    "Yuki",
    "Zoe",
]
_ITEMS = [
    ("apples", 1, 3),
    ("notebooks", 2, 6),
    ("cupcakes", 2, 5),
    ("tickets", 5, 25),
    ("books", 4, 20),
    ("pencils", 1, 2),
    ("shirts", 8, 30),
    ("plants", 3, 15),
    ("marbles", 1, 1),
    ("cookies", 1, 3),
    ("toy cars", 3, 12),
    ("bracelets", 2, 9),
    ("pies", 6, 14),
    ("stickers", 1, 1),
    ("lamps", 10, 40),
]
_PLACES = ["the market", "a bakery", "the school fair", "a bookshop", "the garden center", "a toy store"]
_ANIMALS = ["chickens", "goats", "cows", "ducks", "rabbits", "sheep"]


def _math_problem(rng: random.Random) -> str:
    """One grade-school word problem (several steps of arithmetic), from one of a dozen templates."""
    name, other = rng.sample(_NAMES, 2)
    item, low, high = rng.choice(_ITEMS)
    price = rng.randint(low, high)
    a, b, c = rng.randint(3, 40), rng.randint(2, 15), rng.randint(2, 9)
    place = rng.choice(_PLACES)
    percent = rng.choice([10, 15, 20, 25, 30, 40, 50])
    hours = rng.randint(2, 9)
    rate = rng.randint(8, 35)
    templates = [
        f"{name} buys {a} {item} at {place} for ${price} each and pays with a ${(a * price // 50 + 1) * 50} bill. How much change does {name} get?",
        f"{name} has {a} {item}. {other} has {b} times as many. They give away {c} each. How many {item} do they have left together?",
        f"A {item[:-1]} costs ${price * 4}. During a sale it is {percent}% off. {name} buys {c} of them. How much does {name} spend?",
        f"{name} works {hours} hours a day for {c} days at ${rate} per hour, then spends ${b * 10} on groceries. How much money is left?",
        f"A farm has {a} {rng.choice(_ANIMALS)} and {b} times as many chickens. Each chicken lays {c} eggs a week. How many eggs are laid in {hours} weeks?",
        f"{name} reads {b} pages on Monday and twice as many each following day. How many pages has {name} read after {min(c, 6)} days?",
        f"{name} is {a} years old. {other} is {b} years older than half of {name}'s age. How old will {other} be in {c} years?",
        f"A train travels {rate * 3} miles per hour for {hours} hours, then {rate * 2} miles per hour for {c} hours. What distance does it cover in total?",
        f"{name} saves ${b} every week. A bike costs ${a * 10 + 50}. {name} already has ${a}. How many weeks until {name} can buy the bike?",
        f"There are {a + 20} students in a class. {percent}% of them walk to school, and {c} of the rest ride bikes. The others take the bus. How many take the bus?",
        f"{name} bakes {a} {item} and sells them in boxes of {c}. Each full box sells for ${price * c + 2}. How much does {name} earn from the full boxes?",
        f"A rectangular garden is {a} meters long and {b + 3} meters wide. Fencing costs ${price} per meter. How much does it cost to fence the whole garden?",
        f"{name} and {other} share {a * c} {item} in the ratio {c}:{b}. How many more {item} does the one with the larger share get?",
    ]
    return rng.choice(templates)


_TOPICS = [
    "photosynthesis",
    "the French Revolution",
    "machine learning",
    "climate change",
    "the immune system",
    "black holes",
    "supply and demand",
    "the Renaissance",
    "blockchain",
    "plate tectonics",
    "inflation",
    "the water cycle",
    "quantum computing",
    "the Roman Empire",
    "vaccines",
    "renewable energy",
    "social media",
    "remote work",
    "the printing press",
    "game theory",
    "DNA replication",
    "jazz",
    "urban gardening",
    "the stock market",
    "electric cars",
    "sleep",
    "meditation",
    "volcanoes",
    "the Silk Road",
    "recycling",
    "public libraries",
    "space exploration",
    "bees",
    "coffee",
    "version control",
    "databases",
    "the internet",
    "encryption",
    "compilers",
    "operating systems",
    "marathon training",
    "learning a new language",
    "starting a small business",
    "personal budgeting",
    "time management",
    "public speaking",
    "healthy eating",
    "team leadership",
    "job interviews",
    "Shakespeare",
    "the Industrial Revolution",
    "ancient Egypt",
    "the Cold War",
    "impressionism",
    "ocean currents",
    "antibiotics",
    "artificial intelligence ethics",
    "rainforests",
    "the moon landing",
]
_CHAT_TEMPLATES = [
    "Explain {t} in simple terms.",
    "What are the main advantages and disadvantages of {t}?",
    "Write a short blog post about {t}.",
    "Give me five interesting facts about {t}.",
    "Write a persuasive paragraph arguing that everyone should learn about {t}.",
    "Describe the history of {t} in a few paragraphs.",
    "Imagine you are a teacher. How would you introduce {t} to a class of teenagers?",
    "Write a short story in which {t} plays an important role.",
    "Compare {t} and {u}. How are they similar and how do they differ?",
    "Draft a professional email to a colleague proposing a workshop on {t}.",
    "What are common misconceptions about {t}?",
    "Write a poem about {t}.",
    "List the key steps someone should follow to get started with {t}.",
    "Summarize the most important ideas of {t} as bullet points.",
    "Pretend you are an expert on {t} being interviewed. Answer: why does it matter today?",
    "Write a dialogue between two friends who disagree about {t}.",
]


def chat_instruction(rng: random.Random, topics: list[str]) -> str:
    """An open question or writing task about one (or two) topics."""
    topic, other = rng.sample(topics, 2)
    return rng.choice(_CHAT_TEMPLATES).format(t=topic, u=other)


def summary_instruction(paragraphs: list[str], rng: random.Random) -> str:
    """'Summarize: …' over one to three consecutive documentation paragraphs."""
    start = rng.randrange(len(paragraphs))
    text = " ".join(paragraphs[start : start + rng.randint(1, 3)])
    return "Summarize: " + text[:1600]


def build_instructions(
    count: int,
    seed: int = 0,
    mix: dict[str, float] | None = None,
    functions: list[DocumentedFunction] | None = None,
    paragraphs: list[str] | None = None,
    roots: list[Path] | None = None,
) -> list[Instruction]:
    """`count` instructions across `DOMAINS`, deterministic for a seed and the same machine.

    Args:
        count: how many instructions.
        seed: seeds every choice.
        mix: the share of each domain (default code 0.4, math 0.2, chat 0.25, summary 0.15).
        functions: documented functions for code tasks (default: found with `python_functions(roots)`).
        paragraphs: documentation paragraphs for summaries (default: `doc_paragraphs(roots)`).
        roots: folders to search (default: the standard library, `site-packages` and `/usr/share/doc`).
    """
    mix = mix or {"code": 0.4, "math": 0.2, "chat": 0.25, "summary": 0.15}
    unknown = set(mix) - set(DOMAINS)
    if unknown or not mix or any(share < 0 for share in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"mix must give non-negative shares of {DOMAINS}, got {mix!r}.")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}.")
    rng = random.Random(seed)
    total = sum(mix.values())
    quota = {domain: round(count * mix.get(domain, 0) / total) for domain in DOMAINS}
    instructions: list[Instruction] = []
    if quota["code"]:
        pool = functions if functions is not None else list(python_functions(roots))
        rng.shuffle(pool)
        for index, text in enumerate(code_instructions(pool[: quota["code"]], rng)):
            instructions.append(Instruction(f"code-{index}", "code", [{"role": "user", "content": text}]))
    for index in range(quota["math"]):
        text = _math_problem(rng)
        instructions.append(Instruction(f"math-{index}", "math", [{"role": "user", "content": text}]))
    for index in range(quota["chat"]):
        text = chat_instruction(rng, _TOPICS)
        instructions.append(Instruction(f"chat-{index}", "chat", [{"role": "user", "content": text}]))
    if quota["summary"]:
        docs = paragraphs if paragraphs is not None else list(doc_paragraphs(roots))
        if not docs:
            raise ValueError("no documentation paragraphs were found for summary prompts.")
        for index in range(quota["summary"]):
            text = summary_instruction(docs, rng)
            instructions.append(
                Instruction(f"summary-{index}", "summary", [{"role": "user", "content": text}])
            )
    rng.shuffle(instructions)
    return instructions
