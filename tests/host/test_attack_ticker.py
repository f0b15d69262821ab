"""The epoch ticker under an unlucky operator: every plugin's wall-clock timeout depends on it.

A guest that loops forever stops at its timeout in a real sandbox (pooled and per-call isolation),
with the native ticker and with the Python one, after ``os.fork``, while a Python thread spins in pure
Python (the native ticker never takes the GIL); an environment changed after the first engine adds no
second ticker (which would tick engines twice and halve their timeouts); a ticker that could not start
leaves no engine behind that nothing ticks. Each case runs in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: ``stop_time(isolation, timeout_s)``: seconds a real sandbox's ``loop_forever`` call ran before it
#: ended with ExecutionTimeoutError (tests/host/wat/adversary.wat); None for any other outcome
PRELUDE = textwrap.dedent('''
    import os, sys, threading, time, wasmtime
    from pathlib import Path
    from sandbus.host.sandbox import Limits, Sandbox, engine
    from sandbus.sdk.errors import ExecutionTimeoutError
    WASM = bytes(wasmtime.wat2wasm(Path("tests/host/wat/adversary.wat").read_text()))
    def stop_time(isolation, timeout_s):
        limits = Limits(timeout_s=timeout_s, fuel=10**15, max_instances=1, isolation=isolation)
        with Sandbox(WASM, name="spin", limits=limits) as sb:
            start = time.monotonic()
            try:
                sb.call("loop_forever", {})
            except ExecutionTimeoutError:
                return time.monotonic() - start
            return None
    def in_time(took, timeout_s):
        return took is not None and timeout_s * 0.9 <= took <= timeout_s + 1.5
''')


def child(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    """Run ``code`` after :data:`PRELUDE` in a fresh interpreter; its stdout, once it exited cleanly."""
    done = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("isolation", ["pooled", "per-call"])
def test_a_spinning_guest_stops_at_its_timeout_in_the_parent_and_a_forked_child(native: str, isolation: str) -> None:
    out = child(f'''
        took = stop_time({isolation!r}, 0.3)
        assert in_time(took, 0.3), took
        assert isinstance(engine._ticker, threading.Thread) is ({native!r} == "0"), engine._ticker
        pid = os.fork()
        if pid == 0:
            took = stop_time({isolation!r}, 0.3)
            os._exit(0 if in_time(took, 0.3) else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), in_time(stop_time({isolation!r}, 0.3), 0.3))
    ''', env={"SANDBUS_NATIVE": native})
    assert out.split() == ["0", "True"]


@pytest.mark.parametrize("native", ["1", "0"])
def test_a_timeout_fires_while_a_python_thread_spins_in_pure_python(native: str) -> None:
    out = child('''
        stop = False
        def burn():
            n = 0
            while not stop:
                n += 1
        spinners = [threading.Thread(target=burn) for _ in range(2)]
        for t in spinners:
            t.start()
        try:
            took = stop_time("pooled", 0.3)
        finally:
            stop = True
            for t in spinners:
                t.join()
        print(in_time(took, 0.3), took)
    ''', env={"SANDBUS_NATIVE": native})
    assert out.split()[0] == "True", out


def test_turning_the_helpers_off_after_the_first_engine_does_not_halve_timeouts() -> None:
    # Before: the second engine saw SANDBUS_NATIVE=0 and started a Python thread beside the native
    # one; both ticked the first engine, whose 0.5 s timeout fired after 0.25 s.
    out = child('''
        first = stop_time("pooled", 0.5)
        os.environ["SANDBUS_NATIVE"] = "0"
        engine.get_engine(Limits().stack_bytes, fuel=False)  # a new engine, made with the environment changed
        print(in_time(first, 0.5), in_time(stop_time("pooled", 0.5), 0.5),
              "sandbus-epoch" in {t.name for t in threading.enumerate()})
    ''')
    assert out.split() == ["True", "True", "False"]


def test_a_ticker_that_could_not_start_leaves_no_engine_that_nothing_ticks() -> None:
    # pthread_create fails under a pids limit (EAGAIN); the next load must not get an engine whose
    # guests never time out. The failure is injected: the process runs as root, where RLIMIT_NPROC
    # does not apply. A watchdog ends a guest that nothing ticks, so the "before" state fails in time.
    out = child('''
        from sandbus.host.sandbox import _ticker as native
        real_start = native.start
        def refuse(*args):
            raise OSError(11, "Resource temporarily unavailable")
        native.start = refuse
        try:
            engine.get_engine(512 * 1024)
            print("no error")
        except OSError:
            pass
        native.start = real_start
        handle = engine.get_engine(512 * 1024)
        def watchdog():
            time.sleep(3)
            for _ in range(10**6):
                handle.engine.increment_epoch()
        threading.Thread(target=watchdog, daemon=True).start()
        took = stop_time("pooled", 0.3)
        print(in_time(took, 0.3), native.running())
    ''')
    assert out.split() == ["True", "True"]


def test_processes_that_ran_guests_on_every_thread_exit_cleanly_every_time() -> None:
    # At exit the native thread is stopped before the interpreter frees the engines, while daemon
    # threads may still be inside a guest: no crash, no hang, exit code 0, twenty times over.
    code = '''
        for i in range(4):
            threading.Thread(target=stop_time, args=(("pooled", "per-call")[i % 2], 30.0), daemon=True).start()
        print(in_time(stop_time("per-call", 0.1), 0.1))
    '''
    for _ in range(20):
        assert child(code) == "True"


@pytest.mark.parametrize("native", ["1", "0"])
def test_a_guest_run_by_an_atexit_handler_still_times_out(native: str) -> None:
    # An application closes its sandboxes at exit, with a handler registered before the first engine
    # existed; closing runs each plugin's sandbus_shutdown. The native ticker used to be stopped by
    # an atexit handler of its own, registered later and so run first: a shutdown export that loops
    # then hung the process's exit forever (the Python ticker, a daemon thread, kept ticking).
    out = child('''
        import atexit
        text = Path("tests/host/wat/adversary.wat").read_text().replace(
            '(func (export "sandbus_abi_version")',
            '(func (export "sandbus_shutdown") (loop $l (br $l)))\\n  (func (export "sandbus_abi_version")', 1)
        boxes = []
        def close_all():
            start = time.monotonic()
            for sb in boxes:
                sb.close()
            print("closed", in_time(time.monotonic() - start, 0.3), flush=True)
        atexit.register(close_all)
        sb = Sandbox(bytes(wasmtime.wat2wasm(text)), name="stuck", limits=Limits(timeout_s=0.3, fuel=10**15,
                                                                                max_instances=1))
        boxes.append(sb)
        print("called", sb.call("echo", {"a": 1}) == {"a": 1})
    ''', env={"SANDBUS_NATIVE": native}, timeout=30)
    assert out.split() == ["called", "True", "closed", "True"]
