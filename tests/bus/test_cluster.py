"""A 3-server NATS cluster on loopback, from deploy/nats/cluster.conf: nodes keep serving when a server dies."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbus.bus.server import NatsServer
from sandbus.sdk.client import Client
from sandbus.sdk.errors import PluginNotFoundError, RequestTimeoutError
from tests.bus.conftest import NodeProcess, jetstream_ready, nats_cluster

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    with nats_cluster(tmp_path) as servers:
        yield servers


async def test_nodes_survive_a_killed_server(cluster: list[NatsServer], bus_plugins: Path, tmp_path: Path) -> None:
    urls = [s.url for s in cluster]
    await jetstream_ready(urls[0])
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
