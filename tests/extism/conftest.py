"""Real Extism plugins for the tests: tests/extism/guests/*.ts built with Extism's AssemblyScript PDK
(``@extism/as-pdk``, pinned with the compiler by this directory's package-lock.json).

A build is cached under tests/extism/build/ by the digest of everything that decides its bytes (the source,
the lock file, the compiler flags), so a session compiles only what changed since the last one: asc takes
about a second per guest.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.bus.conftest import nats_server
from tests.extism.loopback import LoopbackServer

__all__ = ["nats_server"]  # the bus tests' real nats-server fixture, for the node tests here

HERE = Path(__file__).resolve().parent
GUESTS = HERE / "guests"
CACHE = HERE / "build"
ASC = HERE / "node_modules" / ".bin" / "asc"
_STAMP = HERE / "node_modules" / ".sandbus-installed"

#: How every test guest is compiled: the PDK's documented way (`asc --use abort=...`), with aborts as a bare
#: trap (no `env.abort` import: an Extism host provides none) and AssemblyScript's default incremental
#: runtime, whose garbage collector runs inside the plugin's own allocations.
ASC_FLAGS = ("-O3", "--use", "abort=")
#: Guests whose source lives elsewhere: the example plugin is tested as it ships (plugins/count_vowels).
SOURCES = {"count_vowels": HERE.parents[1] / "plugins" / "count_vowels" / "assembly" / "index.ts"}


def guest_source(name: str) -> Path:
    return SOURCES.get(name, GUESTS / f"{name}.ts")


def install_pdk() -> None:
    """``npm ci`` here when node_modules is missing or older than the lock file (a fresh clone)."""
    lock = HERE / "package-lock.json"
    if ASC.exists() and _STAMP.exists() and _STAMP.stat().st_mtime_ns >= lock.stat().st_mtime_ns:
        return
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.fail("the Extism guests need Node.js >= 20 and npm (apt-get install nodejs npm)")
    subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=HERE, check=True,
                   capture_output=True, timeout=600)
    _STAMP.touch()


def guest_digest(name: str) -> str:
    """What a guest's bytes depend on: its source, the pinned PDK and compiler, and the flags."""
    h = hashlib.sha256()
    for part in (guest_source(name).read_bytes(), (HERE / "package-lock.json").read_bytes(),
                 "\0".join(ASC_FLAGS).encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:32]


@pytest.fixture(scope="session")
def extism_guest() -> Callable[[str], Path]:
    """``extism_guest("reflect")``: the path of tests/extism/guests/reflect.ts (or of a :data:`SOURCES` entry)
    compiled (or cached)."""
    built: dict[str, Path] = {}

    def build(name: str) -> Path:
        if name in built:
            return built[name]
        out = CACHE / guest_digest(name) / f"{name}.wasm"
        if not out.exists():
            install_pdk()
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f"{name}.wasm.{os.getpid()}.tmp")
            # --path: a source outside this directory finds the PDK pinned here.
            subprocess.run([str(ASC), str(guest_source(name)), "-o", str(tmp), *ASC_FLAGS, "--path",
                            str(HERE / "node_modules")], cwd=HERE, check=True, capture_output=True, timeout=300)
            os.replace(tmp, out)  # a concurrent session sees the whole file or none
        built[name] = out
        return out

    return build


@pytest.fixture
def loopback() -> Iterator[LoopbackServer]:
    """A loopback HTTP server for the http plugin, stopped after the test."""
    server = LoopbackServer()
    yield server
    server.close()
