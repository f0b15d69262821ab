"""sandbus.sdk.testing.BusHarness: an embedded nats-server, in-process nodes and a client, stopped by PID."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbus.sdk.errors import OutOfFuelError, PluginNotFoundError, SandbusError
from sandbus.sdk.testing import BusFactory, BusHarness


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_two_nodes_share_the_calls(sandbus_bus: BusFactory, plugins_dir: Path, probe_project: Path) -> None:
    bus = await sandbus_bus(plugins_dir / "echo.wasm", probe_project, nodes=2)
    assert [n.node_id for n in bus.nodes] == ["test-node-1", "test-node-2"]
    assert await bus.request("echo", "handle_request", {"over": "nats"}) == {"over": "nats"}
    for i in range(40):
        assert await bus.request("probe", "handle_request", i) == {"success": True, "result": i, "error": None}
    served = bus.executions("probe")
    assert sum(served.values()) == 40
    assert all(count > 0 for count in served.values()), served  # one queue group, both nodes answer
    with pytest.raises(OutOfFuelError):  # typed errors travel back over the bus
        await bus.request("probe", "spin", {})
    with pytest.raises(PluginNotFoundError):
        await bus.request("nobody", "handle_request", {})


async def test_stop_releases_everything(plugins_dir: Path, tmp_path: Path) -> None:
    directory = tmp_path / "two"
    directory.mkdir()
    for name in ("echo", "text_processor"):
        for ext in ("wasm", "toml"):
            (directory / f"{name}.{ext}").write_bytes((plugins_dir / f"{name}.{ext}").read_bytes())
    async with BusHarness(directory, jetstream=False) as bus:  # a plugin directory: every pair in it
        assert bus.plugin_dir is not None
        assert sorted(p.name for p in bus.plugin_dir.glob("*.wasm")) == ["echo.wasm", "text_processor.wasm"]
        assert bus.server is not None
        assert bus.server.pid is not None
        pid, workdir = bus.server.pid, bus.plugin_dir.parent
        assert bus.url.startswith("nats://127.0.0.1:")
        assert await bus.client.request("text_processor", "handle_request", {"action": "get_status"}) == {
            "success": True, "result": {"status": "running"}, "error": None}
    assert not _alive(pid)
    assert not workdir.exists()
    assert bus.nodes == []


async def test_a_plugin_that_cannot_load_fails_start(plugins_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "echo.wasm").write_bytes((plugins_dir / "echo.wasm").read_bytes())
    (tmp_path / "echo.toml").write_text((plugins_dir / "echo.toml").read_text().replace(
        'required = ["compute"]', 'required = ["compute", "network"]'))
    bus = BusHarness(tmp_path / "echo.wasm")
    with pytest.raises(SandbusError, match="requires capability 'network'"):
        await bus.start()
    assert bus.server is None  # stopped and cleaned up on the way out


def test_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one plugin"):
        BusHarness()
    with pytest.raises(ValueError, match="nodes"):
        BusHarness(tmp_path, nodes=0)
    with pytest.raises(RuntimeError, match="not started"):
        _ = BusHarness(tmp_path).client
