"""Shared fixtures: real plugins built from source, real C and WAT guests, an isolated module cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import wasmtime

from sandbus.host.sandbox import AuditEvent

ROOT = Path(__file__).resolve().parent.parent
PLUGINS_BUILD = ROOT / "plugins" / "build"
GUESTS = ROOT / "tests" / "host" / "guests"
WAT = ROOT / "tests" / "host" / "wat"


#: The guest ABI v1 exports of a hand-written WAT test guest: its memory and a bump allocator that
#: starts over at every dealloc. Put inside ``(module ...)`` after the imports.
ABI_PRELUDE = """  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (func (export "sandbus_abi_version") (result i32) (i32.const 1))
  (func (export "sandbus_alloc") (param $n i32) (result i32)
    (local $p i32) (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n))) (local.get $p))
  (func (export "sandbus_dealloc") (param i32 i32) (global.set $heap (i32.const 1024)))
"""


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test session gets its own module cache, so no test depends on what an earlier run left."""
    cache = tmp_path_factory.mktemp("module-cache")
    before = os.environ.get("SANDBUS_CACHE_DIR")
    os.environ["SANDBUS_CACHE_DIR"] = str(cache)
    yield cache
    if before is None:
        os.environ.pop("SANDBUS_CACHE_DIR", None)
    else:
        os.environ["SANDBUS_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def plugins_dir() -> Path:
    """plugins/build, built from source (incrementally) by the project's build script."""
    subprocess.run(["bash", str(ROOT / "plugins" / "build.sh")], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHON": sys.executable}, capture_output=True)
    return PLUGINS_BUILD


@pytest.fixture(scope="session")
def c_guest(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Compile tests/host/guests/<name>.c with clang + wasi-libc; cached for the session."""
    out_dir = tmp_path_factory.mktemp("guests")
    built: dict[str, Path] = {}
    clang = shutil.which("clang")
    if clang is None:
        pytest.fail("clang is missing: run `make toolchain` (apt-get install clang lld wasi-libc ...)")

    def build(name: str) -> Path:
        if name not in built:
            out = out_dir / f"{name}.wasm"
            subprocess.run(
                [clang, "--target=wasm32-wasi", "--sysroot=/usr", "-O2", "-mexec-model=reactor",
                 "-Wl,--strip-all", "-Wall", "-Wextra", "-Werror", "-I", str(ROOT / "sdk" / "guest" / "c"),
                 "-o", str(out), str(GUESTS / f"{name}.c")],
                check=True, capture_output=True,
            )
            built[name] = out
        return built[name]

    return build


@pytest.fixture(scope="session")
def c_guest_flags(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Compile tests/bus/guests/<source>.c under an output name, with extra clang flags."""
    out_dir = tmp_path_factory.mktemp("bus-guests")

    def build(source: str, name: str, *flags: str) -> Path:
        out = out_dir / f"{name}.wasm"
        if not out.exists():
            subprocess.run(
                ["clang", "--target=wasm32-wasi", "--sysroot=/usr", "-O2", "-mexec-model=reactor",
                 "-Wl,--strip-all", "-Wall", "-Wextra", "-Werror", "-I", str(ROOT / "sdk" / "guest" / "c"),
                 *flags, "-o", str(out), str(ROOT / "tests" / "bus" / "guests" / f"{source}.c")],
                check=True, capture_output=True,
            )
        return out

    return build


@pytest.fixture(scope="session")
def wat() -> Callable[[str], bytes]:
    """The bytes of tests/host/wat/<name>.wat."""

    def load(name: str) -> bytes:
        return bytes(wasmtime.wat2wasm((WAT / f"{name}.wat").read_text()))

    return load


class AuditLog(list[AuditEvent]):
    """Collects audit events; ``kinds()`` for compact assertions."""

    def __call__(self, event: AuditEvent) -> None:
        self.append(event)

    def kinds(self) -> list[str]:
        return [e.kind for e in self]


@pytest.fixture
def audit() -> AuditLog:
    return AuditLog()
