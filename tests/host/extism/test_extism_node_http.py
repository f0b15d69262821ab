"""An Extism plugin's http_request on a node: the same guarded exchange as our own ABI's (grant, resolve
once, public addresses unless allowed, caps), status and headers kept for http_status_code/http_headers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest

from sandbus.bus.connection import ConnectOptions
from sandbus.bus.server import NatsServer
from sandbus.host.lifecycle.policy import load_policy
from sandbus.host.node.node import Node
from sandbus.sdk.client import Client
from sandbus.sdk.errors import AbiViolationError, SecurityViolationError
from tests.conftest import AuditLog
from tests.extism.loopback import LoopbackServer
from tests.host.extism.guests import plugin

#: fetch: GET the URL given as input; output "<status> <headers JSON>\n<body>".
IMPORTS = '(import "extism:host/env" "http_headers" (func $http_headers (result i64)))'
FETCH = """
  (data (i32.const 16) "{\\"url\\":\\"")
  (data (i32.const 32) "\\",\\"headers\\":{\\"x-plugin\\":\\"wat\\"}}")
  (func $cat (param $a i64) (param $b i64) (result i64)
    (local $p i64) (local $i i64) (local $la i64) (local $lb i64)
    (local.set $la (call $len (local.get $a)))
    (local.set $lb (call $len (local.get $b)))
    (local.set $p (call $alloc (i64.add (local.get $la) (local.get $lb))))
    (block $done (loop $next
      (br_if $done (i64.ge_u (local.get $i) (local.get $la)))
      (call $store8 (i64.add (local.get $p) (local.get $i)) (call $load8 (i64.add (local.get $a) (local.get $i))))
      (local.set $i (i64.add (local.get $i) (i64.const 1))) (br $next)))
    (local.set $i (i64.const 0))
    (block $done (loop $next
      (br_if $done (i64.ge_u (local.get $i) (local.get $lb)))
      (call $store8 (i64.add (local.get $p) (i64.add (local.get $la) (local.get $i)))
                    (call $load8 (i64.add (local.get $b) (local.get $i))))
      (local.set $i (i64.add (local.get $i) (i64.const 1))) (br $next)))
    (local.get $p))
  (func (export "fetch") (result i32)
    (local $req i64) (local $body i64) (local $status i64) (local $out i64)
    (local.set $req (call $cat (call $cat (call $kstr (i32.const 16) (i32.const 8)) (call $ioff))
                               (call $kstr (i32.const 32) (i32.const 31))))
    (local.set $body (call $http (local.get $req) (i64.const 0)))
    (local.set $status (call $alloc (i64.const 4)))
    (call $store8 (local.get $status) (i32.add (i32.const 48) (i32.div_u (call $http_status) (i32.const 100))))
    (call $store8 (i64.add (local.get $status) (i64.const 1))
                  (i32.add (i32.const 48) (i32.rem_u (i32.div_u (call $http_status) (i32.const 10)) (i32.const 10))))
    (call $store8 (i64.add (local.get $status) (i64.const 2))
                  (i32.add (i32.const 48) (i32.rem_u (call $http_status) (i32.const 10))))
    (call $store8 (i64.add (local.get $status) (i64.const 3)) (i32.const 10))
    (local.set $out (call $cat (call $cat (local.get $status) (call $http_headers)) (local.get $body)))
    (call $oset (local.get $out) (call $len (local.get $out)))
    (i32.const 0))
  (func (export "raw") (result i32)
    (drop (call $http (call $ioff) (i64.const 0))) (i32.const 0))
"""

MANIFEST = """
[plugin]
name = "exthttp"
version = "1.0.0"
description = "extism http"
author = "tests"
license = "Apache-2.0"
min_runtime_version = "0.1.0"
[capabilities]
required = ["compute", "network"]
[permissions]
network_hosts = ["127.0.0.1:{port}"]
"""

POLICY = """
[capabilities]
allowed = ["compute", "network"]
[network]
allowed_hosts = ["127.0.0.1"]
allow_addresses = ["127.0.0.1"]   # the test servers listen on loopback
"""


@pytest.fixture
def servers() -> Iterator[tuple[LoopbackServer, LoopbackServer]]:
    """Two loopback HTTP servers answering 203 with an X-Answer header: the first is granted to the plugin,
    the second is not."""
    made = LoopbackServer(203, {"X-Answer": "42"}), LoopbackServer(203, {"X-Answer": "42"})
    yield made
    for server in made:
        server.close()


@pytest.fixture
async def node(tmp_path: Path, nats_server: NatsServer, servers: tuple[LoopbackServer, LoopbackServer],
               audit: AuditLog) -> AsyncIterator[Node]:
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "exthttp.wasm").write_bytes(plugin(FETCH, imports=IMPORTS))
    (d / "exthttp.toml").write_text(MANIFEST.format(port=servers[0].port))
    (tmp_path / "policy.toml").write_text(POLICY)
    n = Node.create(d, ConnectOptions.from_urls(nats_server.url), policy=load_policy(tmp_path / "policy.toml"),
                    node_id="n1")
    n.manager.auditor.add_sink(audit)
    n.manager.discover_and_load()
    await n.start()
    yield n
    await n.stop()
    n.manager.close()


async def test_http_to_a_granted_host(node: Node, nats_server: NatsServer,
                                      servers: tuple[LoopbackServer, LoopbackServer]) -> None:
    async with await Client.connect(nats_server.url) as c:
        reply = (await c.request_raw("exthttp", "fetch", servers[0].url("/x").encode())).data
    status, rest = bytes(reply)[:4], bytes(reply)[4:]
    assert status == b"203\n"
    headers_json, _, got = rest.partition(b"}")
    assert orjson.loads(headers_json + b"}")["X-Answer"] == "42"
    assert got == LoopbackServer.body
    # the plugin's own header went out, once, to the granted server only
    assert [h.get("x-plugin") for h in servers[0].headers] == ["wat"]
    assert servers[1].hits == 0


async def test_http_to_an_ungranted_host_is_a_security_violation(node: Node, nats_server: NatsServer,
                                                                 servers: tuple[LoopbackServer, LoopbackServer],
                                                                 audit: AuditLog) -> None:
    async with await Client.connect(nats_server.url) as c:
        with pytest.raises(SecurityViolationError, match=f"127.0.0.1:{servers[1].port} was not granted"):
            await c.request_raw("exthttp", "fetch", servers[1].url("/x").encode())
    assert "security.network_denied" in audit.kinds()
    assert servers[0].hits == servers[1].hits == 0


async def test_a_malformed_request_is_an_abi_violation(node: Node, nats_server: NatsServer) -> None:
    async with await Client.connect(nats_server.url) as c:
        for bad in (b"not json", b'{"no_url": 1}', b'{"url": "ftp://127.0.0.1/"}', b'{"url": "http://[::1"}'):
            with pytest.raises(AbiViolationError, match="http_request"):
                await c.request_raw("exthttp", "raw", bad)
