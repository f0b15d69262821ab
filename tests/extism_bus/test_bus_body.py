"""The bus alone (no wasm, a plain Python handler) with a bytes plugin beside a JSON one: what
``Served.body`` and ``Served.content_type`` change on the wire, on the hot path (``request_now``) and in
a task (``serve``), and what they do not (error replies, JSON plugins)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from sandbus.bus.connection import ConnectOptions
from sandbus.bus.handler import Reply, Served
from sandbus.bus.plugin_bus import PluginBus
from sandbus.bus.server import NatsServer
from tests.bus.test_plugin_bus import Call, PlainHandler

BODY = bytes(range(256)) + b"\r\n\x00"


@dataclass
class RawHandler(PlainHandler):
    """:class:`PlainHandler` whose ``raw`` plugin answers in a task with the bytes it was given."""

    async def serve(self, plugin: str, function: str, payload: bytes, msg: Msg, *, arrival: float | None,
                    delivery: int | None = None, reply_headers: dict[str, str] | None = None) -> Reply:
        if plugin == "raw" and function == "work":
            self.calls.append(Call(plugin, function, payload, delivery))
            return payload, None
        return await super().serve(plugin, function, payload, msg, arrival=arrival, delivery=delivery,
                                   reply_headers=reply_headers)


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[tuple[PluginBus, PlainHandler]]:
    handler = RawHandler([Served("json_plugin"), Served("raw", body="bytes", content_type="image/png")])
    plugin_bus = PluginBus(handler, ConnectOptions.from_urls(nats_server.url), node_id="body-test")
    handler.bus = plugin_bus
    await plugin_bus.start()
    try:
        yield plugin_bus, handler
    finally:
        await plugin_bus.stop(timeout=5)


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    client = NatsClient()
    await client.connect(nats_server.url)
    try:
        yield client
    finally:
        await client.close()


async def test_a_bytes_plugin_takes_any_body_and_replies_with_its_type_on_both_paths(
        bus: tuple[PluginBus, PlainHandler], nc: NatsClient) -> None:
    _, handler = bus
    inline = await nc.request("sandbus.req.raw.now", BODY, timeout=5)  # answered by request_now
    assert bytes(inline.data) == BODY
    assert (inline.headers or {})["Content-Type"] == "image/png"
    in_task = await nc.request("sandbus.req.raw.work", BODY, timeout=5)  # answered by serve, in a task
    assert bytes(in_task.data) == BODY
    assert (in_task.headers or {})["Content-Type"] == "image/png"
    assert [c.payload for c in handler.calls] == [BODY, BODY], "the body reached the handler unchanged"
    failed = await nc.request("sandbus.req.raw.fail", BODY, timeout=5)
    headers = failed.headers or {}
    assert headers["Sandbus-Error-Code"] == "plugin.not_found"
    assert headers["Content-Type"] == "application/json", "an error reply stays JSON"


async def test_a_json_plugin_beside_it_still_refuses_a_body_that_is_not_json(
        bus: tuple[PluginBus, PlainHandler], nc: NatsClient) -> None:
    _, handler = bus
    refused = await nc.request("sandbus.req.json_plugin.now", BODY, timeout=5,
                               headers={"Content-Type": "application/octet-stream"})
    assert (refused.headers or {})["Sandbus-Error-Code"] == "request.invalid_json"
    assert handler.calls == []
    assert handler.refusals == [("json_plugin", "request.invalid_json", "sandbus.req.json_plugin.now")]
    ok = await nc.request("sandbus.req.json_plugin.now", b"[1]", timeout=5)
    assert (ok.headers or {})["Content-Type"] == "application/json"
