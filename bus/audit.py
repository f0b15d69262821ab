"""Publishing a node's audit events to NATS, with repeats folded into one event with a count.

Why: a plugin (or a client sending it bad requests) can raise the same refusal thousands of times a
second. Each event used to become one message in the ``SANDBUS_AUDIT`` stream, so the trail grew
with the attacker's rate. Here the first event of a kind is published at once (an operator sees it
immediately); identical events (same level, kind, plugin and message) that follow within
``window_s`` are only counted, and when the window closes one more event goes out carrying
``count`` (how many it stands for) and ``first_timestamp`` / ``last_timestamp``. Every event is
accounted for: the counts of the published events add up to the events raised.

The number of distinct events held open at once is bounded (``max_keys``): past it, the open
windows are closed early, and an event's text counts only up to :data:`MAX_AUDIT_MESSAGE`
characters (in the key as in the published event), so memory stays bounded whatever the event
mix; a published event is at most :data:`MAX_AUDIT_EVENT` bytes (details dropped past it). On stop
the PluginBus calls :meth:`AuditPublisher.close`, which publishes the counts still open. The stream
itself is capped by bytes, messages and age (bus/delivery.py, ``StreamLimits``).

Refusals of a caller's mistake (:data:`CALLER_KINDS`) quote what the caller sent (a JSON error's
position, a function name), so no two need be identical: they are folded by plugin and error code
instead of by text, and the published event is the last one of its window. The node's log gets the
same treatment (:class:`RefusalLogFilter`): one line per plugin and kind per window, the next line
saying how many were folded -- else a flood of bad requests is a flood of log lines.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from sandbus.sdk.audit import AuditEvent
from sandbus.sdk.envelope import JSON

__all__ = ["CALLER_KINDS", "MAX_AUDIT_EVENT", "MAX_AUDIT_MESSAGE", "AuditPublisher", "RefusalLogFilter",
           "fold_refusal_logs"]

log = logging.getLogger("sandbus.audit")

#: characters of an event's message kept in the published event (guest-influenced text is bounded)
MAX_AUDIT_MESSAGE = 4096
#: bytes of one published event; past it the details are dropped (the message and counts stay)
MAX_AUDIT_EVENT = 16 * 1024

#: audit kinds raised once per bad request or control body a caller sends: folded whatever their text
CALLER_KINDS = frozenset({"request.refused", "control.refused"})

#: ``async (subject, data, headers=...)``: a NATS client's ``publish``
Publish = Callable[..., Awaitable[None]]
_Key = tuple[str, str, str, str]


class _Window:
    __slots__ = ("count", "first", "last")

    def __init__(self, first: AuditEvent) -> None:
        self.first = first
        self.last = first
        #: events after the first one (already published) seen in this window
        self.count = 0


def _fold_text(event: AuditEvent) -> str:
    """What makes two events "the same" besides level, kind and plugin: the message, except for a
    caller's refusals, whose message quotes the caller (their error code, or control verb, instead)."""
    if event.kind in CALLER_KINDS:
        return str(event.details.get("code") or event.details.get("verb") or "")[:64]
    return event.message[:MAX_AUDIT_MESSAGE]


class RefusalLogFilter(logging.Filter):
    """Lets one log record of :data:`CALLER_KINDS` per (kind, plugin) through per ``window_s``; the
    next one let through says how many were folded meanwhile (their counts are in the audit trail).

    For the ``sandbus.audit`` logger, whose records are ``"%s %s: %s" % (kind, plugin, message)``
    (:class:`sandbus.host.sandbox.audit.Auditor`); any other record passes untouched.
    """

    def __init__(self, window_s: float = 1.0, max_keys: int = 1024) -> None:
        super().__init__()
        self.window_s = window_s
        self.max_keys = max_keys
        self._lock = threading.Lock()  # records come from worker threads too
        #: (kind, plugin) -> [window start, records folded in it]
        self._windows: dict[tuple[str, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple) or len(args) != 3 or args[0] not in CALLER_KINDS:
            return True
        key = (str(args[0]), str(args[1]))
        now = time.monotonic()
        with self._lock:
            window = self._windows.get(key)
            if window is not None and now - window[0] < self.window_s:
                window[1] += 1
                return False
            if len(self._windows) >= self.max_keys:
                self._windows.clear()
            self._windows[key] = [now, 0]
        if window is not None and window[1]:
            record.msg = f"{record.msg} (and {int(window[1])} more like it folded before this one)"
        return True


_refusal_filter: RefusalLogFilter | None = None


def fold_refusal_logs() -> None:
    """Install :class:`RefusalLogFilter` on the ``sandbus.audit`` logger (once per process)."""
    global _refusal_filter
    if _refusal_filter is None:
        _refusal_filter = RefusalLogFilter()
        log.addFilter(_refusal_filter)


class AuditPublisher:
    """Folds repeated audit events and publishes them on ``subject``.

    Parameters:
        publish: a NATS client's ``publish`` (called as ``publish(subject, data, headers=...)``).
        subject: where events go (``sandbus.audit.<node>``, kept by the SANDBUS_AUDIT stream).
        window_s: how long identical events are folded into one.
        max_keys: distinct events held open at once before the windows are closed early.
        connected: whether publishing can work now (events raised while disconnected are dropped).
    """

    def __init__(self, publish: Publish, subject: str, *, window_s: float = 1.0, max_keys: int = 1024,
                 connected: Callable[[], bool] = lambda: True) -> None:
        self._publish = publish
        self.subject = subject
        self.window_s = window_s
        self.max_keys = max_keys
        self._connected = connected
        self._open: dict[_Key, _Window] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: events handed to :meth:`offer`, and messages published (for stats and tests)
        self.offered = 0
        self.published = 0

    def offer(self, event: AuditEvent) -> None:
        """Publish ``event`` now, or count it into an open window of identical events (loop thread only)."""
        self.offered += 1
        key = (event.level.value, event.kind, event.plugin, _fold_text(event))
        window = self._open.get(key)
        if window is not None:
            window.count += 1
            window.last = event
            return
        if len(self._open) >= self.max_keys:
            self.flush()
        self._open[key] = _Window(event)
        self._send(event.to_dict())
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.window_s, self.flush)

    def flush(self) -> None:
        """Close every open window: each one that folded repeats publishes one event with its count."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        windows, self._open = self._open, {}
        for window in windows.values():
            if window.count:
                body = window.last.to_dict()
                body.update(count=window.count, first_timestamp=window.first.timestamp,
                            last_timestamp=window.last.timestamp)
                self._send(body)

    async def close(self, timeout: float = 2.0) -> None:
        """Publish the counts of the windows still open, and wait (bounded) for what is being published."""
        self.flush()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    def _send(self, body: dict[str, Any]) -> None:
        if not self._connected():
            return
        message = body.get("message")
        if isinstance(message, str) and len(message) > MAX_AUDIT_MESSAGE:
            body["message"] = message[:MAX_AUDIT_MESSAGE] + "..."
        body.setdefault("count", 1)
        try:
            data = orjson.dumps(body, default=str)
        except (TypeError, ValueError) as e:  # odd details must not lose the event
            log.warning("audit event %s could not be encoded whole: %s", body.get("kind"), e)
            data = b""
        if not data or len(data) > MAX_AUDIT_EVENT:
            data = orjson.dumps({**{k: body.get(k) for k in ("level", "kind", "plugin", "message", "timestamp",
                                                              "count", "first_timestamp", "last_timestamp")
                                    if k in body}, "details_dropped": True}, default=str)
        task = asyncio.ensure_future(self._publish_one(data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish_one(self, data: bytes) -> None:
        try:
            await self._publish(self.subject, data, headers=dict(JSON))
            self.published += 1
        except Exception as e:  # disconnected: the event is lost, not the node
            log.debug("audit publish failed: %r", e)
