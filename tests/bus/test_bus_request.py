"""Plugin-to-plugin requests (the ``request`` host function) over a real nats-server.

Two nodes: ``n1`` runs in this process (so the test sees its audit events) and serves the plugins that
make requests; ``n2`` is a ``sandbus node`` child process serving their targets, so every successful
request below crossed NATS from one node to another.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from sandbus.bus.server import NatsServer
from sandbus.host.node.hostfuncs import MAX_HOPS, REQUEST_ENOTFOUND, REQUEST_EREMOTE, REQUEST_ETIMEOUT
from sandbus.host.node.node import Node
from sandbus.host.sandbox import AuditLevel
from sandbus.sdk.client import Client
from sandbus.sdk.envelope import H_HOPS, error_from_reply
from sandbus.sdk.errors import HopLimitError, SecurityViolationError
from sandbus.sdk.subjects import request_subject
from tests.bus.conftest import NodeProcess, a_node
from tests.conftest import AuditLog

POLICY = """
[capabilities]
allowed = ["compute", "messaging"]
[messaging]
request_plugins = ["*"]
"""

MANIFEST = """
[plugin]
name = "{name}"
version = "1.0.0"
description = "makes requests"
author = "tests"
license = "Apache-2.0"
min_runtime_version = "0.1.0"
[capabilities]
required = ["compute"{messaging}]
[permissions]
request_plugins = {targets}
[resources]
timeout_seconds = {timeout}
max_instances = {instances}
"""


def _manifest(name: str, targets: list[str], *, timeout: float = 2.0, instances: int = 4) -> str:
    messaging = ', "messaging"' if targets else ""
    return MANIFEST.format(name=name, messaging=messaging, targets=orjson.dumps(targets).decode(),
                           timeout=timeout, instances=instances)


@pytest.fixture
def server() -> Iterator[NatsServer]:
    with NatsServer(jetstream=False) as s:
        yield s


@pytest.fixture
def targets(tmp_path: Path, server: NatsServer, plugins_dir: Path,
            c_guest_flags: Callable[..., Path]) -> Iterator[NodeProcess]:
    """Node n2 (a child process): echo, text_processor and callee (whose ``boom`` traps)."""
    d = tmp_path / "n2" / "plugins"
    d.mkdir(parents=True)
    for name in ("echo", "text_processor"):
        for ext in ("wasm", "toml"):
            shutil.copy(plugins_dir / f"{name}.{ext}", d / f"{name}.{ext}")
    shutil.copy(c_guest_flags("caller", "callee", '-DPLUGIN_NAME="callee"'), d / "callee.wasm")
    (d / "callee.toml").write_text(_manifest("callee", []))
    (d.parent / "policy.toml").write_text(POLICY)
    node = NodeProcess("n2", d, server.url, tmp_path / "n2.log", "--no-durable")
    try:
        node.wait_ready()
        yield node
    finally:
        node.terminate()


@pytest.fixture
async def callers(tmp_path: Path, server: NatsServer, c_guest_flags: Callable[..., Path], targets: NodeProcess,
                  audit: AuditLog) -> AsyncIterator[Node]:
    """Node n1 (this process): caller, solo (requests itself, one instance), looper (requests itself)."""
    d = tmp_path / "n1" / "plugins"
    d.mkdir(parents=True)
    plugins = {
        "caller": _manifest("caller", ["echo", "text_processor.handle_request", "callee.boom", "ghost"]),
        "solo": _manifest("solo", ["solo.loop"], timeout=1.0, instances=1),
        "looper": _manifest("looper", ["looper"], timeout=5.0, instances=MAX_HOPS + 2),
    }
    for name, manifest in plugins.items():
        shutil.copy(c_guest_flags("caller", name, f'-DPLUGIN_NAME="{name}"'), d / f"{name}.wasm")
        (d / f"{name}.toml").write_text(manifest)
    (d.parent / "policy.toml").write_text(POLICY)
    async with a_node(d, server.url, True, "n1", audit=audit, durable=False) as node:
        yield node


async def _ask(url: str, function: str, request: Any, plugin: str = "caller") -> Any:
    async with await Client.connect(url) as c:
        return await c.request(plugin, function, request)


async def test_a_plugin_gets_the_reply_of_a_plugin_on_another_node(callers: Node, server: NatsServer) -> None:
    assert "echo" not in {p.name for p in callers.manager.list_plugins()}  # only n2 serves it
    big = {"text": "é" * 3000}  # 6 KB: more than the guest's first buffer, fetched again with take_result
    assert await _ask(server.url, "handle_request", {"target": "echo", "payload": big}) == \
        {"status": 0, "body": big}
    processed = await _ask(server.url, "handle_request", {
        "target": "text_processor.handle_request", "payload": {"action": "process_data", "data": {"input": "hi"}}})
    assert processed == {"status": 0, "body": {"success": True, "result": {"processed": {"input": "hi"}},
                                               "error": None}}
    # The raw import: min(len, cap) bytes written, the full length returned, take_result refetches.
    raw = await _ask(server.url, "call_raw", {"target": "echo.handle_request", "payload": big})
    assert raw == {"status": 0, "body": big, "prefix_ok": True}


async def test_an_ungranted_target_is_a_security_violation(callers: Node, server: NatsServer,
                                                           audit: AuditLog) -> None:
    with pytest.raises(SecurityViolationError, match=r"requesting 'callee.handle_request' was not granted"):
        await _ask(server.url, "handle_request", {"target": "callee", "payload": {}})
    denied = [e for e in audit if e.kind == "security.request_denied"]
    assert len(denied) == 1
    assert denied[0].level == AuditLevel.CRITICAL
    assert denied[0].plugin == "caller"
    assert denied[0].details["target"] == "callee.handle_request"


async def test_the_targets_error_reaches_the_plugin(callers: Node, server: NatsServer) -> None:
    trapped = await _ask(server.url, "handle_request", {"target": "callee.boom", "payload": {}})
    assert trapped["status"] == REQUEST_EREMOTE
    assert trapped["body"]["code"] == "sandbox.trap"
    assert trapped["body"]["plugin"] == "callee"
    # "echo" grants every function of echo, so this reaches n2, which answers that there is no such function.
    missing = await _ask(server.url, "call_raw", {"target": "echo.nope", "payload": {}})
    assert missing["status"] == REQUEST_EREMOTE
    assert missing["body"]["code"] == "request.unknown_function"
    assert 'no function "nope"' in missing["body"]["message"]
    assert missing["prefix_ok"] is True  # nothing was written into the buffer of a failed request


async def test_a_target_no_node_serves_fails_at_once(callers: Node, server: NatsServer) -> None:
    start = time.monotonic()
    reply = await _ask(server.url, "handle_request", {"target": "ghost", "payload": {}})
    assert time.monotonic() - start < 1.0  # NATS "no responders", not the request timeout (1.6 s here)
    assert reply["status"] == REQUEST_ENOTFOUND
    assert reply["body"]["code"] == "plugin.not_found"
    assert "ghost" in reply["body"]["message"]


async def test_a_plugin_requesting_itself_with_one_instance_times_out(callers: Node, server: NatsServer) -> None:
    # solo's only instance waits for its own reply: the request gives up at 0.8 x its 1 s timeout,
    # early enough for the plugin to answer with the outcome instead of being stopped itself.
    start = time.monotonic()
    reply = await _ask(server.url, "loop", {"n": 1}, plugin="solo")
    elapsed = time.monotonic() - start
    assert reply["status"] == REQUEST_ETIMEOUT
    assert reply["body"]["code"] == "bus.timeout"
    assert 0.7 < elapsed < 2.0


async def test_a_request_cycle_stops_at_the_hop_limit(callers: Node, server: NatsServer, audit: AuditLog) -> None:
    start = time.monotonic()
    reply = await _ask(server.url, "loop", {"n": 1}, plugin="looper")
    assert time.monotonic() - start < 3.0  # no timeout was waited for
    # The call serving hop 8 could not send hop 9: its error travelled back up the chain.
    assert reply["status"] == REQUEST_EREMOTE
    assert reply["body"]["code"] == "limit.hops"
    assert reply["body"]["details"]["limit"] == MAX_HOPS
    assert [e.kind for e in audit if e.kind.startswith("limit.")] == ["limit.hops"]


async def test_the_hop_count_of_the_incoming_request_is_honoured(callers: Node, server: NatsServer) -> None:
    async with await Client.connect(server.url) as c:
        body = orjson.dumps({"target": "echo", "payload": {}})
        # One hop short of the limit: the plugin's request is hop 8, still allowed.
        msg = await c.nc.request(request_subject("caller", "handle_request"), body, timeout=5,
                                 headers={H_HOPS: str(MAX_HOPS - 1)})
        assert orjson.loads(msg.data) == {"status": 0, "body": {}}
        msg = await c.nc.request(request_subject("caller", "handle_request"), body, timeout=5,
                                 headers={H_HOPS: str(MAX_HOPS)})
    err = error_from_reply(msg.data, msg.headers)
    assert isinstance(err, HopLimitError)
    assert err.plugin == "caller"
    assert "hop 9" in err.message
