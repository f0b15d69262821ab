"""Storage (JetStream KV) and network (HTTP to granted hosts) from inside a plugin, on an in-process node."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sandbus.bus.connection import ConnectOptions
from sandbus.bus.server import NatsServer
from sandbus.host.lifecycle.policy import load_policy
from sandbus.host.node.node import Node
from sandbus.sdk.client import Client
from sandbus.sdk.errors import SecurityViolationError
from tests.conftest import AuditLog

MANIFEST = """
[plugin]
name = "netkv"
version = "1.0.0"
description = "kv and http"
author = "tests"
license = "Apache-2.0"
min_runtime_version = "0.1.0"
[capabilities]
required = ["compute", "storage", "network"]
[permissions]
network_hosts = ["127.0.0.1:{port}"]
"""

POLICY = """
[capabilities]
allowed = ["compute", "storage", "network"]
[network]
allowed_hosts = ["127.0.0.1"]
allow_addresses = ["127.0.0.1"]   # the test servers listen on loopback
"""


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello from loopback, long enough to need a second fetch of the result" * 2
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _http_server() -> tuple[ThreadingHTTPServer, threading.Thread]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture
def http_servers() -> Iterator[tuple[int, int]]:
    """Two loopback HTTP servers: the first is granted to the plugin, the second is not."""
    (a, ta), (b, tb) = _http_server(), _http_server()
    yield a.server_address[1], b.server_address[1]
    for server, thread in ((a, ta), (b, tb)):
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
async def node(tmp_path: Path, nats_server: NatsServer, c_guest_flags: Callable[..., Path],
               http_servers: tuple[int, int], audit: AuditLog) -> AsyncIterator[Node]:
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "netkv.wasm").write_bytes(c_guest_flags("netkv", "netkv").read_bytes())
    (d / "netkv.toml").write_text(MANIFEST.format(port=http_servers[0]))
    (tmp_path / "policy.toml").write_text(POLICY)
    n = Node.create(d, ConnectOptions.from_urls(nats_server.url), policy=load_policy(tmp_path / "policy.toml"),
                    node_id="n1")
    n.manager.auditor.add_sink(audit)
    n.manager.discover_and_load()
    await n.start()
    yield n
    await n.stop()
    n.manager.close()


async def test_kv_round_trip(node: Node, nats_server: NatsServer) -> None:
    async with await Client.connect(nats_server.url) as c:
        assert await c.request("netkv", "kv_roundtrip", "greeting") == {"stored": "greeting"}
        # The bucket is the plugin's own, in JetStream.
        kv = await c.nc.jetstream().key_value("sandbus_kv_netkv")
        assert (await kv.status()).bucket == "sandbus_kv_netkv"


async def test_http_to_a_granted_host(node: Node, nats_server: NatsServer, http_servers: tuple[int, int]) -> None:
    async with await Client.connect(nats_server.url) as c:
        reply = await c.request("netkv", "http_get", f"http://127.0.0.1:{http_servers[0]}/x")
    assert reply["status"] == 200
    assert reply["body"].startswith("hello from loopback")


async def test_http_to_an_ungranted_host_is_a_security_violation(node: Node, nats_server: NatsServer,
                                                                 http_servers: tuple[int, int],
                                                                 audit: AuditLog) -> None:
    async with await Client.connect(nats_server.url) as c:
        with pytest.raises(SecurityViolationError, match=f"127.0.0.1:{http_servers[1]} was not granted"):
            await c.request("netkv", "http_get", f"http://127.0.0.1:{http_servers[1]}/x")
    assert "security.network_denied" in audit.kinds()
