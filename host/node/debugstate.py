"""One plugin's whole state on one node, for an operator: the ``debug`` control verb.

``list`` and ``stats`` answer "what runs, how is it doing" for every plugin at once, so they stay
small. ``debug`` answers "what is going on with this one": its limits as enforced, each live
instance, latency and fuel histograms, its latest failures with their function and code, its
latest log lines and audit events. bus/control.py documents every key of the reply.

Everything here is read from what the node keeps anyway (the manager's statistics, the pool's
inventory, the log rings, the audit ring): answering costs the request path nothing, and reading it
never touches a running instance.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson

from sandbus.bus.audit import MAX_AUDIT_EVENT, MAX_AUDIT_MESSAGE
from sandbus.host.lifecycle.models import PluginStatus
from sandbus.host.lifecycle.stats import PluginStats
from sandbus.sdk.audit import AuditEvent
from sandbus.sdk.errors import PluginNotFoundError, SandbusError

if TYPE_CHECKING:
    from sandbus.host.node.node import Node

__all__ = ["DEBUG_KEYS", "MAX_RECENT_AUDIT", "AuditRing", "debug_state"]

#: Audit events kept per plugin.
MAX_RECENT_AUDIT = 50
#: Plugins with an audit ring (names of plugins the node knows; the bound is a backstop).
MAX_AUDIT_PLUGINS = 4096

#: The keys of a ``debug`` reply, in order (all always present).
DEBUG_KEYS = ("node_id", "plugin", "status", "version", "kind", "isolation", "sha256", "last_loaded", "reloads",
              "limits", "instances", "in_flight", "queue_depth", "counters", "latency_ms", "fuel", "recent_errors",
              "recent_logs", "recent_audit")
_COUNTERS = ("executions", "errors", "host_errors", "rejected", "fuel_used", "last_fuel_used", "p50_ms", "p99_ms")


class AuditRing:
    """Each plugin's latest audit events. Added on the event loop, read from control threads."""

    def __init__(self, size: int = MAX_RECENT_AUDIT) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._rings: dict[str, deque[AuditEvent]] = {}

    def add(self, event: AuditEvent) -> None:
        with self._lock:
            ring = self._rings.get(event.plugin)
            if ring is None:
                if len(self._rings) >= MAX_AUDIT_PLUGINS:
                    del self._rings[next(iter(self._rings))]
                ring = self._rings[event.plugin] = deque(maxlen=self._size)
            ring.append(event)

    def retain(self, plugins: set[str]) -> None:
        """Forget the events of every plugin not in ``plugins`` (the ones the node knows)."""
        with self._lock:
            for name in [n for n in self._rings if n not in plugins]:
                del self._rings[name]

    def get(self, plugin: str) -> list[dict[str, Any]]:
        """The plugin's events, oldest first, shaped as on ``sandbus.audit.<node>`` and bounded as there."""
        with self._lock:
            ring = self._rings.get(plugin)
            events = list(ring) if ring is not None else []
        return [_bounded(event) for event in events]


def _bounded(event: AuditEvent) -> dict[str, Any]:
    body = event.to_dict()
    body["count"] = 1
    if len(event.message) > MAX_AUDIT_MESSAGE:
        body["message"] = event.message[:MAX_AUDIT_MESSAGE] + "..."
    try:
        size = len(orjson.dumps(body, default=str))
    except (TypeError, ValueError):
        size = MAX_AUDIT_EVENT + 1
    if size > MAX_AUDIT_EVENT:
        body["details"] = {}
        body["details_dropped"] = True
    else:
        body["details"] = orjson.loads(orjson.dumps(body["details"], default=str))  # plain JSON values
    return body


def debug_state(node: Node, plugin: str) -> dict[str, Any]:
    """The ``debug`` reply for ``plugin`` on ``node`` (see bus/control.py).

    Raises:
        PluginNotFoundError: the node knows no plugin of that name.
    """
    manager = node.manager
    info = manager.info(plugin)
    try:
        facts = manager.debug_facts(plugin)
    except PluginNotFoundError:
        if info.status is not PluginStatus.UNLOADING:
            raise
        # Unloaded while calls still run: the name has left the manager's table, its draining version
        # has not. Its counters are in ``info``; what only the table keeps is answered empty.
        facts = {**PluginStats().histograms(), "recent_errors": [], "instances": []}
    listed = node._listed(info)
    limits: dict[str, Any] | None = None
    if info.status.serving:
        try:
            limits = manager.limits(plugin).model_dump(mode="json")
        except SandbusError:  # unloaded meanwhile
            limits = None
    return {
        "node_id": node.node_id,
        "plugin": info.name,
        "status": info.status.value,
        "version": info.version,
        "kind": listed["kind"],
        "isolation": listed["isolation"],
        "sha256": info.sha256,
        "last_loaded": listed["last_loaded"],
        "reloads": info.reloads,
        "limits": limits,
        "instances": facts["instances"],
        "in_flight": info.in_flight,
        "queue_depth": node.queue_depth(plugin),
        "counters": {k: getattr(info, k) for k in _COUNTERS},
        "latency_ms": facts["latency_ms"],
        "fuel": facts["fuel"],
        "recent_errors": facts["recent_errors"],
        "recent_logs": node.logs.recent(plugin),
        "recent_audit": node.recent_audit.get(plugin),
    }
