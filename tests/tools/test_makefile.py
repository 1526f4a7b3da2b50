"""`make run` installs only what it runs; the test targets install the test tools (dry runs, nothing built)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _dry_run(target: str, venv: Path) -> str:
    """What `make TARGET` would run for a fresh venv at `venv` (`make -n`: nothing is executed).

    CI runs the suite from inside `make test`: the enclosing make's variables would turn this into a sub-make
    (which prints "Entering directory" lines and inherits its flags), so they are dropped.
    """
    env = {
        k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES"}
    }
    completed = subprocess.run(
        ["make", "--no-print-directory", "-n", target, f"VENV={venv}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return completed.stdout


def _installs(commands: str) -> list[str]:
    return [line for line in commands.splitlines() if "pip install" in line and "-e" in line]


def test_make_run_installs_the_package_with_the_bench_extra_only(tmp_path):
    commands = _dry_run("run", tmp_path / "venv")
    assert _installs(commands) == [f'{tmp_path}/venv/bin/pip install -q -e ".[bench]"']
    assert "triton" not in commands
    assert commands.rstrip().endswith("hf-specssm demo")


def test_the_test_targets_install_the_test_tools(tmp_path):
    (install,) = _installs(_dry_run("test-fast", tmp_path / "venv"))
    assert ".[test,demo,docs,bench]" in install


def test_make_demo_installs_the_demo_extra(tmp_path):
    assert _installs(_dry_run("demo", tmp_path / "venv")) == [
        f'{tmp_path}/venv/bin/pip install -q -e ".[demo]"'
    ]
