"""``sandbus replay`` and ``sandbus run --debug`` as an operator meets them: their usage errors and notes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sandbus.host.sandbox.wasmscan import MalformedWasm, scan_wasm
from tests.conftest import ROOT
from tests.debugging.conftest import GUESTS


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


NO_DWARF = "has no debug info (DWARF)"


def test_run_debug_says_when_the_module_has_no_dwarf(debug_guest: Path, tmp_path: Path) -> None:
    """A module built without -g maps to no source line: ``run --debug`` says so once, and how to build
    it; a module with DWARF, or a run without --debug, gets no note."""
    clang = shutil.which("clang")
    assert clang is not None
    plain = tmp_path / "plain.wasm"  # as sandbus build builds an optimised plugin
    subprocess.run([clang, "--target=wasm32-wasi", "--sysroot=/usr", "-O2", "-Wl,--strip-all", "-mexec-model=reactor",
                    "-I", str(ROOT / "sdk" / "guest" / "c"), "-o", str(plain), str(GUESTS / "debug_me.c")],
                   check=True, capture_output=True)
    assert scan_wasm(plain.read_bytes()).debug_info is False
    assert scan_wasm(debug_guest.read_bytes()).debug_info is True
    noted = sandbus("run", "--debug", str(plain), "--input", "1", cwd=tmp_path)
    assert noted.returncode == 0, noted.stderr
    assert noted.stderr.count(NO_DWARF) == 1, noted.stderr
    assert "optimize = false" in noted.stderr
    assert noted.stdout.strip() == '{"n":21}'
    with_dwarf = sandbus("run", "--debug", str(debug_guest), "--input", "1", cwd=tmp_path)
    assert with_dwarf.returncode == 0, with_dwarf.stderr
    assert NO_DWARF not in with_dwarf.stderr
    without_debug = sandbus("run", str(plain), "--input", "1", cwd=tmp_path)
    assert NO_DWARF not in without_debug.stderr


@pytest.mark.parametrize("wasm", [b"", b"\0asm\x01\x00\x00\x00\x00\x85", b"\0asm\x01\x00\x00\x00\x00\x05\x09.debug",
                                  b"\0asm\x01\x00\x00\x00\x00\xff\xff\xff\xff\xff\xff"])
def test_a_broken_module_is_neither_with_nor_without_debug_info(wasm: bytes) -> None:
    with pytest.raises(MalformedWasm):
        scan_wasm(wasm)
