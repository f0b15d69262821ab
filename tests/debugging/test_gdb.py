"""gdb on a plugin's C source: ``sandbus run --debug`` under ``gdb -batch`` stops in the guest's function
on the right line, shows the guest frames, prints a local and steps to the next line -- the walk-through
of docs/guide.md ("Debugging a plugin with gdb"), run as written there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.debugging.conftest import gdb_or_skip, marked_line

#: gdb and a Python process with wasmtime start in ~2 s here; a hung debugger must not hang the suite.
GDB_TIMEOUT_S = 120


def run_gdb(commands: list[str], argv: list[str], cwd: Path, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    gdb = gdb_or_skip()
    args = [gdb, "-batch", "-nx"]
    for command in commands:
        args += ["-ex", command]
    return subprocess.run([*args, "--args", *argv], capture_output=True, text=True, timeout=GDB_TIMEOUT_S,
                          cwd=cwd, env={**os.environ, **(env or {})})


def sandbus_run(plugin: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sandbus", "run", "--debug", str(plugin), "--input", "1", *extra]


def test_breakpoint_backtrace_locals_and_next(debug_guest: Path, tmp_path: Path) -> None:
    done = run_gdb(["set breakpoint pending on", "break add_one", "run", "bt 2", "print x", "next", "print y",
                    "continue"], sandbus_run(debug_guest), tmp_path)
    out = done.stdout
    first, second, caller = marked_line("add_one first"), marked_line("add_one next"), marked_line("caller")
    # Stopped in the guest's function, with its argument, on the line of its first statement.
    assert re.search(rf"Breakpoint 1, add_one \(x=20\) at \S*debug_me\.c:{first}\n", out), out
    # The backtrace runs through the guest: add_one, called from handle_request on the calling line.
    assert re.search(rf"#0 +add_one \(x=20\) at \S*debug_me\.c:{first}\n", out), out
    assert re.search(rf"#1 +0x[0-9a-f]+ in handle_request \(in=.*, len=1\) at \S*debug_me\.c:{caller}\n", out), out
    # A local (the argument), then `next` to the following line, where y holds x + 1.
    assert "$1 = 20\n" in out, out
    assert re.search(rf"\n{second}\t +return y;", out), out
    assert "$2 = 21\n" in out, out
    # After `continue` the call ends as without the debugger: the reply, and a normal exit.
    assert '{"n":21}' in out, out
    assert re.search(r"\[Inferior 1 \(process \d+\) exited normally\]", out), out
    assert "SIGSEGV" not in out, out
    assert "SIGABRT" not in out, out


def test_every_session_steps_cleanly(debug_guest: Path, tmp_path: Path) -> None:
    """A second session in the same module cache steps as the first: code with debug info is never written
    to the cache, where it would carry the breakpoints the first debugger patched into it."""
    cache = tmp_path / "cache"
    for _ in range(2):
        done = run_gdb(["set breakpoint pending on", "break add_one", "run", "next", "print y", "continue"],
                       sandbus_run(debug_guest), tmp_path, env={"SANDBUS_CACHE_DIR": str(cache)})
        assert "$1 = 21\n" in done.stdout, done.stdout
        assert "exited normally" in done.stdout, done.stdout
    written = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    assert not any("debug" in name for name in written), written


def test_without_debug_the_breakpoint_never_resolves(debug_guest: Path, tmp_path: Path) -> None:
    """Without --debug nothing is registered with the debugger: the pending breakpoint is never hit."""
    argv = [a for a in sandbus_run(debug_guest) if a != "--debug"]
    done = run_gdb(["set breakpoint pending on", "break add_one", "run"], argv, tmp_path)
    assert "Breakpoint 1, add_one" not in done.stdout, done.stdout
    assert '{"n":21}' in done.stdout
    assert "exited normally" in done.stdout, done.stdout
