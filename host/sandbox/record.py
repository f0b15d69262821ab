"""Record a call and replay it offline: the same input, configuration and host results, the same outcome.

A call of a core module depends on its input, its configuration, its limits, and on everything
nondeterministic it receives from the host: the results of sandbus host functions (time, KV, requests,
HTTP...) and of WASI's clock and random functions. A :class:`Tape` on the instance records each of those
host calls as it happens: the function, its arguments, its results and every byte it wrote into guest
memory. A :class:`CallRecord` holds them with the module's sha256, the function and the input, and is
written as one JSON file (``sandbus run --record FILE``; on a node, a call that traps, when the
operator's policy lists the plugin under ``[record]``).

Replaying (:func:`replay`, ``sandbus replay FILE``) loads the same module (checked by digest), with the
same limits, configuration and grants, on a fresh instance, and answers every host call from the tape:
nothing reaches the clock, the bus or the network. A guest that asks for another host function than
the one recorded at that point, or for more or fewer host calls, has *diverged*:
:class:`ReplayDivergenceError`. Otherwise the call ends as it ended when it was recorded (the same trap
or reply), which :class:`ReplayOutcome` reports; ``--debug`` runs it under a native debugger's eyes.

What is not recorded, so what a replay cannot reproduce: the contents of granted directories (a replay
grants none), and the state a *pooled* instance kept from earlier calls (a replay starts from a fresh
instance: its initialisation is recorded and replayed, earlier calls are not). Records are core modules
only: components and Extism plugins are refused.

Everything read back from a record file is bounded and validated before use: the file's size, every
field's type, every length; a record is data, never code.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import itertools
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from sandbus.sdk.errors import ReplayDivergenceError, SandboxError, SandbusError, error_from_dict

__all__ = [
    "FORMAT",
    "MAX_RECORD_BYTES",
    "CallRecord",
    "HostEvent",
    "RecordSettings",
    "ReplayDivergenceError",
    "Tape",
    "TrapRecorder",
    "load_record",
    "recordable",
    "save_record",
]

#: The format tag of a record file; another one is refused.
FORMAT = "sandbus.record/1"
#: The largest record file read or written (a bound on what one record may hold: input and host results).
MAX_RECORD_BYTES = 64 * 1024 * 1024
#: Host calls one record holds at most (the call's and its instance's initialisation's together).
MAX_EVENTS = 100_000
#: Arguments or results of one recorded host call at most (wasm allows 1000 parameters a function).
MAX_VALUES = 1000
#: How deep the free-form parts of a record (configuration, limits, grants, errors) may nest: deeper
#: JSON is refused at load rather than failing later, deep in the encoder, as an internal error.
MAX_DEPTH = 64
#: Lists and objects, and values (commas), one record file may hold: what parsing it may build.
MAX_CONTAINERS = 1_000_000
MAX_SEPARATORS = 4_000_000
#: Values the free-form parts of a record (configuration, limits, grants, errors) hold at most, all levels.
MAX_ITEMS = 100_000
#: Bytes written into guest memory one host call holds at most as separate writes (a host function
#: writes its answer once or twice).
MAX_WRITES = 64
#: Numbers the files this process writes, so that no two get one name.
_sequence = itertools.count(1)


def recordable(error: BaseException) -> bool:
    """Whether a call that ended with ``error`` is one a node records: the guest trapped or broke a limit
    or the ABI (a failure the plugin's own code led to), not a refusal before it ran."""
    from sandbus.sdk.errors import (
        AbiViolationError,
        ExecutionTimeoutError,
        MemoryLimitError,
        OutOfFuelError,
        StackLimitError,
        TrapError,
    )

    return isinstance(error, TrapError | OutOfFuelError | StackLimitError | MemoryLimitError
                      | ExecutionTimeoutError | AbiViolationError)


@dataclass
class HostEvent:
    """One host call: ``module.name(args)`` returned ``results`` (or raised ``error``) after writing
    ``writes`` into guest memory. A write is ``(arg, offset, data)``: at ``args[arg] + offset`` when the
    pointer was one of the arguments (``arg`` >= 0), else at the absolute address ``offset`` (``arg`` -1),
    so that a replay whose guest passes other pointers still gets its bytes where it asked for them."""

    module: str
    name: str
    args: list[int]
    results: list[int] = field(default_factory=list)
    writes: list[tuple[int, int, bytes]] = field(default_factory=list)
    error: dict[str, Any] | None = None

    def size(self) -> int:
        return 64 + len(self.module) + len(self.name) + 24 * (len(self.args) + len(self.results)) + sum(
            32 + len(d) * 4 // 3 for _, _, d in self.writes)

    def to_json(self) -> dict[str, Any]:
        return {"module": self.module, "name": self.name, "args": self.args, "results": self.results,
                "writes": [[a, o, base64.b64encode(d).decode()] for a, o, d in self.writes],
                "error": self.error}

    @classmethod
    def from_json(cls, data: Any) -> HostEvent:
        obj = _obj(data, "event")
        module, name = _name(obj.get("module"), "event module"), _name(obj.get("name"), "event name")
        writes = []
        raw_writes = _list(obj.get("writes"), "event writes")
        if len(raw_writes) > MAX_WRITES:
            raise _bad(f"a host call makes at most {MAX_WRITES} writes into guest memory")
        for w in raw_writes:
            item = _list(w, "event write")
            if len(item) != 3:
                raise _bad("an event write is [arg, offset, base64]")
            writes.append((_int(item[0], "write arg"), _int(item[1], "write offset"), _b64(item[2], "write")))
        error = obj.get("error")
        if error is not None:
            error = _error(error, "event error")
        args, results = _list(obj.get("args"), "event args"), _list(obj.get("results"), "event results")
        if len(args) > MAX_VALUES or len(results) > MAX_VALUES:
            raise _bad(f"a host call has at most {MAX_VALUES} arguments and results")
        return cls(module, name, [_int(a, "event arg") for a in args], [_int(r, "event result") for r in results],
                   writes, error)


class Tape:
    """The host calls of one instance, recorded or replayed. Not thread-safe: one per instance, which
    serves one call at a time.

    Recording: the instance's initialisation is kept (:attr:`init`), then each call's host calls from
    :meth:`begin_call` on (:attr:`call`); host calls between two calls (health checks) are not kept.
    Past ``max_bytes`` the tape stops keeping events and is marked :attr:`truncated` (a record made from
    it is refused by replay, which could not reproduce the call).

    Replaying: each host call takes the next event (:meth:`next_event`), which must be the same function.
    """

    def __init__(self, *, max_bytes: int = MAX_RECORD_BYTES, replay: CallRecord | None = None) -> None:
        self.max_bytes = max_bytes
        self.replaying = replay is not None
        self.phase = "init"
        self.init: list[HostEvent] = list(replay.init) if replay is not None else []
        self.call: list[HostEvent] = list(replay.call) if replay is not None else []
        self.truncated = False
        #: Calls this instance served before the current one (recording): their effect on its memory is
        #: not in the record, so a replay from a fresh instance may not see what this call saw.
        self.earlier_calls = 0
        self._size = 0  # of the events kept: the initialisation's and the current call's
        self._call_size = 0
        self._position = 0
        #: The host call being recorded: guest-memory writes made while it runs belong to it.
        self.current: HostEvent | None = None

    # -- recording ---------------------------------------------------------------------------------

    def begin_call(self) -> None:
        """A call starts: recording, forget the previous call's events; replaying, the initialisation
        must have made every host call it recorded."""
        if self.replaying:
            if self.phase == "init" and self._position != len(self.init):
                raise self._diverged(self._position, f"{len(self.init)} host calls", "end")
            self.phase, self._position = "call", 0
            return
        self._size -= self._call_size  # the previous call's events are forgotten
        self._call_size = 0
        if self.phase == "call":
            self.earlier_calls += 1
        self.phase = "call"
        self.call = []

    def end_init(self) -> None:
        """The instance is initialised: host calls until the next call (health checks) are not kept."""
        if not self.replaying and self.phase == "init":
            self.phase = "idle"

    def record(self, event: HostEvent) -> None:
        if self.phase == "idle":
            return
        events = self.init if self.phase == "init" else self.call
        size = event.size()
        if self.truncated or self._size + size > self.max_bytes or len(self.init) + len(self.call) >= MAX_EVENTS:
            self.truncated = True
            return
        self._size += size
        if self.phase == "call":
            self._call_size += size
        events.append(event)

    def on_write(self, ptr: int, data: bytes) -> None:
        """A host function wrote ``data`` at ``ptr`` of guest memory."""
        event = self.current
        if event is None:
            return
        if len(event.writes) >= MAX_WRITES or self.truncated or len(data) > self.max_bytes:
            # More than a record may hold (HostEvent.from_json), or than this tape keeps: not copied
            # (a guest asking random_get for a GiB would double it in host memory), and not replayable.
            self.truncated = True
            return
        args = tuple(event.args)
        matches = [i for i, arg in enumerate(args) if arg == ptr]
        # The argument whose buffer holds the write (two arguments may have the same value: a clock id
        # and a pointer both 0), so that a replay checks it against the right span (write_span).
        for i in matches:
            span = write_span(event, i, args)
            if span is None or len(data) <= span:
                event.writes.append((i, 0, bytes(data)))
                return
        if matches:
            event.writes.append((matches[-1], 0, bytes(data)))
            return
        event.writes.append((-1, ptr, bytes(data)))

    # -- replaying ---------------------------------------------------------------------------------

    def next_event(self, module: str, name: str) -> HostEvent:
        """The recorded event answering this host call, or :class:`ReplayDivergenceError`."""
        events = self.init if self.phase == "init" else self.call
        index = self._position
        if index >= len(events):
            raise self._diverged(index, "end", f"{module}.{name}")
        event = events[index]
        if (event.module, event.name) != (module, name):
            raise self._diverged(index, f"{event.module}.{event.name}", f"{module}.{name}")
        self._position += 1
        return event

    def end_call(self) -> None:
        """A replayed call returned: it must have made every host call it recorded."""
        if self.replaying and self.phase == "call" and self._position != len(self.call):
            nxt = self.call[self._position]
            raise self._diverged(self._position, f"{nxt.module}.{nxt.name}", "end")

    def mismatch(self, message: str) -> ReplayDivergenceError:
        """A replayed host call that matches its event by name but not otherwise."""
        return ReplayDivergenceError(f"the replay diverged from the record at host call {self._position - 1} of "
                                     f"the {self.phase}: {message}", index=self._position - 1, phase=self.phase)

    def _diverged(self, index: int, expected: str, found: str) -> ReplayDivergenceError:
        return ReplayDivergenceError(
            f"the replay diverged from the record at host call {index} of the {self.phase}: the record has "
            f"{expected}, the guest asked for {found}", index=index, expected=expected, found=found,
            phase=self.phase)


#: Host functions that write a fixed number of bytes at one argument (WASI's clock readings).
_FIXED_WRITES: dict[tuple[str, str], tuple[int, int]] = {
    ("wasi_snapshot_preview1", "clock_time_get"): (2, 8),
    ("wasi_snapshot_preview1", "clock_res_get"): (1, 8),
}


def write_span(event: HostEvent, arg: int, args: tuple[int, ...]) -> int | None:
    """How many bytes the guest let the host write at ``args[arg]`` in this host call: WASI's clocks
    8; a buffer pointer followed by its capacity (``random_get``, and every sandbus host function that
    answers into a buffer: ``env_get``, ``take_result``...) that capacity; None when the call says no
    size (a host function of an embedder's own: only guest memory bounds it)."""
    fixed = _FIXED_WRITES.get((event.module, event.name))
    if fixed is not None:
        return fixed[1] if arg == fixed[0] else 0
    if event.module in ("wasi_snapshot_preview1", "sandbus_v1"):
        return max(0, args[arg + 1]) if arg + 1 < len(args) else 0
    return None


def apply_writes(event: HostEvent, args: tuple[int, ...], write: Callable[[int, bytes], None]) -> None:
    """Write an event's recorded bytes into guest memory, where this replayed call's arguments point.

    A record is data from elsewhere: each write must stay inside the buffer the replayed guest handed
    the host function (:func:`write_span`), else it is a divergence, not a write over the guest's other
    data; guest memory itself bounds every write (an ABI violation beyond it)."""
    where = f"{event.module}.{event.name}"
    for arg, offset, data in event.writes:
        if arg >= 0:
            if arg >= len(args):
                raise ReplayDivergenceError(f"a recorded write names argument {arg} of a host call with "
                                            f"{len(args)} arguments", function=where)
            span = write_span(event, arg, args)
            if offset < 0 or (span is not None and offset + len(data) > span):
                raise ReplayDivergenceError(
                    f"the record writes {len(data)} bytes at offset {offset} of argument {arg} of {where}, "
                    f"whose buffer has {span} bytes", function=where, offset=offset, length=len(data), span=span)
            write(args[arg] + offset, data)
        elif event.module in ("wasi_snapshot_preview1", "sandbus_v1"):
            raise ReplayDivergenceError(f"the record writes at an address {where} was not given", function=where)
        else:
            write(offset, data)


@dataclass
class CallRecord:
    """One recorded call (see the module docstring). ``outcome`` is how it ended: ``{"reply": base64}``
    or ``{"error": <the error's wire form>}``."""

    plugin: str
    sha256: str
    function: str
    input: bytes
    config: dict[str, Any]
    limits: dict[str, Any]
    capabilities: dict[str, Any]
    init: list[HostEvent]
    call: list[HostEvent]
    outcome: dict[str, Any]
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat().replace("+00:00", "Z"))
    truncated: bool = False
    #: Where the module was loaded from, when known: where a replay looks for it (its digest decides).
    module: str | None = None
    #: Calls the recorded instance served before this one (a pooled instance keeps its memory from call
    #: to call; a replay starts from a fresh one, so state they left is not replayed).
    earlier_calls: int = 0

    def to_bytes(self) -> bytes:
        return orjson.dumps({
            "format": FORMAT, "created": self.created, "plugin": self.plugin, "sha256": self.sha256,
            "module": self.module, "earlier_calls": self.earlier_calls,
            "function": self.function, "input": base64.b64encode(self.input).decode(), "config": self.config,
            "limits": self.limits, "capabilities": self.capabilities, "truncated": self.truncated,
            "init": [e.to_json() for e in self.init], "call": [e.to_json() for e in self.call],
            "outcome": self.outcome,
        }, default=str)  # an error's details are JSON-able by design; anything else is shown as text

    @classmethod
    def from_bytes(cls, raw: bytes) -> CallRecord:
        if len(raw) > MAX_RECORD_BYTES:
            raise _bad(f"a record is at most {MAX_RECORD_BYTES} bytes, this one has {len(raw)}")
        # What parsing would build, bounded before it is built: a 64 MiB file of tiny lists parses to
        # over a GiB of objects. Brackets and commas inside strings count too (base64 has none), so
        # the bound errs on the side of refusing; a real record has a few per host call.
        containers, separators = raw.count(b"[") + raw.count(b"{"), raw.count(b",")
        if containers > MAX_CONTAINERS or separators > MAX_SEPARATORS:
            raise _bad(f"a record holds at most {MAX_CONTAINERS} lists and objects and {MAX_SEPARATORS} values, "
                       f"this one up to {containers} and {separators}")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise _bad(f"not JSON: {e}") from e
        obj = _obj(data, "record")
        if obj.get("format") != FORMAT:
            raise _bad(f"not a sandbus call record (format {str(obj.get('format'))[:40]!r}, expected {FORMAT!r})")
        raw_init, raw_call = _list(obj.get("init"), "init"), _list(obj.get("call"), "call")
        if len(raw_init) + len(raw_call) > MAX_EVENTS:  # counted before any is converted
            raise _bad(f"a record holds at most {MAX_EVENTS} host calls")
        init = [HostEvent.from_json(e) for e in raw_init]
        call = [HostEvent.from_json(e) for e in raw_call]
        sha = _str(obj.get("sha256"), "sha256")
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise _bad("sha256 must be 64 lowercase hex digits")
        earlier = obj.get("earlier_calls", 0)
        if type(earlier) is not int or not 0 <= earlier < 2**63:
            raise _bad("earlier_calls must be a count")
        truncated = obj.get("truncated", False)
        if not isinstance(truncated, bool):
            raise _bad("truncated must be true or false")
        return cls(plugin=_name(obj.get("plugin"), "plugin"), sha256=sha,
                   function=_name(obj.get("function"), "function"), input=_b64(obj.get("input"), "input"),
                   config=_obj(_shallow(obj.get("config"), "config"), "config"),
                   limits=_obj(_shallow(obj.get("limits"), "limits"), "limits"),
                   capabilities=_capabilities(obj.get("capabilities")), init=init, call=call,
                   outcome=_outcome(obj.get("outcome")), created=_str(obj.get("created"), "created"),
                   truncated=truncated, earlier_calls=earlier,
                   module=None if obj.get("module") is None else _path_text(obj.get("module"), "module"))

    def recorded_error(self) -> SandbusError | None:
        """The error the recorded call ended with (None: it replied)."""
        error = self.outcome.get("error")
        return error_from_dict(error) if isinstance(error, dict) else None

    def recorded_reply(self) -> bytes | None:
        reply = self.outcome.get("reply")
        return _b64(reply, "reply") if reply is not None else None


def load_record(path: Path) -> CallRecord:
    """Read and validate a record file (at most :data:`MAX_RECORD_BYTES`).

    Raises:
        SandboxError: unreadable, too large, or not a valid record (``details["path"]``).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SandboxError(f"{path} is not a regular file", path=str(path))
            raw = f.read(MAX_RECORD_BYTES + 1)
    except OSError as e:
        raise SandboxError(f"cannot read the record {path}: {e.strerror}", path=str(path)) from e
    try:
        return CallRecord.from_bytes(raw)
    except SandboxError as e:
        raise SandboxError(f"{path}: {e.message}", path=str(path)) from e


def save_record(record: CallRecord, path: Path) -> None:
    """Write ``record`` to ``path`` as a new private file (mode 0600: it holds the call's input).

    Written under a hidden temporary name beside ``path`` and renamed over it when whole: a record is
    never half-written, a file already at ``path`` is replaced (never kept with its own, perhaps looser,
    mode), and a symlink or FIFO planted there is replaced, not followed or blocked on.

    Raises:
        OSError: the directory cannot be written, or ``path`` is a directory.
    """
    data = record.to_bytes()
    directory = path.parent
    temp = directory / f".{path.name}.{os.getpid()}.{next(_sequence)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


@dataclass(frozen=True)
class RecordSettings:
    """Where a node writes the records of calls that trap, and how many and how large they may be.

    Parameters:
        directory: created (mode 0700) at the first record; records hold the call's input and the
            host results it received, which may be private. An existing directory is used only when it
            is a real directory (not a symlink), owned by this process's user and writable by no one
            else: anyone who may write there could replace a record with one of their own, which the
            operator would then replay.
        max_bytes: the largest record file; a call whose host calls held more is recorded without them
            (``truncated``: kept as evidence, refused by replay), and one whose record is still larger
            (its input) is not written (``record.dropped``).
        max_records: records of one plugin kept in the directory; beyond, new traps are not recorded
            (audited once a process as ``record.dropped``) until some are removed.
    """

    directory: Path
    max_bytes: int = 1024 * 1024
    max_records: int = 100


#: What a node's record file is called: ``PLUGIN-TIME-PID-N.json`` (N counts this process's records, so
#: that two recorders of one plugin, before and after a reload, never pick the same name).
_RECORD_NAME = re.compile(r"(?P<plugin>[a-z][a-z0-9_]{0,62})-\d{8}T\d{12}Z-\d+(-\d+)?\.json")
_PLUGIN_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
#: What a granted environment variable's name may be (host/lifecycle/manifest.py's check_env_name).
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")


class TrapRecorder:
    """Writes the records of one plugin's failed calls into :attr:`RecordSettings.directory`.

    A call that fails may run on a node's event loop: :meth:`submit` only queues the record (at most
    :data:`PENDING` waiting; beyond, it is dropped and audited), and one thread of the recorder encodes
    and writes them, so no file is written on the loop. A record is written to a hidden temporary file
    and renamed into place, so a record file is whole or absent, whenever the node stops.
    """

    #: Records waiting to be written at most; a burst of traps beyond is not recorded (``record.dropped``).
    PENDING = 16
    #: ``record.dropped`` for a full queue is audited at most once this many seconds (with the count).
    DROP_REPORT_S = 10.0

    def __init__(self, plugin: str, settings: RecordSettings,
                 on_event: Callable[[str, str, Mapping[str, Any]], None] | None = None,
                 module_path: Path | None = None) -> None:
        if not _PLUGIN_NAME.fullmatch(plugin):
            # The name becomes part of a file name in the directory: a plugin name, nothing else.
            raise SandboxError(f"cannot record calls of {plugin[:80]!r}: not a plugin name", plugin=plugin[:80])
        self.plugin = plugin
        self.settings = settings
        self.module_path = module_path
        self._on_event = on_event
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queue: list[CallRecord] = []
        self._busy = False
        self._thread: threading.Thread | None = None
        self._full_reported = False
        self._dropped = 0  # since the last record.dropped of a full queue
        self._dropped_reported_at: float | None = None
        #: Per audit kind: when it was last emitted, and how many were held back since (see _limited).
        self._reports: dict[str, tuple[float | None, int]] = {}

    def submit(self, record: CallRecord) -> bool:
        """Queue ``record`` to be written; False when :data:`PENDING` records already wait (dropped)."""
        report = 0
        with self._lock:
            if len(self._queue) >= self.PENDING:
                dropped = True
                self._dropped += 1
                now = time.monotonic()
                if self._dropped_reported_at is None or now - self._dropped_reported_at >= self.DROP_REPORT_S:
                    # A trap storm must not become an audit storm: one event an interval, with the count.
                    report, self._dropped, self._dropped_reported_at = self._dropped, 0, now
            else:
                dropped = False
                self._queue.append(record)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=f"sandbus-record-{self.plugin}",
                                                    daemon=True)
                    self._thread.start()
                self._idle.notify_all()
        if report:
            self._emit("record.dropped", f"{report} failed call(s) not recorded: {self.PENDING} records wait to be "
                       "written", {"pending": self.PENDING, "dropped": report, "reason": "queue"})
        return not dropped

    def flush(self, timeout: float) -> bool:
        """Wait until every queued record is written (at most ``timeout`` seconds); True if none is left."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._queue and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._idle:
                self._idle.wait_for(lambda: bool(self._queue))
                record = self._queue.pop(0)
                self._busy = True
            try:
                self.write(record)
            except Exception:  # never the end of the writer: the next record may well be written
                import logging

                logging.getLogger("sandbus.record").exception("writing a record of %s failed", self.plugin)
            finally:
                with self._idle:
                    self._busy = False
                    self._idle.notify_all()

    def write(self, record: CallRecord) -> Path | None:
        """Write ``record`` now; its path, or None when it is not written: the plugin already has
        ``max_records`` records, the record is larger than ``max_bytes``, or the directory cannot be
        used (audited, never the call's failure)."""
        directory = self.settings.directory
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR) and directory.is_symlink():
                self._limited("record.failed", f"a failed call was not recorded: {directory} is a symlink",
                           {"path": str(directory), "reason": "a symlink"})
                return None
            self._limited("record.failed", f"a failed call could not be recorded in {directory}: {e.strerror}",
                       {"path": str(directory)})
            return None
        try:
            problem = _unsafe_directory(os.fstat(dfd))
            if problem is not None:
                self._limited("record.failed", f"a failed call was not recorded: {directory} is {problem}",
                           {"path": str(directory), "reason": problem})
                return None
            return self._write_in(dfd, directory, record)
        except OSError as e:
            self._limited("record.failed", f"a failed call could not be recorded in {directory}: {e.strerror}",
                       {"path": str(directory)})
            return None
        finally:
            os.close(dfd)

    def _write_in(self, dfd: int, directory: Path, record: CallRecord) -> Path | None:
        existing = sum(1 for name in os.listdir(dfd)
                       if (m := _RECORD_NAME.fullmatch(name)) is not None and m["plugin"] == self.plugin)
        if existing >= self.settings.max_records:
            if not self._full_reported:
                self._full_reported = True
                self._emit("record.dropped", f"a failed call was not recorded: {existing} records of "
                           f"this plugin are in {directory} (max_records)",
                           {"limit": self.settings.max_records, "reason": "max_records"})
            return None
        data = record.to_bytes()
        if len(data) > self.settings.max_bytes:
            self._limited("record.dropped", f"a failed call of {record.function} was not recorded: its record has "
                       f"{len(data)} bytes, above max_bytes ({self.settings.max_bytes}; its input has "
                       f"{len(record.input)})", {"limit": self.settings.max_bytes, "size": len(data),
                                                 "reason": "max_bytes"})
            return None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{self.plugin}-{stamp}-{os.getpid()}-{next(_sequence)}.json"
        temp = f".{name}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600,
                     dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(temp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dfd)
            raise
        path = directory / name
        self._emit("record.written", f"the failed call of {record.function} was recorded in {path}",
                   {"path": str(path), "function": record.function, "truncated": record.truncated})
        return path

    def _limited(self, kind: str, message: str, details: Mapping[str, Any]) -> None:
        """:meth:`_emit`, at most once per :data:`DROP_REPORT_S` for each kind: a plugin that traps in a
        loop into a directory that cannot be used (or with inputs too large to record) makes one event an
        interval, which says how many failed calls it stands for (``count``)."""
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._reports.get(kind, (None, 0))
            if last is not None and now - last < self.DROP_REPORT_S:
                self._reports[kind] = (last, suppressed + 1)
                return
            self._reports[kind] = (now, 0)
        self._emit(kind, message, {**details, "count": suppressed + 1})

    def _emit(self, kind: str, message: str, details: Mapping[str, Any]) -> None:
        if self._on_event is not None:
            self._on_event(kind, message, details)


def _unsafe_directory(st: os.stat_result) -> str | None:
    """Why a record directory must not be used, or None: someone else's, or writable by others."""
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by this node's user (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"writable by others (mode {stat.S_IMODE(st.st_mode):04o}; make it 0700)"
    return None


# -- validation of what a record file holds ---------------------------------------------------------


def _bad(message: str) -> SandboxError:
    return SandboxError(f"invalid call record: {message}")


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"{what} must be an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise _bad(f"{what} must be a list")
    return value


def _int(value: Any, what: str) -> int:
    if type(value) is not int or not -(2**63) <= value < 2**64:
        raise _bad(f"{what} must be a 64-bit integer")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str) or len(value) > 4096:
        raise _bad(f"{what} must be a string of at most 4096 characters")
    return value


def _name(value: Any, what: str) -> str:
    """A name a record gives (plugin, function, host function): shown on a terminal and in errors, so
    printable text only."""
    text = _str(value, what)
    if not text or len(text) > 256 or not text.isprintable():
        raise _bad(f"{what} must be 1 to 256 printable characters")
    return text


def _path_text(value: Any, what: str) -> str:
    text = _str(value, what)
    if not text or "\x00" in text or not text.isprintable():
        raise _bad(f"{what} must be a path of printable characters")
    return text


def _shallow(value: Any, what: str) -> Any:
    """``value`` when it nests at most :data:`MAX_DEPTH` levels and holds at most :data:`MAX_ITEMS`
    values (an iterative walk, no recursion limit; only containers are kept on its stack, so a list of
    millions of numbers costs nothing to refuse)."""
    stack = [(value, 0)] if isinstance(value, dict | list) else []
    items = 0
    while stack:
        item, level = stack.pop()
        if level >= MAX_DEPTH:
            raise _bad(f"{what} nests deeper than {MAX_DEPTH} levels")
        children = item.values() if isinstance(item, dict) else item
        items += len(children)
        if items > MAX_ITEMS:
            raise _bad(f"{what} holds more than {MAX_ITEMS} values")
        stack.extend((v, level + 1) for v in children if isinstance(v, dict | list))
    return value


def _error(value: Any, what: str) -> dict[str, Any]:
    """An error's wire form: an object with a string ``code`` and ``message``."""
    obj = _obj(_shallow(value, what), what)
    _str(obj.get("code"), f"{what} code")
    _str(obj.get("message"), f"{what} message")
    return obj


def _outcome(value: Any) -> dict[str, Any]:
    """``{"reply": base64}`` or ``{"error": <wire form>}``, checked now rather than after the replay ran."""
    obj = _obj(value, "outcome")
    if "error" in obj and obj["error"] is not None:
        return {"error": _error(obj["error"], "outcome error")}
    if "reply" in obj:
        _b64(obj["reply"], "outcome reply")
        return {"reply": obj["reply"]}
    raise _bad("outcome must hold a reply or an error")


def _capabilities(value: Any) -> dict[str, Any]:
    """The grants: ``clock``/``random`` booleans, ``env`` names to values, ``env_unset``/``extra``/``dirs``
    lists of strings (each of the types the sandbox takes: a string is not a list of its letters)."""
    obj = _obj(value, "capabilities")
    for key in ("clock", "random"):
        if not isinstance(obj.get(key, False), bool):
            raise _bad(f"capabilities {key} must be true or false")
    env = _obj(obj.get("env", {}), "capabilities env")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise _bad("capabilities env must map names to strings")
    for name, text in env.items():
        if not _ENV_NAME.fullmatch(name) or "\x00" in text or len(text) > 65536:
            raise _bad(f"capabilities env: {name[:64]!r} is not a variable name with a value a process can have")
    for key in ("env_unset", "extra", "dirs"):
        items = _list(obj.get(key, []), f"capabilities {key}")
        if len(items) > 4096 or not all(isinstance(i, str) and len(i) <= 4096 for i in items):
            raise _bad(f"capabilities {key} must be a list of strings")
    return obj


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise _bad(f"{what} must be base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad(f"{what} is not valid base64: {e}") from e
