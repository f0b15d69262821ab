"""pytest fixtures for plugin tests. Enable them in a ``conftest.py``::

    pytest_plugins = ["sandbus.sdk.testing.pytest_plugin"]

(``sandbus new`` writes that conftest.py.) Then::

    def test_echo(sandbus_plugin):
        plugin = sandbus_plugin("build/echo.wasm", limits={"fuel": 1_000_000})
        assert plugin.call("handle_request", {"a": 1}) == {"a": 1}

    @pytest.mark.asyncio          # not needed with asyncio_mode = "auto"
    async def test_over_nats(sandbus_bus):
        bus = await sandbus_bus("build/echo.wasm", nodes=2)
        assert await bus.request("echo", "handle_request", {"a": 1}) == {"a": 1}

Every harness a fixture made is closed at teardown, the NATS server stopped by PID, even when the
test fails.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbus.sdk.testing.bus import BusFactory, BusHarness
from sandbus.sdk.testing.harness import PluginFactory, PluginHarness

__all__ = ["sandbus_bus", "sandbus_plugin"]


@pytest.fixture
def sandbus_plugin() -> Iterator[PluginFactory]:
    """``sandbus_plugin(path, **options)`` -> a :class:`PluginHarness` (options as its parameters)."""
    opened: list[PluginHarness] = []

    def factory(plugin: str | Path, **options: Any) -> PluginHarness:
        harness = PluginHarness(plugin, **options)
        opened.append(harness)
        return harness

    yield factory
    for harness in reversed(opened):
        harness.close()


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - pytest-asyncio is a dev dependency; without it, no bus fixture
    pass
else:

    @pytest_asyncio.fixture
    async def sandbus_bus() -> AsyncIterator[BusFactory]:
        """``await sandbus_bus(*plugins, nodes=1, policy=None, jetstream=True)`` -> a started
        :class:`BusHarness` (embedded nats-server, in-process nodes, a connected client)."""
        started: list[BusHarness] = []

        async def factory(*plugins: str | Path, **options: Any) -> BusHarness:
            bus = BusHarness(*plugins, **options)
            await bus.start()
            started.append(bus)
            return bus

        yield factory
        for bus in reversed(started):
            await bus.stop()
