"""Audit events: every limit hit, permission denial and lifecycle change, delivered to a callback.

The callback is the embedding app's; a failing callback must not break the
call being audited, so its exceptions are logged and swallowed. The records themselves
(:class:`AuditEvent`, :class:`AuditLevel`) are defined in :mod:`sandbus.sdk.audit`, shared with the
PluginBus, and re-exported here under the same names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sandbus.sdk.audit import AuditEvent, AuditLevel

__all__ = ["AuditEvent", "AuditLevel", "AuditSink", "Auditor"]

log = logging.getLogger("sandbus.audit")


AuditSink = Callable[[AuditEvent], None]

_LOG_LEVELS = {AuditLevel.INFO: logging.INFO, AuditLevel.WARNING: logging.WARNING,
               AuditLevel.CRITICAL: logging.CRITICAL}


class Auditor:
    """Fans events out to sinks (the app's callback; on a node also the PluginBus's publisher and telemetry)."""

    def __init__(self, *sinks: AuditSink) -> None:
        self._sinks: list[AuditSink] = [s for s in sinks if s is not None]

    def add_sink(self, sink: AuditSink) -> None:
        self._sinks.append(sink)

    def emit(self, level: AuditLevel, kind: str, plugin: str, message: str, **details: Any) -> AuditEvent:
        event = AuditEvent(level, kind, plugin, message, details)
        log.log(_LOG_LEVELS[level], "%s %s: %s", kind, plugin, message)
        for sink in self._sinks:
            try:
                sink(event)
            except Exception:
                log.exception("audit sink %r failed on %s", sink, kind)
        return event
