"""Fixtures of the guest-debugging tests: a C plugin built with DWARF, and gdb in batch mode."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

GUESTS = Path(__file__).resolve().parent / "guests"


def build_debug_guest(name: str, out_dir: Path) -> Path:
    """tests/debugging/guests/<name>.c built as the guide says: ``-g -O0``, nothing stripped."""
    clang = shutil.which("clang")
    if clang is None:
        pytest.fail("clang is missing: run `make toolchain` (apt-get install clang lld wasi-libc ...)")
    out = out_dir / f"{name}.wasm"
    subprocess.run([clang, "--target=wasm32-wasi", "--sysroot=/usr", "-g", "-O0", "-mexec-model=reactor",
                    "-Wall", "-Wextra", "-Werror", "-I", str(ROOT / "sdk" / "guest" / "c"), "-o", str(out),
                    str(GUESTS / f"{name}.c")], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def debug_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """debug_me.c: a function to break in, a local to print, a line to step to."""
    return build_debug_guest("debug_me", tmp_path_factory.mktemp("debug-guest"))


@pytest.fixture(scope="session")
def dice_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dice.c: reads the clock and random bytes, traps when its draw is below the input."""
    return build_debug_guest("dice", tmp_path_factory.mktemp("dice-guest"))


def marked_line(marker: str, source: str = "debug_me.c") -> int:
    """The line of ``source`` whose comment says ``line: <marker>`` (the test does not hard-code numbers)."""
    for number, text in enumerate((GUESTS / source).read_text().splitlines(), start=1):
        if re.search(rf"/\* line: {re.escape(marker)} \*/", text):
            return number
    raise AssertionError(f"no line marked {marker!r}")


def gdb_or_skip() -> str:
    """The gdb binary; skips (saying how to install it) when the machine has none -- except in CI, where
    ``make test`` installs it, so a missing gdb is a broken install step, not a reason to skip."""
    gdb = shutil.which("gdb")
    if gdb is None:
        if os.environ.get("CI"):
            pytest.fail("gdb is not installed, and CI must run the debugger tests (make test-tools installs it)")
        pytest.skip("gdb is not installed (Debian: apt-get install gdb)")
    return gdb


@pytest.fixture(scope="session")
def spin_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """spin.c: reads the clock once, then counts for as many steps as its input says (forever if < 0)."""
    return build_debug_guest("spin", tmp_path_factory.mktemp("spin-guest"))


@pytest.fixture(scope="session")
def counter_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """counter.c: counts its calls in memory and traps on the second."""
    return build_debug_guest("counter", tmp_path_factory.mktemp("counter-guest"))
