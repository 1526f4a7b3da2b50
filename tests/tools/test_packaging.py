"""Packaging: the shipped drafters are found from the package (source checkout or installed data), never the
working folder; a transformers outside the tested range warns instead of failing the import."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import hf_specssm
from hf_specssm import shipped
from hf_specssm._compat import MAX_TRANSFORMERS_EXCLUSIVE, MIN_TRANSFORMERS, check_transformers_version
from hf_specssm.shipped import SHIPPED_DRAFTERS, shipped_drafter_candidates, shipped_drafter_path
from hf_specssm.tools.bench.command import add_arguments as add_bench_arguments
from hf_specssm.tools.cli import add_demo_arguments
from hf_specssm_demo.catalog import MAMBA_DRAFTER, Catalog

ROOT = Path(__file__).resolve().parents[2]


def test_found_from_another_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = shipped_drafter_path(must_exist=True)
    assert folder.is_absolute() and folder == ROOT / "checkpoints" / "mamba2-qwen2.5-coder"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert hf_specssm.shipped_drafter_path is shipped_drafter_path


def test_command_defaults_name_the_shipped_folder_wherever_they_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = str(shipped_drafter_path())
    demo = add_demo_arguments(argparse.ArgumentParser()).parse_args([])
    bench = add_bench_arguments(argparse.ArgumentParser()).parse_args([])
    assert demo.mamba_drafter == bench.mamba_drafter == expected
    assert (Path(expected) / "config.json").is_file()
    # the demo looks its drafter up under a root (tests point that root elsewhere)
    assert Path(Catalog().repo_root) / MAMBA_DRAFTER.local_path == Path(expected)


def _fake_installation(root: Path, name: str) -> tuple[Path, Path]:
    """A distribution as pip installs a wheel: `site/…dist-info/RECORD` lists data under `share/`."""
    site = root / "lib" / "site-packages"
    info = site / "hf_specssm-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hf_specssm\nVersion: 0.1.0\n")
    data = root / "share" / "hf_specssm" / "checkpoints" / name
    data.mkdir(parents=True)
    (data / "config.json").write_text("{}")
    record = [f"../../share/hf_specssm/checkpoints/{name}/config.json,,", "hf_specssm/__init__.py,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    return info, data


def test_installed_copy_is_found_through_the_distribution_record(tmp_path, monkeypatch):
    info, data = _fake_installation(tmp_path, "mamba2-qwen2.5-coder")
    # no source checkout beside the package, as after `pip install hf_specssm-….whl`
    monkeypatch.setattr(shipped, "_CHECKOUT", tmp_path / "no-checkout")
    monkeypatch.setattr(
        importlib.metadata, "distribution", lambda name: importlib.metadata.PathDistribution(info)
    )
    assert shipped_drafter_path(must_exist=True) == data.resolve()
    assert shipped_drafter_candidates() == [tmp_path / "no-checkout" / "mamba2-qwen2.5-coder", data.resolve()]


def test_a_missing_drafter_names_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "_CHECKOUT", tmp_path / "no-checkout")

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ValueError, match=r"in none of: .*no-checkout/mamba2-qwen2\.5-coder\. Install"):
        shipped_drafter_path(must_exist=True)
    # defaults computed before anything loads get the checkout's path, for the caller's own message
    assert shipped_drafter_path() == tmp_path / "no-checkout" / "mamba2-qwen2.5-coder"


def test_an_unknown_name_is_refused():
    with pytest.raises(
        ValueError, match=r"name='qwen' is not a shipped drafter; choose one of mamba2-qwen2\.5-coder"
    ):
        shipped_drafter_path("qwen")


@pytest.mark.parametrize("name", SHIPPED_DRAFTERS)
def test_wheels_carry_every_file_of_the_shipped_folders(name):
    """pyproject's data-files install each shipped folder whole where `_installed_folder` looks for it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    data_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    patterns = data_files[f"share/hf_specssm/checkpoints/{name}"]
    carried = {path for pattern in patterns for path in ROOT.glob(pattern)}
    folder = ROOT / "checkpoints" / name
    assert carried == {path for path in folder.iterdir() if path.is_file()}


@pytest.mark.parametrize("version", ["5.16.2", "5.24.0", "6.0.0"])
def test_transformers_outside_the_tested_range_warns(version):
    expected = (
        rf"tested with transformers >= {MIN_TRANSFORMERS} and < {MAX_TRANSFORMERS_EXCLUSIVE}; the installed "
        rf"version is {version}\."
    )
    with pytest.warns(UserWarning, match=expected):
        check_transformers_version(version)


@pytest.mark.parametrize("version", [str(MIN_TRANSFORMERS), "5.23.9"])
def test_transformers_inside_the_tested_range_is_quiet(version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_transformers_version(version)


@pytest.mark.slow
def test_import_succeeds_with_an_untested_transformers(tmp_path):
    script = (
        "import warnings, transformers\n"
        "transformers.__version__ = '5.99.0'\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import hf_specssm\n"
        "print([str(w.message) for w in caught if w.category is UserWarning and 'tested with' in str(w.message)])\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "the installed version is 5.99.0" in run.stdout
