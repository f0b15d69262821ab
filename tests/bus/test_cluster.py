"""A 3-server NATS cluster on loopback, from deploy/nats/cluster.conf: nodes keep serving when a server dies."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbus.bus.server import NatsServer
from sandbus.sdk.client import Client
from sandbus.sdk.errors import PluginNotFoundError, RequestTimeoutError
from tests.bus.conftest import NodeProcess

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    ports = [(_free_port(), _free_port()) for _ in range(3)]
    routes = {f"NATS_ROUTE_{i + 1}": f"nats-route://127.0.0.1:{c}" for i, (_, c) in enumerate(ports)}
    servers = []
    try:
        for i, (port, cport) in enumerate(ports):
            env = {"NATS_NAME": f"s{i}", "NATS_HOST": "127.0.0.1", "NATS_PORT": str(port),
                   "NATS_CLUSTER_PORT": str(cport), "NATS_STORE": str(tmp_path / f"s{i}"), **routes}
            servers.append(NatsServer(config=ROOT / "deploy" / "nats" / "cluster.conf", jetstream=False,
                                      store_dir=tmp_path / f"s{i}", env=env).start())
        yield servers
    finally:
        for s in servers:
            s.stop()


async def _jetstream_ready(url: str, timeout: float = 30.0) -> None:
    async with await Client.connect(url) as c:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await c.nc.jetstream().account_info()
                return
            except Exception:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)  # waiting for the cluster to elect a meta leader


async def test_nodes_survive_a_killed_server(cluster: list[NatsServer], bus_plugins: Path, tmp_path: Path) -> None:
    urls = [s.url for s in cluster]
    await _jetstream_ready(urls[0])
    nodes = [NodeProcess("n1", bus_plugins, ",".join(urls), tmp_path / "n1.log"),
             NodeProcess("n2", bus_plugins, ",".join(reversed(urls)), tmp_path / "n2.log")]
    try:
        for n in nodes:
            await asyncio.get_running_loop().run_in_executor(None, n.wait_ready)
        async with await Client.connect(urls[2]) as c:
            assert await asyncio.gather(*(c.request("echo", "handle_request", [i]) for i in range(50))) == [
                [i] for i in range(50)]
            cluster[0].kill()
            ok = 0
            for _ in range(1000):
                try:
                    assert await c.request("echo", "handle_request", ["after"], timeout=1) == ["after"]
                    ok += 1
                    if ok == 50:
                        break
                except (PluginNotFoundError, RequestTimeoutError):
                    await asyncio.sleep(0.02)  # a node is failing over to another server
            assert ok == 50
            seen: set[str] = set()
            for _ in range(30):  # a node may still be failing over: both must be back in discovery
                seen = {v["node_id"] for v in await c.nodes(timeout=1.0)}
                if seen == {"n1", "n2"}:
                    break
            assert seen == {"n1", "n2"}
    finally:
        for n in nodes:
            n.terminate()
