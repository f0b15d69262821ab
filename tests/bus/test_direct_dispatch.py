"""GuardedNatsClient.dispatch_directly and natsraw.write_raw_now, against a real nats-server.

A direct handler runs in the read loop: what it handles never reaches the subscription's callback, what
it declines (or raises on) does, a message the client cannot decode is dropped without ending reading,
and a raw write from inside the handler reaches the wire."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from nats.aio.msg import Msg

from sandbus.bus.requests import Requests
from sandbus.bus.server import NatsServer
from sandbus.sdk.nats_guard import GuardedNatsClient
from sandbus.sdk.natsraw import write_raw_now
from tests.bus.conftest import a_node
from tests.bus.test_hardening_bus import raw_publish

pytestmark = pytest.mark.asyncio


async def _connected(url: str) -> GuardedNatsClient:
    nc = GuardedNatsClient()
    await nc.connect(url)
    return nc


async def _wait(cond: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(5):
        while not cond():
            await asyncio.sleep(0.01)
    assert cond(), what


async def test_a_handled_message_skips_the_callback_and_a_declined_one_reaches_it(nats_server: NatsServer) -> None:
    nc, pub = await _connected(nats_server.url), await _connected(nats_server.url)
    try:
        direct: list[tuple[bytes, dict[str, str] | None]] = []
        called: list[bytes] = []

        def handler(msg: Msg) -> bool:
            direct.append((msg.data, msg.headers))
            return msg.data != b"decline"

        async def cb(msg: Msg) -> None:
            called.append(msg.data)

        sub = await nc.subscribe("d.x", cb=cb)
        nc.dispatch_directly(sub, handler)
        await nc.flush()
        await pub.publish("d.x", b"take", headers={"K": "v"})
        await pub.publish("d.x", b"decline")
        await pub.publish("d.x", b"take2")
        await pub.flush()
        await _wait(lambda: len(direct) == 3 and called == [b"decline"], "three handled, one declined")
        assert direct == [(b"take", {"K": "v"}), (b"decline", None), (b"take2", None)]
        assert called == [b"decline"]
        assert nc.stats["in_msgs"] == 3
    finally:
        await nc.close()
        await pub.close()


async def test_a_handler_that_raises_leaves_the_message_to_the_callback(nats_server: NatsServer,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    nc, pub = await _connected(nats_server.url), await _connected(nats_server.url)
    try:
        called: list[bytes] = []

        def handler(msg: Msg) -> bool:
            raise RuntimeError("a bug in the handler")

        async def cb(msg: Msg) -> None:
            called.append(msg.data)

        nc.dispatch_directly(await nc.subscribe("d.y", cb=cb), handler)
        await nc.flush()
        with caplog.at_level(logging.ERROR, logger="sandbus.bus"):
            for i in range(3):
                await pub.publish("d.y", b"%d" % i)
            await pub.flush()
            await _wait(lambda: len(called) == 3, "every message reached the callback")
        assert called == [b"0", b"1", b"2"]
        assert any("direct handler" in r.getMessage() for r in caplog.records)
        assert nc.read_loop_restarts == 0
        assert nc.is_connected
    finally:
        await nc.close()
        await pub.close()


async def test_an_undecodable_message_is_dropped_and_reading_goes_on(nats_server: NatsServer) -> None:
    nc = await _connected(nats_server.url)
    try:
        seen: list[str] = []

        def handler(msg: Msg) -> bool:
            seen.append(msg.subject)
            return True

        async def cb(msg: Msg) -> None:
            raise AssertionError("never called: the handler takes every message")

        nc.dispatch_directly(await nc.subscribe("e.*", cb=cb), handler)
        await nc.flush()
        raw_publish(nats_server.port, b"PUB e.\xff 1\r\nx\r\n", b"PUB e.ok 1\r\ny\r\n")
        await _wait(lambda: seen == ["e.ok"], "the good message after the bad one")
        assert nc.dropped_messages == 1
        assert nc.read_loop_restarts == 0
    finally:
        await nc.close()


async def test_a_raw_write_from_the_handler_answers_the_request(nats_server: NatsServer) -> None:
    nc, client = await _connected(nats_server.url), await _connected(nats_server.url)
    try:
        def handler(msg: Msg) -> bool:
            assert msg.reply
            return write_raw_now(nc, b"PUB %s 5\r\nhello\r\n" % msg.reply.encode(), 1, 5)

        async def cb(msg: Msg) -> None:
            raise AssertionError("never called: the raw write goes out")

        nc.dispatch_directly(await nc.subscribe("svc", cb=cb), handler)
        await nc.flush()
        replies = await asyncio.gather(*(client.request("svc", b"?", timeout=5) for _ in range(50)))
        assert {r.data for r in replies} == {b"hello"}
        assert nc.stats["out_msgs"] >= 50
    finally:
        await nc.close()
        await client.close()


async def test_no_raw_write_on_a_closed_connection(nats_server: NatsServer) -> None:
    nc = await _connected(nats_server.url)
    await nc.close()
    assert write_raw_now(nc, b"PUB x 0\r\n\r\n", 1, 0) is False


async def test_only_plain_subscriptions_with_a_callback_take_a_direct_handler(nats_server: NatsServer) -> None:
    nc = await _connected(nats_server.url)
    try:
        with pytest.raises(ValueError, match="callback"):
            nc.dispatch_directly(await nc.subscribe("no.cb"), lambda m: True)

        async def cb(msg: Msg) -> None:
            pass

        with pytest.raises(ValueError, match="message limit"):
            nc.dispatch_directly(await nc.subscribe("limited", cb=cb, max_msgs=3), lambda m: True)
    finally:
        await nc.close()


async def test_the_registration_ends_with_the_subscription(nats_server: NatsServer) -> None:
    nc = await _connected(nats_server.url)
    try:
        async def cb(msg: Msg) -> None:
            pass

        for _ in range(20):  # a plugin reloaded again and again: no handler is left behind
            sub = await nc.subscribe("gone", cb=cb)
            nc.dispatch_directly(sub, lambda m: True)
            await sub.unsubscribe()
        drained = await nc.subscribe("drained", cb=cb)
        nc.dispatch_directly(drained, lambda m: True)
        await drained.drain()  # type: ignore[no-untyped-call]
        assert nc._direct == {}
    finally:
        await nc.close()


# -- a node's requests: the direct path answers exactly as the queued one ------------------------------

_PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
#: (subject, body, headers): a success with an id and trace context to echo, a bare success, the
#: caller's mistakes (a body that is not JSON, nested too deep, an unknown function, a bad token)
_REQUESTS: list[tuple[str, bytes, dict[str, str] | None]] = [
    ("sandbus.req.echo.handle_request", b'{"x": [1, 2]}', {"Sandbus-Msg-Id": "m-1", "traceparent": _PARENT}),
    ("sandbus.req.echo.handle_request", b"{}", None),
    ("sandbus.req.echo.handle_request", b"{not json", {"Sandbus-Msg-Id": "m-2"}),
    ("sandbus.req.echo.handle_request", b"[" * 300 + b"]" * 300, None),
    ("sandbus.req.echo.nope", b"{}", None),
    ("sandbus.req.echo.a-b!", b"{}", None),
    ("sandbus.req.text_processor.handle_request", b'{"text": "hello world", "operation": "upper"}', None),
]


async def _answers(plugins: Path, url: str, direct: bool, monkeypatch: pytest.MonkeyPatch
                   ) -> tuple[list[tuple[bytes, dict[str, str]]], dict[str, int], list[str], int]:
    """The replies (body, headers but the node's id), echo's counters, the audit event kinds, and how many
    requests reached the subscription's callback."""
    events: list[str] = []
    queued: list[Msg] = []
    on_request = Requests.on_request

    async def counted(self: Requests, msg: Msg) -> None:
        queued.append(msg)
        await on_request(self, msg)

    monkeypatch.setattr(Requests, "on_request", counted)
    async with a_node(plugins, url, direct, "direct" if direct else "queued") as node:
        node.manager.auditor.add_sink(lambda e: events.append(e.kind))
        nc = node.bus.nc
        assert isinstance(nc, GuardedNatsClient)
        assert bool(nc._direct) is direct
        client = await _connected(url)
        try:
            answers = []
            for subject, body, headers in _REQUESTS:
                reply = await client.request(subject, body, timeout=5, headers=headers)
                shown = dict(reply.headers or {})
                shown.pop("Sandbus-Node")
                answers.append((reply.data, shown))
        finally:
            await client.close()
        info = node.manager.info("echo")
        return (answers, {"executions": info.executions, "rejected": info.rejected, "errors": info.errors}, events,
                len(queued))


async def test_a_node_answers_the_same_with_and_without_the_direct_path(
        bus_plugins: Path, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    direct = await _answers(bus_plugins, nats_server.url, True, monkeypatch)
    queued = await _answers(bus_plugins, nats_server.url, False, monkeypatch)
    assert direct[0] == queued[0]
    assert direct[1] == queued[1] == {"executions": 2, "rejected": 4, "errors": 0}
    refused = [k for k in direct[2] if k == "request.refused"]
    assert refused == [k for k in queued[2] if k == "request.refused"]
    assert len(refused) == 4  # each refusal audited once: the direct path leaves them to the queued one
    # Only what the bus refuses reached the callback (not JSON, too deep, a bad token); an unknown
    # function is the plugin manager's refusal, answered by the direct path.
    assert (direct[3], queued[3]) == (3, len(_REQUESTS))
    assert direct[0][0][1] == {"Content-Type": "application/json", "Sandbus-Msg-Id": "m-1", "traceparent": _PARENT}
    assert orjson.loads(direct[0][0][0]) == {"x": [1, 2]}
