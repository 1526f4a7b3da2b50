"""Offline training text for a Mamba drafter: Python source and documentation found on this machine.

No network and no benchmark prompts: the corpus is what ships with Python and the installed packages.

- **code**: the `.py` files of the standard library and of `site-packages` (licenses: PSF and the
  packages' own permissive licenses; the text is used to train, never redistributed);
- **docs**: prose paragraphs from package documentation (`*.md`, `*.rst`, `*.txt` under `site-packages`
  and `/usr/share/doc`, and the long descriptions in `*.dist-info/METADATA`).

`python_functions` additionally pulls documented functions out of the source, which
`hf_specssm.training.mamba_drafter.prompts` turns into coding instructions for distillation.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Generated, vendored or test-data folders add bulk and little that a chat model writes.
_SKIP_PARTS = {"__pycache__", "test", "tests", "testing", "_vendor", "vendor", "idlelib", "lib2to3", "site"}
_MAX_FILE_BYTES = 200_000


def default_roots() -> list[Path]:
    """The standard library and the `site-packages` of the running interpreter (deduplicated)."""
    paths = sysconfig.get_paths()
    roots: list[Path] = []
    for key in ("stdlib", "purelib", "platlib"):
        path = Path(paths[key]).resolve()
        if path.is_dir() and path not in roots:
            roots.append(path)
    return roots


def default_doc_roots() -> list[Path]:
    """`default_roots()` plus `/usr/share/doc` when it exists."""
    roots = default_roots()
    share = Path("/usr/share/doc")
    if share.is_dir():
        roots.append(share)
    return roots


def _walk(roots: Iterable[Path], suffixes: tuple[str, ...]) -> Iterator[Path]:
    """Files under `roots` with one of `suffixes`, in a stable order, skipping `_SKIP_PARTS` folders."""
    seen: set[Path] = set()
    for root in roots:
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_PARTS and not d.startswith("."))
            for name in sorted(files):
                if not name.endswith(suffixes):
                    continue
                path = Path(directory, name)
                try:
                    real = path.resolve()
                    if real in seen or real.stat().st_size > _MAX_FILE_BYTES:
                        continue
                except OSError:
                    continue
                seen.add(real)
                yield path


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def python_sources(roots: Iterable[Path] | None = None) -> Iterator[str]:
    """The text of every readable `.py` file under `roots` (default `default_roots()`)."""
    for path in _walk(roots or default_roots(), (".py",)):
        text = _read(path)
        if text and text.strip():
            yield text


_PROSE = re.compile(r"[A-Za-z][A-Za-z ,.;:'()\-]{40,}")


def _is_prose(paragraph: str) -> bool:
    """Mostly sentences: letters and spaces dominate, few code or table characters."""
    if len(paragraph) < 200:
        return False
    letters = sum(ch.isalpha() or ch == " " for ch in paragraph)
    if letters / len(paragraph) < 0.85 or paragraph.count(".") < 2:
        return False
    return bool(_PROSE.search(paragraph)) and not paragraph.lstrip().startswith(("|", "$", ">>>", "..", "#"))


def _paragraphs(text: str) -> Iterator[str]:
    for block in re.split(r"\n\s*\n", text):
        paragraph = " ".join(line.strip() for line in block.splitlines()).strip()
        if _is_prose(paragraph):
            yield paragraph


def doc_paragraphs(roots: Iterable[Path] | None = None) -> Iterator[str]:
    """Prose paragraphs of documentation files and package descriptions, each once (exact duplicates dropped).

    Args:
        roots: folders to search (default `default_doc_roots()`).
    """
    seen: set[bytes] = set()
    for path in _walk(roots or default_doc_roots(), (".md", ".rst", ".txt", "METADATA")):
        text = _read(path)
        if not text:
            continue
        if path.name == "METADATA":
            # the long description follows the header block
            text = text.split("\n\n", 1)[1] if "\n\n" in text else ""
        for paragraph in _paragraphs(text):
            key = hashlib.sha1(paragraph.encode()).digest()
            if key not in seen:
                seen.add(key)
                yield paragraph


@dataclass(frozen=True)
class DocumentedFunction:
    """A public function with a docstring, as found in the source.

    Attributes:
        name: the function's name.
        signature: its `def` line(s), decorators excluded, e.g. `def f(x: int) -> int:`.
        docstring: its docstring, dedented.
        source: its whole source (signature, docstring and body).
    """

    name: str
    signature: str
    docstring: str
    source: str


def python_functions(
    roots: Iterable[Path] | None = None, max_per_file: int = 5
) -> Iterator[DocumentedFunction]:
    """Module-level public functions with a docstring of at least a sentence and a body of 3–40 lines."""
    for path in _walk(roots or default_roots(), (".py",)):
        text = _read(path)
        if not text:
            continue
        try:
            module = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        found = 0
        for node in module.body:
            if found >= max_per_file:
                break
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            docstring = ast.get_docstring(node)
            if not docstring or len(docstring) < 40 or not node.body or node.end_lineno is None:
                continue
            body_start = node.body[1].lineno if len(node.body) > 1 else None
            if body_start is None or not 3 <= node.end_lineno - body_start <= 40:
                continue
            signature = "\n".join(lines[node.lineno - 1 : node.body[0].lineno - 1]).rstrip()
            if not signature.startswith("def "):
                continue
            source = "\n".join(lines[node.lineno - 1 : node.end_lineno])
            found += 1
            yield DocumentedFunction(node.name, signature, docstring, source)
