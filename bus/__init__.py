"""The PluginBus over NATS: plugins served on subjects, whatever runs them.

:class:`PluginBus` (bus/plugin_bus.py) owns a node's NATS side: the subscriptions for requests,
direct messages and topics (bus/requests.py), durable delivery through JetStream with acks, naks
and dead letters (bus/delivery.py), discovery and control as a NATS micro service (bus/control.py),
and the audit events it publishes (bus/audit.py). It knows no wasm: it calls a
:class:`BusHandler` (bus/handler.py), a handful of methods that a host node implements
(``sandbus.host.node``) and a test can implement in plain Python. Connecting (servers, auth, TLS)
is bus/connection.py, and a real ``nats-server`` child process bus/server.py.

Names load on first use (:mod:`sandbus._lazy`), so ``import sandbus.bus`` costs only what is touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sandbus._lazy import lazy_attributes

if TYPE_CHECKING:
    from sandbus.bus.connection import ConnectOptions, connect
    from sandbus.bus.handler import BusHandler, Reply, Served
    from sandbus.bus.plugin_bus import PluginBus, RequestOutcome
    from sandbus.bus.server import NatsServer

__all__ = ["BusHandler", "ConnectOptions", "NatsServer", "PluginBus", "Reply", "RequestOutcome", "Served", "connect"]

#: public name -> the module that defines it
_WHERE = {
    "BusHandler": "sandbus.bus.handler",
    "ConnectOptions": "sandbus.bus.connection",
    "NatsServer": "sandbus.bus.server",
    "PluginBus": "sandbus.bus.plugin_bus",
    "Reply": "sandbus.bus.handler",
    "RequestOutcome": "sandbus.bus.plugin_bus",
    "Served": "sandbus.bus.handler",
    "connect": "sandbus.bus.connection",
}

if not TYPE_CHECKING:  # type checkers see the imports above, and an unknown name is an error to them
    __getattr__, __dir__ = lazy_attributes(__name__, _WHERE)
