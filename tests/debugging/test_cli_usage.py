"""``sandbus replay`` and ``sandbus run --debug`` as an operator meets them: their usage errors and notes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def sandbus(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandbus", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.mark.parametrize(("name", "content"), [("missing.json", None), ("bad.json", b"{not json"),
                                               ("empty.json", b"")])
def test_an_unreadable_or_invalid_record_is_a_usage_error(tmp_path: Path, name: str, content: bytes | None) -> None:
    if content is not None:
        (tmp_path / name).write_bytes(content)
    done = sandbus("replay", name, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("sandbus: ")
