"""The sandbus host: sandbox, plugin lifecycle, node, telemetry, CLI, authoring.

Its names load on first use (:mod:`sandbus._lazy`): ``sandbus.host.cli`` and the other modules below this
package import without wasmtime or watchdog, so the client side of the CLI runs from a client-only install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sandbus._lazy import lazy_attributes

if TYPE_CHECKING:
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

_LIFECYCLE = ("DiscoveryReport", "PluginInfo", "PluginManager", "PluginStatus", "PluginWatcher")
#: public name -> the module that defines it
_WHERE = {name: "sandbus.host.lifecycle" if name in _LIFECYCLE else "sandbus.host.sandbox" for name in __all__}

if not TYPE_CHECKING:  # type checkers see the imports above, and an unknown name is an error to them
    __getattr__, __dir__ = lazy_attributes(__name__, _WHERE)
