"""A record file from elsewhere ("here is my failing call") is data to distrust: every malformed or
hostile part is a typed error naming what was wrong, before or instead of a write into the replayed
guest, with bounded time; and a replay keeps the recorded limits, so an out-of-fuel call runs out again.
Real wasm (tests/debugging/guests), real files, the real command line."""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from sandbus.host.sandbox import Capabilities, Limits, Sandbox
from sandbus.host.sandbox.record import CallRecord, ReplayDivergenceError, load_record
from sandbus.host.sandbox.replay import replay
from sandbus.sdk.errors import ExecutionTimeoutError, OutOfFuelError, SandboxError
from tests.debugging.test_record_replay import record_one


def good_record(dice_guest: Path) -> dict[str, Any]:
    record, reply, _ = record_one(dice_guest, 0)
    assert reply is not None
    data: dict[str, Any] = orjson.loads(record.to_bytes())
    return data


def clock_event(data: dict[str, Any]) -> dict[str, Any]:
    event: dict[str, Any] = next(e for e in data["call"] if e["name"] == "clock_time_get")
    return event


def deep(levels: int) -> Any:
    value: Any = []
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(("change", "why"), [
    # JSON the encoder cannot write back (it was an internal error when the sandbox re-encoded it).
    (lambda d: d.update(config={"a": deep(300)}), "config nests deeper than 64"),
    (lambda d: d["limits"].update(fuel=deep(100)), "limits nests deeper"),
    # The outcome is checked at load, not after the replay ran.
    (lambda d: d["outcome"].update(reply="***"), "outcome reply is not valid base64"),
    (lambda d: d.update(outcome={"error": {"code": 5, "message": [1]}}), "outcome error code"),
    (lambda d: d.update(outcome={}), "outcome must hold a reply or an error"),
    (lambda d: d["call"][0].update(error={"anything": 1}), "event error code"),
    # Grants of the wrong type (a string was taken as the list of its letters).
    (lambda d: d["capabilities"].update(extra="abc"), "capabilities extra must be a list"),
    (lambda d: d["capabilities"].update(env=["A"]), "capabilities env must be an object"),
    (lambda d: d["capabilities"].update(env={"A": 1}), "env must map names to strings"),
    (lambda d: d["capabilities"].update(env={"A=B": "x"}), "'A=B' is not a variable name"),
    (lambda d: d["capabilities"].update(env={"A": "x\x00y"}), "'A' is not a variable name with a value"),
    (lambda d: d["capabilities"].update(clock="yes"), "capabilities clock must be true or false"),
    (lambda d: d.update(truncated="no"), "truncated must be true or false"),
    # Bounds on what one host call holds, and on free-form parts.
    (lambda d: d["call"][0].update(args=list(range(5000))), "at most 1000 arguments"),
    (lambda d: d["call"][0].update(writes=[[-1, 0, ""]] * 65), "at most 64 writes"),
    (lambda d: d.update(config={"a": [0] * 100_001}), "config holds more than 100000 values"),
    # Names shown on a terminal: printable only.
    (lambda d: d.update(plugin="dice\x1b]0;pwned\x07"), "plugin must be 1 to 256 printable"),
    (lambda d: d.update(function="handle\nrequest"), "function must be 1 to 256 printable"),
    (lambda d: d["call"][0].update(name=""), "event name must be 1 to 256 printable"),
])
def test_a_malformed_record_is_refused_at_load(dice_guest: Path, tmp_path: Path, change: Any, why: str) -> None:
    data = good_record(dice_guest)
    change(data)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))  # the standard library's: it writes deeper JSON than orjson
    with pytest.raises(SandboxError, match=why):
        load_record(path)


@pytest.mark.parametrize(("write", "why"), [
    ([2, 0, "QUFB" * 2000], "writes 6000 bytes at offset 0 of argument 2 .* whose buffer has 8 bytes"),
    ([2, 4, "AAAAAAAAAAA="], "writes 8 bytes at offset 4"),
    ([2, -64, "AAAAAAAAAAA="], "at offset -64"),
    ([-1, 1 << 40, "AAAAAAAAAAA="], "writes at an address .* was not given"),
    ([7, 0, "AAAAAAAAAAA="], "names argument 7 of a host call with 3 arguments"),
])
def test_a_recorded_write_stays_in_the_buffer_the_guest_gave(dice_guest: Path, write: list[Any], why: str) -> None:
    data = good_record(dice_guest)
    clock_event(data)["writes"] = [write]
    outcome = replay(CallRecord.from_bytes(orjson.dumps(data)))
    assert isinstance(outcome.error, ReplayDivergenceError)
    assert outcome.error.details["function"] == "wasi_snapshot_preview1.clock_time_get"
    assert re.search(why, outcome.error.message), outcome.error.message
    assert not outcome.reproduced


def test_a_record_the_module_cannot_take_says_so(dice_guest: Path) -> None:
    data = good_record(dice_guest)
    too_big = CallRecord.from_bytes(orjson.dumps({**data, "input": "QUFB" * (2 * 1024 * 1024)}))
    with pytest.raises(SandboxError, match="its input has 6291456 bytes, its limits allow 1048576"):
        replay(too_big)
    elsewhere = CallRecord.from_bytes(orjson.dumps({**data, "function": "no_such_function"}))
    with pytest.raises(SandboxError, match="exports no function 'no_such_function'"):
        replay(elsewhere)


def test_a_replay_stopped_early_names_the_error_that_stopped_it(dice_guest: Path) -> None:
    """The guest runs out of (edited) fuel while the record still holds host calls: the divergence says
    which error stopped it, not only that the tape was not used up."""
    data = good_record(dice_guest)
    data["limits"]["fuel"] = 200  # out of fuel before the first host call
    outcome = replay(CallRecord.from_bytes(orjson.dumps(data)))
    assert isinstance(outcome.error, ReplayDivergenceError)
    message = outcome.error.message
    assert "after the call failed with limit.fuel: handle_request ran out of fuel" in message, message
    assert outcome.error.details["error"]["code"] == "limit.fuel"


def record_spin(spin_guest: Path, steps: int, limits: Limits) -> CallRecord:
    with Sandbox(spin_guest, limits=limits, capabilities=Capabilities(clock=True), record_calls=True) as sandbox:
        with contextlib.suppress(OutOfFuelError, ExecutionTimeoutError):
            sandbox.call_bytes("handle_request", str(steps).encode())
        record = sandbox.last_record
    assert record is not None
    record.module = str(spin_guest)
    return record


def test_out_of_fuel_replays_as_out_of_fuel(spin_guest: Path) -> None:
    record = record_spin(spin_guest, -1, Limits(fuel=2_000_000))
    recorded = record.recorded_error()
    assert isinstance(recorded, OutOfFuelError)
    outcome = replay(CallRecord.from_bytes(record.to_bytes()))
    assert isinstance(outcome.error, OutOfFuelError)
    assert outcome.reproduced
    # The recorded fuel, not the default: with more, the same input runs further (here: forever, so
    # the bounded timeout ends it).
    more = CallRecord.from_bytes(record.to_bytes())
    more.limits["fuel"] = 10**12
    outcome = replay(more, timeout_s=0.3)
    assert isinstance(outcome.error, ExecutionTimeoutError)


def test_a_record_without_fuel_or_with_a_huge_timeout_runs_a_bounded_time(spin_guest: Path) -> None:
    record = record_spin(spin_guest, 1000, Limits())
    forever = CallRecord.from_bytes(record.to_bytes())
    forever.input = b"-1"
    forever.limits.update(fuel=None, timeout_s=1e9)
    started = time.monotonic()
    outcome = replay(forever, timeout_s=0.5)
    assert isinstance(outcome.error, ExecutionTimeoutError)
    assert time.monotonic() - started < 10


def sandbus(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandbus", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_the_command_prints_a_records_text_inert_and_bounds_its_time(dice_guest: Path, spin_guest: Path,
                                                                      tmp_path: Path) -> None:
    data = good_record(dice_guest)
    data["outcome"] = {"error": {"code": "sandbox.trap", "message": "boom\x1b]0;pwned\x07\x1b[2J"}}
    (tmp_path / "r.json").write_bytes(orjson.dumps(data))
    done = sandbus("replay", "r.json", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "\x1b" not in done.stderr
    assert "\x07" not in done.stderr
    assert "replay: ended otherwise than the record, which ended with sandbox.trap: boom" in done.stderr
    assert "Traceback" not in done.stderr

    record = record_spin(spin_guest, 1000, Limits())
    record.input = b"-1"
    record.limits.update(fuel=None, timeout_s=1e9)
    (tmp_path / "spin.json").write_bytes(record.to_bytes())
    started = time.monotonic()
    done = sandbus("replay", "spin.json", "--timeout", "0.5", cwd=tmp_path)
    assert time.monotonic() - started < 30
    assert "timeout" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_run_record_writes_a_new_private_file_whatever_was_at_the_path(dice_guest: Path, tmp_path: Path) -> None:
    """``--record FILE`` where a looser file, a symlink (to someone's file) or a FIFO already is: the
    record replaces it as a new 0600 file; the symlink's target is untouched; nothing blocks."""
    loose = tmp_path / "loose.json"
    loose.write_text("old")
    loose.chmod(0o644)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "link.json").symlink_to(victim)
    os.mkfifo(tmp_path / "fifo.json")
    for name in ("loose.json", "link.json", "fifo.json"):
        done = sandbus("run", str(dice_guest), "--input", "0", "--allow-clock", "--allow-random", "--record", name,
                       cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        path = tmp_path / name
        assert stat.S_ISREG(path.lstat().st_mode), name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
        assert load_record(path).function == "handle_request"
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.json", "link.json", "loose.json", "victim.txt"]


def test_a_record_says_how_many_calls_its_instance_served_before(counter_guest: Path, tmp_path: Path) -> None:
    """State a pooled instance kept from earlier calls is not recorded: the record counts those calls,
    and the replay says so, beside an ending that differs for that reason."""
    with Sandbox(counter_guest, record_calls=True) as sandbox:
        sandbox.call_bytes("handle_request", b"{}")
        first = sandbox.last_record
        with contextlib.suppress(SandboxError):
            sandbox.call_bytes("handle_request", b"{}")
        second = sandbox.last_record
    assert first is not None
    assert second is not None
    assert first.earlier_calls == 0
    assert second.earlier_calls == 1
    second.module = str(counter_guest)
    assert CallRecord.from_bytes(second.to_bytes()).earlier_calls == 1
    (tmp_path / "second.json").write_bytes(second.to_bytes())
    done = sandbus("replay", "second.json", cwd=tmp_path)
    assert done.returncode == 1
    assert "the recorded instance had served 1 call(s) before this one" in done.stderr, done.stderr
    assert "replay: ended otherwise than the record" in done.stderr


def test_a_replay_says_the_granted_directories_are_not_replayed(dice_guest: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    done = sandbus("run", str(dice_guest), "--input", "0", "--allow-clock", "--allow-random", "--allow-read",
                   str(data_dir), "--record", "r.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert load_record(tmp_path / "r.json").capabilities["dirs"]
    again = sandbus("replay", "r.json", cwd=tmp_path)
    assert "replay: note: the recorded call was granted directories" in again.stderr, again.stderr


def test_a_record_cannot_raise_the_hosts_load_bounds(dice_guest: Path) -> None:
    """A record and its module come from the same sender: the record's own compile limits would let a
    compile bomb through. The replay keeps the lower of the record's and the host's defaults."""
    data = good_record(dice_guest)
    data["limits"].update(max_module_bytes=2**32, max_functions=2**32, compile_timeout_s=1e9,
                          compile_memory_bytes=1 << 48)
    outcome = replay(CallRecord.from_bytes(orjson.dumps(data)))
    assert outcome.reproduced
    assert outcome.limits is not None
    defaults = Limits()
    assert (outcome.limits.max_module_bytes, outcome.limits.max_functions, outcome.limits.compile_timeout_s,
            outcome.limits.compile_memory_bytes) == (defaults.max_module_bytes, defaults.max_functions,
                                                     defaults.compile_timeout_s, defaults.compile_memory_bytes)
    data["limits"]["max_module_bytes"] = 1000  # lower than the module: kept, and the load is refused
    with pytest.raises(SandboxError, match="1000"):
        replay(CallRecord.from_bytes(orjson.dumps(data)))


def test_a_record_names_only_a_wasm_file_as_its_module(dice_guest: Path) -> None:
    data = good_record(dice_guest)
    for elsewhere in ("/etc/passwd", "/proc/self/environ", str(dice_guest.with_suffix(".toml"))):
        record = CallRecord.from_bytes(orjson.dumps({**data, "module": elsewhere}))
        with pytest.raises(SandboxError, match=r"not a \.wasm file: name the module"):
            replay(record)
    record = CallRecord.from_bytes(orjson.dumps({**data, "module": "/etc/passwd"}))
    assert replay(record, dice_guest).reproduced  # given by the user: any name


def test_a_replay_can_be_given_more_time_than_recorded(spin_guest: Path) -> None:
    """Under gdb, stepping takes time the call's timeout counts: --timeout gives the replay room, above the
    recorded timeout (which a timeout's ending never reproduces exactly anyway)."""
    record = record_spin(spin_guest, 1000, Limits(fuel=None, timeout_s=0.2))
    record.input = b"600000000"  # about 2 s here: well past 0.2 s, then replies
    outcome = replay(CallRecord.from_bytes(record.to_bytes()))
    assert isinstance(outcome.error, ExecutionTimeoutError)  # the recorded 0.2 s
    outcome = replay(CallRecord.from_bytes(record.to_bytes()), timeout_s=60)
    assert outcome.error is None, outcome.error
    assert outcome.limits is not None
    assert outcome.limits.timeout_s == 60


def test_what_parsing_a_record_would_build_is_bounded_first(dice_guest: Path, tmp_path: Path) -> None:
    """Sixty MiB of tiny lists parse to over a GiB of objects: refused by counting, before parsing."""
    data = good_record(dice_guest)
    tiny = b"[" + b",".join([b'[0,0,""]'] * 2_000_000) + b"]"
    raw = orjson.dumps({**data, "config": {"a": "@@"}}).replace(b'"@@"', tiny)
    path = tmp_path / "r.json"
    path.write_bytes(raw)
    started = time.monotonic()
    with pytest.raises(SandboxError, match="at most 1000000 lists and objects"):
        load_record(path)
    assert time.monotonic() - started < 5
    path.write_bytes(orjson.dumps({**data, "config": {"a": "@@"}}).replace(b'"@@"', b"[" + b"1," * 4_000_000 + b"1]"))
    with pytest.raises(SandboxError, match="4000000 values"):
        load_record(path)


def test_a_host_call_writing_more_often_than_a_record_holds_truncates_the_tape() -> None:
    """What a recorder keeps, a replay can load: a host call of an embedder's that writes into guest
    memory more than MAX_WRITES times marks the record truncated, not unloadable."""
    from sandbus.host.sandbox.record import MAX_WRITES, HostEvent, Tape

    tape = Tape()
    tape.begin_call()
    tape.current = HostEvent("custom", "scatter", [0])
    for i in range(MAX_WRITES + 1):
        tape.on_write(8 * i, b"x")
    assert tape.truncated
    assert len(tape.current.writes) == MAX_WRITES


def test_a_write_larger_than_the_tape_keeps_is_not_copied() -> None:
    from sandbus.host.sandbox.record import HostEvent, Tape

    tape = Tape(max_bytes=1000)
    tape.begin_call()
    tape.current = HostEvent("wasi_snapshot_preview1", "random_get", [64, 5000])
    tape.on_write(64, bytes(5000))
    assert tape.truncated
    assert tape.current.writes == []
