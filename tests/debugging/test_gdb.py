"""gdb on a plugin's C source: ``sandbus run --debug`` under ``gdb -batch`` stops in the guest's function
on the right line, shows the guest frames, prints a local and steps to the next line -- the walk-through
of docs/guide.md ("Debugging a plugin with gdb"), run as written there."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.debugging.conftest import gdb_or_skip, marked_line

#: gdb and a Python process with wasmtime start in ~2 s here; a hung debugger must not hang the suite.
GDB_TIMEOUT_S = 120


def run_gdb(commands: list[str], argv: list[str], cwd: Path, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """``gdb -batch`` running ``commands`` on ``argv`` (a command line, or ``["-p", PID]`` to attach)."""
    gdb = gdb_or_skip()
    args = [gdb, "-batch", "-nx"]
    for command in commands:
        args += ["-ex", command]
    target = argv if argv[:1] == ["-p"] else ["--args", *argv]
    return subprocess.run([*args, *target], capture_output=True, text=True, timeout=GDB_TIMEOUT_S,
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


NODE_POLICY = '''
[capabilities]
allowed = ["compute"]

[debug]
plugins = ["debug_me"]
'''
NODE_MANIFEST = '''
[plugin]
name = "debug_me"
version = "1.0.0"
min_runtime_version = "0.1.0"

[capabilities]
required = ["compute"]
'''


def test_attach_to_a_node_that_serves_a_listed_plugin(debug_guest: Path, tmp_path: Path) -> None:
    """docs/guide.md "On a node": gdb attaches to a running node, the plugin's code (registered before it
    attached) is found, and a request over NATS stops on the breakpoint."""
    from sandbus.bus.server import NatsServer
    from tests.bus.conftest import NodeProcess

    gdb_or_skip()
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    shutil.copy(debug_guest, plugins / "debug_me.wasm")
    (plugins / "debug_me.toml").write_text(NODE_MANIFEST)
    (tmp_path / "policy.toml").write_text(NODE_POLICY)
    server = NatsServer().start()
    node = NodeProcess("dbg", plugins, server.url, tmp_path / "node.log")
    try:
        node.wait_ready()
        assert "plugin.debug_info debug_me" in node.output()  # the node's log says so
        reply = tmp_path / "reply.json"
        # The request starts from gdb, once the breakpoint is set; it waits while the call is stopped.
        request = (f"{sys.executable} -m sandbus request debug_me handle_request 1 -s {server.url} "
                   f"--timeout 60 > {reply} 2>&1 &")
        done = run_gdb(["set scheduler-locking step", "break add_one", f"shell {request}", "continue", "bt 2",
                        "print x", "next", "print y", "detach"], ["-p", str(node.proc.pid)], tmp_path)
        out = done.stdout
        first, second = marked_line("add_one first"), marked_line("add_one next")
        assert re.search(rf"Breakpoint 1, add_one \(x=20\) at \S*debug_me\.c:{first}\n", out), out
        assert re.search(r"#1 +0x[0-9a-f]+ in handle_request \(in=.*, len=1\)", out), out
        assert "$1 = 20\n" in out, out
        assert re.search(rf"\n{second}\t +return y;", out), out
        assert "$2 = 21\n" in out, out
        deadline = time.monotonic() + 60
        while '{"n":21}' not in (reply.read_text() if reply.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.05)  # the detached node answers the request; bounded
        assert '{"n":21}' in reply.read_text(), reply.read_text()
    finally:
        node.terminate()
        server.stop()
