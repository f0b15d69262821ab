"""Host functions under attack, on a real node (in this process, so its audit events are seen) and a real
nats-server with JetStream: deadlines (a server that dribbles), buffers larger than their caps, addresses a
granted name resolves to, and chains through publish that would never end.

Guests: tests/bus/guests/hostile.c (raw host-function calls) and cycler.c (request/publish cycles).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats.errors
import orjson
import pytest

from sandbus.bus.connection import ConnectOptions
from sandbus.bus.server import NatsServer
from sandbus.host.lifecycle.policy import load_policy
from sandbus.host.node.hostfuncs import MAX_HOPS
from sandbus.host.node.netguard import refused_address
from sandbus.host.node.node import Node
from sandbus.sdk.client import Client
from sandbus.sdk.envelope import H_HOPS
from sandbus.sdk.errors import (
    AbiViolationError,
    BusError,
    ExecutionTimeoutError,
    PayloadTooLargeError,
    RateLimitError,
    SecurityViolationError,
    TrapError,
)
from sandbus.sdk.subjects import topic_subject
from tests.conftest import ABI_PRELUDE, AuditLog

HOSTILE = """
[plugin]
name = "hostile"
version = "1.0.0"
[capabilities]
required = ["compute", "messaging", "network", "storage"]
[permissions]
publish_topics = ["big.t"]
request_plugins = ["spinner.loop_forever"]
network_hosts = {hosts}
[resources]
timeout_seconds = 1
max_instances = 4
"""

SPINNER = """
[plugin]
name = "spinner"
version = "1.0.0"
[capabilities]
required = ["compute"]
[resources]
timeout_seconds = 2
max_fuel = 1000000000000
max_instances = 2
"""

SELFLOOP = """
[plugin]
name = "selfloop"
version = "1.0.0"
[capabilities]
required = ["compute", "messaging"]
[permissions]
publish_topics = ["loop.t"]
[resources]
max_instances = 1
[subscriptions]
topics = ["loop.t"]
durable = {durable}
"""

CYCLER = """
[plugin]
name = "cycler"
version = "1.0.0"
[capabilities]
required = ["compute", "messaging"]
[permissions]
publish_topics = ["cyc.t"]
request_plugins = ["cycler"]
[resources]
max_instances = 4
[subscriptions]
topics = ["cyc.t"]
durable = false
"""

FANOUT = """
[plugin]
name = "fanout"
version = "1.0.0"
[capabilities]
required = ["compute", "messaging"]
[permissions]
publish_topics = ["fan.t"]
[resources]
max_instances = 2
[subscriptions]
topics = {topics}
durable = false
"""

POLICY = """
[capabilities]
allowed = ["compute", "messaging", "network", "storage"]
[network]
allowed_hosts = ["127.0.0.1", "localhost", "169.254.169.254", "[fd00:ec2::254]", "[::ffff:127.0.0.1]"]
{addresses}
[messaging]
publish_topics = ["big.>", "loop.t", "cyc.t", "fan.t"]
request_plugins = ["spinner", "cycler"]
subscribe_topics = ["loop.t", "cyc.t", "fan.t"]
{sends}
[limits]
max_fuel = 1000000000000
"""

LOOPBACK = 'allow_addresses = ["127.0.0.1", "::1"]'


# -- HTTP servers on loopback -----------------------------------------------------------------------


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, dribble: bool, canned: bytes | None = None) -> None:
        self.dribble = dribble
        self.canned = canned  # the whole response, when given
        self.requests: list[bytes] = []
        self.stop = threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock = self.request
        sock.settimeout(5)
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                return
            head += chunk
        self.server.requests.append(head)
        if self.server.canned is not None:
            sock.sendall(self.server.canned)
            return
        if not self.server.dribble:
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            return
        # One byte a second, for up to a minute: every socket read gets its byte well within any timeout.
        response = b"HTTP/1.1 200 OK\r\nContent-Length: 60\r\n\r\n" + b"x" * 60
        for i in range(len(response)):
            if self.server.stop.wait(1.0 if i else 0.0):
                return
            try:
                sock.sendall(response[i:i + 1])
            except OSError:
                return  # the node hung up: what the test expects


@pytest.fixture
def http_server() -> Iterator[Callable[..., _Server]]:
    servers: list[tuple[_Server, threading.Thread]] = []

    def start(dribble: bool, canned: bytes | None = None) -> _Server:
        server = _Server(dribble, canned)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return server

    yield start
    for server, thread in servers:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# -- nodes --------------------------------------------------------------------------------------------


NodeFactory = Callable[..., Awaitable[Node]]


@pytest.fixture
async def make_node(tmp_path: Path, nats_server: NatsServer, c_guest_flags: Callable[..., Path],
                    wat: Callable[[str], bytes], audit: AuditLog) -> AsyncIterator[NodeFactory]:
    nodes: list[Node] = []

    async def make(*, hosts: list[str] | None = None, addresses: str = "", plugins: tuple[str, ...] = ("hostile",),
                   durable: bool = False, sends: str = "", fanout_topics: tuple[str, ...] = ("fan.t",)) -> Node:
        d = tmp_path / f"n{len(nodes)}" / "plugins"
        d.mkdir(parents=True)
        if "hostile" in plugins:
            shutil.copy(c_guest_flags("hostile", "hostile"), d / "hostile.wasm")
            (d / "hostile.toml").write_text(HOSTILE.format(hosts=orjson.dumps(hosts or []).decode()))
            (d / "spinner.wasm").write_bytes(wat("adversary"))
            (d / "spinner.toml").write_text(SPINNER)
        if "selfloop" in plugins:
            shutil.copy(c_guest_flags("cycler", "selfloop", "-DSELF_LOOP"), d / "selfloop.wasm")
            (d / "selfloop.toml").write_text(SELFLOOP.format(durable=str(durable).lower()))
        if "cycler" in plugins:
            shutil.copy(c_guest_flags("cycler", "cycler"), d / "cycler.wasm")
            (d / "cycler.toml").write_text(CYCLER)
        if "fanout" in plugins:
            shutil.copy(c_guest_flags("fanout", "fanout"), d / "fanout.wasm")
            (d / "fanout.toml").write_text(FANOUT.format(topics=orjson.dumps(fanout_topics).decode()))
        (d.parent / "policy.toml").write_text(POLICY.format(addresses=addresses, sends=sends))
        node = Node.create(d, ConnectOptions.from_urls(nats_server.url), policy=load_policy(d.parent / "policy.toml"),
                           node_id=f"n{len(nodes)}")
        node.manager.auditor.add_sink(audit)
        node.manager.discover_and_load()
        failed = [p for p in node.manager.list_plugins() if p.name not in node.manager.names()]
        assert not failed, failed
        await node.start()
        nodes.append(node)
        assert node.nc is not None
        await node.nc.flush()  # its subscriptions reached the server before the test's first request
        return node

    yield make
    for node in nodes:
        await node.stop()
        node.manager.close()


async def _call(url: str, function: str, payload: Any, plugin: str = "hostile", timeout: float = 10.0) -> Any:
    async with await Client.connect(url) as c:
        return await c.request(plugin, function, payload, timeout=timeout)


async def _still_serving(url: str) -> None:
    assert await _call(url, "handle_request", {"alive": True}) == {"alive": True}


# -- finding 4: one deadline for everything a call waits for ----------------------------------------


async def test_f04_http_dribble_ends_at_the_calls_deadline(make_node: NodeFactory, nats_server: NatsServer,
                                                           http_server: Callable[[bool], _Server],
                                                           audit: AuditLog) -> None:
    server = http_server(True)
    port = server.server_address[1]
    await make_node(hosts=[f"127.0.0.1:{port}"], addresses=LOOPBACK)
    start = time.monotonic()
    with pytest.raises(ExecutionTimeoutError, match="timeout"):
        await _call(nats_server.url, "http_raw", {"url": f"http://127.0.0.1:{port}/slow"})
    elapsed = time.monotonic() - start
    assert len(server.requests) == 1  # it did reach the server, which then sent a byte a second
    assert elapsed < 2.5, f"a 1 s call took {elapsed:.2f} s"  # not the 10 s HTTP timeout, nor a byte per second
    assert "limit.timeout" in audit.kinds()
    await _still_serving(nats_server.url)


async def test_f04_a_second_request_gets_what_is_left_of_the_deadline(make_node: NodeFactory,
                                                                      nats_server: NatsServer) -> None:
    await make_node()
    start = time.monotonic()
    # Each request to a plugin that never answers waits 80 % of what is left of the 1 s call: 0.8 s, then
    # 0.16 s. Two full shares (1.6 s) would have overrun the call.
    reply = await _call(nats_server.url, "request_twice", {"target": "spinner.loop_forever", "payload": {}})
    elapsed = time.monotonic() - start
    assert reply == {"first": -3, "second": -3}
    assert elapsed < 2.0


WAITER = """
(module
  (import "probe_v1" "wait" (func $wait))
""" + ABI_PRELUDE + """
  (func (export "sandbus_init") (param i32 i32) (result i32) {init} (i32.const 0))
  (func (export "sandbus_health") (result i32) (call $wait) (i32.const 0))
  (func (export "handle_request") (param $p i32) (param $n i32) (result i64)
    (call $wait)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $p)) (i64.const 32)) (i64.extend_i32_u (local.get $n)))))
"""


def _waiter(waits: int, timeout_s: float = 0.3, first_wait: float | None = None,
            holding: threading.Event | None = None) -> Any:
    """A sandbox whose host function ``probe_v1.wait`` waits for all that is left of the deadline, as a
    host function waiting for a silent peer does; ``waits``: how many waits sandbus_init makes;
    ``first_wait``: the first wait of a call lasts this long instead (``holding`` is set when it begins)."""
    from sandbus.host.sandbox import CallContext, HostFunctions, Limits, Sandbox
    from sandbus.host.sandbox.deadline import remaining

    funcs = HostFunctions()
    short = [first_wait] if first_wait is not None else []

    @funcs.register("wait", module="probe_v1")
    def wait(ctx: CallContext) -> None:
        left = remaining(ctx, "wait")
        if short:
            if holding is not None:
                holding.set()
            left = short.pop()
        time.sleep(left)  # a host function blocked on a peer for its whole budget

    import wasmtime

    wat = WAITER.format(init="(call $wait) " * waits)
    return Sandbox(bytes(wasmtime.wat2wasm(wat)), name="waiter", host_functions=funcs,
                   limits=Limits(timeout_s=timeout_s, max_instances=1))


def test_f04_host_functions_in_sandbus_init_share_one_deadline() -> None:
    # Two waits of "what is left" in sandbus_init: the second finds nothing left. Without a deadline for
    # init, each got a whole timeout and init ran for twice the plugin's timeout.
    start = time.monotonic()
    with pytest.raises(ExecutionTimeoutError, match="wait not started"):
        _waiter(2)  # builds (and initialises) its first instance
    elapsed = time.monotonic() - start
    assert elapsed < 0.55, f"sandbus_init with a 0.3 s timeout ran {elapsed:.2f} s"


def test_f04_health_gets_its_own_deadline_not_the_last_calls() -> None:
    sandbox = _waiter(0)
    try:
        assert sandbox.call("handle_request", "x") == "x"  # waits out its whole deadline
        assert sandbox.health()  # a fresh deadline: not "the call's timeout has passed"
    finally:
        sandbox.close()


def test_f04_a_call_that_waited_for_its_instance_has_less_left_for_host_functions() -> None:
    # One instance: the first call holds it for 0.4 s; the second arrives at once with a deadline of its
    # arrival + 1 s, and gets the instance with 0.6 s left. Its host function may wait 0.6 s, not a whole
    # second from the moment the instance was free.
    holding = threading.Event()
    sandbox = _waiter(0, timeout_s=1.0, first_wait=0.4, holding=holding)
    try:
        holder = threading.Thread(target=sandbox.call, args=("handle_request", "x"))
        arrival = time.monotonic()
        holder.start()
        assert holding.wait(5)  # the holder has the instance (for 0.4 s)
        with contextlib.suppress(ExecutionTimeoutError):  # its host function may end right at the deadline
            sandbox.call_detailed("handle_request", b'"y"', deadline=arrival + 1.0)
        elapsed = time.monotonic() - arrival
        holder.join(timeout=5)
    finally:
        sandbox.close()
    assert elapsed < 1.25, f"a call due 1 s after it arrived ended after {elapsed:.2f} s"


# -- finding 7: lengths are checked before a byte is copied ------------------------------------------


@pytest.mark.parametrize("what", ["log", "publish", "http", "request", "kv"])
async def test_f07_length_beyond_guest_memory_is_an_abi_error(make_node: NodeFactory, nats_server: NatsServer,
                                                              what: str) -> None:
    await make_node()
    with pytest.raises(AbiViolationError, match="outside guest memory"):
        await _call(nats_server.url, "oversize", {"what": what, "len": 1 << 30, "alloc": 0})
    await _still_serving(nats_server.url)


@pytest.mark.parametrize("what", ["log", "publish", "http", "request", "kv"])
async def test_f07_length_above_the_cap_is_refused_without_a_copy(make_node: NodeFactory, nats_server: NatsServer,
                                                                  audit: AuditLog, what: str) -> None:
    await make_node()
    size = 24 << 20  # inside guest memory, far above every cap (log 64 KiB, payload 1 MiB, ...)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(PayloadTooLargeError):
            await _call(nats_server.url, "oversize", {"what": what, "len": size, "alloc": size})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size // 4, f"{peak} bytes allocated while refusing {size}: the buffer was copied"
    assert any(k.startswith("limit.") for k in audit.kinds())
    await _still_serving(nats_server.url)


@pytest.mark.parametrize("what", ["publish", "request"])
def test_f07_the_test_harness_bounds_guest_buffers_like_a_node(tmp_path: Path, c_guest_flags: Callable[..., Path],
                                                               what: str) -> None:
    from sandbus.sdk.testing import PluginHarness

    shutil.copy(c_guest_flags("hostile", "hostile"), tmp_path / "hostile.wasm")
    (tmp_path / "hostile.toml").write_text(HOSTILE.format(hosts="[]"))
    (tmp_path / "policy.toml").write_text(POLICY.format(addresses="", sends=""))
    size = 24 << 20
    with PluginHarness(tmp_path / "hostile.wasm", policy=tmp_path / "policy.toml") as plugin:
        plugin.on_request("*", {"ok": True})
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            plugin.expect_error(PayloadTooLargeError, "oversize", {"what": what, "len": size, "alloc": size})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < size // 4, f"{peak} bytes allocated while refusing {size}: the buffer was copied"
        assert plugin.published == []
        assert plugin.requested == []
        with pytest.raises(AbiViolationError, match="outside guest memory"):
            plugin.call("oversize", {"what": what, "len": 1 << 30, "alloc": 0})


# -- finding 19: the address behind a granted name ----------------------------------------------------


async def test_f19_a_granted_name_resolving_to_loopback_is_refused(make_node: NodeFactory, nats_server: NatsServer,
                                                                   http_server: Callable[[bool], _Server],
                                                                   audit: AuditLog) -> None:
    server = http_server(False)
    port = server.server_address[1]
    await make_node(hosts=[f"localhost:{port}"])  # granted by name, but the policy names no private address
    with pytest.raises(SecurityViolationError, match=r"localhost resolves to .*allow_addresses"):
        await _call(nats_server.url, "http_raw", {"url": f"http://localhost:{port}/"})
    assert server.requests == []  # refused before connecting
    denied = [e for e in audit if e.kind == "security.network_denied"]
    assert denied
    assert denied[-1].details["host"] == "localhost"
    await _still_serving(nats_server.url)


async def test_f19_allowed_by_the_policy_it_connects_and_keeps_the_granted_host(
        make_node: NodeFactory, nats_server: NatsServer, http_server: Callable[[bool], _Server]) -> None:
    server = http_server(False)
    port = server.server_address[1]
    await make_node(hosts=[f"localhost:{port}"], addresses=LOOPBACK)
    reply = await _call(nats_server.url, "http_raw", {"url": f"http://localhost:{port}/x"})
    assert (reply["status"], reply["body"]) == (200, "ok")
    assert f"Host: localhost:{port}\r\n".encode() in server.requests[0]


async def test_f19_the_guest_may_not_set_host(make_node: NodeFactory, nats_server: NatsServer,
                                              http_server: Callable[[bool], _Server], audit: AuditLog) -> None:
    server = http_server(False)
    port = server.server_address[1]
    await make_node(hosts=[f"localhost:{port}"], addresses=LOOPBACK)
    with pytest.raises(SecurityViolationError, match="Host header"):
        await _call(nats_server.url, "http_raw", {"url": f"http://localhost:{port}/",
                                                  "headers": {"host": "metadata.google.internal"}})
    assert server.requests == []
    assert "security.network_denied" in audit.kinds()


async def test_f19_https_verifies_the_granted_name_at_the_checked_address(
        make_node: NodeFactory, nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the node (in this process) trusts the test certificate
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    names: list[str | None] = []
    server_ctx.sni_callback = lambda _sock, name, _ctx: names.append(name)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)  # the server thread never outlives a node that did not connect
    port = listener.getsockname()[1]
    heads: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            heads.append(tls.recv(65536))
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\ntls")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        await make_node(hosts=[f"localhost:{port}"], addresses=LOOPBACK)
        reply = await _call(nats_server.url, "http_raw", {"url": f"https://localhost:{port}/"})
    finally:
        listener.close()
        thread.join(timeout=5)
    assert (reply["status"], reply["body"]) == (200, "tls")
    assert names == ["localhost"]  # SNI, and the certificate was checked for the granted name
    assert f"Host: localhost:{port}\r\n".encode() in heads[0]


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/",
                                 "http://[::ffff:127.0.0.1]:80/"])
async def test_f19_metadata_and_mapped_addresses_are_refused(make_node: NodeFactory, nats_server: NatsServer,
                                                             url: str) -> None:
    # Granted by the manifest and the policy's hosts, and (for the last) loopback is even allowed as IPv4:
    # the IPv4-mapped spelling is judged as the IPv4 address it carries, the others are never public.
    await make_node(hosts=["169.254.169.254:80", "[fd00:ec2::254]:80", "[::ffff:127.0.0.1]:80"],
                    addresses='allow_addresses = ["10.0.0.0/8"]')
    with pytest.raises(SecurityViolationError, match="allow_addresses"):
        await _call(nats_server.url, "http_raw", {"url": url})


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                                     "100.64.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", "::1", "::",
                                     "fe80::1", "fd00:ec2::254", "::ffff:10.0.0.1", "64:ff9b::a9fe:a9fe",
                                     "2002:7f00:1::1",
                                     # Python 3.11's is_global calls these global: IPv4-compatible loopback and
                                     # metadata, IPv4-translated, local-use NAT64, site-local, documentation.
                                     "::127.0.0.1", "::169.254.169.254", "::ffff:0:127.0.0.1",
                                     "64:ff9b:1::a9fe:a9fe", "fec0::1", "3fff::1", "198.51.100.7"])
def test_f19_non_public_addresses_are_refused_unless_listed(address: str) -> None:
    import ipaddress

    addr = ipaddress.ip_address(address)
    assert refused_address(addr, [])
    inner = ipaddress.ip_network(address)
    assert not refused_address(addr, [inner])


def test_f19_public_addresses_pass() -> None:
    import ipaddress

    for address in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "::ffff:93.184.216.34"):
        assert not refused_address(ipaddress.ip_address(address), [])


async def test_f19_other_spellings_of_a_granted_host_are_not_granted(
        make_node: NodeFactory, nats_server: NatsServer, http_server: Callable[..., _Server], audit: AuditLog) -> None:
    server = http_server(False)
    port = server.server_address[1]
    # Only "localhost:<port>" is granted (and loopback allowed): every other way to write loopback, or
    # another port, is a host that was not granted -- refused before a lookup or a connection.
    await make_node(hosts=[f"localhost:{port}"], addresses=LOOPBACK)
    for url in (f"http://127.1:{port}/", f"http://0x7f000001:{port}/", f"http://2130706433:{port}/",
                f"http://127.0.0.1:{port}/", f"http://[::ffff:127.0.0.1]:{port}/", f"http://0.0.0.0:{port}/",
                f"http://[::]:{port}/", f"http://[::1]:{port}/", f"http://localhost.:{port}/",
                f"http://localhost@127.0.0.1:{port}/", f"http://localhost:{port + 1}/", "http://localhost/"):
        with pytest.raises(SecurityViolationError, match="was not granted"):
            await _call(nats_server.url, "http_raw", {"url": url})
    assert server.requests == []
    assert audit.kinds().count("security.network_denied") == 12
    assert (await _call(nats_server.url, "http_raw", {"url": f"http://LOCALHOST:{port}/"}))["status"] == 200


def test_f19_slow_lookups_of_one_plugin_do_not_starve_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    # No resolver here is slow, so getaddrinfo stands in for one: "slow.example" answers only when released.
    from sandbus.host.node import netguard

    release = threading.Event()
    real = socket.getaddrinfo

    def resolver(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        if host == "slow.example":
            release.wait(10)
        return real("93.184.216.34", port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    try:
        refusals = 0
        for _ in range(netguard.MAX_LOOKUPS + 4):  # a plugin calling again and again with a tiny deadline
            with pytest.raises(netguard.NameNotResolved) as info:
                netguard.resolve_checked("slow.example", 80, [], 0.01, owner="hog")
            refusals += "still in progress" in str(info.value)
        assert netguard.lookups_in_progress("hog") == netguard.MAX_LOOKUPS_PER_OWNER
        assert refusals == netguard.MAX_LOOKUPS + 4 - netguard.MAX_LOOKUPS_PER_OWNER
        # Another plugin still resolves.
        assert netguard.resolve_checked("fast.example", 80, [], 2.0, owner="other")
    finally:
        release.set()
    deadline = time.monotonic() + 5
    while netguard.lookups_in_progress("hog"):
        assert time.monotonic() < deadline, "the released lookups did not end"
        time.sleep(0.01)  # polling a condition, bounded by the deadline above


@pytest.mark.parametrize("headers", [
    {"Content-Length": "0"},  # the body would be read as a second request
    {"transfer-encoding": "chunked"},
    {"Connection": "Upgrade", "Upgrade": "h2c"},
    {"Host ": "metadata.google.internal"},
])
async def test_f19_no_second_request_with_another_host_through_framing_headers(
        make_node: NodeFactory, nats_server: NatsServer, http_server: Callable[..., _Server], audit: AuditLog,
        headers: dict[str, str]) -> None:
    server = http_server(False)
    port = server.server_address[1]
    await make_node(hosts=[f"localhost:{port}"], addresses=LOOPBACK)
    smuggled = "GET /latest/meta-data/ HTTP/1.1\r\nHost: metadata.google.internal\r\n\r\n"
    with pytest.raises(SecurityViolationError, match="Host header or a framing header"):
        await _call(nats_server.url, "http_raw", {"url": f"http://localhost:{port}/", "method": "POST",
                                                  "headers": headers, "body": smuggled})
    assert server.requests == []
    assert "security.network_denied" in audit.kinds()
    await _still_serving(nats_server.url)


@pytest.mark.parametrize("method", ["GET http://metadata.google.internal/", "GET\t/x", "", "G\r\nX: y"])
async def test_f19_a_method_that_is_not_a_token_is_refused(make_node: NodeFactory, nats_server: NatsServer,
                                                           http_server: Callable[..., _Server], method: str) -> None:
    server = http_server(False)
    port = server.server_address[1]
    await make_node(hosts=[f"localhost:{port}"], addresses=LOOPBACK)
    with pytest.raises(AbiViolationError, match="method"):
        await _call(nats_server.url, "http_raw", {"url": f"http://localhost:{port}/", "method": method})
    assert server.requests == []


async def test_f19_a_redirect_is_returned_not_followed(make_node: NodeFactory, nats_server: NatsServer,
                                                       http_server: Callable[..., _Server]) -> None:
    target = http_server(False)  # loopback, not granted: must never see a request
    location = f"http://127.0.0.1:{target.server_address[1]}/secret"
    redirector = http_server(False, f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n"
                                    "Connection: close\r\n\r\n".encode())
    port = redirector.server_address[1]
    await make_node(hosts=[f"localhost:{port}"], addresses=LOOPBACK)
    reply = await _call(nats_server.url, "http_raw", {"url": f"http://localhost:{port}/"})
    assert (reply["status"], reply["headers"]["Location"]) == (302, location)
    assert len(redirector.requests) == 1
    assert target.requests == []


# -- finding 7 (HTTP): the response cap counts the headers too --------------------------------------


async def test_f07_response_headers_count_toward_the_http_cap(make_node: NodeFactory, nats_server: NatsServer,
                                                              http_server: Callable[..., _Server],
                                                              audit: AuditLog) -> None:
    # 90 header lines of 20 KB (each within http.client's own line limit): 1.8 MB of result for a
    # 2-byte body, above the 1 MiB response cap.
    fat = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 20_000) for i in range(90))
    server = http_server(False, b"HTTP/1.1 200 OK\r\n" + fat + b"Content-Length: 2\r\nConnection: close\r\n\r\nok")
    port = server.server_address[1]
    await make_node(hosts=[f"localhost:{port}"], addresses=LOOPBACK)
    with pytest.raises(PayloadTooLargeError, match="headers and body"):
        await _call(nats_server.url, "http_raw", {"url": f"http://localhost:{port}/"})
    assert "limit.http_response" in audit.kinds()
    await _still_serving(nats_server.url)


# -- finding 4: waits that are not HTTP ---------------------------------------------------------------


async def test_f04_a_loop_of_requests_ends_at_the_calls_deadline(make_node: NodeFactory,
                                                                 nats_server: NatsServer) -> None:
    await make_node()
    start = time.monotonic()
    with pytest.raises(ExecutionTimeoutError):
        await _call(nats_server.url, "request_loop", {})
    elapsed = time.monotonic() - start
    assert elapsed < 2.5, f"a 1 s call that loops on request took {elapsed:.2f} s"
    await _still_serving(nats_server.url)


@pytest.mark.parametrize(("function", "payload"), [
    ("oversize", {"what": "kv", "len": 2, "alloc": 2}),  # kv_put: a JetStream API request
    ("publish_one", {}),  # a durable publish waits for its ack
    ("request_twice", {"target": "spinner.loop_forever", "payload": {}}),
])
async def test_f04_waits_on_a_frozen_nats_server_end_at_the_calls_deadline(
        make_node: NodeFactory, nats_server: NatsServer, function: str, payload: Any) -> None:
    import os
    import signal

    node = await make_node()
    pid = nats_server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # the server takes every byte and answers nothing
    try:
        start = time.monotonic()
        try:
            result = await node.call("hostile", function, orjson.dumps(payload))
        except ExecutionTimeoutError:
            result = None
        elapsed = time.monotonic() - start
    finally:
        os.kill(pid, signal.SIGCONT)
    # The 1 s call ends by its deadline (two requests that never get a reply: -3 twice, within it).
    assert result is None or orjson.loads(result.reply) == {"first": -3, "second": -3}
    assert elapsed < 2.0, f"{function} on a frozen NATS server ran {elapsed:.2f} s of a 1 s call"
    await _still_serving(nats_server.url)


async def test_f04_publish_with_its_stream_gone_is_a_bus_error(make_node: NodeFactory, nats_server: NatsServer,
                                                               audit: AuditLog) -> None:
    node = await make_node()
    assert node.nc is not None
    assert await _call(nats_server.url, "publish_one", {}) == {"returned": 0}
    await node.nc.jetstream().delete_stream("SANDBUS_TOPICS")  # the durable publish now gets no ack
    with pytest.raises(BusError) as info:
        await _call(nats_server.url, "publish_one", {})
    assert not isinstance(info.value, TrapError)
    assert "publish" in str(info.value)
    await _still_serving(nats_server.url)
    assert node.manager.info("hostile").last_error in (None, "")  # the bus failed, not the plugin


# -- finding 20: chains through publish end at the hop limit -----------------------------------------


async def _watch(url: str, topic: str) -> tuple[Client, list[int]]:
    client = await Client.connect(url)
    hops: list[int] = []

    async def seen(msg: Any) -> None:
        hops.append(int((msg.headers or {}).get(H_HOPS, "0")))

    await client.nc.subscribe(topic_subject(topic), cb=seen)
    await client.nc.flush()
    return client, hops


async def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)  # polling a condition, bounded by the deadline above


async def test_f20_a_topic_self_loop_stops_at_the_hop_limit(make_node: NodeFactory, nats_server: NatsServer,
                                                            audit: AuditLog) -> None:
    await make_node(plugins=("selfloop",))
    watcher, hops = await _watch(nats_server.url, "loop.t")
    try:
        # The client's request publishes hop 1; each message handled publishes one more onto the same topic.
        assert await _call(nats_server.url, "handle_request", {}, plugin="selfloop") == {"published": True}
        await _wait_for(lambda: "limit.hops" in audit.kinds())
        await watcher.nc.flush()
        assert sorted(hops) == list(range(1, MAX_HOPS + 1))
        event = next(e for e in audit if e.kind == "limit.hops")
        assert (event.plugin, event.details["hops"]) == ("selfloop", MAX_HOPS + 1)
        await _still_serving_loop(nats_server.url, hops)
    finally:
        await watcher.close()


async def _still_serving_loop(url: str, hops: list[int]) -> None:
    """The node answers the plugin's requests after the loop was stopped."""
    assert await _call(url, "handle_request", {}, plugin="selfloop") == {"published": True}
    await _wait_for(lambda: hops.count(1) == 2)


async def test_f20_durable_deliveries_keep_the_hop_count(make_node: NodeFactory, nats_server: NatsServer,
                                                         audit: AuditLog) -> None:
    await make_node(plugins=("selfloop",), durable=True)
    watcher, hops = await _watch(nats_server.url, "loop.t")
    try:
        # Stored by JetStream with hop 7: its delivery publishes hop 8, whose delivery may not publish hop 9.
        js = watcher.nc.jetstream()
        await js.publish(topic_subject("loop.t"), b'{"start": true}', headers={H_HOPS: str(MAX_HOPS - 1)})
        await _wait_for(lambda: "limit.hops" in audit.kinds())
        await watcher.nc.flush()
        assert sorted(hops) == [MAX_HOPS - 1, MAX_HOPS]
        assert next(e for e in audit if e.kind == "limit.hops").details["hops"] == MAX_HOPS + 1
    finally:
        await watcher.close()


async def test_f20_a_request_publish_request_cycle_stops_at_the_hop_limit(
        make_node: NodeFactory, nats_server: NatsServer, audit: AuditLog) -> None:
    await make_node(plugins=("cycler",))
    watcher, hops = await _watch(nats_server.url, "cyc.t")
    try:
        # request (hop 0) -> publish (1) -> request (2) -> publish (3) ... -> publish 9: refused.
        assert await _call(nats_server.url, "handle_request", {}, plugin="cycler") == {"published": True}
        await _wait_for(lambda: "limit.hops" in audit.kinds())
        await watcher.nc.flush()
        assert sorted(hops) == [1, 3, 5, 7]
        assert next(e.details.get("hops") for e in audit if e.kind == "limit.hops") == MAX_HOPS + 1
    finally:
        await watcher.close()



# -- finding 20: the fan-out of a chain is bounded by the send limits ----------------------------------


async def test_f20_fan_out_is_bounded(make_node: NodeFactory, nats_server: NatsServer, audit: AuditLog) -> None:
    """A plugin that publishes 3 messages onto its own topic for every message it handles would turn one
    request into 3 + 9 + ... + 3^8 = 9,840 messages within the hop limit. Its token bucket (burst 30,
    5 a second here) refuses the sends beyond it: the total stays within burst + rate x elapsed, each
    refusal fails its call with ``limit.rate`` (audited), and the node goes on serving the plugin."""
    burst, rate = 30, 5.0
    node = await make_node(plugins=("fanout",), sends=f"max_sends_per_second = {rate}\nsend_burst = {burst}")
    watcher, hops = await _watch(nats_server.url, "fan.t")
    start = time.monotonic()
    try:
        assert await _call(nats_server.url, "handle_request", {}, plugin="fanout") == {"published": True}
        # Every message the chain produced has been handled (each delivery either sent its 3 or was refused).
        await _wait_for(lambda: len(hops) >= burst and "limit.rate" in audit.kinds()
                        and node.manager.info("fanout").executions == 1 + len(hops))
        assert await _call(nats_server.url, "ping", {}, plugin="fanout") == {"pong": True}  # still serving
        await watcher.nc.flush()
        elapsed = time.monotonic() - start
        assert burst <= len(hops) <= burst + rate * elapsed, (len(hops), elapsed)
        assert max(hops) < MAX_HOPS  # the send limit stopped it, not the hop limit
        refusals = [e for e in audit if e.kind == "limit.rate"]
        assert refusals
        assert {(e.plugin, e.details["scope"]) for e in refusals} == {("fanout", "plugin")}
        assert node.manager.info("fanout").errors >= len(refusals)
    finally:
        await watcher.close()


async def test_f20_fan_out_one_call_cannot_send_more_than_the_per_call_cap(
        make_node: NodeFactory, nats_server: NatsServer, audit: AuditLog) -> None:
    """One call looping on ``publish`` sends ``max_sends_per_call`` messages and then fails with
    ``RateLimitError``; the next call gets its own allowance."""
    await make_node(plugins=("fanout",), sends="max_sends_per_call = 10", fanout_topics=())
    watcher, hops = await _watch(nats_server.url, "fan.t")
    try:
        with pytest.raises(RateLimitError, match="max_sends_per_call") as info:
            await _call(nats_server.url, "handle_request", {"n": 50}, plugin="fanout")
        assert info.value.code == "limit.rate"
        event = next(e for e in audit if e.kind == "limit.rate")
        assert (event.plugin, event.details["scope"], event.details["limit"]) == ("fanout", "call", 10)
        assert await _call(nats_server.url, "handle_request", {"n": 10}, plugin="fanout") == {"published": True}
        await _wait_for(lambda: len(hops) == 20)
        await watcher.nc.flush()
        assert len(hops) == 20
    finally:
        await watcher.close()


# -- finding 18: subscriptions have a policy ceiling, through a real node --------------------------------


async def test_f18_subscriptions_to_everything_refused_alone_on_a_node(
        tmp_path: Path, nats_server: NatsServer, plugins_dir: Path, c_guest_flags: Callable[..., Path],
        audit: AuditLog) -> None:
    """A compute-only plugin subscribing to ``>`` is refused at load, naming the topic and the policy
    key; the plugin subscribed within the ceiling and the others load and serve, and the eavesdropper
    hears nothing."""
    d = tmp_path / "plugins"
    d.mkdir()
    for ext in ("wasm", "toml"):
        shutil.copy(plugins_dir / f"echo.{ext}", d / f"echo.{ext}")
    shutil.copy(plugins_dir / "echo.wasm", d / "eavesdrop.wasm")
    (d / "eavesdrop.toml").write_text('[plugin]\nname = "eavesdrop"\nversion = "1.0.0"\n[capabilities]\n'
                                      'required = ["compute"]\n[subscriptions]\ntopics = [">"]\ndurable = false\n')
    shutil.copy(c_guest_flags("recorder", "listener", '-DPLUGIN_NAME="listener"'), d / "listener.wasm")
    (d / "listener.toml").write_text('[plugin]\nname = "listener"\nversion = "1.0.0"\n[capabilities]\n'
                                     'required = ["compute", "messaging"]\n[permissions]\n'
                                     'publish_topics = ["seen.*"]\n[subscriptions]\ntopics = ["orders.*"]\n'
                                     'durable = false\n')
    (tmp_path / "policy.toml").write_text('[capabilities]\nallowed = ["compute", "messaging"]\n[messaging]\n'
                                          'publish_topics = ["seen.*"]\nsubscribe_topics = ["orders.*"]\n')
    node = Node.create(d, ConnectOptions.from_urls(nats_server.url), policy=load_policy(tmp_path / "policy.toml"),
                       node_id="f18")
    node.manager.auditor.add_sink(audit)
    report = node.manager.discover_and_load()
    await node.start()
    watcher, seen = await _watch(nats_server.url, "seen.listener")  # one entry per message the listener handled
    try:
        assert set(report.loaded) == {"echo", "listener"}
        error = node.manager.info("eavesdrop").last_error or ""
        assert "[subscriptions] topics entry '>'" in error
        assert "[messaging] subscribe_topics" in error
        refused = [e for e in audit if e.kind == "policy.refused"]
        assert [e.plugin for e in refused] == ["eavesdrop"]
        await watcher.publish("orders.created", {"id": 42}, durable=False)
        await _wait_for(lambda: len(seen) == 1)
        assert await _call(nats_server.url, "handle_request", {"a": 1}, plugin="echo") == {"a": 1}
        assert node.manager.info("listener").executions == 1
        assert node.manager.info("eavesdrop").executions == 0
    finally:
        await watcher.close()
        await node.stop()
        node.manager.close()



# -- finding 14's sibling: a guest's publish is held to the same JSON depth as the bus -------------------


async def test_f14_a_publish_nested_too_deeply_is_an_abi_error(make_node: NodeFactory, nats_server: NatsServer) -> None:
    """orjson reads 1024 levels but writes 254: a deeper publish could not be wrapped in its envelope, and
    must fail as the guest's typed error (not as a host bug), with nothing published."""
    await make_node()
    async with await Client.connect(nats_server.url) as c:
        seen = await c.nc.subscribe("sandbus.topic.big.t")
        assert await c.request("hostile", "publish_deep", {"depth": 200}, timeout=10) == {"returned": 0}
        assert orjson.loads((await seen.next_msg(timeout=5)).data)["payload"] is not None
        with pytest.raises(AbiViolationError, match="nested too deeply"):
            await c.request("hostile", "publish_deep", {"depth": 300}, timeout=10)
        # Nothing was published: a short bounded wait shows that nothing arrives (the publish of depth
        # 200 above, on the same path, arrived at once).
        with pytest.raises(nats.errors.TimeoutError):
            await seen.next_msg(timeout=0.3)
    await _still_serving(nats_server.url)
