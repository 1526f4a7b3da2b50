"""Acceptance against input length: does a drafter keep drafting well as the context grows?

Inputs are real Python modules of the standard library (never benchmark prompts), cut at a line boundary
so that the rendered chat prompt has about `length` tokens, followed by an instruction to explain the
code. Each drafter runs with a constant draft length so that τ compares like with like; the drafter's
milliseconds per drafted token show how its cost grows with the context (a Transformer drafter's KV cache
grows, a Mamba drafter's state does not).
"""

from __future__ import annotations

import sysconfig
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_specssm.tools.bench.harness import BenchContext, TokenProgress, append_row, read_rows, run_one
from hf_specssm.tools.bench.methods import GenerationSettings, Method

SOURCE_MODULES = ("argparse.py", "inspect.py", "typing.py", "subprocess.py", "tarfile.py")
INSTRUCTION = "Explain what the code above does, then show a short example of how to use it."


def long_inputs(tokenizer, length: int, count: int = 2) -> list[tuple[str, list[int]]]:
    """`count` chat prompts of about `length` tokens (never more): `(module name, token ids)`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    inputs = []
    for name in SOURCE_MODULES:
        path = stdlib / name
        if not path.is_file():
            continue
        lines = path.read_text(encoding="utf-8").splitlines()

        def render(n: int, lines: list[str] = lines) -> list[int]:
            code = "\n".join(lines[:n])
            text = f"```python\n{code}\n```\n\n{INSTRUCTION}"
            chat = [{"role": "user", "content": text}]
            rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            return tokenizer(rendered, add_special_tokens=False)["input_ids"]

        # binary search for the most lines that fit
        low, high = 1, len(lines)
        if len(render(high)) <= length:
            continue  # the module is too short for this length
        while low < high:
            middle = (low + high + 1) // 2
            if len(render(middle)) <= length:
                low = middle
            else:
                high = middle - 1
        inputs.append((name, render(low)))
        if len(inputs) == count:
            break
    if not inputs:
        raise ValueError(f"no standard-library module is long enough for {length} tokens.")
    return inputs


def run_long_context(
    target: torch.nn.Module,
    tokenizer,
    methods: Sequence[Method],
    lengths: Sequence[int],
    out_path: str | Path,
    context: BenchContext,
    max_new_tokens: int = 96,
    count: int = 2,
    progress: bool = True,
) -> list[dict]:
    """Greedy runs of `methods` on inputs of each length; rows (with `context_tokens`) appended to `out_path`."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["method"], r["prompt_id"], r["length"]) for r in read_rows(out_path)}
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    jobs = []
    for length in lengths:
        for name, ids in long_inputs(tokenizer, length, count):
            jobs += [(length, name, ids, m) for m in methods if (m.name, name, length) not in done]
    # in tokens, moved by every round (a long prefill alone can take a minute)
    bar = tqdm(total=len(jobs) * max_new_tokens, desc="long-context", unit="tok", disable=not progress)
    with open(out_path, "a") as sink:
        for number, (length, name, ids, method) in enumerate(jobs, start=1):
            bar.set_postfix_str(f"{number}/{len(jobs)} {method.name}, {length} tokens in")
            input_ids = torch.tensor([ids], device=target.device)
            streamer = TokenProgress(bar)
            measured = run_one(method, target, input_ids, settings, seed=0, streamer=streamer)
            bar.update(max_new_tokens - streamer.tokens)
            row = {
                "method": method.name,
                "prompt_id": name,
                "length": length,
                "context_tokens": len(ids),
                **measured,
            }
            append_row(sink, row, context)
    bar.close()
    return read_rows(out_path)


def long_context_table(rows: Sequence[dict]) -> str:
    """Markdown: τ and drafter ms per drafted token, per method and input length."""
    lengths = sorted({r["length"] for r in rows})
    methods = sorted({r["method"] for r in rows})
    out = [
        "| method | " + " | ".join(f"{n} tokens: τ / ms per draft token" for n in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for method in methods:
        cells = []
        for length in lengths:
            picked = [r for r in rows if r["method"] == method and r["length"] == length]
            if not picked:
                cells.append("–")
                continue
            tau = sum(r["new_tokens"] for r in picked) / max(1, sum(r["rounds"] for r in picked))
            drafted = sum(r["drafted"] or 0 for r in picked)
            cost = 1000 * sum(r["drafter_s"] for r in picked) / drafted if drafted else float("nan")
            cells.append(f"{tau:.2f} / {cost:.1f}")
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"
