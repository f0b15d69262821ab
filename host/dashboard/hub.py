"""The dashboard's memory of the cluster, and its fan-out to the open pages.

One :class:`Hub` per process. The collector writes into it; each open page (a Server-Sent Events stream)
is a :class:`Listener` with a bounded queue. Everything is bounded: the audit and log history (rings), the
number of listeners, the events queued for each. A page that does not keep up is cut off rather than
buffered without end; its browser reconnects and starts again from a fresh snapshot, so nothing it shows
is silently stale.

Log lines and audit events arrive one by one but leave in batches (:meth:`Hub.flush`, called a few times a
second), so a burst of lines costs one event per page, not one per line.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = ["Hub", "HubLimits", "Listener", "TooManyListeners", "sse_event"]


@dataclass(frozen=True)
class HubLimits:
    """Bounds of the dashboard's memory.

    Parameters:
        max_listeners: open event streams at once (more are refused with 503).
        listener_queue: events queued for one stream before it is cut off.
        listener_bytes: bytes of events queued for one stream before it is cut off (a batch of long log lines
            is megabytes: counting events alone would let one page that does not read hold hundreds of them).
        audit_history: audit events kept (and sent to a new page).
        log_history: log lines kept (and sent to a new page).
        batch: log lines or audit events sent in one event; past it, the rest of a burst is counted as
            dropped (the page shows how many).
    """

    max_listeners: int = 32
    listener_queue: int = 256
    listener_bytes: int = 8 * 1024 * 1024
    audit_history: int = 500
    log_history: int = 1000
    batch: int = 500


class TooManyListeners(Exception):
    """All :attr:`HubLimits.max_listeners` streams are open."""


def sse_event(name: str, data: Any) -> bytes:
    """One Server-Sent Event: a name and a JSON payload (JSON has no raw newline, so one ``data:`` line)."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data, default=str) + b"\n\n"


@dataclass(eq=False)  # each stream is its own listener (hashed by identity)
class Listener:
    """One open event stream: its queue of encoded events (and their size), and whether it was cut off."""

    queue: asyncio.Queue[bytes | None]
    cut_off: bool = False
    #: bytes of the events queued after the snapshot (the snapshot, bounded by the history, is not counted)
    queued_bytes: int = 0
    _snapshot_taken: bool = False

    def _taken(self, item: bytes | None) -> bytes | None:
        if item is not None:
            if self._snapshot_taken:
                self.queued_bytes -= len(item)
            self._snapshot_taken = True
        return item

    def take_nowait(self) -> bytes | None:
        """The next event, already queued (:meth:`take` waits for one)."""
        return self._taken(self.queue.get_nowait())

    async def take(self) -> bytes | None:
        """The next event to write, or ``None``: the stream ends (cut off, or the server stops)."""
        return self._taken(await self.queue.get())


@dataclass
class Hub:
    """The cluster as last seen, plus who is watching."""

    limits: HubLimits = field(default_factory=HubLimits)
    #: static facts the page needs (jaeger URL, whether control is on), sent in every snapshot
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self.deploys: dict[str, Any] = {"available": False, "deploys": [], "reports": {}, "invalid": {}}
        self.audit: collections.deque[dict[str, Any]] = collections.deque(maxlen=self.limits.audit_history)
        self.logs: collections.deque[dict[str, Any]] = collections.deque(maxlen=self.limits.log_history)
        self._pending_audit: list[dict[str, Any]] = []
        self._pending_logs: list[dict[str, Any]] = []
        self._listeners: set[Listener] = set()
        #: streams whose handler has not returned yet, cut off or not: the cap counts these (a stream cut off
        #: while its handler still waits on a client that does not read holds its place until it is closed)
        self._open: set[Listener] = set()
        #: streams cut off for falling behind, since start
        self.cut_offs = 0
        #: lines and events that arrived faster than a batch could carry (never shown)
        self.dropped = {"logs": 0, "audit": 0}
        #: messages from the bus refused as malformed, by kind
        self.malformed = {"logs": 0, "audit": 0, "nodes": 0}
        self.updated_at: float | None = None
        #: whether the collector reaches the nodes, and if not why (shown on every page)
        self.status: dict[str, Any] = {"ok": True, "message": ""}
        #: the snapshot as JSON, built once per change (it is megabytes with full histories: building it per
        #: request would let whoever loops on /api/state or reopens streams spend the dashboard's CPU)
        self._snapshot_json: bytes | None = None
        self._snapshot_counts: tuple[int, ...] = ()

    # -- listeners -----------------------------------------------------------------------------------------

    @property
    def listener_count(self) -> int:
        return len(self._open)

    def listen(self) -> Listener:
        """A new stream's listener, its queue already holding the snapshot.

        Raises:
            TooManyListeners: :attr:`HubLimits.max_listeners` are open.
        """
        if len(self._open) >= self.limits.max_listeners:
            raise TooManyListeners(f"{len(self._open)} event streams are open (at most "
                                   f"{self.limits.max_listeners})")
        listener = Listener(asyncio.Queue(maxsize=self.limits.listener_queue + 1))
        listener.queue.put_nowait(b"event: snapshot\ndata: " + self.snapshot_json() + b"\n\n")
        self._listeners.add(listener)
        self._open.add(listener)
        return listener

    def leave(self, listener: Listener) -> None:
        """The stream's handler returned (its connection is closed): its place is free."""
        self._listeners.discard(listener)
        self._open.discard(listener)

    def _broadcast(self, event: bytes) -> None:
        for listener in list(self._listeners):
            if listener.queue.qsize() >= self.limits.listener_queue \
                    or listener.queued_bytes + len(event) > self.limits.listener_bytes:
                self._cut_off(listener)
            else:
                listener.queue.put_nowait(event)
                listener.queued_bytes += len(event)

    def _cut_off(self, listener: Listener) -> None:
        """A stream that fell behind: its queue emptied and ended (``None``), so its handler closes it."""
        listener.cut_off = True
        self.cut_offs += 1
        self._end(listener)

    def _end(self, listener: Listener) -> None:
        """No more events for ``listener``: its queue emptied and ended, so its handler returns."""
        self._listeners.discard(listener)
        while not listener.queue.empty():
            listener.queue.get_nowait()
        listener.queued_bytes = 0
        listener.queue.put_nowait(None)

    def close_all(self) -> None:
        for listener in list(self._listeners):
            self._end(listener)

    # -- what the collector writes --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {"info": self.info, "status": self.status, "nodes": self.nodes_list(), "deploys": self.deploys,
                "audit": list(self.audit), "logs": list(self.logs), "dropped": dict(self.dropped),
                "refused": dict(self.malformed), "updated_at": self.updated_at}

    def snapshot_json(self) -> bytes:
        """:meth:`snapshot` encoded, reused until the state changes (counters: until the next flush)."""
        if self._snapshot_json is None:
            self._snapshot_json = orjson.dumps(self.snapshot(), default=str)
            self._snapshot_counts = self._counts()
        return self._snapshot_json

    def _counts(self) -> tuple[int, ...]:
        return (*self.dropped.values(), *self.malformed.values())

    def _changed(self) -> None:
        self._snapshot_json = None

    def nodes_list(self) -> list[dict[str, Any]]:
        return [self.nodes[n] for n in sorted(self.nodes)]

    def set_nodes(self, nodes: dict[str, dict[str, Any]]) -> None:
        self.nodes = nodes
        self.updated_at = time.time()
        self._changed()
        self._broadcast(sse_event("nodes", {"nodes": self.nodes_list(), "updated_at": self.updated_at}))

    def set_status(self, ok: bool, message: str) -> None:
        status = {"ok": ok, "message": message}
        if status != self.status:
            self.status = status
            self._changed()
            self._broadcast(sse_event("status", status))

    def set_deploys(self, deploys: dict[str, Any]) -> None:
        if deploys != self.deploys:
            self.deploys = deploys
            self._changed()
            self._broadcast(sse_event("deploys", deploys))

    def add_log(self, line: dict[str, Any]) -> None:
        if len(self._pending_logs) >= self.limits.batch:
            self.dropped["logs"] += 1
            return
        self._pending_logs.append(line)

    def add_audit(self, event: dict[str, Any]) -> None:
        if len(self._pending_audit) >= self.limits.batch:
            self.dropped["audit"] += 1
            return
        self._pending_audit.append(event)

    def flush(self) -> None:
        """Send what arrived since the last flush, one event per kind, and keep it in the history."""
        if self._pending_logs or self._pending_audit or self._counts() != self._snapshot_counts:
            self._changed()
        if self._pending_logs:
            batch, self._pending_logs = self._pending_logs, []
            self.logs.extend(batch)
            self._broadcast(sse_event("logs", {"lines": batch, "dropped": self.dropped["logs"]}))
        if self._pending_audit:
            events, self._pending_audit = self._pending_audit, []
            self.audit.extend(events)
            self._broadcast(sse_event("audit", {"events": events, "dropped": self.dropped["audit"]}))
