"""The epoch ticker: a native thread when the helper is built, a Python thread otherwise, and in every
case a guest that spins is stopped (after a fork, with more engines than the native ticker holds, with
the helper turned off), and a process that used it exits cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from sandbus.host.sandbox import engine

ROOT = Path(__file__).resolve().parents[2]

#: run in a fresh interpreter: ``spins_stopped(handle)`` is True when a guest looping forever on
#: ``handle``'s engine is interrupted by its epoch deadline (a few ticks) within a bounded time
PRELUDE = textwrap.dedent('''
    import os, sys, threading, time, wasmtime
    from sandbus.host.sandbox import engine
    WAT = '(module (func (export "spin") (loop $l (br $l))))'
    def spins_stopped(handle):
        store = wasmtime.Store(handle.engine)
        if handle.fuel:
            store.set_fuel(2**62)
        store.set_epoch_deadline(3)
        inst = wasmtime.Instance(store, wasmtime.Module(handle.engine, WAT), [])
        start = time.monotonic()
        try:
            inst.exports(store)["spin"](store)
        except wasmtime.Trap as e:
            return "interrupt" in str(e) and time.monotonic() - start < 5
        return False
''')


def run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, **(env or {})})


def assert_prints_ok(code: str, env: dict[str, str] | None = None) -> None:
    """``code`` (after :data:`PRELUDE`) ran to its end, printed "ok", and its interpreter exited cleanly."""
    done = run(textwrap.dedent(code) + '\nprint("ok")\n', env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_ticker_is_native_and_no_python_thread_ticks() -> None:
    if engine._native_ticker() is None:
        pytest.fail("the compiled ticker is not built: pip install -e . builds host/sandbox/_ticker.c")
    engine.get_engine(512 * 1024)
    native = engine._ticker
    assert native is engine._native_ticker()
    assert native is not None
    assert not isinstance(native, threading.Thread)
    assert native.running()
    assert "sandbus-epoch" not in {t.name for t in threading.enumerate()}


def test_a_spinning_guest_is_stopped_and_the_process_exits_cleanly() -> None:
    assert_prints_ok('''
        h = engine.get_engine(512 * 1024)
        assert not isinstance(engine._ticker, threading.Thread), engine._ticker
        assert spins_stopped(h) and spins_stopped(engine.get_engine(1024 * 1024, fuel=False))
    ''')


def test_a_forked_child_ticks_again() -> None:
    done = run('''
        h = engine.get_engine(512 * 1024)
        pid = os.fork()
        if pid == 0:
            os._exit(0 if spins_stopped(h) else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), spins_stopped(h))
    ''')
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "True"]


def test_more_engines_than_the_native_ticker_holds_fall_back_to_a_python_thread() -> None:
    assert_prints_ok('''
        handles = [engine.get_engine(64 * 1024 + i * 4096) for i in range(70)]
        assert isinstance(engine._ticker, threading.Thread), engine._ticker
        assert spins_stopped(handles[0]) and spins_stopped(handles[-1])
    ''')


def test_with_the_helpers_turned_off_a_python_thread_ticks() -> None:
    assert_prints_ok('''
        h = engine.get_engine(512 * 1024)
        assert isinstance(engine._ticker, threading.Thread), engine._ticker
        assert spins_stopped(h)
    ''', env={"SANDBUS_NATIVE": "0"})
