"""Hostile Python components (tests/guests/py_adversary, built with componentize-py) against the host's
promises: a trapping guest never takes the process down at exit, an error stays with the call that caused
it, and a directory grant is an identity that nothing the guest does to the tree can widen.

The component is built once for this module (~10 s) and compiled once into the session's module cache;
every other load, in this process or in the subprocesses below, comes from that cache.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime.component._enter as component_enter
from wasmtime._wasi import CUSTOM_OUTPUTS as wasi_callbacks

from sandbus.host.sandbox import Limits, Sandbox, SandboxBuilder
from sandbus.sdk.errors import MemoryLimitError, PayloadTooLargeError, SandbusError, SecurityViolationError, TrapError

ROOT = Path(__file__).resolve().parents[2]
GUEST = Path(__file__).resolve().parent / "py_adversary"
SDK = ROOT / "sdk" / "guest" / "python"
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def adversary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """py_adversary as a component, loaded once so that the session's module cache holds it compiled."""
    cpy = Path(sys.executable).with_name("componentize-py")
    if not cpy.exists():
        pytest.fail("componentize-py is missing from the venv (pip install componentize-py)")
    out = tmp_path_factory.mktemp("py-adversary") / "adv.wasm"
    with tempfile.TemporaryDirectory() as novenv:  # keep the build venv's site-packages out of the guest
        (Path(novenv) / "lib" / "site-packages").mkdir(parents=True)
        subprocess.run([str(cpy), "-q", "-d", str(SDK / "wit"), "-w", "plugin", "componentize", "app",
                        "-p", str(GUEST), "-p", str(SDK), "-o", str(out)],
                       check=True, capture_output=True, timeout=300,
                       env={**os.environ, "VIRTUAL_ENV": novenv, "PYTHONDONTWRITEBYTECODE": "1"})
    with Sandbox(out) as sb:  # compiles into the session cache
        assert sb.kind == "component"
    return out


def _call(sb: Sandbox, function: str, request: Any) -> Any:
    """The reply's envelope, or the name and text of the typed error the call ended with."""
    try:
        return sb.call(function, request)
    except SandbusError as e:
        return f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------
# 9: a component that traps must not make the process abort at exit
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)  # 8 interpreters; each loads two components from the cache
def test_f09_trapping_component_then_clean_exit(plugins_dir: Path, adversary: Path) -> None:
    """RecursionError, wasm stack exhaustion and MemoryError, 9 traps per process, then exit (with the
    sandboxes closed, or left for the interpreter's shutdown to collect): 8 processes, every one exits 0
    with no Rust panic. Before the fix, a guest output callback ran on a wasmtime thread during
    interpreter shutdown and the process aborted (exit 134) in about a quarter of these runs."""
    failures = []
    for run in range(8):
        ending = "close" if run % 2 == 0 else "leave"
        proc = subprocess.run([sys.executable, "-m", "tests.guests.f09_exit_probe", str(plugins_dir / "py_echo.wasm"),
                               str(adversary), "3", ending],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0 or "cannot unwind" in proc.stderr:
            failures.append((run, ending, proc.returncode, proc.stderr[-600:]))
        else:
            assert proc.stdout.split() == ["TrapError", "StackLimitError"] * 3 + ["MemoryLimitError"] * 3
    assert failures == []


def test_f09_guest_output_is_read_on_the_calling_thread(adversary: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No Python runs on wasmtime's threads: no output callback is handed to wasmtime-py at all, what
    the guest wrote is logged by the thread that made the call, and it is all there when the call's
    error is built (the trap names the guest's MemoryError). This is the root of the abort at exit."""
    caplog.set_level(logging.INFO, logger="sandbus.plugin")
    with Sandbox(adversary, limits=Limits(memory_bytes=32 * MIB)) as sb:
        assert wasi_callbacks.handles == {}
        caller = threading.get_ident()
        with pytest.raises(MemoryLimitError):
            sb.call("hoard", {})
        with pytest.raises(TrapError, match=r"RecursionError: on purpose"):
            sb.call("crash", {})
    records = [r for r in caplog.records if r.name.startswith("sandbus.plugin") and "[stderr]" in r.getMessage()]
    assert records, "the guest's tracebacks reached no log"
    assert {r.thread for r in records} == {caller}
    assert any("MemoryError" in r.getMessage() for r in records)


def test_f09_guest_output_is_bounded(adversary: Path) -> None:
    """What a call writes waits in a bounded pipe: 20 MB of stdout ends the call with the log cap's
    PayloadTooLargeError (no hang, no unbounded buffer), and the next call is clean."""
    with Sandbox(adversary, limits=Limits(log_bytes=4096)) as sb:
        with pytest.raises(PayloadTooLargeError, match="log"):
            sb.call("spew", {"bytes": 20 * MIB})
        assert sb.call("spew", {"bytes": 100})["result"] == {"written": 100, "error": None}


def test_f09_cli_exit_codes_after_a_trap(adversary: Path) -> None:
    """`sandbus run` on a component that runs out of memory or of wasm stack exits 3 (a limit), one that
    traps (CPython's own RecursionError) exits 1, and none aborts."""
    for function, request, code in (("hoard", "{}", 3), ("recurse", '{"limit": 1000000}', 3), ("recurse", "{}", 1)):
        proc = subprocess.run([sys.executable, "-m", "sandbus", "run", str(adversary), "--function", function,
                               "--input", request, "--memory-mb", "32"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert (function, request, proc.returncode) == (function, request, code), proc.stderr[-600:]
        assert "cannot unwind" not in proc.stderr


# ---------------------------------------------------------------------------
# 2: an error belongs to the call that caused it
# ---------------------------------------------------------------------------


def test_f02_component_errors_never_come_from_the_process_wide_slot(adversary: Path) -> None:
    """wasmtime-py re-raises, on *any* failing component call, the last exception a linked function
    raised anywhere in the process (one global slot). A plugin that traps while another tenant's error
    sits in that slot gets its own trap, and a denied host call leaves nothing in the slot."""
    with Sandbox(adversary, name="tenant_a") as a, Sandbox(adversary, name="tenant_b") as b:
        planted = SecurityViolationError("environment variable 'SECRET_A' was not granted", plugin="tenant_a")
        component_enter.LAST_EXCEPTION = planted  # what tenant A's denied call left there, before the fix
        try:
            with pytest.raises(TrapError) as trapped:
                b.call("crash", {})
        finally:
            component_enter.LAST_EXCEPTION = None
        assert trapped.value.plugin == "tenant_b"
        assert "SECRET_A" not in str(trapped.value)
        with pytest.raises(SecurityViolationError, match="SECRET_A") as denied:
            a.call("env", {"name": "SECRET_A"})
        assert denied.value.plugin == "tenant_a"
        assert component_enter.LAST_EXCEPTION is None


def test_f02_component_errors_stay_with_their_caller(adversary: Path) -> None:
    """Two threads: A's plugin asks for a variable it was not granted (a SecurityViolationError raised
    in a host function), B's plugin traps (a wasm error, nothing raised in Python). Each caller gets its
    own error, every time."""
    rounds = 150
    wrong: list[str] = []
    barrier = threading.Barrier(2)

    def loop(sb: Sandbox, function: str, request: Any, check: Callable[[BaseException], bool]) -> None:
        barrier.wait(timeout=30)
        for _ in range(rounds):
            try:
                sb.call(function, request)
                wrong.append(f"{function} succeeded")
            except SandbusError as e:
                if not check(e):
                    wrong.append(f"{function}: {type(e).__name__}: {e}")

    with Sandbox(adversary, name="tenant_a") as a, Sandbox(adversary, name="tenant_b") as b:
        threads = [
            threading.Thread(target=loop, args=(a, "env", {"name": "SECRET_A"}, lambda e: isinstance(
                e, SecurityViolationError) and "SECRET_A" in str(e) and e.plugin == "tenant_a")),
            threading.Thread(target=loop, args=(b, "crash", {}, lambda e: type(e) is TrapError
                                                and e.plugin == "tenant_b")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
    assert wrong == []


# ---------------------------------------------------------------------------
# 1: a grant is an identity; nested grants and a guest that rewrites the tree
# ---------------------------------------------------------------------------


@pytest.fixture
def nested(tmp_path: Path) -> Iterator[Path]:
    """tmp/work (to be granted writable) holding out/ (granted on its own) and, beside work, a secret."""
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    (work / "out" / "marker").write_text("inner grant")
    (tmp_path / "secret.txt").write_text("outside every grant")
    yield work
    shutil.rmtree(tmp_path, ignore_errors=True)


# How a guest can replace /work/out, and what the granted directory holds afterwards. "/work/./out"
# reaches it through the outer grant (wasi-libc picks the preopen by the longest string prefix, and
# "/work/out" itself is the inner grant's root, which cannot be renamed through itself).
_REPLACE: dict[str, tuple[list[tuple[str, str, str]], list[str]]] = {
    "rename_then_symlink": ([("rename", "/work/./out", "/work/moved"),
                             ("symlink", "/work/./out", "../../../../../..")], ["marker"]),
    "unlink_then_symlink": ([("unlink", "/work/./out/marker", ""), ("rmdir", "/work/./out", ""),
                             ("symlink", "/work/./out", "..")], []),
    "replace_by_new_dir": ([("rename", "/work/./out", "/work/moved"), ("mkdir", "/work/./out", "")], ["marker"]),
}


@pytest.mark.parametrize("inner_writable", [False, True], ids=["inner_ro", "inner_rw"])
@pytest.mark.parametrize("attack", sorted(_REPLACE))
def test_f01_component_nested_grant_survives_tree_changes(adversary: Path, nested: Path, attack: str,
                                                          inner_writable: bool) -> None:
    """The guest rewrites the tree under its grants, traps on purpose, and the pool builds a new
    instance: that instance's /work/out is still the directory granted at load (moved, or removed and
    empty), never what the name now points to."""
    steps, expected = _REPLACE[attack]
    builder = SandboxBuilder(adversary).allow_write(nested, guest="/work")
    builder = (builder.allow_write if inner_writable else builder.allow_read)(nested / "out", guest="/work/out")
    with builder.build() as sb:
        assert sb.call("fs", {"op": "list", "path": "/work/out"})["result"] == {"names": ["marker"]}
        for op, path, to in steps:
            assert sb.call("fs", {"op": op, "path": path, "to": to})["success"], (op, path)
        with pytest.raises(TrapError):
            sb.call("crash", {})
        assert sb.pool.replaced >= 1
        listing = _call(sb, "fs", {"op": "list", "path": "/work/out"})
        secret = _call(sb, "fs", {"op": "read", "path": "/work/out/secret.txt"})
        deep = _call(sb, "fs", {"op": "read", "path": "/work/out/etc/hostname"})
        _call(sb, "fs", {"op": "write", "path": "/work/out/escaped.txt", "data": "x"})
    assert isinstance(listing, dict), listing
    assert listing["result"] == {"names": expected}
    for reply in (secret, deep):
        assert not (isinstance(reply, dict) and reply["success"]), reply
    # A write may only land in the granted directory itself (moved to work/moved), and only if writable.
    allowed = {nested / "moved" / "escaped.txt"} if inner_writable else set()
    assert set(nested.parent.rglob("escaped.txt")) <= allowed
    assert not Path("/escaped.txt").exists()
