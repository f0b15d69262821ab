"""Fixtures of the bytes-on-the-bus tests: real nats-servers (with a chosen max payload), a node serving a
directory of plugins, and a client."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sandbus.bus.connection import ConnectOptions
from sandbus.bus.server import NatsServer
from sandbus.host.lifecycle.policy import load_policy
from sandbus.host.node.node import Node
from sandbus.sdk.client import Client
from tests.bus.conftest import nats_server

__all__ = ["MIB", "big_server", "client", "nats_server", "server_with_max_payload", "start_node"]

MIB = 1024 * 1024


def server_with_max_payload(max_payload: int) -> Iterator[NatsServer]:
    """A JetStream nats-server on a free loopback port whose max payload is ``max_payload``, stopped after."""
    conf = Path(os.environ.get("TMPDIR", "/tmp")) / f"sandbus-extism-bus-{os.getpid()}-{max_payload}.conf"
    conf.write_text(f"listen: 127.0.0.1:-1\nmax_payload: {max_payload}\n")
    server = NatsServer(jetstream=True, config=conf).start()
    try:
        yield server
    finally:
        server.stop()
        conf.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def big_server() -> Iterator[NatsServer]:
    """4 MiB max payload: above the sandbox's 1 MiB input cap, so a large body reaches the node and the
    node's cap is what answers it."""
    yield from server_with_max_payload(4 * MIB)


async def start_node(server: NatsServer, plugins: Path, node_id: str) -> Node:
    """A started node serving every plugin of ``plugins`` under ``plugins/../policy.toml`` (all must load)."""
    n = Node.create(plugins, ConnectOptions.from_urls(server.url), policy=load_policy(plugins.parent / "policy.toml"),
                    node_id=node_id)
    report = n.manager.discover_and_load()
    assert report.ok, report.failed
    await n.start()
    return n


@pytest.fixture
async def client(big_server: NatsServer) -> AsyncIterator[Client]:
    c = await Client.connect(big_server.url)
    try:
        yield c
    finally:
        await c.close()
