"""Assembling the Hugging Face Space from a source checkout (`make space`, `python -m hf_specssm_demo.space`).

A Space is a repository whose root holds its card (`README.md` with `sdk: gradio` and `app_file` in its
front matter), `app.py` and `requirements.txt`. The project's own README is not a Space card, so the card
lives in `space/README.md` and is copied to the Space's root here, beside `app.py`, the root
`requirements.txt`, the two packages (`app.py` imports them from the checkout), the shipped drafters in
`checkpoints/` and the license. Upload the folder with `hf upload --repo-type space USER/NAME FOLDER`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Space path → checkout path
FILES = {
    "README.md": "space/README.md",
    "app.py": "app.py",
    "requirements.txt": "requirements.txt",
    "LICENSE": "LICENSE",
}
FOLDERS = ("hf_specssm", "hf_specssm_demo", "checkpoints")


def _copy_folder(source: Path, destination: Path) -> None:
    """The files under `source` (no byte-code caches, no empty folders) into `destination`."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if not path.is_file() or "__pycache__" in relative.parts or path.suffix == ".pyc":
            continue
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def assemble(out_dir: str | Path, root: str | Path = REPO_ROOT) -> Path:
    """Write the Space's files from the checkout at `root` into `out_dir` (replaced when it exists).

    The folder is built as `<out_dir>.partial` and renamed at the end, so an interrupted run never
    leaves a half Space behind.

    Raises:
        FileNotFoundError: `root` lacks one of the files or folders a Space needs (not a source checkout).
    """
    root, out_dir = Path(root), Path(out_dir)
    missing = [name for name in [*FILES.values(), *FOLDERS] if not (root / name).exists()]
    if missing:
        raise FileNotFoundError(f"{root / missing[0]} is missing: assemble the Space from a source checkout")
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, source in FILES.items():
        shutil.copy2(root / source, staging / name)
    for folder in FOLDERS:
        _copy_folder(root / folder, staging / folder)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.replace(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """`python -m hf_specssm_demo.space OUT`: assemble the Space into OUT and say how to upload it."""
    parser = argparse.ArgumentParser(
        prog="python -m hf_specssm_demo.space",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("out", nargs="?", default="artifacts/space", help="folder to write")
    args = parser.parse_args(argv)
    folder = assemble(args.out)
    print(f"{folder}: upload it with `hf upload --repo-type space USER/NAME {folder}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
