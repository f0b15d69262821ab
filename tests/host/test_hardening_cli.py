"""The CLI under attack: guest output and remote text shown as data, bad usage refused as such, and no
input read past its cap."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import wasmtime

from sandbus.host.sandbox import Capabilities, Limits, Sandbox
from sandbus.host.sandbox.audit import Auditor
from sandbus.host.sandbox.component import ComponentCallContext, _CallState, _output_sink
from sandbus.host.sandbox.guest_text import escape_controls, guest_lines

SANDBUS = Path(sys.executable).parent / "sandbus"

#: What a hostile guest writes: a clear-screen, a window-title change, a forged sandbus line after a
#: newline, a carriage return meant to overwrite the record's prefix, and a C1 CSI (U+009B) in UTF-8.
ATTACK = ("\x1b[2J\x1b]0;pwned\x07\nsandbus: plugin 'other': forged\r\nINFO sandbus.audit: forged too\r"
          "sandbus: overwritten \u009b31m red\u202eevil").encode()

# Control bytes a terminal acts on; none may reach it from a guest.
TERMINAL_CONTROLS = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]|\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9\xaa-\xae]")


def _wat_bytes(data: bytes) -> str:
    return "".join(f"\\{b:02x}" for b in data)


FORGER_WAT = f"""
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "sandbus_v1" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 2)
  (data (i32.const 64) "{{\\"ok\\":true}}")
  (data (i32.const 1024) "{_wat_bytes(ATTACK)}")
  (global $heap (mut i32) (i32.const 8192))
  (func $ok (result i64) (i64.or (i64.shl (i64.const 64) (i64.const 32)) (i64.const 11)))
  (func (export "sandbus_abi_version") (result i32) (i32.const 1))
  (func (export "sandbus_alloc") (param $n i32) (result i32)
    (local $p i32) (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n))) (local.get $p))
  (func (export "sandbus_dealloc") (param i32 i32) (global.set $heap (i32.const 8192)))
  (func $write (param $fd i32)
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const {len(ATTACK)}))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "forge_stderr") (param i32 i32) (result i64) (call $write (i32.const 2)) (call $ok))
  (func (export "forge_stdout") (param i32 i32) (result i64) (call $write (i32.const 1)) (call $ok))
  (func (export "forge_log") (param i32 i32) (result i64)
    (call $log (i32.const 3) (i32.const 1024) (i32.const {len(ATTACK)})) (call $ok)))
"""


@pytest.fixture(scope="module")
def forger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("forger") / "forger.wasm"
    path.write_bytes(wasmtime.wat2wasm(FORGER_WAT))
    return path


def sandbus(*args: str) -> subprocess.CompletedProcess[bytes]:
    assert SANDBUS.exists(), "the sandbus console script is not installed (pip install -e .)"
    # A wide terminal, so rich never folds a table cell across lines.
    return subprocess.run([str(SANDBUS), *args], capture_output=True, timeout=60,
                          env={**os.environ, "COLUMNS": "400"})


# --------------------------------------------------------------------------------------------------
# Finding 11: guest output is the plugin's, escaped, one record per line
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("function", ["forge_stderr", "forge_stdout", "forge_log"])
def test_f11_guest_output_cannot_drive_or_forge_the_terminal(forger: Path, function: str) -> None:
    r = sandbus("run", str(forger), "--function", function, "-v")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"ok": True}
    err = r.stderr
    assert TERMINAL_CONTROLS.search(err) is None, err
    lines = err.decode().splitlines()
    assert not [ln for ln in lines if ln.startswith(("sandbus:", "INFO sandbus.audit: forged"))], lines
    guest = [ln for ln in lines if "forged" in ln or "overwritten" in ln or "\\x1b" in ln]
    assert len(guest) == 4, lines  # one record per guest line, none dropped
    assert all(ln.startswith("[plugin forger] ") for ln in guest), guest
    assert any("\\x1b[2J\\x1b]0;pwned\\x07" in ln for ln in guest)  # shown, not run
    assert any("\\x9b31m red\\u202eevil" in ln for ln in guest)


def test_f11_every_guest_output_path_makes_escaped_single_line_records(
        forger: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="sandbus.plugin"), Sandbox(forger) as sb:
        for function in ("forge_stderr", "forge_stdout", "forge_log"):
            assert sb.call(function, {}) == {"ok": True}
        # The component path: its stdout/stderr sink, on a component's call context.
        ctx = ComponentCallContext("pycomp", Capabilities(), Limits(), Auditor(),
                                   logging.getLogger("sandbus.plugin.pycomp"))
        state = _CallState()
        assert _output_sink(ctx, state, "stderr", logging.WARNING)(ATTACK) == len(ATTACK)
        assert state.stderr_tail.endswith(b"evil")  # the trap reason still sees the raw tail
    by_plugin: dict[str, list[str]] = {}
    for rec in caplog.records:
        by_plugin.setdefault(rec.name, []).append(rec.getMessage())
    expected = [escape_controls(ln) for ln in ATTACK.decode().replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    assert by_plugin["sandbus.plugin.forger"] == (
        [f"[stderr] {ln}" for ln in expected] + [f"[stdout] {ln}" for ln in expected] + expected)
    assert by_plugin["sandbus.plugin.pycomp"] == [f"[stderr] {ln}" for ln in expected]
    for messages in by_plugin.values():
        for message in messages:
            assert TERMINAL_CONTROLS.search(message.encode()) is None
            assert "\n" not in message


def test_f11_guest_lines_rules() -> None:
    assert guest_lines("a\r\nb\rc\n\n\nd\n") == ["a", "b", "c", "d"]
    assert guest_lines("\t\x00\x7f\x85\u2028\u2066") == ["\\x09\\x00\\x7f\\x85\\u2028\\u2066"]
    assert guest_lines("héllo ✓ 日本") == ["héllo ✓ 日本"]  # printable text is untouched
    assert escape_controls("a\nb\x1b", keep_newlines=True) == "a\nb\\x1b"


def test_f11_plugin_listing_shows_names_and_reasons_as_text(tmp_path: Path, plugins_dir: Path) -> None:
    """A file name with an escape sequence and a reason quoting ``[a.key]`` reach the table as text."""
    d = tmp_path / "plugins"
    d.mkdir()
    shutil.copy(plugins_dir / "echo.wasm", d / "evil\x1b[2J.wasm")
    shutil.copy(plugins_dir / "echo.wasm", d / "badtopic.wasm")
    (d / "badtopic.toml").write_text('[plugin]\nname = "badtopic"\nversion = "1.0.0"\n'
                                     '[subscriptions]\ntopics = ["a b"]\n', encoding="utf-8")
    r = sandbus("plugins", "check", str(d))
    assert r.returncode == 1
    out = (r.stdout + r.stderr).decode()
    assert "\x1b" not in out
    assert "evil\\x1b[2J" in out
    assert "[subscriptions.topics]" in out  # rich would have read it as markup and dropped it


# --------------------------------------------------------------------------------------------------
# Finding 12: bad usage is exit 2; no input is read past its cap
# --------------------------------------------------------------------------------------------------


def test_f12_function_unknown_exit_2(plugins_dir: Path) -> None:
    r = sandbus("run", str(plugins_dir / "echo.wasm"), "--function", "nope")
    assert r.returncode == 2, r.stderr
    assert b"no function 'nope'" in r.stderr
    assert b"handle_request" in r.stderr
    r = sandbus("run", str(plugins_dir / "echo.wasm"), "--function", "handle_request", "--input", "{}")
    assert r.returncode == 0, r.stderr  # the same module, a function it has


@pytest.mark.parametrize(
    "args",
    [
        ["request", "echo\n", "handle_request", "{}"],
        ["request", "echo", "handle_request\n", "{}"],
        ["request", "ech o"],
        ["pub", "orders.x\n", "{}"],
        ["pub", "$JS.API.x", "{}"],
        ["run", "{echo}", "--allow-env", "HOME\n"],
        ["run", "{echo}", "--config", "[1]"],
    ],
)
def test_f08_cli_arguments_are_validated_before_use(plugins_dir: Path, args: list[str]) -> None:
    # --nats points nowhere: a validated argument never gets as far as connecting.
    extra = ["--nats", "nats://127.0.0.1:9"] if args[0] in ("request", "pub") else []
    r = sandbus(*[a.replace("{echo}", str(plugins_dir / "echo.wasm")) for a in args], *extra)
    assert r.returncode == 2, r.stderr
    assert b"Traceback" not in r.stderr


#: Runs the CLI as its only child and reports the child's peak RSS: RUSAGE_CHILDREN of the test process
#: would include every process earlier tests started.
_MEASURE = """
import json, resource, subprocess, sys
size = int(sys.argv[1])
proc = subprocess.Popen(sys.argv[2:], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
chunk = b"a" * (1 << 20)  # fed in chunks: a 48 MB buffer here would count in the child's RSS from fork to exec
try:
    proc.stdin.write(b'"')
    for _ in range(size // len(chunk)):
        proc.stdin.write(chunk)
    proc.stdin.write(chunk[: size % len(chunk)] + b'"')
    proc.stdin.close()
except BrokenPipeError:
    pass
stderr = proc.stderr.read()
proc.wait()
print(json.dumps({"rc": proc.returncode, "stderr": stderr.decode(errors="replace"),
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def _run_measured(size: int, *args: str) -> dict[str, object]:
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(size), str(SANDBUS), *args], capture_output=True,
                       text=True, timeout=120, check=True)
    result: dict[str, object] = json.loads(r.stdout)
    return result


def test_f12_stdin_cap(plugins_dir: Path) -> None:
    echo = str(plugins_dir / "echo.wasm")
    cap = Limits().max_input_bytes
    small = _run_measured(cap // 2, "run", echo, "--input", "-")
    big = _run_measured(48 * 1024 * 1024, "run", echo, "--input", "-")
    assert small["rc"] == 0, small["stderr"]
    assert big["rc"] == 2, big["stderr"]
    assert "larger than the 1048576-byte input cap" in str(big["stderr"])
    # 48 MB offered: the refused run stays within a few MiB of a run that loaded the plugin and echoed half
    # a cap (before, it read and parsed all of it: +100 MB and more).
    assert int(str(big["maxrss_kib"])) < int(str(small["maxrss_kib"])) + 16 * 1024, (small, big)


def test_f11_replies_from_the_bus_reach_the_terminal_as_data() -> None:
    """Anything on the account can answer ``sandbus.req.echo.*``: its reply is printed as JSON or refused."""
    import asyncio

    import nats

    from sandbus.bus.server import NatsServer
    from sandbus.sdk.nats_guard import GuardedNatsClient

    replies = [b'\x1b[2J\x1b]0;pwned\x07{"a": 1}', '{"say": "\u009b31m red \u202eevil"}'.encode()]

    async def go(url: str) -> list[tuple[int | None, bytes, bytes]]:
        nc = GuardedNatsClient()  # its flush() is a barrier: the subscriptions are in place after it
        await nc.connect(url)
        answers = iter(replies)

        async def respond(msg: nats.aio.msg.Msg) -> None:
            await nc.publish(msg.reply, next(answers))

        await nc.subscribe("sandbus.req.echo.*", cb=respond)
        await nc.flush()
        results = []
        try:
            for _ in replies:
                proc = await asyncio.create_subprocess_exec(
                    str(SANDBUS), "request", "echo", "--nats", url, "--timeout", "5",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                out, err = await asyncio.wait_for(proc.communicate(), 60)
                results.append((proc.returncode, out, err))
        finally:
            await nc.close()
        return results

    server = NatsServer().start()
    try:
        (rc1, out1, err1), (rc2, out2, err2) = asyncio.run(go(server.url))
    finally:
        server.stop()
    assert rc1 == 1  # not JSON: refused, named, escaped
    assert b"the reply is not JSON" in err1
    assert TERMINAL_CONTROLS.search(out1 + err1) is None
    assert rc2 == 0, err2
    assert TERMINAL_CONTROLS.search(out2) is None
    assert json.loads(out2) == {"say": "\u009b31m red \u202eevil"}  # the same value, escaped as JSON
    assert b"\\u009b31m red \\u202eevil" in out2


# --------------------------------------------------------------------------------------------------
# Findings 11/12 (siblings): a hostile peer answering `ls` and `trace`; options and failures that
# ended in a traceback; a FIFO for a module; a node that could not be stopped while connecting
# --------------------------------------------------------------------------------------------------

_NASTY = "[red]x\x1b[2J\x1b]8;;http://evil\x07link\x1b]8;;\x07\u009b2J\u202e\u200b\ufeff"
_CHAIN = [{"span_id": f"s{i}", "parent_id": f"s{i - 1}" if i else None, "name": "n", "duration_ms": 1.0,
           "service": "s", "attributes": {}, "events": []} for i in range(3000)]

HOSTILE_ANSWERS = {
    "ping not json": (["\x1b[2Jnot json"], "{}", None, ["ls"]),
    "ping not an object": (["[1, 2]"], "{}", None, ["ls"]),
    "plugins not a list": ([json.dumps({"metadata": {"node_id": "n1"}})], '{"node_id": "n1", "plugins": "abc"}',
                           None, ["ls"]),
    "plugins not objects": ([json.dumps({"metadata": {"node_id": "n1"}})], '{"node_id": "n1", "plugins": [1, 2]}',
                            None, ["ls"]),
    "markup and escapes": ([json.dumps({"metadata": {"node_id": "n1"}})], json.dumps(
        {"node_id": _NASTY, "plugins": [{"name": _NASTY, "version": _NASTY, "status": _NASTY, "executions": _NASTY,
                                         "memory_bytes": "x", "p50_ms": "y", "last_error": _NASTY * 1000}]}),
        None, ["ls"]),
    "spans not json": ([], "{}", "not json", ["trace", "echo"]),
    "spans not a list": ([], "{}", '{"a": 1}', ["trace", "echo"]),
    "spans missing keys": ([], "{}", '[{"name": "x"}, 1]', ["trace", "echo"]),
    "spans a 3000-deep chain": ([], "{}", json.dumps(_CHAIN), ["trace", "echo"]),
    "spans with escapes": ([], "{}", json.dumps([{"span_id": "a", "parent_id": None, "name": _NASTY,
                                                  "duration_ms": 1, "service": _NASTY,
                                                  "attributes": {"sandbus.x": _NASTY}, "events": [_NASTY]}]),
                           ["trace", "echo"]),
}


def test_f12_ls_and_trace_survive_a_hostile_peer() -> None:
    """Anyone on the account can answer ``$SRV.PING``, a node's ``list`` and a traced request: whatever they
    send, ``ls`` and ``trace`` print escaped text and exit 0, never a traceback."""
    import asyncio

    import nats

    from sandbus.bus.server import NatsServer
    from sandbus.sdk.nats_guard import GuardedNatsClient

    async def case(url: str, ping: list[str], listing: str, spans: str | None,
                   cmd: list[str]) -> tuple[int | None, bytes, bytes]:
        nc = GuardedNatsClient()  # its flush() is a barrier: the subscriptions are in place after it
        await nc.connect(url)

        async def on_ping(msg: nats.aio.msg.Msg) -> None:
            for answer in ping:
                await nc.publish(msg.reply, answer.encode())

        async def on_list(msg: nats.aio.msg.Msg) -> None:
            await nc.publish(msg.reply, listing.encode())

        async def on_request(msg: nats.aio.msg.Msg) -> None:
            await nc.publish(msg.reply, b'{"ok": 1}', headers={"Sandbus-Trace-Spans": spans} if spans else None)

        await nc.subscribe("$SRV.PING.sandbus-node", cb=on_ping)
        await nc.subscribe("sandbus.node.*.list", cb=on_list)
        await nc.subscribe("sandbus.node.*.stats", cb=on_list)  # `ls` asks for stats
        await nc.subscribe("sandbus.req.echo.*", cb=on_request)
        await nc.flush()
        try:
            proc = await asyncio.create_subprocess_exec(
                str(SANDBUS), *cmd, "--nats", url, *(["--timeout", "0.3"] if cmd[0] == "ls" else []),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "400"})
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            await nc.close()
        return proc.returncode, out, err

    async def go(url: str) -> dict[str, tuple[int | None, bytes, bytes]]:
        return {name: await case(url, *answers) for name, answers in HOSTILE_ANSWERS.items()}

    server = NatsServer().start()
    try:
        results = asyncio.run(go(server.url))
    finally:
        server.stop()
    for name, (rc, out, err) in results.items():
        # No node id in the PING answers: no node answered (exit 6); else the listing is shown.
        assert rc == (6 if name.startswith("ping not") else 0), (name, err)
        assert b"Traceback" not in err, (name, err)
        assert TERMINAL_CONTROLS.search(out + err) is None, (name, out + err)
        assert "\u200b".encode() not in out + err, name
        assert "\ufeff".encode() not in out + err, name
    out = results["markup and escapes"][1].decode()
    assert "[red]x\\x1b[2J" in out  # markup shown as text, escapes visible
    assert len(out) < 20_000  # a 60 KB error is cut to a cell
    assert "1 node(s)" in out
    err = results["spans with escapes"][2].decode()
    assert "[red]x\\x1b[2J" in err


@pytest.mark.parametrize("args", [
    ["run", "{echo}", "--memory-mb", "nan"],
    ["run", "{echo}", "--timeout", "inf"],
    ["run", "{echo}", "--timeout", "-1"],
    ["request", "echo", "--timeout", "nan"],
    ["ls", "--timeout", "-5"],
    ["trace", "echo", "--timeout", "inf"],
    ["node", "--plugins", "{dir}", "--workers", "-3"],
    ["node", "--plugins", "{dir}", "--max-waiting", "0"],
])
def test_f12_numeric_options_are_usage_errors(plugins_dir: Path, args: list[str]) -> None:
    r = sandbus(*[a.replace("{echo}", str(plugins_dir / "echo.wasm")).replace("{dir}", str(plugins_dir))
                  for a in args], *(["--nats", "nats://127.0.0.1:9"] if args[0] in ("request", "ls", "trace", "node")
                                    else []))
    assert r.returncode == 2, r.stderr
    assert b"Traceback" not in r.stderr


def test_f12_unreachable_nats_is_one_error_line_not_a_traceback() -> None:
    r = sandbus("ls", "--nats", "nats://127.0.0.1:9")
    assert r.returncode == 5  # EXIT_BUS
    assert b"Traceback" not in r.stderr
    line = r.stderr.decode().strip()
    assert "\n" not in line, r.stderr
    assert line.startswith("sandbus: "), r.stderr
    assert "127.0.0.1:9" in line, r.stderr


@pytest.mark.parametrize("command", ["run", "inspect"])
def test_f12_a_fifo_for_a_module_is_refused_not_waited_on(tmp_path: Path, command: str) -> None:
    fifo = tmp_path / "plugin.wasm"
    os.mkfifo(fifo)
    r = subprocess.run([str(SANDBUS), command, str(fifo)], capture_output=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert b"not a regular file" in r.stderr


def test_f12_node_stops_on_sigterm_while_nats_is_unreachable(tmp_path: Path, plugins_dir: Path) -> None:
    """The node retried its connection forever and ignored SIGINT/SIGTERM meanwhile (kill -9 only)."""
    import signal
    import time

    d = tmp_path / "plugins"
    d.mkdir()
    for ext in ("wasm", "toml"):
        shutil.copy(plugins_dir / f"echo.{ext}", d / f"echo.{ext}")
    log = tmp_path / "node.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(SANDBUS), "node", "--plugins", str(d), "--nats", "nats://127.0.0.1:9",
                                 "--no-watch"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while b"Connect call failed" not in log.read_bytes():
            assert proc.poll() is None, log.read_bytes()
            assert time.monotonic() < deadline, log.read_bytes()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_bytes()
        assert b"stopped before it connected" in log.read_bytes()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_f11_escape_controls_leaves_no_invisible_character() -> None:
    """Every control, format (bidi, zero-width, BOM, tags...), separator and surrogate code point is written
    as a visible escape; printable text is untouched."""
    import sys as _sys
    import unicodedata

    from sandbus.host.cli.output import terminal_json

    invisible = "".join(chr(c) for c in range(_sys.maxunicode + 1)
                        if unicodedata.category(chr(c)) in ("Cc", "Cf", "Zl", "Zp", "Cs"))
    escaped = escape_controls(invisible)
    assert escaped.isascii()
    assert escaped.isprintable()
    assert escape_controls("a\u200db") == "a\\u200db"
    assert escape_controls("\U000e0041") == "\\U000e0041"
    assert escape_controls("héllo ✓ 日本 \u00a0") == "héllo ✓ 日本 \u00a0"
    raw = json.dumps({"x": invisible.replace("\ud800", "").translate({c: None for c in range(0xD800, 0xE000)})},
                     ensure_ascii=False).encode()
    shown = terminal_json(raw)
    assert json.loads(shown) == json.loads(raw)
    assert not any(unicodedata.category(ch) in ("Cf", "Zl", "Zp") for ch in shown.decode())
