"""The AS-PDK Extism plugins served by a real node on a real nats-server, compared with the Extism Python SDK:
count_vowels' JSON reply (declared ``application/json`` in its manifest) and HTTP through the node's network
grant -- the manifest's ``network_hosts`` and the policy's ``allowed_hosts``/``allow_addresses`` are what
Extism's ``allowed_hosts`` is on its own host.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import extism
import pytest

from sandbus.bus.connection import ConnectOptions
from sandbus.bus.server import NatsServer
from sandbus.host.lifecycle.policy import load_policy
from sandbus.host.node.node import Node
from sandbus.sdk.client import Client
from sandbus.sdk.errors import GuestError, SecurityViolationError
from tests.conftest import AuditLog
from tests.extism.loopback import LoopbackServer

Guest = Callable[[str], Path]

MANIFEST = """
[plugin]
name = "{name}"
version = "1.0.0"
{extra_plugin}
[capabilities]
required = {caps}
[permissions]
{permissions}
[resources]
timeout_seconds = 5
{extra}
"""

POLICY = """
[capabilities]
allowed = ["compute", "network"]
[network]
allowed_hosts = ["127.0.0.1"]
allow_addresses = ["127.0.0.1"]   # the test's server listens on loopback
"""


@pytest.fixture
def servers() -> Iterator[tuple[LoopbackServer, LoopbackServer]]:
    """Two loopback HTTP servers: the plugin's manifest grants the first, not the second."""
    granted, other = LoopbackServer(), LoopbackServer()
    yield granted, other
    granted.close()
    other.close()


@pytest.fixture
async def node(tmp_path: Path, nats_server: NatsServer, extism_guest: Guest,
               servers: tuple[LoopbackServer, LoopbackServer], audit: AuditLog) -> AsyncIterator[Node]:
    d = tmp_path / "plugins"
    d.mkdir()
    plugins = {
        # one instance: its running total (a var) is what one Extism plugin keeps; its vowels from [config]
        "count_vowels": ('content_type = "application/json"', '["compute"]', "",
                         'max_instances = 1\n[config]\nvowels = "aeiouyAEIOUY"'),
        "http": ("", '["compute", "network"]', f'network_hosts = ["127.0.0.1:{servers[0].port}"]', ""),
        "fail": ("", '["compute"]', "", ""),
    }
    for name, (extra_plugin, caps, permissions, extra) in plugins.items():
        shutil.copy(extism_guest(name), d / f"{name}.wasm")
        (d / f"{name}.toml").write_text(MANIFEST.format(name=name, extra_plugin=extra_plugin, caps=caps,
                                                        permissions=permissions, extra=extra))
    (tmp_path / "policy.toml").write_text(POLICY)
    n = Node.create(d, ConnectOptions.from_urls(nats_server.url), policy=load_policy(tmp_path / "policy.toml"),
                    node_id="extism-n1")
    n.manager.auditor.add_sink(audit)
    report = n.manager.discover_and_load()
    assert report.ok, report.failed
    await n.start()
    yield n
    await n.stop()
    n.manager.close()


async def test_count_vowels_through_the_node_is_what_extism_answers(node: Node, nats_server: NatsServer,
                                                                    extism_guest: Guest) -> None:
    """The manifest's [config] reaches config_get, the var keeps its total across requests: the node's replies
    are the Extism SDK's, call by call."""
    plugin = extism.Plugin(extism_guest("count_vowels").read_bytes(), wasi=False, config={"vowels": "aeiouyAEIOUY"},
                           functions=[])
    async with await Client.connect(nats_server.url) as c:
        for text in (b"Hello, World!", "ünïcödé aeiou".encode(), b"", b"my"):
            assert await c.request_bytes("count_vowels", "count_vowels", text) == \
                bytes(plugin.call("count_vowels", text))
        # its manifest declares JSON output: the client may decode it (the plugin gets the JSON text '"aeiou"')
        assert await c.request("count_vowels", "count_vowels", "aeiou") == \
            {"count": 5, "total": 14, "vowels": "aeiouyAEIOUY"}


async def test_a_failure_reaches_the_client_with_the_plugins_text(node: Node, nats_server: NatsServer) -> None:
    async with await Client.connect(nats_server.url) as c:
        with pytest.raises(GuestError, match="refused: over the bus"):
            await c.request_bytes("fail", "fail", b"over the bus")


async def test_http_to_the_granted_host_is_what_extism_fetches(node: Node, nats_server: NatsServer,
                                                               extism_guest: Guest,
                                                               servers: tuple[LoopbackServer, LoopbackServer]
                                                               ) -> None:
    granted, _ = servers
    url = granted.url("/hello").encode()
    in_extism = bytes(extism.Plugin({"wasm": [{"data": extism_guest("http").read_bytes()}],
                                     "allowed_hosts": ["127.0.0.1"]}, functions=[]).call("fetch", url))
    async with await Client.connect(nats_server.url) as c:
        on_node = await c.request_bytes("http", "fetch", url)
    assert on_node == in_extism == b"200\n" + LoopbackServer.body
    assert granted.hits == 2
    assert granted.headers[-1]["x-plugin"] == "extism-as"  # the plugin's request headers are sent


async def test_http_to_a_host_the_manifest_does_not_grant_is_refused(node: Node, nats_server: NatsServer,
                                                                     servers: tuple[LoopbackServer, LoopbackServer],
                                                                     audit: AuditLog) -> None:
    """Same address, another port: not granted. Refused before any connection, with an audit event."""
    _, other = servers
    async with await Client.connect(nats_server.url) as c:
        with pytest.raises(SecurityViolationError, match=f"127.0.0.1:{other.port}"):
            await c.request_bytes("http", "fetch", other.url("/").encode())
    assert other.hits == 0
    assert "security.network_denied" in audit.kinds()
