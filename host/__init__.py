"""The sandbus host: sandbox, plugin lifecycle, node, CLI."""

from .sandbox import (
    AuditEvent,
    AuditLevel,
    Capabilities,
    DirGrant,
    HostFunction,
    HostFunctions,
    Limits,
    Sandbox,
    SandboxBuilder,
    run_plugin,
)

__all__ = [
    "AuditEvent",
    "AuditLevel",
    "Capabilities",
    "DirGrant",
    "HostFunction",
    "HostFunctions",
    "Limits",
    "Sandbox",
    "SandboxBuilder",
    "run_plugin",
]
