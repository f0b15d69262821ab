"""docs/security.md names a test for every guarantee: each named test must exist, so the page cannot drift."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "security.md"
# `tests/x.py::test_name` or the shorthand `::test_name` (same file as the id before it on the row).
_ID = re.compile(r"`((?:tests/[\w/]+\.py)?)::(test_\w+)(?:\[[^\]]*\])?`")


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")}


def _referenced() -> list[tuple[str, str]]:
    refs = []
    for line in DOC.read_text().splitlines():
        current = ""
        for path, name in _ID.findall(line):
            current = path or current
            assert current, f"shorthand ::{name} with no file before it on: {line[:80]}"
            refs.append((current, name))
    return refs


def test_every_guarantee_names_tests_that_exist() -> None:
    refs = _referenced()
    assert len(refs) > 50, "the guarantee tables were not parsed"
    names: dict[str, set[str]] = {}
    missing = []
    for path, name in refs:
        file = ROOT / path
        if path not in names:
            names[path] = _test_names(file) if file.is_file() else set()
        if name not in names[path]:
            missing.append(f"{path}::{name}")
    assert not missing, f"docs/security.md names tests that do not exist: {missing}"
