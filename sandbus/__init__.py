"""sandbus: untrusted WebAssembly plugins in wasmtime sandboxes on host nodes that talk over NATS.

``import sandbus`` is the public API. Names are loaded when first used, so a client-only install (no
wasmtime, no watchdog, no nats-server binary) can ``from sandbus import Client, PluginMessage`` without
the host side being importable; a host name needs the ``host`` extra (``pip install 'sandbus[host]'``).

Below it: :mod:`sandbus.sdk` (the contract: envelopes, errors, subjects, tracing, the client, guest SDKs,
the test harness), :mod:`sandbus.bus` (the PluginBus over NATS) and :mod:`sandbus.host` (the sandbox, the
plugin lifecycle, the node, telemetry, the CLI).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sandbus._lazy import lazy_attributes

if TYPE_CHECKING:
    from sandbus._version import __version__
    from sandbus.bus import BusHandler, PluginBus
    from sandbus.bus.connection import ConnectOptions
    from sandbus.bus.server import NatsServer
    from sandbus.host.cluster.agent import ClusterAgent
    from sandbus.host.cluster.registry import Registry
    from sandbus.host.lifecycle import DiscoveryReport, PluginInfo, PluginManager, PluginStatus, PluginWatcher
    from sandbus.host.node.node import Node
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
    from sandbus.sdk import errors
    from sandbus.sdk.client import Client
    from sandbus.sdk.errors import SandbusError
    from sandbus.sdk.message import PluginMessage

#: public name -> the module that defines it
_WHERE = {
    "AuditEvent": "sandbus.host.sandbox",
    "AuditLevel": "sandbus.host.sandbox",
    "BusHandler": "sandbus.bus",
    "Capabilities": "sandbus.host.sandbox",
    "Client": "sandbus.sdk.client",
    "ClusterAgent": "sandbus.host.cluster.agent",
    "ConnectOptions": "sandbus.bus.connection",
    "DirGrant": "sandbus.host.sandbox",
    "DiscoveryReport": "sandbus.host.lifecycle",
    "HostFunction": "sandbus.host.sandbox",
    "HostFunctions": "sandbus.host.sandbox",
    "Limits": "sandbus.host.sandbox",
    "NatsServer": "sandbus.bus.server",
    "Node": "sandbus.host.node.node",
    "PluginBus": "sandbus.bus",
    "PluginInfo": "sandbus.host.lifecycle",
    "PluginManager": "sandbus.host.lifecycle",
    "PluginMessage": "sandbus.sdk.message",
    "PluginStatus": "sandbus.host.lifecycle",
    "PluginWatcher": "sandbus.host.lifecycle",
    "Registry": "sandbus.host.cluster.registry",
    "Sandbox": "sandbus.host.sandbox",
    "__version__": "sandbus._version",
    "SandboxBuilder": "sandbus.host.sandbox",
    "SandbusError": "sandbus.sdk.errors",
    "errors": "sandbus.sdk",
    "run_plugin": "sandbus.host.sandbox",
}

__all__ = [
    "AuditEvent",
    "AuditLevel",
    "BusHandler",
    "Capabilities",
    "Client",
    "ClusterAgent",
    "ConnectOptions",
    "DirGrant",
    "DiscoveryReport",
    "HostFunction",
    "HostFunctions",
    "Limits",
    "NatsServer",
    "Node",
    "PluginBus",
    "PluginInfo",
    "PluginManager",
    "PluginMessage",
    "PluginStatus",
    "PluginWatcher",
    "Registry",
    "Sandbox",
    "SandboxBuilder",
    "SandbusError",
    "__version__",
    "errors",
    "run_plugin",
]

if not TYPE_CHECKING:  # type checkers see the imports above, and an unknown name is an error to them
    __getattr__, __dir__ = lazy_attributes(__name__, _WHERE)
