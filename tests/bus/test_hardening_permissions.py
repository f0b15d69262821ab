"""The shipped NATS permissions (deploy/nats/permissions.conf) on a real server, with a real node.

The node connects as the ``sandbus-node`` user and must get everything it uses (its subscriptions,
streams, durable consumers, replies, audit, plugin publishes) without one permission violation in
the server's log; a ``client`` may call plugins but not control nodes; an ``operator`` may; a ``viewer``
may watch (discovery, list, stats, debug, the audit trail, plugin log lines) and nothing else.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from sandbus.bus.server import NatsServer
from sandbus.sdk.client import Client
from sandbus.sdk.errors import (
    BusError,
    PluginNotFoundError,
    RequestTimeoutError,
    SandbusError,
    SecurityViolationError,
)
from tests.bus.conftest import NodeProcess

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "nats" / "permissions.conf"
PASSWORDS = {"sandbus-node": "node-secret", "operator": "operator-secret", "client": "client-secret",
             "publisher": "publisher-secret", "viewer": "viewer-secret"}

StartNode = Callable[..., NodeProcess]


@pytest.fixture
def secured_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server running deploy/nats/permissions.conf as shipped (JetStream on, a free port)."""
    store = tmp_path / "nats"
    env = {"NATS_HOST": "127.0.0.1", "NATS_PORT": "-1", "NATS_STORE": str(store),
           "SANDBUS_NODE_PASSWORD": PASSWORDS["sandbus-node"],
           "SANDBUS_OPERATOR_PASSWORD": PASSWORDS["operator"],
           "SANDBUS_CLIENT_PASSWORD": PASSWORDS["client"],
           "SANDBUS_PUBLISHER_PASSWORD": PASSWORDS["publisher"],
           "SANDBUS_VIEWER_PASSWORD": PASSWORDS["viewer"]}
    server = NatsServer(config=CONFIG, jetstream=False, store_dir=store, env=env).start()
    try:
        yield server
    finally:
        server.stop()


class Connected:
    """A client connected as one of the config's users, keeping the errors the server sent it."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    async def connect(self, url: str, user: str) -> Client:
        async def on_error(e: Exception) -> None:
            self.errors.append(str(e))

        return await Client.connect(url, user=user, password=PASSWORDS[user], error_cb=on_error,
                                    allow_reconnect=False)

    async def wait_error(self, pattern: str, timeout: float = 5.0) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            for e in self.errors:
                if re.search(pattern, e, re.IGNORECASE):
                    return e
            await asyncio.sleep(0.01)  # the server's -ERR arrives on the client's read loop
        raise AssertionError(f"no error matching {pattern!r} within {timeout} s; got {self.errors}")


def violations(server: NatsServer, user: str) -> list[str]:
    """The permission violations the server logged for ``user``."""
    text = server.log_path.read_text(errors="replace")
    return [line for line in text.splitlines() if "Violation" in line and f'/user:{user}"' in line]


async def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)  # polling the server's view, bounded by the deadline


#: The operator policy of these nodes: the recorders hear orders.* and publish to seen.*, netkv may use storage.
POLICY = """
[capabilities]
allowed = ["compute", "messaging", "storage", "network"]
[limits]
max_fuel = 10000000000000
[messaging]
publish_topics = ["seen.*"]
subscribe_topics = ["orders.*"]
[network]
allowed_hosts = ["127.0.0.1"]
"""
NETKV_TOML = """
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
network_hosts = ["127.0.0.1:9"]
"""


def start_secured_node(start_node: StartNode, server: NatsServer, plugins: Path,
                       c_guest_flags: Callable[..., Path]) -> NodeProcess:
    (plugins.parent / "policy.toml").write_text(POLICY)
    (plugins / "netkv.wasm").write_bytes(c_guest_flags("netkv", "netkv").read_bytes())
    (plugins / "netkv.toml").write_text(NETKV_TOML)
    return start_node("n1", server.url, "--user", "sandbus-node",
                      env={"SANDBUS_NATS_PASSWORD": PASSWORDS["sandbus-node"]})


async def test_f17_client_cannot_unload_but_operator_can(secured_server: NatsServer, start_node: StartNode,
                                                        bus_plugins: Path, c_guest_flags: Callable[..., Path]) -> None:
    start_secured_node(start_node, secured_server, bus_plugins, c_guest_flags)
    url = secured_server.url
    with pytest.raises(BusError, match="Authorization Violation"):
        await Client.connect(url, allow_reconnect=False)  # no anonymous access

    client_errors, operator_errors = Connected(), Connected()
    async with await client_errors.connect(url, "client") as client, \
            await operator_errors.connect(url, "operator") as operator:
        assert await client.request("echo", "handle_request", {"as": "client"}) == {"as": "client"}

        # A client's unload is refused by the server: the client sees no reply (a typed timeout) and
        # a permissions violation naming the control subject; the plugin is still served.
        with pytest.raises(RequestTimeoutError):
            await client.control("n1", "unload", {"plugin": "echo"}, timeout=1.0)
        await client_errors.wait_error(r'permissions violation for publish to "sandbus\.node\.n1\.unload"')
        # ... and discovery is not a client's business either.
        assert await client.nodes(timeout=0.3) == []
        await client_errors.wait_error(r'permissions violation for publish to "\$SRV\.PING')
        # ... nor is reading other parties' requests or forging audit events.
        await client.nc.subscribe("sandbus.req.>")
        await client_errors.wait_error(r'permissions violation for subscription to "sandbus\.req\.>"')
        await client.nc.publish("sandbus.audit.n1", b'{"kind": "forged"}')
        await client_errors.wait_error(r'permissions violation for publish to "sandbus\.audit\.n1"')
        assert await client.request("echo", "handle_request", ["still served"]) == ["still served"]

        # The operator discovers the node and unloads the plugin; then nobody serves it.
        views = await operator.nodes(timeout=1.0)
        assert [v["node_id"] for v in views] == ["n1"]
        assert await operator.control("n1", "unload", {"plugin": "echo"}, timeout=5.0) == {"unloaded": "echo"}
        with pytest.raises(PluginNotFoundError):
            await client.request("echo", "handle_request", {}, timeout=2.0)
        assert operator_errors.errors == []

    assert violations(secured_server, "sandbus-node") == []
    assert violations(secured_server, "operator") == []
    assert len(violations(secured_server, "client")) >= 4


async def test_f17_node_has_what_it_needs(secured_server: NatsServer, start_node: StartNode,
                                          bus_plugins: Path, c_guest_flags: Callable[..., Path]) -> None:
    """Durable topics, a plugin's publish, its KV bucket and the audit trail all work as ``sandbus-node``.

    (Dead letters use the same grants as durable publishes and acks; reaching one takes five
    deliveries with backoff, ~30 s, so this test leaves them to tests/bus/test_bus.py.)
    """
    start_secured_node(start_node, secured_server, bus_plugins, c_guest_flags)
    url = secured_server.url
    client_errors, operator_errors = Connected(), Connected()
    async with await client_errors.connect(url, "client") as client, \
            await operator_errors.connect(url, "operator") as operator:
        # A plugin's publish (a JetStream publish by the node) and a durable delivery to two plugins.
        assert await client.request("rec_a", "handle_request", {"direct": 1}) == {"published": True}
        await client.publish("orders.created", {"n": 1})
        js = operator.nc.jetstream()

        async def seen() -> dict[str, int]:
            info = await js.stream_info("SANDBUS_TOPICS", subjects_filter="sandbus.topic.seen.>")
            counts = dict(info.state.subjects or {})
            return counts if counts.get("sandbus.topic.seen.rec_a", 0) >= 2 and counts.get(
                "sandbus.topic.seen.rec_b", 0) >= 1 else {}

        await until(seen, 15, "the recorders' publications")

        # The storage host functions: the plugin's own KV bucket, created and used by the node.
        assert await client.request("netkv", "kv_roundtrip", "greeting") == {"stored": "greeting"}

        # A denied publish by a plugin: an error reply to the client and an audit event the operator reads.
        audit = await operator.nc.subscribe("sandbus.audit.>")
        await operator.nc.flush()  # the server has the subscription before the event can happen
        with pytest.raises(SecurityViolationError, match="not granted"):
            await client.request("rec_a", "handle_request", {"forbidden": 1})
        kinds = []
        for _ in range(20):  # other events (the failed call) may come first
            kinds.append(orjson.loads((await audit.next_msg(timeout=5)).data)["kind"])
            if kinds[-1] == "security.publish_denied":
                break
        assert kinds[-1] == "security.publish_denied", kinds
        # ... and finds it in the audit stream afterwards, as `nats stream view` would read it.
        last = await js.get_last_msg("SANDBUS_AUDIT", "sandbus.audit.n1")
        assert orjson.loads(last.data or b"{}")["kind"]
        replay = await js.subscribe("sandbus.audit.>", stream="SANDBUS_AUDIT", ordered_consumer=True)
        assert orjson.loads((await replay.next_msg(timeout=5)).data)["kind"]
        await replay.unsubscribe()

        assert client_errors.errors == []
        assert operator_errors.errors == []

    assert violations(secured_server, "sandbus-node") == []
    assert violations(secured_server, "operator") == []
    assert violations(secured_server, "client") == []


async def test_node_publishes_log_lines_and_a_viewer_watches_but_cannot_act(
        secured_server: NatsServer, start_node: StartNode, bus_plugins: Path,
        c_guest_flags: Callable[..., Path]) -> None:
    """The node publishes its plugins' log lines as ``sandbus-node`` with no violation; the ``viewer`` follows
    them, lists, reads stats, debug state and the audit trail, and is refused every action."""
    start_secured_node(start_node, secured_server, bus_plugins, c_guest_flags)
    url = secured_server.url
    client_errors, viewer_errors, operator_errors = Connected(), Connected(), Connected()
    async with await client_errors.connect(url, "client") as client, \
            await viewer_errors.connect(url, "viewer") as viewer, \
            await operator_errors.connect(url, "operator") as operator:
        # text_processor logs a debug line for every request: the viewer (and the operator) follow it.
        async with viewer.logs("text_processor") as lines, operator.logs("text_processor") as operator_lines:
            await client.request("text_processor", "handle_request", {"action": "get_status"})
            line = await asyncio.wait_for(anext(aiter(lines)), 10)
            assert (await asyncio.wait_for(anext(aiter(operator_lines)), 10))["seq"] == line["seq"]
        assert (line["node"], line["plugin"], line["level"]) == ("n1", "text_processor", "debug")
        assert line["message"].startswith("text_processor: request of ")

        # Watching: discovery, list, stats, debug, the audit trail (live and from the stream).
        assert [v["node_id"] for v in await viewer.nodes(timeout=1.0)] == ["n1"]
        assert "plugins" in await viewer.control("n1", "list")
        (state,) = await viewer.debug("text_processor")
        assert state["recent_logs"][-1]["seq"] == line["seq"]
        audit = await viewer.nc.subscribe("sandbus.audit.>")
        await viewer.nc.flush()
        with pytest.raises(SandbusError):
            await client.request("text_processor", "no_such_function", {})
        assert orjson.loads((await audit.next_msg(timeout=5)).data)["kind"] == "request.refused"
        js = viewer.nc.jetstream()
        assert orjson.loads((await js.get_last_msg("SANDBUS_AUDIT", "sandbus.audit.n1")).data or b"{}")["kind"]
        replay = await js.subscribe("sandbus.audit.>", stream="SANDBUS_AUDIT", ordered_consumer=True)
        assert orjson.loads((await replay.next_msg(timeout=5)).data)["kind"]
        await replay.unsubscribe()
        assert viewer_errors.errors == []

        # Acting: every control verb that changes a node, and every request, message or topic, is refused
        # by the server (no reply reaches the viewer: a typed timeout) and logged as a violation.
        for verb in ("unload", "reload", "load"):
            with pytest.raises(RequestTimeoutError):
                await viewer.control("n1", verb, {"plugin": "echo"}, timeout=1.0)
            await viewer_errors.wait_error(rf'permissions violation for publish to "sandbus\.node\.n1\.{verb}"')
        with pytest.raises(RequestTimeoutError):
            await viewer.request("echo", "handle_request", {}, timeout=1.0)
        await viewer_errors.wait_error(r'permissions violation for publish to "sandbus\.req\.echo')
        await viewer.nc.publish("sandbus.msg.echo", b"{}")
        await viewer_errors.wait_error(r'permissions violation for publish to "sandbus\.msg\.echo"')
        await viewer.nc.publish("sandbus.log.n1.echo", b'{"forged": true}')
        await viewer_errors.wait_error(r'permissions violation for publish to "sandbus\.log\.n1\.echo"')
        await viewer.nc.subscribe("sandbus.req.>")
        await viewer_errors.wait_error(r'permissions violation for subscription to "sandbus\.req\.>"')
        assert await client.request("echo", "handle_request", ["still served"]) == ["still served"]
        # ... and a client may not follow the logs.
        await client.nc.subscribe("sandbus.log.>")
        await client_errors.wait_error(r'permissions violation for subscription to "sandbus\.log\.>"')
        assert operator_errors.errors == []

    assert violations(secured_server, "sandbus-node") == []
    assert violations(secured_server, "operator") == []
    assert len(violations(secured_server, "viewer")) >= 7


def test_a_command_the_server_refuses_says_so_at_once(secured_server: NatsServer, start_node: StartNode,
                                                      bus_plugins: Path, c_guest_flags: Callable[..., Path]) -> None:
    """A CLI command whose publish or subscription the server's permissions refuse ends at once with the
    server's reason and the security exit code (4), instead of waiting out its timeout for a reply that
    cannot come (exit 7) or reporting that no node answered."""
    import subprocess
    import sys

    start_secured_node(start_node, secured_server, bus_plugins, c_guest_flags)

    def sandbus(user: str, *args: str) -> subprocess.CompletedProcess[str]:
        # --timeout 60 where a command has one; the process is given 30 s: a command that waited for its
        # timeout fails this test by timing out.
        return subprocess.run([sys.executable, "-m", "sandbus", *args, "--nats", secured_server.url, "--no-context",
                               "--user", user, "--password", PASSWORDS[user]],
                              capture_output=True, text=True, timeout=30)

    refused = sandbus("viewer", "request", "text_processor", "handle_request", "{}", "--timeout", "60")
    assert refused.returncode == 4, refused
    assert 'permissions violation for publish to "sandbus.req.text_processor.handle_request"' in refused.stderr.lower()
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    client_ls = sandbus("client", "ls")
    assert client_ls.returncode == 4, client_ls
    assert "$srv.ping" in client_ls.stderr.lower()
    # What the user may do still works, with no note.
    allowed = sandbus("client", "request", "text_processor", "handle_request", '{"action": "get_status"}')
    assert allowed.returncode == 0, allowed.stderr
    assert sandbus("viewer", "ls").returncode == 0
