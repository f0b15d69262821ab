"""Record and replay: a plugin that reads the clock and random bytes and traps on some draws, recorded on a
real node (real nats-server, real wasm) and with ``sandbus run --record``, replayed offline to the same
trap or reply, under gdb too; divergence, a foreign module and hostile record files are typed errors."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from sandbus.bus.connection import ConnectOptions
from sandbus.bus.server import NatsServer
from sandbus.host.lifecycle import PluginManager
from sandbus.host.lifecycle.policy import load_policy
from sandbus.host.node.node import Node
from sandbus.host.sandbox import Capabilities, Limits, ModuleCache, Sandbox
from sandbus.host.sandbox.record import (
    FORMAT,
    MAX_RECORD_BYTES,
    CallRecord,
    ReplayDivergenceError,
    Tape,
    load_record,
)
from sandbus.host.sandbox.replay import replay
from sandbus.sdk.client import Client
from sandbus.sdk.errors import PolicyError, SandboxError, SecurityViolationError, TrapError
from tests.conftest import AuditLog
from tests.debugging.conftest import marked_line
from tests.debugging.test_gdb import run_gdb

GRANTED = Capabilities(clock=True, random=True)
MANIFEST = """
[plugin]
name = "dice"
version = "1.0.0"
min_runtime_version = "0.1.0"

[capabilities]
required = ["compute", "clock", "random"]
"""
POLICY = """
[capabilities]
allowed = ["compute", "clock", "random"]

[record]
plugins = ["dice"]
directory = "{records}"
max_records = {max_records}
"""


def expected_draw(record: CallRecord) -> int:
    """The draw dice.c computes from the host results in ``record`` (what a faithful replay must see)."""
    events: dict[tuple[str, str], list[bytes | int]] = {}
    for e in record.call:
        if e.name != "log":
            events.setdefault((e.module, e.name), []).append(e.writes[0][2] if e.writes else e.results[0])
    host_ms = events[("sandbus_v1", "time_now_ms")][0]
    wall, mono = (int.from_bytes(b, "little") % 1_000_000_000 for b in events[("wasi_snapshot_preview1",
                                                                               "clock_time_get")]
                  if isinstance(b, bytes))
    random = events[("wasi_snapshot_preview1", "random_get")][0]
    assert isinstance(host_ms, int)
    assert isinstance(random, bytes)
    noise = int.from_bytes(random, "little")
    return ((noise ^ (host_ms % 2**64) ^ wall ^ mono) % 2**64) % 100


def record_one(dice_guest: Path, threshold: int) -> tuple[CallRecord, bytes | None, Exception | None]:
    with Sandbox(dice_guest, capabilities=GRANTED, record_calls=True) as sandbox:
        try:
            reply: bytes | None = sandbox.call_bytes("handle_request", str(threshold).encode())
            error: Exception | None = None
        except TrapError as e:
            reply, error = None, e
        record = sandbox.last_record
    assert record is not None
    record.module = str(dice_guest)
    return record, reply, error


# -- recording and replaying in a sandbox ------------------------------------------------------------


def test_a_reply_replays_to_the_same_bytes(dice_guest: Path) -> None:
    record, reply, _ = record_one(dice_guest, 0)  # threshold 0: never traps
    assert reply is not None
    assert [(e.module, e.name) for e in record.call] == [
        ("sandbus_v1", "time_now_ms"), ("wasi_snapshot_preview1", "clock_time_get"),
        ("wasi_snapshot_preview1", "clock_time_get"), ("wasi_snapshot_preview1", "random_get"),
        ("sandbus_v1", "log")]
    assert orjson.loads(reply)["draw"] == expected_draw(record)
    again = CallRecord.from_bytes(record.to_bytes())  # through the file format
    for _ in range(3):
        outcome = replay(again)
        assert outcome.reply == reply  # the same noise and clock readings: they came from the record
        assert outcome.reproduced


def test_a_trap_replays_to_the_same_trap(dice_guest: Path) -> None:
    record, _, error = record_one(dice_guest, 100)  # threshold 100: always traps
    assert isinstance(error, TrapError)
    outcome = replay(CallRecord.from_bytes(record.to_bytes()))
    assert isinstance(outcome.error, TrapError)
    assert outcome.error.message == error.message
    assert outcome.reproduced


def test_another_host_call_than_recorded_is_a_divergence(dice_guest: Path) -> None:
    record, _, _ = record_one(dice_guest, 0)
    record.call[3].name = "clock_res_get"  # the record says clock_res_get where the guest asks random_get
    outcome = replay(record)
    assert isinstance(outcome.error, ReplayDivergenceError)
    assert outcome.error.details == {"index": 3, "expected": "wasi_snapshot_preview1.clock_res_get",
                                     "found": "wasi_snapshot_preview1.random_get", "phase": "call"}
    assert not outcome.reproduced


def test_fewer_or_more_host_calls_than_recorded_are_divergences(dice_guest: Path) -> None:
    record, _, _ = record_one(dice_guest, 0)
    extra = CallRecord.from_bytes(record.to_bytes())
    extra.call.append(extra.call[-1])  # the guest returns before the recorded last host call
    outcome = replay(extra)
    assert isinstance(outcome.error, ReplayDivergenceError)
    assert outcome.error.details["found"] == "end"
    short = CallRecord.from_bytes(record.to_bytes())
    del short.call[-1]  # the guest asks for a host call the record does not have
    outcome = replay(short)
    assert isinstance(outcome.error, ReplayDivergenceError)
    assert outcome.error.details["expected"] == "end"


def test_a_replay_runs_only_the_recorded_module(dice_guest: Path, debug_guest: Path) -> None:
    record, _, _ = record_one(dice_guest, 0)
    with pytest.raises(SecurityViolationError, match="sha256"):
        replay(record, debug_guest)


def test_a_truncated_record_is_refused(dice_guest: Path) -> None:
    tape = Tape(max_bytes=200)
    record, _, _ = record_one(dice_guest, 0)
    tape.begin_call()
    for event in record.call:
        tape.record(event)
    assert tape.truncated
    record.truncated = True
    with pytest.raises(SandboxError, match="truncated"):
        replay(record)


@pytest.mark.parametrize(("raw", "why"), [
    (b"not json", "not JSON"),
    (b"[]", "record must be an object"),
    (b'{"format": "other/1"}', "not a sandbus call record"),
    (b"x" * (MAX_RECORD_BYTES + 1), "at most"),
])
def test_hostile_record_files_are_refused(tmp_path: Path, raw: bytes, why: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(raw)
    with pytest.raises(SandboxError, match=why):
        load_record(path)


def test_a_record_with_bad_fields_is_refused(dice_guest: Path, tmp_path: Path) -> None:
    record, _, _ = record_one(dice_guest, 0)
    good = orjson.loads(record.to_bytes())
    assert good["format"] == FORMAT
    for key, value, why in (("input", "***", "base64"), ("sha256", "abc", "sha256"),
                            ("call", [{"module": 1, "writes": []}], "event module"),
                            ("limits", {"fuel": -1}, "limits")):
        path = tmp_path / f"{key}.json"
        path.write_bytes(orjson.dumps({**good, key: value}))
        with pytest.raises(SandboxError, match=why):
            replay(load_record(path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(SandboxError, match="regular file"):
        load_record(fifo)


def test_components_and_per_call_plugins_are_not_recorded(dice_guest: Path) -> None:
    with pytest.raises(SandboxError, match="pooled core modules"):
        Sandbox(dice_guest, capabilities=GRANTED, limits=Limits(isolation="per-call"), record_calls=True)


# -- the command line ----------------------------------------------------------------------------------


def sandbus(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandbus", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_run_record_then_replay(dice_guest: Path, tmp_path: Path) -> None:
    done = sandbus("run", str(dice_guest), "--input", "100", "--allow-clock", "--allow-random", "--record", "r.json",
                   cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "trapped" in done.stderr
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o600  # it holds the input
    again = sandbus("replay", "r.json", cwd=tmp_path)
    assert again.returncode == 1, again.stderr
    assert "replay: reproduced the recorded outcome (sandbox.trap: handle_request trapped" in again.stderr
    ok = sandbus("run", str(dice_guest), "--input", "0", "--allow-clock", "--allow-random", "--record", "ok.json",
                 cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    moved = tmp_path / "moved.wasm"
    shutil.copy(dice_guest, moved)
    replayed = sandbus("replay", "ok.json", "--module", str(moved), cwd=tmp_path)
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout == ok.stdout  # the same draw, noise and clock: all from the record


# -- on a node -------------------------------------------------------------------------------------


def node_dir(tmp_path: Path, dice_guest: Path, max_records: int = 100) -> tuple[Path, Path]:
    plugins, records = tmp_path / "plugins", tmp_path / "records"
    plugins.mkdir()
    shutil.copy(dice_guest, plugins / "dice.wasm")
    (plugins / "dice.toml").write_text(MANIFEST)
    (tmp_path / "policy.toml").write_text(POLICY.format(records=records, max_records=max_records))
    return plugins, records


async def test_a_node_records_a_trapping_call_and_it_replays_under_gdb(dice_guest: Path, tmp_path: Path) -> None:
    plugins, records = node_dir(tmp_path, dice_guest)
    audit = AuditLog()
    server = NatsServer().start()
    node = Node.create(plugins, ConnectOptions.from_urls(server.url), policy=load_policy(tmp_path / "policy.toml"))
    node.manager.auditor.add_sink(audit)
    try:
        assert node.manager.discover_and_load().ok
        await node.start()
        async with await Client.connect(server.url) as client:
            assert "draw" in await client.request("dice", "handle_request", 0)  # a reply: not recorded
            assert not records.exists()
            with pytest.raises(TrapError, match="unreachable"):
                await client.request("dice", "handle_request", 100)
    finally:
        await node.stop()
        node.manager.close()
        server.stop()
    [path] = records.iterdir()  # written by then: closing the manager waited for the record's writer
    assert stat.S_IMODE(records.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [e.details["path"] for e in audit if e.kind == "record.written"] == [str(path)]
    record = load_record(path)
    assert record.plugin == "dice"
    assert record.input == b"100"
    assert record.module == str(plugins / "dice.wasm")
    outcome = replay(record)
    assert isinstance(outcome.error, TrapError)
    assert outcome.reproduced

    # Under gdb: the replayed call stops where it traps, with the recorded draw.
    # A trap is an illegal instruction that wasmtime's handler turns into the trap: gdb passes it on.
    done = run_gdb(["set breakpoint pending on", "handle SIGILL nostop noprint pass", "break check_draw", "run",
                    "bt 2", "print draw", "print threshold", "continue"],
                   [sys.executable, "-m", "sandbus", "replay", "--debug", str(path)], tmp_path)
    out = done.stdout
    line = marked_line("trap", "dice.c")
    assert re.search(rf"Breakpoint 1, check_draw \(draw={expected_draw(record)}, threshold=100\) at \S*dice\.c:{line}",
                     out), out
    assert re.search(r"#1 +0x[0-9a-f]+ in handle_request \(in=.*, len=3\) at \S*dice\.c:\d+", out), out
    assert f"$1 = {expected_draw(record)}\n" in out, out
    assert "$2 = 100\n" in out, out
    assert "replay: reproduced the recorded outcome (sandbox.trap" in done.stderr + out, done.stderr


def test_a_node_keeps_at_most_max_records(dice_guest: Path, tmp_path: Path) -> None:
    plugins, records = node_dir(tmp_path, dice_guest, max_records=2)
    audit = AuditLog()
    manager = PluginManager(plugins, policy=load_policy(tmp_path / "policy.toml"), on_audit=audit,
                            cache=ModuleCache(tmp_path / "cache"))
    try:
        manager.load("dice")
        for _ in range(4):
            with pytest.raises(TrapError):
                manager.execute_json("dice", "handle_request", 100)
    finally:
        manager.close(timeout=10)
    assert len(list(records.iterdir())) == 2
    assert audit.kinds().count("record.written") == 2
    assert audit.kinds().count("record.dropped") == 1  # said once, not at every trap


def test_the_record_policy_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    for text, key in (('[record]\nplugins = ["dice"]\n', "record.directory"),
                      ('[record]\nplugins = ["dice"]\ndirectory = "records"\n', "record.directory"),
                      ('[record]\nplugins = ["Dice!"]\ndirectory = "/r"\n', "record.plugins[0]"),
                      ('[record]\nplugins = ["dice"]\ndirectory = "/r"\nmax_bytes = 0\n', "record.max_bytes")):
        path.write_text(text)
        with pytest.raises(PolicyError) as info:
            load_policy(path)
        assert info.value.details["key"] == key, text
    path.write_text('[record]\nplugins = ["dice"]\ndirectory = "/r"\n')
    assert load_policy(path).record.settings_for("dice") is not None
    assert load_policy(path).record.settings_for("other") is None
