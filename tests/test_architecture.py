"""The layers only point down: `lint-imports` checks the contracts in pyproject.toml, as a test, so that CI runs it.

The contracts (issue #20) are explained in ARCHITECTURE.md, which must list
the same ones. The tool runs from the repository root, as a developer would;
the test skips, saying why, when import-linter is not installed
(`pip install -e '.[test]'` brings it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The interpreter's own scripts directory first, so that this environment's lint-imports is the one run.
SEARCH_PATH = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])


def contracts() -> list[dict]:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["tool"]["importlinter"]["contracts"]


def test_the_import_contracts_are_kept():
    executable = shutil.which("lint-imports", path=SEARCH_PATH)
    if executable is None:
        pytest.skip("lint-imports is not installed (pip install -e '.[test]' installs import-linter)")
    result = subprocess.run(
        [executable], cwd=ROOT, env={**os.environ, "PATH": SEARCH_PATH}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"`lint-imports` failed:\n{result.stdout}{result.stderr}"
    assert f"Contracts: {len(contracts())} kept, 0 broken." in result.stdout, result.stdout


def test_architecture_md_lists_exactly_the_contracts():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    section = text.split("## Contracts", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- \*\*(.+?)\*\*", section, flags=re.MULTILINE)
    assert listed == [contract["name"] for contract in contracts()]
