"""The sandbus host: sandbox, plugin lifecycle, node, CLI."""

from sandbus.host.lifecycle import DiscoveryReport, PluginInfo, PluginManager, PluginStatus, PluginWatcher
from sandbus.host.sandbox import (
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
    "DiscoveryReport",
    "HostFunction",
    "HostFunctions",
    "Limits",
    "PluginInfo",
    "PluginManager",
    "PluginStatus",
    "PluginWatcher",
    "Sandbox",
    "SandboxBuilder",
    "run_plugin",
]
