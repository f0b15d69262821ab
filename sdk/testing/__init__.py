"""Testing plugins: the one corner of ``sdk`` that drives the host runtime.

* :class:`PluginHarness` -- a plugin in a sandbox, loaded as a node would load it (manifest resolved
  against a policy), with typed errors, audit events, logs, published messages and requests to other
  plugins (answered by stubs) to assert on.
* :class:`BusHarness` -- an embedded nats-server, host nodes in this process and a connected
  :class:`sandbus.sdk.client.Client`, for integration tests.
* :mod:`sandbus.sdk.testing.pytest_plugin` -- the ``sandbus_plugin`` and ``sandbus_bus`` fixtures.

wasmtime is imported when a harness is created, never by ``import sandbus``, ``import sandbus.sdk`` or
``import sandbus.sdk.testing``.
"""

from sandbus.sdk.testing.bus import BusFactory, BusHarness
from sandbus.sdk.testing.harness import AuditLog, LogLine, PluginFactory, PluginHarness, Published, Requested

__all__ = ["AuditLog", "BusFactory", "BusHarness", "LogLine", "PluginFactory", "PluginHarness", "Published",
           "Requested"]
