"""The layers only point down: `lint-imports` checks the contracts in pyproject.toml, as a test, so that CI runs it.

The contracts (issue #20) are explained in ARCHITECTURE.md, which must list
the same ones. The tool runs from the repository root, as a developer would;
the test skips, saying why, when import-linter is not installed
(`pip install -e '.[test]'` brings it).
"""

from __future__ import annotations

import ast
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


# -- all SQL lives in ledger/ ----------------------------------------------------------------

#: The packages that reach the ledger only through ledger/'s functions.
OUTSIDE_LEDGER = ("daemon", "actions", "bench")
#: asyncpg's methods that run SQL text given as their first argument (Connection and Pool alike).
QUERY_METHODS = frozenset(
    {"execute", "executemany", "fetch", "fetchrow", "fetchval", "prepare", "cursor", "copy_from_query"}
)
#: SQL as we write it (keywords in capitals); prose in docstrings and comments is not looked at.
SQL_TEXT = re.compile(
    r"\bSELECT\b[\s\S]*\bFROM\b|\bINSERT\s+INTO\b|\bUPDATE\s+[\w.]+\s+(\w+\s+)?SET\b|\bDELETE\s+FROM\b"
    r"|\bTRUNCATE\b|\bCREATE\s+(TABLE|INDEX|SCHEMA|DATABASE)\b|\bALTER\s+TABLE\b|\bDROP\s+(TABLE|DATABASE)\b"
    r"|\b(NOTIFY|LISTEN)\s+\w|\bSELECT\s+(pg_|extract|now\(|count\(|1\b)|\bWITH\s+\w+\s+AS\s*\("
)


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the string nodes that are docstrings (of the module, a class or a function)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def sql_outside_ledger(source: str, filename: str) -> list[str]:
    """Where `source` holds SQL: a string (not a docstring) that reads as SQL, or an asyncpg query
    method called with text (a literal, an f-string, or a name bound to a string in the module).

    Either is enough: SQL text kept in a constant and run elsewhere is found by the first, a query
    assembled in the call by the second.
    """
    tree = ast.parse(source, filename)
    docstrings = _docstrings(tree)
    constants = {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant | ast.JoinedStr)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if SQL_TEXT.search(node.value):
                found.append(f"{filename}:{node.lineno}: SQL text {node.value.strip()[:60]!r}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            query = node.args[0]
            text = isinstance(query, ast.JoinedStr | ast.BinOp) or (
                isinstance(query, ast.Constant) and isinstance(query.value, str)
            )
            if node.func.attr in QUERY_METHODS and (text or (isinstance(query, ast.Name) and query.id in constants)):
                found.append(f"{filename}:{node.lineno}: .{node.func.attr}() called with SQL text")
    return found


def test_no_sql_outside_ledger():
    """Issue #20: every SQL statement is a named function of ledger/; daemon, actions and bench call those."""
    found = []
    for package in OUTSIDE_LEDGER:
        for path in sorted((ROOT / package).rglob("*.py")):
            found += sql_outside_ledger(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, "SQL outside ledger/ (move it into a ledger module as a named function):\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        'rows = await conn.fetch("SELECT a FROM ordo.t")',
        '_Q = """\nSELECT count(*)\nFROM ordo.executions\n"""',
        '_Q = "DELETE FROM ordo.timers WHERE x = $1"',
        'await pool.execute(f"NOTIFY {channel}")',
        '_Q = "x"\nawait conn.fetchval(_Q, 1)',
        'await conn.execute("UPDATE ordo.partitions SET owner = NULL")',
        'since = await pool.fetchval("SELECT extract(epoch FROM now())::float8")',
    ],
)
def test_the_sql_guard_finds_sql_however_it_is_written(source):
    assert sql_outside_ledger(source, "example.py")


@pytest.mark.parametrize(
    "source",
    [
        '"""Claims partitions (`FOR UPDATE SKIP LOCKED`) and reads ordo.timers; select from the list."""',
        "msgs = await sub.fetch(batch, timeout=1.0)",
        'log = logging.getLogger("ordo.worker")',
        'METHODS = frozenset({"GET", "DELETE", "PUT"})',
        "rows = await history.transitions(conn, execution_id)",
    ],
)
def test_the_sql_guard_leaves_prose_and_other_fetches_alone(source):
    assert sql_outside_ledger(source, "example.py") == []
