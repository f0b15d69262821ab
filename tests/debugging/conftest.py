"""Fixtures of the guest-debugging tests: a C plugin built with DWARF, and gdb in batch mode."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

GUESTS = Path(__file__).resolve().parent / "guests"


@pytest.fixture(scope="session")
def debug_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/debugging/guests/debug_me.c built as the guide says: ``-g -O0``, nothing stripped."""
    clang = shutil.which("clang")
    if clang is None:
        pytest.fail("clang is missing: run `make toolchain` (apt-get install clang lld wasi-libc ...)")
    out = tmp_path_factory.mktemp("debug-guest") / "debug_me.wasm"
    subprocess.run([clang, "--target=wasm32-wasi", "--sysroot=/usr", "-g", "-O0", "-mexec-model=reactor",
                    "-Wall", "-Wextra", "-Werror", "-I", str(ROOT / "sdk" / "guest" / "c"), "-o", str(out),
                    str(GUESTS / "debug_me.c")], check=True, capture_output=True)
    return out


def marked_line(marker: str) -> int:
    """The line of debug_me.c whose comment says ``line: <marker>`` (the test does not hard-code numbers)."""
    for number, text in enumerate((GUESTS / "debug_me.c").read_text().splitlines(), start=1):
        if re.search(rf"/\* line: {re.escape(marker)} \*/", text):
            return number
    raise AssertionError(f"no line marked {marker!r}")


def gdb_or_skip() -> str:
    """The gdb binary; skips (saying how to install it) when the machine has none."""
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.skip("gdb is not installed (Debian: apt-get install gdb)")
    return gdb
