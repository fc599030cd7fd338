"""The code against its linters, its formatter and its type checker, as ordinary tests, so that CI runs them.

Each test runs one tool the way a developer would, from the repository root with
the configuration in pyproject.toml, and skips, saying why, when the tool is not
installed (`pip install -e '.[test]'` brings them all), as asyncpg's
tests/test__sourcecode.py does. A failure shows the tool's own report.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import hotpath

ROOT = Path(__file__).resolve().parent.parent
# The interpreter's own scripts directory first, so that the tools of this
# environment are the ones run (and cython-lint finds the pycodestyle it calls).
SEARCH_PATH = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])


def run_tool(tool: str, *args: str) -> None:
    """Run `tool args...` in the repository root; fail with its output when it reports anything."""
    executable = shutil.which(tool, path=SEARCH_PATH)
    if executable is None:
        pytest.skip(f"{tool} is not installed (pip install -e '.[test]' installs it)")
    result = subprocess.run(
        [executable, *args],
        cwd=ROOT,
        env={**os.environ, "PATH": SEARCH_PATH},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"`{tool} {' '.join(args)}` failed:\n{result.stdout}{result.stderr}"


def test_ruff_lint():
    run_tool("ruff", "check", ".")


def test_ruff_format():
    run_tool("ruff", "format", "--check", ".")


def test_mypy_strict():
    """Strict over the packages listed in pyproject.toml's [tool.mypy] files."""
    run_tool("mypy")


def test_cython_lint():
    run_tool("cython-lint", "hotpath")


def test_stubs_match_the_compiled_modules():
    """hotpath/_dispatcher.pyi and _ring.pyi state what the built extensions really have."""
    if dict(hotpath.implementations())["compiled"] is None:
        pytest.skip(f"the compiled modules are not in use: {hotpath.COMPILED_UNAVAILABLE}")
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install -e '.[test]' installs it)")
    allowlist = "hotpath/stubtest-allowlist.txt"
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "--allowlist", allowlist, "hotpath._dispatcher", "hotpath._ring"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"stubtest failed:\n{result.stdout}{result.stderr}"
