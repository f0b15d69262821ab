"""The PluginBus on its own: a real nats-server, and a plain Python handler instead of a node (no wasm at all)."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from sandbus.bus import BusHandler, ConnectOptions, PluginBus, Reply, Served
from sandbus.bus import plugin_bus as plugin_bus_module
from sandbus.bus.delivery import TOPIC_STREAM, DurableTopics
from sandbus.bus.requests import _FUNCTION
from sandbus.bus.server import NatsServer
from sandbus.sdk.audit import AuditEvent, AuditLevel
from sandbus.sdk.client import Client
from sandbus.sdk.envelope import H_ERROR_CODE, PluginMessage
from sandbus.sdk.errors import (
    HopLimitError,
    InvalidControlError,
    InvalidJsonError,
    PayloadTooLargeError,
    PluginNotFoundError,
    RequestError,
    SandbusError,
)
from sandbus.sdk.subjects import audit_subject, check_token, control_subject, dlq_subject, request_subject
from tests.bus.conftest import ROOT, collect, until

NODE = "bus-test"




@dataclass
class Call:
    plugin: str
    function: str
    payload: bytes
    delivery: int | None


@dataclass
class PlainHandler:
    """A BusHandler in plain Python: ``now`` answers on the hot path, everything else in ``serve``."""

    served: list[Served]
    calls: list[Call] = field(default_factory=list)
    controls: list[tuple[str, str, bool]] = field(default_factory=list)
    audits: list[AuditEvent] = field(default_factory=list)
    refusals: list[tuple[str, str, str]] = field(default_factory=list)
    #: payloads (bytes of the envelope's payload) whose call fails, and how many times so far
    failures: dict[str, int] = field(default_factory=dict)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    bus: PluginBus | None = None

    def serving(self) -> Sequence[Served]:
        return self.served

    def request_now(self, plugin: str, function: str, msg: Msg, reply_headers: dict[str, str]) -> bytes | None:
        if function == "now":
            self.calls.append(Call(plugin, function, msg.data, None))
            return msg.data
        return None

    async def serve(self, plugin: str, function: str, payload: bytes, msg: Msg, *, arrival: float | None,
                    delivery: int | None = None, reply_headers: dict[str, str] | None = None) -> Reply:
        self.calls.append(Call(plugin, function, payload, delivery))
        if function == "fail":
            raise PluginNotFoundError("the handler says no", plugin=plugin)
        if function == "handle_message":
            body = orjson.loads(payload)["payload"]
            if isinstance(body, dict) and body.get("hold"):
                await self.release.wait()
            if isinstance(body, dict) and "permanent" in body:
                raise HopLimitError("a failure that cannot pass", plugin=plugin)  # retryable: False
            if isinstance(body, dict) and "oversize" in body:  # retryable as a class, not this one
                err = PayloadTooLargeError("input above the cap", plugin=plugin, direction="input")
                err.retryable = False
                raise err
            if isinstance(body, dict) and "fail" in body:
                key = str(body["fail"])
                self.failures[key] = self.failures.get(key, 0) + 1
                if body.get("times", 1 << 30) >= self.failures[key]:
                    raise SandbusError(f"failing on purpose ({self.failures[key]})", plugin=plugin)
        return orjson.dumps({"plugin": plugin, "function": function, "got": orjson.loads(payload)}), None

    def runs_inline(self, plugin: str) -> bool:
        return False

    def control(self, verb: str, plugin: str, force: bool) -> Any:
        self.controls.append((verb, plugin, force))
        if verb == "load":
            self.served.append(Served(plugin))
        return {"verb": verb, "plugin": plugin}

    def refused(self, plugin: str, err: RequestError, subject: str) -> None:
        self.refusals.append((plugin, err.code, subject))

    def describe(self, stats: bool) -> dict[str, Any]:
        return {"plugins": [{"name": s.name, "topics": list(s.topics)} for s in self.served]}

    def audit(self, level: AuditLevel, kind: str, plugin: str, message: str, **details: Any) -> None:
        event = AuditEvent(level, kind, plugin, message, details)
        self.audits.append(event)
        assert self.bus is not None
        self.bus.publish_audit(event)


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[tuple[PluginBus, PlainHandler]]:
    handler = PlainHandler([
        Served("calc"),
        Served("fan_a", topics=("news.*",), message_function="handle_message"),
        Served("fan_b", topics=("news.*",), message_function="handle_message"),
        Served("worker", topics=("jobs.*",), durable=True, message_function="handle_message", timeout_s=2.0,
               instances=4),
    ])
    plugin_bus = PluginBus(handler, ConnectOptions.from_urls(nats_server.url), node_id=NODE, max_deliver=3)
    handler.bus = plugin_bus
    await plugin_bus.start()
    try:
        yield plugin_bus, handler
    finally:
        handler.release.set()
        await plugin_bus.stop(timeout=5)


@pytest.fixture
async def client(nats_server: NatsServer) -> AsyncIterator[Client]:
    c = await Client.connect(nats_server.url)
    try:
        yield c
    finally:
        await c.close()


def test_the_node_and_a_plain_object_implement_the_handler_interface() -> None:
    """The interface is a handful of methods, and both implementations follow its signatures exactly."""
    from sandbus.host.node.node import Node

    members = {n for n, v in vars(BusHandler).items() if callable(v) and not n.startswith("_")}
    assert members == {"serving", "request_now", "serve", "runs_inline", "refused", "control", "describe", "audit"}
    for impl in (Node, PlainHandler):
        for name in members:
            want, got = getattr(BusHandler, name), getattr(impl, name)
            assert list(inspect.signature(got).parameters) == list(inspect.signature(want).parameters), (impl, name)
            assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(want), (impl, name)


async def test_a_request_is_routed_to_the_handler_and_answered(bus: tuple[PluginBus, PlainHandler],
                                                               client: Client) -> None:
    _, handler = bus
    # The hot path: answered inside the subscription callback.
    assert await client.request("calc", "now", {"x": 1}) == {"x": 1}
    # Not now: served in a task, through serve().
    assert await client.request("calc", "sum", [1, 2]) == {"plugin": "calc", "function": "sum", "got": [1, 2]}
    assert [(c.plugin, c.function) for c in handler.calls] == [("calc", "now"), ("calc", "sum")]
    # What the handler raises is the caller's typed error.
    with pytest.raises(PluginNotFoundError, match="the handler says no"):
        await client.request("calc", "fail", {})
    # A plugin the handler does not serve has no subscription: nobody answers.
    with pytest.raises(PluginNotFoundError, match="no node serves"):
        await client.request("nobody", "now", {})


async def test_a_direct_message_reaches_the_handler_as_an_envelope(bus: tuple[PluginBus, PlainHandler],
                                                                   client: Client) -> None:
    _, handler = bus
    reply = await client.send("fan_a", {"hello": "there"}, timeout=5)
    assert reply["function"] == "handle_message"  # the served plugin's message function
    envelope = PluginMessage.model_validate(reply["got"])
    assert envelope.payload == {"hello": "there"}
    assert envelope.to == "fan_a"
    assert handler.calls[-1].plugin == "fan_a"


async def test_a_topic_broadcast_reaches_each_subscribing_plugin_once(bus: tuple[PluginBus, PlainHandler],
                                                                      client: Client) -> None:
    _, handler = bus
    def received() -> list[tuple[str, Any]]:
        return [(c.plugin, PluginMessage.model_validate_json(c.payload).payload) for c in handler.calls]

    await client.publish("news.today", {"n": 1}, durable=False)
    # A marker after it: once each plugin has the marker, a second copy of the first would be in too.
    await client.publish("news.later", {"n": 2}, durable=False)
    await until(lambda: {p for p, body in received() if body == {"n": 2}} == {"fan_a", "fan_b"}, 5,
                "the marker at both subscribers")
    assert sorted(p for p, body in received() if body == {"n": 1}) == ["fan_a", "fan_b"]
    first = PluginMessage.model_validate_json(handler.calls[0].payload)
    assert first.topic == "news.today"


async def test_a_durable_message_is_acked_only_after_the_handler_returns(bus: tuple[PluginBus, PlainHandler],
                                                                         client: Client) -> None:
    plugin_bus, handler = bus
    assert plugin_bus.durable_topics
    handler.release.clear()
    await client.publish("jobs.one", {"hold": True})
    await until(lambda: any(c.plugin == "worker" for c in handler.calls), 5, "the delivery")
    js = client.nc.jetstream()
    info = await js.consumer_info(TOPIC_STREAM, DurableTopics.durable_name("worker"))
    assert info.num_ack_pending == 1  # the handler has not returned: not acked
    handler.release.set()

    async def acked() -> bool:
        info = await js.consumer_info(TOPIC_STREAM, DurableTopics.durable_name("worker"))
        return bool(info.num_ack_pending == 0 and info.delivered.stream_seq >= 1)

    for _ in range(500):  # bounded: 5 s
        if await acked():
            break
        await asyncio.sleep(0.01)
    assert await acked()
    assert [c.delivery for c in handler.calls if c.plugin == "worker"] == [1]


async def test_a_failed_durable_message_is_redelivered(bus: tuple[PluginBus, PlainHandler], client: Client) -> None:
    _, handler = bus
    await client.publish("jobs.retry", {"fail": "once", "times": 1})
    await until(lambda: [c.delivery for c in handler.calls if c.plugin == "worker"] == [1, 2], 5,
                "the redelivery after one failure")
    assert handler.failures == {"once": 2}
    assert not [e for e in handler.audits if e.kind == "delivery.dead_letter"]


async def test_a_durable_message_is_dead_lettered_after_max_deliver(bus: tuple[PluginBus, PlainHandler],
                                                                    client: Client) -> None:
    plugin_bus, handler = bus
    dead = await collect(client.nc, dlq_subject("worker"))
    audited = await collect(client.nc, audit_subject(NODE))
    await client.publish("jobs.doomed", {"fail": "always"})
    await until(lambda: len(dead) == 1, 10, "the dead letter")
    assert [c.delivery for c in handler.calls if c.plugin == "worker"] == [1, 2, 3]  # max_deliver=3
    letter = dead[0]
    assert letter.headers is not None
    assert letter.headers[H_ERROR_CODE] == "sandbus.error"
    assert letter.headers["Sandbus-Deliveries"] == "3"
    assert PluginMessage.model_validate_json(letter.data).payload == {"fail": "always"}
    # Audited through the handler once the message is terminated (the dead letter can reach a
    # subscriber before the node has its publish ack), and published by the bus on sandbus.audit.<node>.
    await until(lambda: [e.kind for e in handler.audits] == ["delivery.dead_letter"], 5, "the audit event")
    await until(lambda: any(orjson.loads(m.data)["kind"] == "delivery.dead_letter" for m in audited), 5,
                "the published audit event")
    assert plugin_bus.served("worker") is not None


async def test_a_permanent_failure_is_dead_lettered_at_its_first_delivery(bus: tuple[PluginBus, PlainHandler],
                                                                         client: Client) -> None:
    _, handler = bus
    dead = await collect(client.nc, dlq_subject("worker"))
    await client.publish("jobs.hopeless", {"permanent": True})
    await until(lambda: len(dead) == 1, 10, "the dead letter")
    letter = dead[0]
    assert letter.headers is not None
    assert (letter.headers[H_ERROR_CODE], letter.headers["Sandbus-Deliveries"]) == ("limit.hops", "1")
    assert [c.delivery for c in handler.calls if c.plugin == "worker"] == [1]  # not redelivered
    # An envelope the bus refuses never reaches the handler: dead-lettered at once, reported as refused.
    await client.nc.jetstream().publish("sandbus.topic.jobs.bad", b'{"id": 7}',
                                        headers={"Content-Type": "application/vnd.sandbus.message+json"})
    await until(lambda: len(dead) == 2, 10, "the second dead letter")
    assert dead[1].headers is not None
    assert (dead[1].headers[H_ERROR_CODE], dead[1].headers["Sandbus-Deliveries"]) == ("request.invalid_envelope",
                                                                                        "1")
    assert [c.delivery for c in handler.calls if c.plugin == "worker"] == [1]
    assert [(p, code) for p, code, _ in handler.refusals] == [("worker", "request.invalid_envelope")]
    # An error whose class is retried, but which says of itself that it cannot pass, is not retried either.
    await client.publish("jobs.oversize", {"oversize": True})
    await until(lambda: len(dead) == 3, 10, "the third dead letter")
    assert dead[2].headers is not None
    assert (dead[2].headers[H_ERROR_CODE], dead[2].headers["Sandbus-Deliveries"]) == ("limit.payload", "1")
    assert [c.delivery for c in handler.calls if c.plugin == "worker"] == [1, 1]


async def test_discovery_and_control_list_what_the_handler_serves(bus: tuple[PluginBus, PlainHandler],
                                                                  client: Client) -> None:
    _, handler = bus
    views = await client.nodes(timeout=0.5)
    assert [v["node_id"] for v in views] == [NODE]
    view = views[0]
    assert view["durable_topics"] is True
    assert [p["name"] for p in view["plugins"]] == ["calc", "fan_a", "fan_b", "worker"]
    # load: the handler's control, then the bus subscribes before it answers.
    assert await client.control(NODE, "load", {"plugin": "late"}) == {"verb": "load", "plugin": "late"}
    assert handler.controls == [("load", "late", False)]
    assert await client.request("late", "now", [7]) == [7]
    assert await client.control(NODE, "unload", {"plugin": "late", "force": True}) == {"verb": "unload",
                                                                                       "plugin": "late"}
    assert handler.controls[-1] == ("unload", "late", True)


async def test_an_audit_event_is_published(bus: tuple[PluginBus, PlainHandler], client: Client) -> None:
    plugin_bus, _ = bus
    audited = await collect(client.nc, audit_subject(NODE))
    plugin_bus.publish_audit(AuditEvent(AuditLevel.WARNING, "test.event", "calc", "something held", {"n": 1}))
    await until(lambda: len(audited) == 1, 5, "the audit event")
    body = orjson.loads(audited[0].data)
    assert (body["kind"], body["plugin"], body["details"]) == ("test.event", "calc", {"n": 1})
    assert body["count"] == 1


async def raw_request(nc: NatsClient, subject: str, body: bytes) -> tuple[bytes, dict[str, str]]:
    msg = await nc.request(subject, body, timeout=5)
    return bytes(msg.data), dict(msg.headers or {})


async def test_hostile_input_gets_a_typed_error_and_the_bus_keeps_serving(bus: tuple[PluginBus, PlainHandler],
                                                                          client: Client) -> None:
    plugin_bus, handler = bus
    nc = client.nc
    deep = b"[" * 300 + b"]" * 300
    cases = (
        (request_subject("calc", "now"), b"{not json", InvalidJsonError, "not valid JSON"),
        (request_subject("calc", "now"), deep, InvalidJsonError, "nested too deeply"),
        ("sandbus.req.calc.$bad", b"{}", RequestError, "function"),  # '$' would reach reserved subjects
        ("sandbus.req.calc." + "f" * 300, b"{}", RequestError, "function"),  # longer than a token may be
        ("sandbus.msg.fan_a", b"\xff\xfe", InvalidJsonError, "not valid JSON"),
        ("sandbus.msg.fan_a", deep, InvalidJsonError, "nested too deeply"),  # read, but cannot be re-encoded
    )
    for subject, body, error, what in cases:
        data, headers = await raw_request(nc, subject, body)
        assert headers.get(H_ERROR_CODE) == error.code, (subject, data)
        assert headers.get("Sandbus-Node") == NODE
        assert what in orjson.loads(data)["error"]["message"]
    assert not [c for c in handler.calls if c.function != "now" and c.plugin == "calc"]  # none reached it
    # Each was the client's mistake: reported to the handler (the node counts it as the plugin's "rejected").
    assert [(p, code) for p, code, _ in handler.refusals] == [
        (subject.split(".")[2], error.code) for subject, _, error, _ in cases]
    # A malformed control request: typed, and audited.
    data, headers = await raw_request(nc, control_subject(NODE, "load"), b'{"plugin": 3}')
    assert headers.get(H_ERROR_CODE) == InvalidControlError.code
    assert headers.get("Sandbus-Node") == NODE
    assert [e.kind for e in handler.audits] == ["control.refused"]
    # Still serving, on every path.
    assert await client.request("calc", "now", {"ok": True}) == {"ok": True}
    assert (await client.send("fan_a", 1, timeout=5))["function"] == "handle_message"
    assert plugin_bus.connected


async def test_a_sync_follows_what_the_handler_serves(bus: tuple[PluginBus, PlainHandler], client: Client) -> None:
    plugin_bus, handler = bus
    handler.served[0] = replace(handler.served[0], message_function="other")  # same subscriptions
    handler.served.pop(1)  # fan_a goes
    await plugin_bus.sync()
    calc = plugin_bus.served("calc")
    assert calc is not None
    assert calc.message_function == "other"
    assert plugin_bus.served("fan_a") is None
    with pytest.raises(PluginNotFoundError, match="no node serves"):
        await client.send("fan_a", 1, timeout=2)
    assert (await client.send("calc", 1, timeout=5))["function"] == "other"


@pytest.mark.parametrize("function", ["handle_request", "a", "A-z_9", "f" * 255, "f" * 256, "", "a.b", "$x", "a\n",
                                      "\u00e9", "a b", "*", ">", "a\x00"])
def test_the_hot_path_token_check_is_check_token(function: str) -> None:
    try:
        check_token(function, "function")
        valid = True
    except ValueError:
        valid = False
    assert (_FUNCTION.fullmatch(function) is not None) == valid


def test_importing_the_bus_loads_no_wasm_and_no_host() -> None:
    code = (
        "import sys\n"
        "import sandbus.bus\n"
        "from sandbus.bus import PluginBus, BusHandler, Served, ConnectOptions\n"
        "import sandbus.bus.audit, sandbus.bus.control, sandbus.bus.delivery, sandbus.bus.requests\n"
        "import sandbus.bus.plugin_bus, sandbus.bus.server, sandbus.bus.wire\n"
        "bad = sorted(m for m in sys.modules if m == 'wasmtime' or m.startswith(('wasmtime.', 'sandbus.host')))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


async def test_the_cached_reply_headers_are_the_bytes_nats_py_would_send() -> None:
    """Replies skip nats-py's per-header encoding (bus/wire.py): the bytes must be the library's own."""
    from nats.protocol.command import hpub_cmd

    from sandbus.bus.wire import header_block

    sent: list[bytes] = []

    async def capture(cmd: bytes, priority: bool = False) -> None:
        sent.append(cmd)

    nc = NatsClient()
    nc._send_command = capture  # type: ignore[method-assign]
    for headers in ({"Content-Type": "application/json", "Sandbus-Node": "n-1"},
                    {"Content-Type": "application/json", "Sandbus-Node": "n-1", "Sandbus-Msg-Id": "a.b:c-d_e",
                     "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                     "tracestate": "k=v,a@b=c d"}):
        await nc._send_publish("_INBOX.x.1", "", b'{"a":1}', 7, headers)
        assert sent.pop() == hpub_cmd("_INBOX.x.1", "", header_block(headers), b'{"a":1}')


async def test_topics_become_durable_once_jetstream_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node started while JetStream does not answer (a server without it, a cluster still electing its
    leader) serves topics at most once, and keeps trying: once JetStream answers, the plugins' topics move
    to durable consumers without a restart of the node."""
    monkeypatch.setattr(plugin_bus_module, "DURABLE_RETRY_S", 0.1)
    server = NatsServer(jetstream=False).start()
    port = int(server.url.rsplit(":", 1)[1])
    handler = PlainHandler([Served("worker", topics=("jobs.*",), durable=True, message_function="handle_message")])
    bus = PluginBus(handler, ConnectOptions.from_urls(server.url), node_id="late-js")
    handler.bus = bus
    try:
        await bus.start()
        assert not bus.durable_topics
        server.stop()
        server = NatsServer(jetstream=True, store_dir=tmp_path / "js", port=port).start()
        await until(lambda: bus.durable_topics, 20, "durable topics once JetStream answers")
        async with await Client.connect(server.url) as c:
            await c.publish("jobs.late", {"n": 1})  # stored by JetStream: the publish is acked
            js = c.nc.jetstream()
            await until(lambda: any(call.plugin == "worker" for call in handler.calls), 10, "the durable delivery")
            info = await js.consumer_info(TOPIC_STREAM, DurableTopics.durable_name("worker"))
            assert info.delivered.stream_seq >= 1
    finally:
        await bus.stop(timeout=5)
        server.stop()
