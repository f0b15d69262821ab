"""Audit records: what every refusal, limit hit and lifecycle change is reported as.

They live in the shared contract because both sides raise and carry them: the sandbox raises them
(host/sandbox/audit.py fans them out to sinks), and the PluginBus raises its own (dead letters,
refused control requests, restarted delivery loops) and publishes every one on
``sandbus.audit.<node>``, where an operator's tools read them back with :meth:`AuditEvent.to_dict`'s shape.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AuditEvent", "AuditLevel"]


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
