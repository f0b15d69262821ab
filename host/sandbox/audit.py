"""Audit events: every limit hit, permission denial and lifecycle change, delivered to a callback.

The callback is the embedding app's; a failing callback must not break the
call being audited, so its exceptions are logged and swallowed.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AuditEvent", "AuditLevel", "AuditSink", "Auditor"]

log = logging.getLogger("sandbus.audit")


class AuditLevel(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True)
class AuditEvent:
    """One audited fact.

    Parameters:
        level: info (lifecycle), warning (a limit held), critical (a security violation).
        kind: a stable dotted name, e.g. ``limit.fuel`` or ``security.fs_denied``.
        plugin: the plugin involved.
        message: a sentence for humans.
        details: machine-readable facts.
    """

    level: AuditLevel
    kind: str
    plugin: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level.value,
            "kind": self.kind,
            "plugin": self.plugin,
            "message": self.message,
            "details": self.details,
            "timestamp": self.timestamp,
        }


AuditSink = Callable[[AuditEvent], None]

_LOG_LEVELS = {AuditLevel.INFO: logging.INFO, AuditLevel.WARNING: logging.WARNING,
               AuditLevel.CRITICAL: logging.CRITICAL}


class Auditor:
    """Fans events out to sinks (the app's callback; later the bus and telemetry)."""

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
