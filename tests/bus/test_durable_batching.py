"""Durable delivery's batched acks and the client's JetStream publish, on a real nats-server.

Acks of inline calls go out together, one write per batch (bus/delivery.py ``_send_acks``), and the
client publishes with a reply inbox of its own and a header block it encodes itself
(sdk/jspublish.py). Both rely on nats-py internals: these tests fail if the library moves under them,
and they show the guarantees that must survive the batching: every success acked once, every failure
nak'ed or dead-lettered (never swept up by a neighbour's ack), nothing acked before its handler
returned, the last acks on the server once a plugin is stopped.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import nats.errors
import nats.js.errors
import orjson
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from sandbus.bus import ConnectOptions, PluginBus, Reply, Served
from sandbus.bus import delivery as delivery_module
from sandbus.bus.delivery import TOPIC_STREAM, DurableTopics, delivery_count, ensure_streams
from sandbus.bus.server import NatsServer
from sandbus.sdk import natsraw
from sandbus.sdk.audit import AuditLevel
from sandbus.sdk.client import Client
from sandbus.sdk.envelope import ENVELOPE_CONTENT_TYPE, PluginMessage
from sandbus.sdk.errors import (
    BusError,
    HopLimitError,
    InvalidEnvelopeError,
    PayloadTooLargeError,
    RequestError,
    SandbusError,
)
from sandbus.sdk.jspublish import JetStreamPublisher
from sandbus.sdk.subjects import dlq_subject
from tests.bus.conftest import collect, until

PLUGIN = "batcher"


@dataclass
class InlineHandler:
    """A BusHandler whose calls "run inline" (the batched-ack path): fails on request, never waits.

    A payload ``{"fail": k}`` fails its first ``k`` deliveries (retryable); ``{"permanent": true}``
    fails for good. ``ack_pending`` records, at each call, how many messages the plugin's consumer
    had unacked then (read from another connection by the test, not here).
    """

    calls: list[tuple[Any, int]] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    audits: list[str] = field(default_factory=list)
    served: list[Served] = field(default_factory=lambda: [
        Served(PLUGIN, topics=("batch.*",), durable=True, message_function="handle_message", timeout_s=2.0)])

    def serving(self) -> Sequence[Served]:
        return self.served

    def request_now(self, plugin: str, function: str, msg: Msg, reply_headers: dict[str, str]) -> bytes | None:
        return None

    async def serve(self, plugin: str, function: str, payload: bytes, msg: Msg, *, arrival: float | None,
                    delivery: int | None = None, reply_headers: dict[str, str] | None = None) -> Reply:
        body = orjson.loads(payload)["payload"]
        self.calls.append((body, delivery or 0))
        if isinstance(body, dict) and body.get("permanent"):
            raise HopLimitError("cannot pass", plugin=plugin)
        if isinstance(body, dict) and "fail" in body and (delivery or 0) <= body["fail"]:
            raise SandbusError(f"failing delivery {delivery}", plugin=plugin)
        return b"{}", None

    def runs_inline(self, plugin: str) -> bool:
        return True

    def refused(self, plugin: str, err: RequestError, subject: str) -> None:
        self.refusals.append(err.code)

    def control(self, verb: str, plugin: str, force: bool) -> Any:
        return {}

    def describe(self, stats: bool) -> dict[str, Any]:
        return {"plugins": []}

    def audit(self, level: AuditLevel, kind: str, plugin: str, message: str, **details: Any) -> None:
        self.audits.append(kind)


def consumer_info_now(url: str) -> dict[str, Any]:
    """The plugin's consumer as the server sees it, asked on a raw socket of our own *without yielding to
    the event loop*: whatever the bus still holds in nats-py's write buffer cannot reach the server
    meanwhile, so what this reports was on the server already."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 4222), timeout=5) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"INFO ")
        api = f"$JS.API.CONSUMER.INFO.{TOPIC_STREAM}.{DurableTopics.durable_name(PLUGIN)}"
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\n'
                  b"SUB _INBOX.now 1\r\n" + f"PUB {api} _INBOX.now 0\r\n\r\n".encode())
        while True:
            line = f.readline()
            assert line, "the server closed the raw connection"
            if line.startswith(b"PING"):
                s.sendall(b"PONG\r\n")
            elif line.startswith((b"MSG ", b"HMSG ")):
                size = int(line.split()[-1])
                info: dict[str, Any] = orjson.loads(f.read(size + 2)[:size].split(b"\r\n\r\n")[-1])
                return info
            elif line.startswith(b"-ERR"):
                raise AssertionError(line)


def delivered(handler: InlineHandler, n: int) -> bool:
    return len(handler.calls) == n


async def start_bus(url: str, handler: InlineHandler, max_deliver: int = 3) -> PluginBus:
    bus = PluginBus(handler, ConnectOptions.from_urls(url), node_id="batch-test", max_deliver=max_deliver)
    await bus.start()
    assert bus.durable_topics
    return bus


@pytest.fixture
async def client(nats_server: NatsServer) -> AsyncIterator[Client]:
    """A client of a server whose sandbus streams exist (a node made them)."""
    c = await Client.connect(nats_server.url)
    assert await ensure_streams(c.nc)
    try:
        yield c
    finally:
        await c.close()


@pytest.mark.parametrize("raw_acks", [True, False], ids=["one-write", "msg-ack"])
async def test_a_batch_with_failures_interleaved_acks_each_success_once_and_retries_each_failure(
        nats_server: NatsServer, client: Client, monkeypatch: pytest.MonkeyPatch, raw_acks: bool) -> None:
    """All of it arrives in one pull (the consumer exists, the bus is away while it is published): the
    acks of the successes go out together, and no failure among them is acked with them."""
    monkeypatch.setattr(delivery_module, "RAW_WRITES", raw_acks)
    handler = InlineHandler()
    bus = await start_bus(nats_server.url, handler)  # creates the durable consumer
    await bus.stop(timeout=5)
    bodies: list[Any] = []
    for i in range(60):
        bodies.append({"fail": 1, "i": i} if i % 7 == 3 else {"permanent": True, "i": i} if i == 30 else {"i": i})
    await asyncio.gather(*(client.publish("batch.mixed", b) for b in bodies))
    dead = await collect(client.nc, dlq_subject(PLUGIN))
    handler = InlineHandler()
    bus = await start_bus(nats_server.url, handler)
    try:
        assert bus._durable is not None
        assert bus._durable._raw_acks is raw_acks
        failing = [b for b in bodies if "fail" in b]
        await until(lambda: len(handler.calls) == len(bodies) + len(failing), 10, "every delivery and redelivery")
        await until(lambda: len(dead) == 1, 10, "the dead letter")
        js = client.nc.jetstream()

        async def settled() -> bool:
            info = await js.consumer_info(TOPIC_STREAM, DurableTopics.durable_name(PLUGIN))
            return bool(info.num_ack_pending == 0 and info.num_pending == 0 and info.num_redelivered == 0)

        for _ in range(500):  # bounded: 5 s
            if await settled():
                break
            await asyncio.sleep(0.01)
        assert await settled()
    finally:
        await bus.stop(timeout=5)
    by_body: dict[int, list[int]] = {}
    for body, delivery in handler.calls:
        by_body.setdefault(body["i"], []).append(delivery)
    for body in bodies:
        expected = [1, 2] if "fail" in body else [1]  # a success is never delivered again: its ack arrived
        assert by_body[body["i"]] == expected, body
    assert PluginMessage.model_validate_json(dead[0].data).payload == {"permanent": True, "i": 30}
    assert dead[0].headers is not None
    assert dead[0].headers["Sandbus-Deliveries"] == "1"


async def test_nothing_is_acked_before_its_handler_returned(nats_server: NatsServer, client: Client) -> None:
    """A handler that lets the loop run (and so nats-py's writer) sees its own message unacked on the
    server: the acks batched before it may have gone out, its own waits for it to return."""
    js = client.nc.jetstream()
    pending_at_call: list[int] = []
    buses: list[PluginBus] = []

    class Watching(InlineHandler):
        async def serve(self, plugin: str, function: str, payload: bytes, msg: Msg, *, arrival: float | None,
                        delivery: int | None = None, reply_headers: dict[str, str] | None = None) -> Reply:
            bus_nc = buses[-1].nc
            assert bus_nc is not None
            await bus_nc.flush()  # whatever the bus wrote before this call, the server has processed
            info = await js.consumer_info(TOPIC_STREAM, DurableTopics.durable_name(PLUGIN))
            pending_at_call.append(info.num_ack_pending)
            return await super().serve(plugin, function, payload, msg, arrival=arrival, delivery=delivery)

    handler = Watching()
    buses.append(await start_bus(nats_server.url, handler))
    await buses[-1].stop(timeout=5)
    await asyncio.gather(*(client.publish("batch.watch", {"i": i}) for i in range(20)))
    handler = Watching()
    buses.append(await start_bus(nats_server.url, handler))
    try:
        await until(lambda: len(handler.calls) == 20, 10, "the 20 deliveries")
        for i in range(20, 25):  # and one at a time
            await client.publish("batch.watch", {"i": i})
            await until(functools.partial(delivered, handler, i + 1), 10, f"delivery {i}")
    finally:
        await buses[-1].stop(timeout=5)
    assert len(pending_at_call) == 25
    assert all(p >= 1 for p in pending_at_call), pending_at_call
    info = await js.consumer_info(TOPIC_STREAM, DurableTopics.durable_name(PLUGIN))
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_a_message_arriving_alone_is_handled_without_lingering(nats_server: NatsServer,
                                                                      client: Client) -> None:
    """Lingering for company (bus/delivery.py ``LINGER_S``) is for a flow of messages: one arriving
    alone is handled at once. Shown with a linger longer than the wait: it would not arrive in time."""
    handler = InlineHandler()
    bus = await start_bus(nats_server.url, handler)
    try:
        durable = bus._durable
        assert durable is not None
        durable.linger_s = 30.0
        await client.publish("batch.alone", {"i": 0})
        await until(functools.partial(delivered, handler, 1), 10, "the lone message")
    finally:
        await bus.stop(timeout=5)


async def test_stopping_a_plugin_leaves_its_last_acks_on_the_server(nats_server: NatsServer, client: Client) -> None:
    handler = InlineHandler()
    bus = await start_bus(nats_server.url, handler)
    try:
        await asyncio.gather(*(client.publish("batch.last", {"i": i}) for i in range(40)))
        await until(lambda: len(handler.calls) == 40, 10, "the 40 deliveries")
        assert bus._durable is not None
        await bus._durable.stop_plugin(PLUGIN)
        info = consumer_info_now(nats_server.url)  # no loop turn in between: nats-py could not write since
        assert (info["num_ack_pending"], info["num_pending"]) == (0, 0)
        assert info["delivered"]["stream_seq"] >= 40
    finally:
        await bus.stop(timeout=5)


def test_the_batched_acks_and_the_client_find_the_nats_py_internals_they_use() -> None:
    """Pinned nats-py: when these move, acks and publishes fall back to the public path (slower); this
    test says so instead of a benchmark drifting."""
    assert natsraw.RAW_WRITES


@pytest.mark.parametrize(("reply", "expected"), [
    ("$JS.ACK.S.C.3.10.11.1733170000000000000.5", 3),
    ("$JS.ACK._.ACCHASH.S.C.4.10.11.1733170000000000000.5.token", 4),
    ("$JS.ACK.dom.ACC.S.C.7.10.11.1733170000000000000.5", 7),
])
def test_the_delivery_count_is_what_nats_py_reads(reply: str, expected: int) -> None:
    assert delivery_count(reply) == expected == Msg(NatsClient(), reply=reply).metadata.num_delivered


@pytest.mark.parametrize("reply", [
    "", "x", "$JS.ACK.S.C", "$JS.ACK.S.C.x.10.11.1.5", "$JS.ACK.S.C.\u00b2.10.11.1.5", "$JS.ACK.S.C.-3.10.11.1.5",
    "$JS.ACK.S.C." + "9" * 5000 + ".10.11.1.5", "$JS.ACK.S.C.0.10.11.1.5", "_INBOX.a.b.c.d.e.f.g.h",
])
def test_a_delivery_count_that_is_not_one_counts_as_the_first_delivery(reply: str) -> None:
    """Anyone who can publish to a pull inbox chooses the reply subject: nothing in it may raise."""
    assert delivery_count(reply) == 1


# -- the client's publish -----------------------------------------------------------------------------


async def test_a_client_publish_is_stored_once_with_the_headers_and_envelope_of_the_protocol(
        nats_server: NatsServer) -> None:
    async with await Client.connect(nats_server.url, sender="orders-app") as c:
        assert await ensure_streams(c.nc)
        await c.publish("warm.up", {})  # finds out the stream exists
        seen = await collect(c.nc, "sandbus.topic.orders.created")
        before = (await c.nc.jetstream().stream_info(TOPIC_STREAM)).state.messages
        msg_id = await c.publish("orders.created", {"id": 42})
        again = await c.publish("orders.created", {"id": 42}, msg_id=msg_id)  # a retry: stored once
        await until(lambda: len(seen) == 2, 5, "both publishes on the wire")
        info = await c.nc.jetstream().stream_info(TOPIC_STREAM)
    assert again == msg_id
    assert info.state.messages == before + 1
    headers = seen[0].headers
    assert headers == {"Content-Type": ENVELOPE_CONTENT_TYPE, "Sandbus-Msg-Id": msg_id, "Nats-Msg-Id": msg_id,
                       "Sandbus-From": "orders-app"}
    envelope = orjson.loads(seen[0].data)
    assert list(envelope) == ["id", "from", "to", "topic", "payload", "timestamp", "headers"]
    assert (envelope["id"], envelope["from"], envelope["to"], envelope["topic"], envelope["payload"]) == (
        msg_id, "orders-app", None, "orders.created", {"id": 42})
    assert len(msg_id) == 32
    assert int(msg_id, 16) >= 0


@pytest.mark.parametrize("msg_id", ["a b", "x\r\nNats-Msg-Id: other", "", "é", "x" * 129])
async def test_a_message_id_a_node_would_refuse_is_refused_before_anything_is_sent(
        client: Client, msg_id: str) -> None:
    """The client encodes its header block itself: a CR/LF in an id would forge headers on the wire."""
    seen = await collect(client.nc, "sandbus.topic.orders.>")
    with pytest.raises(InvalidEnvelopeError, match="msg_id"):
        await client.publish("orders.created", {"n": 1}, msg_id=msg_id)
    client.sender = "bad\r\nsender"
    with pytest.raises(InvalidEnvelopeError, match="sender"):
        await client.publish("orders.created", {"n": 1})
    client.sender = "client"
    await client.publish("orders.marker", {"n": 2})
    await until(lambda: len(seen) == 1, 5, "the marker")
    assert [m.subject for m in seen] == ["sandbus.topic.orders.marker"]


async def test_a_message_whose_headers_push_it_over_the_max_payload_is_refused_and_the_connection_lives(
        client: Client) -> None:
    """The server counts the header block against its max payload and closes the connection of a
    publisher that sends more: the client measures the whole message, not only its body."""
    await client.publish("size.probe", "")  # finds out the stream exists
    empty = len(orjson.dumps({"id": "0" * 32, "from": "client", "to": None, "topic": "size.probe", "payload": "",
                              "timestamp": 1.0, "headers": {}}))
    # A payload whose envelope fits the max payload alone, but not with its ~150 bytes of headers.
    payload = "x" * (client.nc.max_payload - empty - 20)
    with pytest.raises(PayloadTooLargeError, match="headers included"):
        await client.publish("size.probe", payload)
    await client.publish("size.probe", {"still": "connected"})
    assert client.nc.is_connected


async def test_requests_and_direct_messages_count_their_headers_against_the_max_payload_too(
        client: Client) -> None:
    """The same rule on every path a client sends on: a request, a control request and a direct
    message whose body fits alone but not with its header block are refused before they are sent."""
    body = "x" * (client.nc.max_payload - 40)  # fits alone, not with the ~100 bytes of headers
    data = orjson.dumps(body)
    with pytest.raises(PayloadTooLargeError, match="headers included"):
        await client.request_bytes("echo", "handle_request", data, timeout=1)
    with pytest.raises(PayloadTooLargeError, match="headers included"):
        await client.request_detailed("echo", payload=data, timeout=1)
    with pytest.raises(PayloadTooLargeError, match="headers included"):
        await client.control("nobody", "list", body, timeout=1)
    with pytest.raises(PayloadTooLargeError, match="headers included"):
        await client.send("echo", body[:-60])
    with pytest.raises(PayloadTooLargeError, match="headers included"):
        await client.send("echo", body[:-60], timeout=1)
    assert client.nc.is_connected
    await client.publish("size.probe", {"still": "connected"})
    assert client.nc.is_connected


async def test_the_publisher_maps_what_the_server_answers_to_the_errors_of_nats_py(nats_server: NatsServer) -> None:
    nc = NatsClient()
    await nc.connect(nats_server.url)
    publisher = JetStreamPublisher(nc, timeout=0.3)
    try:
        # Nobody listens: the server's "no responders" status.
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            await publisher.publish("nobody.listens", b"{}")
        # Somebody listens and never answers: a timeout, and nothing left waiting.
        await nc.subscribe("silent.one")
        with pytest.raises(nats.errors.TimeoutError):
            await publisher.publish("silent.one", b"{}")
        assert publisher.pending == 0

        # Whoever answers is not a stream: an error object with stray keys, garbage, a JSON that is not an ack.
        answers = iter([b'{"error": {"code": 400, "description": "no", "extra": [1]}, "stream": 5}',
                        b"\xff\xfe not json", b'{"stream": "S"}', b"[1, 2]", b'{"error": {"code": "x"}}'])

        async def answer(msg: Msg) -> None:
            await nc.publish(msg.reply, next(answers))

        await nc.subscribe("liar.one", cb=answer)
        with pytest.raises(nats.js.errors.BadRequestError):
            await publisher.publish("liar.one", b"{}")
        for _ in range(3):
            with pytest.raises(BusError, match="not one"):
                await publisher.publish("liar.one", b"{}")
        with pytest.raises(nats.js.errors.APIError):
            await publisher.publish("liar.one", b"{}")
        # A stray message on the inbox (a late ack, a guess) is dropped: no publish waits for it.
        await nc.publish(publisher._prefix + "999", b'{"stream": "S", "seq": 1}')
        await nc.flush()
        assert publisher.pending == 0
    finally:
        await publisher.close()
        await nc.close()


async def test_many_publishes_in_flight_each_get_their_own_ack(client: Client) -> None:
    await client.publish("flight.warm", {})
    before = (await client.nc.jetstream().stream_info(TOPIC_STREAM)).state.messages
    ids = await asyncio.gather(*(client.publish("flight.many", {"i": i}) for i in range(300)))
    assert len(set(ids)) == 300
    assert client._acks.pending == 0
    assert (await client.nc.jetstream().stream_info(TOPIC_STREAM)).state.messages == before + 300


async def test_publishes_waiting_when_the_client_closes_fail_instead_of_hanging(nats_server: NatsServer) -> None:
    nc = NatsClient()
    await nc.connect(nats_server.url)
    await nc.subscribe("silent.two")  # listens, never acks
    publisher = JetStreamPublisher(nc, timeout=30)
    waiting = asyncio.ensure_future(publisher.publish("silent.two", b"{}"))
    await until(lambda: publisher.pending == 1, 5, "the publish to wait")
    await publisher.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await asyncio.wait_for(waiting, 5)
    await nc.close()


async def test_a_publish_under_a_trace_carries_its_context_through_the_ordinary_header_path(client: Client) -> None:
    """With a trace to carry on, the headers are no longer only the ones the client checked: they go
    through nats-py's own encoding, with ``traceparent``, and the message is stored all the same."""
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    parent = SpanContext(trace_id=0x0AF7651916CD43DD8448EB211C80319C, span_id=0xB7AD6B7169203331, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    await client.publish("traced.warm", {})
    seen = await collect(client.nc, "sandbus.topic.traced.one")
    before = (await client.nc.jetstream().stream_info(TOPIC_STREAM)).state.messages
    with trace.use_span(NonRecordingSpan(parent)):
        msg_id = await client.publish("traced.one", {"n": 1})
    await until(lambda: len(seen) == 1, 5, "the traced publish")
    headers = seen[0].headers
    assert headers is not None
    assert headers["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    assert (headers["Sandbus-Msg-Id"], headers["Nats-Msg-Id"]) == (msg_id, msg_id)
    assert (await client.nc.jetstream().stream_info(TOPIC_STREAM)).state.messages == before + 1


def test_a_new_message_id_is_a_random_uuid4_hex() -> None:
    """The protocol promises a random UUID's hex form; ids are what the stream deduplicates on."""
    import uuid

    from sandbus.sdk.envelope import new_message_id, valid_message_id

    ids = [new_message_id() for _ in range(2000)]
    assert len(set(ids)) == 2000
    for value in ids[:200]:
        parsed = uuid.UUID(value)
        assert (parsed.hex, parsed.version, parsed.variant) == (value, 4, uuid.RFC_4122)
        assert valid_message_id(value) == value
