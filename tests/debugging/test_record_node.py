"""A node's recorder under a hostile plugin and a careless disk: a trap storm is one audit event an
interval, a record is never larger than ``max_bytes``, never half-written, never written into a directory
others may write to (or through a symlink), and its name is the plugin's own. Real files, real threads,
a real file-size limit in a child process."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from sandbus.host.sandbox.record import CallRecord, RecordSettings, TrapRecorder, load_record
from sandbus.sdk.errors import SandboxError


class Events:
    """The recorder's audit events, as a node's auditor would receive them (thread-safe)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def __call__(self, kind: str, message: str, details: Any) -> None:
        with self._lock:
            self.items.append((kind, message, dict(details)))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [d for k, _, d in self.items if k == kind]


def a_record(input_: bytes = b"100") -> CallRecord:
    return CallRecord(plugin="dice", sha256="0" * 64, function="handle_request", input=input_, config={},
                      limits={}, capabilities={}, init=[], call=[],
                      outcome={"error": {"code": "sandbox.trap", "message": "unreachable"}})


def test_a_trap_storm_is_one_audit_event_an_interval(tmp_path: Path) -> None:
    events = Events()
    recorder = TrapRecorder("dice", RecordSettings(tmp_path / "records"), on_event=events)
    recorder.PENDING = 0  # every record finds the queue full: the storm, without racing the writer
    for _ in range(500):
        assert not recorder.submit(a_record())
    assert [d["dropped"] for d in events.of("record.dropped")] == [1]
    recorder.DROP_REPORT_S = 0.0  # the interval has passed: the next report counts every drop since
    recorder.submit(a_record())
    assert [d["dropped"] for d in events.of("record.dropped")] == [1, 500]


def test_a_record_larger_than_max_bytes_is_not_written(tmp_path: Path) -> None:
    events = Events()
    records = tmp_path / "records"
    recorder = TrapRecorder("dice", RecordSettings(records, max_bytes=4096), on_event=events)
    assert recorder.write(a_record(b"x" * 100_000)) is None  # the input alone is larger
    assert list(records.iterdir()) == []
    [dropped] = events.of("record.dropped")
    assert dropped["reason"] == "max_bytes"
    assert dropped["size"] > 4096
    path = recorder.write(a_record(b"7"))
    assert path is not None
    assert path.stat().st_size <= 4096


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_directory_others_may_write_to_is_refused(tmp_path: Path, mode: int) -> None:
    events = Events()
    records = tmp_path / "records"
    records.mkdir()
    records.chmod(mode)
    assert TrapRecorder("dice", RecordSettings(records), on_event=events).write(a_record()) is None
    assert list(records.iterdir()) == []
    [failed] = events.of("record.failed")
    assert "writable by others" in failed["reason"]


def test_a_readable_directory_of_ours_is_used_and_each_record_is_private(tmp_path: Path) -> None:
    records = tmp_path / "records"
    records.mkdir(mode=0o755)
    records.chmod(0o755)
    path = TrapRecorder("dice", RecordSettings(records)).write(a_record())
    assert path is not None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    events = Events()
    records = tmp_path / "records"
    records.mkdir(mode=0o700)
    os.chown(records, 65534, 65534)
    assert TrapRecorder("dice", RecordSettings(records), on_event=events).write(a_record()) is None
    assert list(records.iterdir()) == []
    assert "owned by uid 65534" in events.of("record.failed")[0]["reason"]


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    events = Events()
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "records").symlink_to(target)
    assert TrapRecorder("dice", RecordSettings(tmp_path / "records"), on_event=events).write(a_record()) is None
    assert list(target.iterdir()) == []
    assert events.of("record.failed")[0]["reason"] == "a symlink"


@pytest.mark.parametrize("name", ["../dice", "dice/x", "Dice", "", ".hidden", "a" * 64])
def test_only_a_plugin_name_names_records(tmp_path: Path, name: str) -> None:
    with pytest.raises(SandboxError, match="not a plugin name"):
        TrapRecorder(name, RecordSettings(tmp_path))


def test_max_records_counts_only_this_plugins_records(tmp_path: Path) -> None:
    records = tmp_path / "records"
    records.mkdir(mode=0o700)
    (records / "dice-notes.json").write_text("{}")  # not a record: an operator's file
    (records / "dice_two-20261203T080000000000Z-1-1.json").write_text("{}")  # another plugin's
    (records / ".dice-20261203T080000000000Z-1-1.json.tmp").write_text("")  # a write that never finished
    path = TrapRecorder("dice", RecordSettings(records, max_records=1)).write(a_record())
    assert path is not None


def test_two_recorders_of_one_plugin_at_once_write_every_record(tmp_path: Path) -> None:
    """A reload makes a new recorder while the old one still writes: both at once, no name twice."""
    records = tmp_path / "records"
    settings = RecordSettings(records, max_records=1000)
    recorders = [TrapRecorder("dice", settings), TrapRecorder("dice", settings)]
    for _ in range(100):
        for recorder in recorders:
            while not recorder.submit(a_record()):
                recorder.flush(timeout=10)
    assert all(recorder.flush(timeout=30) for recorder in recorders)
    written = sorted(records.iterdir())
    assert len(written) == 200
    assert all(load_record(path).function == "handle_request" for path in written)


def test_a_write_cut_short_leaves_no_record_behind(tmp_path: Path) -> None:
    """The disk fills (here: a file-size limit) in the middle of a record: no half record is left under
    a record's name for a later replay to trip over, and the failure is audited."""
    records = tmp_path / "records"
    script = f"""
import resource, signal, sys
from pathlib import Path
from tests.debugging.test_record_node import Events, a_record
from sandbus.host.sandbox.record import RecordSettings, TrapRecorder
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
events = Events()
path = TrapRecorder("dice", RecordSettings(Path({str(records)!r}), max_bytes=1 << 20), on_event=events).write(
    a_record(b"x" * 50_000))
print(path, [k for k, _, _ in events.items])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None ['record.failed']", done.stdout
    assert list(records.iterdir()) == []


def test_a_failing_directory_or_oversized_records_are_one_audit_event_an_interval(tmp_path: Path) -> None:
    """A plugin trapping in a loop while the directory cannot be used (or with inputs too large to record):
    one record.failed (record.dropped) an interval, counting the calls it stands for."""
    events = Events()
    records = tmp_path / "records"
    records.mkdir()
    records.chmod(0o777)
    loose = TrapRecorder("dice", RecordSettings(records), on_event=events)
    for _ in range(50):
        assert loose.write(a_record()) is None
    assert [d["count"] for d in events.of("record.failed")] == [1]
    loose.DROP_REPORT_S = 0.0
    loose.write(a_record())
    assert [d["count"] for d in events.of("record.failed")] == [1, 50]

    records.chmod(0o700)
    small = TrapRecorder("dice", RecordSettings(records, max_bytes=1024), on_event=events)
    for _ in range(50):
        assert small.write(a_record(b"x" * 10_000)) is None
    assert [d["count"] for d in events.of("record.dropped")] == [1]


def test_concurrent_traps_on_a_node_are_each_recorded_whole(dice_guest: Path, tmp_path: Path) -> None:
    """Four instances trapping at once, forty times: forty whole records of forty calls, no name twice,
    none larger than max_bytes, each replayable to its trap."""
    from concurrent.futures import ThreadPoolExecutor

    from sandbus.host.lifecycle import PluginManager
    from sandbus.host.lifecycle.policy import load_policy
    from sandbus.host.sandbox import ModuleCache
    from sandbus.host.sandbox.replay import replay
    from sandbus.sdk.errors import TrapError
    from tests.conftest import AuditLog
    from tests.debugging.test_record_replay import node_dir
    from tests.host.manager.factory import wait_until

    plugins, records = node_dir(tmp_path, dice_guest, max_records=1000)
    (plugins / "dice.toml").write_text((plugins / "dice.toml").read_text() + "\n[resources]\nmax_instances = 4\n")
    audit = AuditLog()
    manager = PluginManager(plugins, policy=load_policy(tmp_path / "policy.toml"), on_audit=audit,
                            cache=ModuleCache(tmp_path / "cache"))

    def trap(_: int) -> bool:
        try:
            manager.execute_json("dice", "handle_request", 100)
        except TrapError:
            return True
        return False

    try:
        manager.load("dice")
        with ThreadPoolExecutor(4) as pool:
            for round_ in range(1, 11):  # four at once, ten times; the queue (16) is never what is tested
                assert all(pool.map(trap, range(4)))
                wanted = 4 * round_
                wait_until(lambda: audit.kinds().count("record.written") >= wanted, timeout=30,  # noqa: B023
                           what="the round's records")
    finally:
        manager.close(timeout=30)
    written = sorted(records.iterdir())
    assert len(written) == 40
    assert audit.kinds().count("record.written") == 40
    assert all(not p.name.startswith(".") for p in written)
    for path in written[:3]:
        outcome = replay(load_record(path))
        assert isinstance(outcome.error, TrapError)
        assert outcome.reproduced
