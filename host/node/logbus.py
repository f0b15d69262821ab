"""Plugin log lines on the bus: captured where guests log, published off the request path.

A guest's ``log()`` and its stdout/stderr reach the Python logger ``sandbus.plugin.<name>``
(host/sandbox/instance.py: one record per line, control characters escaped). A node captures those
records with one :class:`logging.Handler` on ``sandbus.plugin`` and publishes each line on
``sandbus.log.<node>.<plugin>`` (docs/protocol.md has the record). Why it is shaped this way:

* The handler runs in the calling thread -- the event loop for an inline call, a worker thread
  otherwise -- inside the plugin's call. So it does only what must happen there: stamp the line
  (time, level, plugin, serving version, the call's trace id), append it to the plugin's ring
  and to one bounded queue, and wake the loop at most once per batch. No JSON, no NATS, one
  short lock. A plugin that does not log costs nothing: no record is ever made for it.
* A loop task drains the queue and publishes. Each plugin has a token bucket (lines per
  second): what exceeds it is dropped and counted, the count goes out in the ``dropped`` field
  of the plugin's next published line and in a ``log.dropped`` audit event (at most one per
  plugin per interval). The queue is bounded too: a line that finds it full is counted the same
  way, never waited for. A flooding plugin therefore costs the node a bounded amount of work and
  memory, and never holds up another plugin's calls.
* Each line gets ``seq``, increasing per node, when it is captured: a follower that sees a gap
  knows it missed lines (dropped here, or lost by core NATS).
* Each plugin's last lines stay in a ring on the node (``sandbus debug`` shows them) whether or not
  they were published.

The per-call cap (``Limits.log_bytes``) applies before any of this: what exceeds it never becomes a
record. Each message is bounded again here (:data:`MAX_LOG_MESSAGE`), so a line is always far below
the NATS max payload, and published as one JSON message: a guest line can never become two records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from sandbus.host.sandbox.guest_text import escape_controls
from sandbus.sdk.envelope import CONTENT_TYPE, H_CONTENT_TYPE, H_NODE
from sandbus.sdk.subjects import log_subject

__all__ = [
    "DEFAULT_LOG_RATE",
    "DEFAULT_RING_SIZE",
    "LOG_LEVELS",
    "MAX_LOG_MESSAGE",
    "LogLine",
    "PluginLogs",
    "iso_time",
]

log = logging.getLogger("sandbus.node")

#: Where guest output is logged: ``sandbus.plugin.<name>``.
PLUGIN_LOGGER = "sandbus.plugin"
_PREFIX_LEN = len(PLUGIN_LOGGER) + 1
#: Characters of one message kept (the rest is cut and said so); the per-call cap bounds the total.
MAX_LOG_MESSAGE = 8192
#: The plugin logger's level while nodes capture (when it has none of its own): every record is made, a
#: guest's trace and debug lines too.
CAPTURE_LEVEL = 1
#: Lines per plugin each node keeps for the debug view.
DEFAULT_RING_SIZE = 200
#: Lines per second and plugin published on the bus (the burst allowed is one second's worth).
DEFAULT_LOG_RATE = 200.0
#: Lines waiting to be published, all plugins together.
DEFAULT_QUEUE_SIZE = 10_000
#: Characters of the lines waiting to be published, all plugins together: lines at the message bound
#: (:data:`MAX_LOG_MESSAGE`) fill this long before the line count (the queue holds at most ~16 MiB of text).
DEFAULT_QUEUE_CHARS = 16 * 1024 * 1024
#: Characters one plugin's ring keeps: 200 lines at the message bound would be 1.6 MB a plugin, so a ring
#: of long lines keeps fewer of them (always the newest line).
DEFAULT_RING_CHARS = 256 * 1024
#: What a line costs besides its message, counted against the character bounds.
LINE_OVERHEAD = 128
#: Seconds between two ``log.dropped`` audit events of one plugin.
DROP_AUDIT_INTERVAL_S = 1.0
#: Plugins with a ring: names come from loaded plugins only, the bound is a backstop.
MAX_RING_PLUGINS = 4096

#: Python logging levels -> the record's ``level``.
LOG_LEVELS = ("debug", "info", "warning", "error")
_STREAMS = {"[stdout] ": "stdout", "[stderr] ": "stderr"}


def _level_name(levelno: int) -> str:
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warning"
    if levelno >= logging.INFO:
        return "info"
    return "debug"


#: (whole second, its ISO 8601 text): lines come many per second, formatting the date once per second is enough
_second: tuple[int, str] = (0, "1970-01-01T00:00:00")


def iso_time(ts: float) -> str:
    """``ts`` (Unix seconds) as ISO 8601 UTC with microseconds: ``2026-12-03T08:00:00.123456Z``."""
    global _second
    whole = int(ts)
    micros = round((ts - whole) * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, 0
    cached = _second
    if cached[0] != whole:
        cached = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{cached[1]}.{micros:06d}Z"


class LogLine:
    """One captured line. ``dropped`` is set when it is published (lines dropped just before it)."""

    __slots__ = ("dropped", "level", "message", "plugin", "seq", "size", "stream", "thread", "trace_id", "ts",
                 "version")

    def __init__(self, ts: float, level: str, plugin: str, version: str | None, stream: str | None,
                 message: str, trace_id: str | None, seq: int) -> None:
        self.ts = ts
        self.level = level
        self.plugin = plugin
        self.version = version
        self.stream = stream
        self.message = message
        self.trace_id = trace_id
        self.seq = seq
        self.dropped = 0
        #: what it counts against the ring's and the queue's character bounds
        self.size = len(message) + LINE_OVERHEAD
        #: the thread that logged it (:meth:`PluginLogs.discard_since` takes back an interrupted call's lines)
        self.thread = 0

    def to_dict(self, node: str) -> dict[str, Any]:
        """The record as published (docs/protocol.md, docs/schemas/log-line.schema.json)."""
        return {"ts": iso_time(self.ts), "node": node, "plugin": self.plugin, "version": self.version,
                "level": self.level, "stream": self.stream, "message": self.message,
                "trace_id": self.trace_id, "seq": self.seq, "dropped": self.dropped}


def _bounded(message: str) -> str:
    if len(message) <= MAX_LOG_MESSAGE:
        return message
    return f"{message[:MAX_LOG_MESSAGE]}... ({len(message) - MAX_LOG_MESSAGE} characters cut)"


class PluginLogs:
    """One node's capture of its plugins' log lines: rings, the publish queue, and the publisher.

    Parameters:
        node_id: the node (in every record and subject).
        version_of: the serving version of a plugin (None when unknown); called in the logging thread.
        trace_id: the current call's trace id (32 hex) or None; called in the logging thread.
        owns: whether a plugin is this node's (to route a line logged outside the node's threads
            when several nodes share a process).
        publish: publish lines on the bus (False: rings only, ``--no-bus-logs``).
        rate: lines per second and plugin published; the excess is dropped and counted.
        ring_size: lines per plugin kept for the debug view.
        queue_size: lines waiting to be published, all plugins together.
        queue_chars: characters of the lines waiting to be published, all plugins together.
        ring_chars: characters of one plugin's ring (fewer lines are kept when they are long).
        audit: ``(plugin, dropped)``: raise the ``log.dropped`` audit event (on the loop).
    """

    def __init__(self, node_id: str, *, version_of: Callable[[str], str | None],
                 trace_id: Callable[[], str | None], owns: Callable[[str], bool], publish: bool = True,
                 rate: float = DEFAULT_LOG_RATE, ring_size: int = DEFAULT_RING_SIZE,
                 queue_size: int = DEFAULT_QUEUE_SIZE, queue_chars: int = DEFAULT_QUEUE_CHARS,
                 ring_chars: int = DEFAULT_RING_CHARS,
                 audit: Callable[[str, int], None] | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"log rate must be positive, found {rate}")
        if min(ring_size, queue_size, queue_chars, ring_chars) < 1:
            raise ValueError("ring and queue sizes must be 1 or more")
        self.node_id = node_id
        self.publishing = publish
        self.rate = rate
        self.ring_size = ring_size
        self.queue_size = queue_size
        self.queue_chars = queue_chars
        self.ring_chars = ring_chars
        self._version_of = version_of
        self._trace_id = trace_id
        self._owns = owns
        self._audit = audit
        self._lock = threading.Lock()
        self._seq = 0
        self._rings: dict[str, deque[LogLine]] = {}
        #: characters each ring holds (under the lock)
        self._ring_sizes: dict[str, int] = {}
        self._queue: deque[LogLine] = deque()
        #: characters the queue holds (under the lock)
        self._queued = 0
        #: lines that found the queue full, per plugin, since the drain last looked (under the lock)
        self._overflow: dict[str, int] = {}
        self._woken = False
        self._closing = False
        #: lines are queued before :meth:`start` too (plugins loaded before the node connects), up to the
        #: queue's bounds, and published once it starts; False once closed or when not publishing
        self._early = publish
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._event: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._publish: Callable[..., Any] | None = None
        #: per plugin: [tokens, last refill (monotonic)]
        self._buckets: dict[str, list[float]] = {}
        #: per plugin: lines dropped since its last published line
        self._dropped: dict[str, int] = {}
        #: per plugin: lines dropped since its last log.dropped audit event (a timer reports them)
        self._unaudited: dict[str, int] = {}
        self._subjects: dict[str, str] = {}
        self._headers = {H_CONTENT_TYPE: CONTENT_TYPE, H_NODE: node_id}
        #: counters for stats and tests: lines captured, published, dropped (rate cap and queue)
        self.captured = 0
        self.published = 0
        self.dropped = 0

    # -- capture (any thread) ------------------------------------------------------------------------

    def take(self, record: logging.LogRecord) -> None:
        """Capture one record of ``sandbus.plugin.<name>`` (the logging thread; must stay cheap)."""
        plugin = record.name[_PREFIX_LEN:]
        args = record.args
        stream: str | None = None
        if record.msg == "%s%s" and isinstance(args, tuple) and len(args) == 2:
            # CallContext.log's record: (stream prefix, one escaped line)
            prefix = str(args[0])
            stream = _STREAMS.get(prefix) if prefix else None
            message = str(args[1])
            if prefix and stream is None:
                message = escape_controls(prefix) + message
        else:  # logged by something else under the plugin's name: made one safe line here
            message = escape_controls(record.getMessage())
        line = LogLine(record.created, _level_name(record.levelno), plugin, self._version_of(plugin), stream,
                       _bounded(message), self._trace_id(), 0)
        line.thread = threading.get_ident()
        wake = False
        with self._lock:
            self._seq += 1
            line.seq = self._seq
            self.captured += 1
            ring = self._rings.get(plugin)
            if ring is None:
                if len(self._rings) >= MAX_RING_PLUGINS:
                    oldest = next(iter(self._rings))
                    del self._rings[oldest]
                    self._ring_sizes.pop(oldest, None)
                ring = self._rings[plugin] = deque()
            held = self._ring_sizes.get(plugin, 0) + line.size
            ring.append(line)
            while len(ring) > 1 and (len(ring) > self.ring_size or held > self.ring_chars):
                held -= ring.popleft().size
            self._ring_sizes[plugin] = held
            if self._event is not None or self._early:
                if len(self._queue) >= self.queue_size or self._queued + line.size > self.queue_chars:
                    self._overflow[plugin] = self._overflow.get(plugin, 0) + 1
                else:
                    self._queue.append(line)
                    self._queued += line.size
                if not self._woken:
                    self._woken = wake = True
        if wake:
            self._wake()

    @property
    def last_seq(self) -> int:
        """The ``seq`` of the latest line captured (0: none yet): a mark for :meth:`discard_since`."""
        return self._seq

    def discard_since(self, plugin: str, mark: int) -> int:
        """Take back the lines ``plugin`` logged on this thread after ``mark`` (a :attr:`last_seq`): a call
        interrupted and run again from the start logs them again, and each line must be told once.

        Only for a call that ran on the node's loop thread (an inline call), where nothing else logs and
        the queue is not drained until the call returns: every such line is still in the ring and the
        queue. Returns how many lines were taken back."""
        if self._seq == mark:
            return 0
        me = threading.get_ident()

        def ours(line: LogLine) -> bool:
            return line.seq > mark and line.plugin == plugin and line.thread == me

        with self._lock:
            ring = self._rings.get(plugin)
            taken = 0
            if ring is not None:
                kept = [line for line in ring if not ours(line)]
                taken = len(ring) - len(kept)
                if taken:
                    self._rings[plugin] = deque(kept)
                    self._ring_sizes[plugin] = sum(line.size for line in kept)
            if any(ours(line) for line in self._queue):
                queue = deque(line for line in self._queue if not ours(line))
                self._queued -= sum(line.size for line in self._queue if ours(line))
                self._queue = queue
            self.captured -= taken
        return taken

    def _wake(self) -> None:
        loop, event = self._loop, self._event
        if loop is None or event is None:
            return
        if threading.get_ident() == self._loop_thread:
            event.set()
        else:
            # RuntimeError: the loop closed meanwhile, nothing will be published any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    def recent(self, plugin: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The plugin's last lines on this node (oldest first), as records."""
        with self._lock:
            ring = self._rings.get(plugin)
            lines = list(ring) if ring is not None else []
        if limit is not None:
            lines = lines[-limit:] if limit > 0 else []
        return [line.to_dict(self.node_id) for line in lines]

    def owns(self, plugin: str) -> bool:
        return self._owns(plugin)

    def retain(self, plugins: set[str]) -> None:
        """Forget what is kept for every plugin not in ``plugins`` (the ones the node knows): the ring, the
        rate bucket, the count of lines dropped. Loop thread only. A node that loads and unloads plugins
        of ever new names keeps state for the ones it has, not for every name it ever had."""
        with self._lock:
            for name in [n for n in self._rings if n not in plugins]:
                del self._rings[name]
                self._ring_sizes.pop(name, None)
        for kept in (self._buckets, self._dropped, self._subjects):
            for name in [n for n in kept if n not in plugins]:
                del kept[name]

    def held(self) -> dict[str, int]:
        """What the node holds now (for tests and stats): plugins with a ring, lines in the rings, characters
        in the rings, lines and characters queued, plugins with a rate bucket or a dropped count."""
        with self._lock:
            return {"rings": len(self._rings), "ring_lines": sum(len(r) for r in self._rings.values()),
                    "ring_chars": sum(self._ring_sizes.values()), "queued": len(self._queue),
                    "queued_chars": self._queued, "buckets": len(self._buckets),
                    "dropped_plugins": len(self._dropped), "subjects": len(self._subjects)}

    # -- publishing (the event loop) -----------------------------------------------------------------

    def start(self, publish: Callable[..., Any]) -> None:
        """Publish from now on through ``publish`` (a NATS client's ``publish``; loop thread only)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if not self.publishing:
            return
        self._publish = publish
        self._event = asyncio.Event()
        with self._lock:
            self._early = False
            if self._queue or self._overflow:  # what plugins logged while loading, before the node connected
                self._woken = True
                self._event.set()
        self._task = asyncio.ensure_future(self._run(self._event))

    async def close(self, timeout: float = 2.0) -> None:
        """Publish what is queued (bounded by ``timeout``), then stop publishing."""
        task, event = self._task, self._event
        with self._lock:
            self._early = False
        if task is None or event is None:
            return
        with self._lock:
            self._event = None  # lines captured from now on stay in the rings only
        self._closing = True
        event.set()
        try:
            await asyncio.wait_for(task, timeout)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
        self._task = None

    async def _run(self, event: asyncio.Event) -> None:
        while True:
            await event.wait()
            # Let what was scheduled with the lines go first: the reply of the call that logged them is
            # being flushed now, and must not wait for its own lines to be encoded and published.
            await asyncio.sleep(0)
            event.clear()
            with self._lock:
                self._woken = False
            try:
                await self._drain()
            except Exception:  # the publisher must outlive any one line
                log.exception("publishing plugin log lines failed")
            if self._closing:
                return

    async def _drain(self) -> None:
        publish = self._publish
        assert publish is not None
        # The whole queue at once: lines that found it full came after every line it held, so their count
        # goes out after these (on each plugin's next line).
        with self._lock:
            queue, self._queue, self._queued = self._queue, deque(), 0
            overflow, self._overflow = self._overflow, {}
        now = time.monotonic()
        for line in queue:
            plugin = line.plugin
            bucket = self._buckets.get(plugin)
            if bucket is None:
                if len(self._buckets) >= MAX_RING_PLUGINS:
                    self._buckets.clear()
                bucket = self._buckets[plugin] = [self.rate, now]
            else:
                bucket[0] = min(self.rate, bucket[0] + (now - bucket[1]) * self.rate)
                bucket[1] = now
            if bucket[0] < 1.0:
                self._drop(plugin, 1)
                continue
            bucket[0] -= 1.0
            line.dropped = self._dropped.pop(plugin, 0)
            subject = self._subjects.get(plugin)
            if subject is None:
                subject = self._subjects[plugin] = log_subject(self.node_id, plugin)
            try:
                await publish(subject, orjson.dumps(line.to_dict(self.node_id)), headers=self._headers)
                self.published += 1
            except Exception as e:  # disconnected: the line is lost, counted for the next one
                log.debug("log line publish failed: %r", e)
                self._drop(plugin, 1 + line.dropped)
            now = time.monotonic()
        for plugin, count in overflow.items():
            self._drop(plugin, count)

    def _drop(self, plugin: str, count: int) -> None:
        self.dropped += count
        self._dropped[plugin] = self._dropped.get(plugin, 0) + count
        pending = self._unaudited.get(plugin)
        self._unaudited[plugin] = (pending or 0) + count
        if pending is None and self._audit is not None and self._loop is not None:
            self._loop.call_later(DROP_AUDIT_INTERVAL_S, self._audit_drops, plugin)

    def _audit_drops(self, plugin: str) -> None:
        count = self._unaudited.pop(plugin, 0)
        if count and self._audit is not None:
            self._audit(plugin, count)


class _Dispatch(logging.Handler):
    """The one handler on ``sandbus.plugin``: hands each record to the node it belongs to.

    A record is the node's whose thread logged it (its event loop, its plugins' worker threads); a
    line logged elsewhere (a plugin's ``sandbus_init`` while loading) goes to every node that has
    the plugin, which is the one node there is outside of tests.
    """

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.hubs: list[PluginLogs] = []
        self.threads: dict[int, PluginLogs] = {}

    def handle(self, record: logging.LogRecord) -> bool:  # no handler lock, no filters: see take()
        hub = self.threads.get(threading.get_ident())
        if hub is not None:
            hub.take(record)
        elif len(hubs := self.hubs) == 1:
            hubs[0].take(record)
        else:
            plugin = record.name[_PREFIX_LEN:]
            for h in list(hubs):
                if h.owns(plugin):
                    h.take(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)


_dispatch_lock = threading.Lock()
_dispatch: _Dispatch | None = None


def attach(hub: PluginLogs) -> None:
    """Capture ``sandbus.plugin`` records for ``hub`` from now on (the first one installs the handler).

    A plugin logger that has no level of its own is set to :data:`CAPTURE_LEVEL`, so that a guest's
    trace and debug lines are made and captured too. They also reach the handlers above it: a
    process that prints its log gives its handlers the level it prints at (``sandbus node`` does:
    its stderr keeps the node's level); an explicit level on the plugin logger is left as it is.
    """
    global _dispatch
    with _dispatch_lock:
        if _dispatch is None:
            logger = logging.getLogger(PLUGIN_LOGGER)
            _dispatch = _Dispatch()
            logger.addHandler(_dispatch)
            if logger.level == logging.NOTSET:
                logger.setLevel(CAPTURE_LEVEL)
        if hub not in _dispatch.hubs:
            _dispatch.hubs = [*_dispatch.hubs, hub]


def keep_handler_levels(logger: logging.Logger | None = None) -> None:
    """Give each handler of ``logger`` (default: the root logger) that has no level the logger's level:
    what it prints stays as it was when plugin loggers are lowered to capture debug lines."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if handler.level == logging.NOTSET:
            handler.setLevel(target.getEffectiveLevel())


def detach(hub: PluginLogs) -> None:
    """Stop capturing for ``hub`` (the handler stays, cheap, for the process's other nodes)."""
    with _dispatch_lock:
        if _dispatch is not None:
            _dispatch.hubs = [h for h in _dispatch.hubs if h is not hub]
            _dispatch.threads = {t: h for t, h in _dispatch.threads.items() if h is not hub}


def claim_thread(hub: PluginLogs) -> None:
    """The calling thread logs for ``hub`` (a node's loop thread, its plugins' worker threads).

    Threads that ended are forgotten here: a worker thread claims once, when it starts, and lanes (with
    their threads) come and go with plugins, so the map would otherwise grow with every thread a
    long-running node ever started."""
    with _dispatch_lock:
        if _dispatch is not None:
            alive = {t.ident for t in threading.enumerate()}
            _dispatch.threads = {**{t: h for t, h in _dispatch.threads.items() if t in alive},
                                 threading.get_ident(): hub}
