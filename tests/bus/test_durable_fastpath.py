"""Durable deliveries run inline without ``serve``'s coroutines (``Node.deliver_now``), and nothing else changes.

The bus calls a handler's ``deliver_now`` for a plugin served inline while its turn on the loop is not
due (bus/delivery.py ``DurableTopics._deliver_inline``). These tests run a real nats-server, real nodes
and real wasm, each outcome twice: through ``deliver_now`` and through ``serve`` (a node without the
method, which is also how a handler that does not have it is served), and hold both to the same
expectation: acks, naks, dead letters with the same error code at the same delivery, the plugin's
counters. Then what must survive the shortcut: turns between two busy plugins, spans of a traced
delivery, demotion to threads on a budget overrun, a plain handler without the method.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
import wasmtime
from nats.aio.msg import Msg
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from sandbus.bus import ConnectOptions, PluginBus, Reply, Served
from sandbus.bus.delivery import TOPIC_STREAM, DurableTopics, _ack_subject
from sandbus.bus.server import NatsServer
from sandbus.host.lifecycle.policy import load_policy
from sandbus.host.node.node import Node
from sandbus.host.sandbox import CallResult
from sandbus.host.telemetry.otel import Telemetry
from sandbus.sdk.envelope import H_ERROR_CODE
from sandbus.sdk.errors import InvalidJsonError, TrapError, UnknownFunctionError
from sandbus.sdk.nats_guard import GuardedNatsClient
from tests.bus.conftest import collect, until
from tests.bus.test_hardening_node import SLEEPER_WAT
from tests.bus.test_plugin_bus import PlainHandler
from tests.conftest import ABI_PRELUDE

MANIFEST = """
[plugin]
name = "{name}"
version = "1.0.0"
description = "a durable fast-path test plugin"
author = "tests"
license = "Apache-2.0"
min_runtime_version = "0.1.0"
[capabilities]
required = {caps}
[resources]
timeout_seconds = 3
max_fuel = 1000000000000
max_instances = 2
[subscriptions]
topics = ["{topic}"]
durable = true
"""

POLICY = """
[capabilities]
allowed = ["compute", "clock"]
[limits]
max_fuel = 10000000000000
[messaging]
subscribe_topics = [">"]
"""

#: traps on every message
TRAPPER_WAT = "(module\n" + ABI_PRELUDE + """
  (func (export "handle_message") (param i32 i32) (result i64) unreachable))
"""

#: exports neither handle_message nor handle_request: every message names a function it does not have
NOFUNC_WAT = "(module\n" + ABI_PRELUDE + """
  (func (export "something_else") (param i32 i32) (result i64) (i64.const 0)))
"""

#: returns its input after {ms} ms of busy waiting (no side effect: it may run inline and be re-run)
def busy(ms: int) -> bytes:
    """A message handler that busy-waits ``ms`` ms and returns its input (the request sleeper, as a
    ``handle_message``)."""
    return bytes(wasmtime.wat2wasm(SLEEPER_WAT.replace("{ms}", str(ms)).replace(
        '(export "handle_request")', '(export "handle_message")')))


def add_plugin(d: Path, name: str, wasm: Path | bytes, topic: str, caps: tuple[str, ...] = ("compute",)) -> None:
    if isinstance(wasm, Path):
        shutil.copy(wasm, d / f"{name}.wasm")
    else:
        (d / f"{name}.wasm").write_bytes(wasm)
    (d / f"{name}.toml").write_text(MANIFEST.format(name=name, topic=topic, caps=orjson.dumps(list(caps)).decode()))


class RecordingNode(Node):
    """A node that records which way each durable delivery went (the real methods do the work)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: (plugin, what deliver_now answered) per call
        self.now: list[tuple[str, bool]] = []
        #: plugin per durable delivery that went through serve()
        self.served_async: list[str] = []
        #: plugin per call that ran inline and returned (either way)
        self.ran_inline: list[str] = []

    def deliver_now(self, plugin: str, function: str, envelope: bytes, msg: Msg, delivery: int) -> bool:
        handled = super().deliver_now(plugin, function, envelope, msg, delivery)
        self.now.append((plugin, handled))
        return handled

    async def serve(self, plugin: str, function: str, payload: bytes, msg: Msg, *, arrival: float | None,
                    delivery: int | None = None, reply_headers: dict[str, str] | None = None) -> Reply:
        if delivery is not None:
            self.served_async.append(plugin)
        return await super().serve(plugin, function, payload, msg, arrival=arrival, delivery=delivery,
                                   reply_headers=reply_headers)

    def try_inline(self, plugin: str, function: str, payload: bytes) -> CallResult | None:
        result = super().try_inline(plugin, function, payload)
        if result is not None:
            self.ran_inline.append(plugin)
        return result


class ServeOnlyNode(RecordingNode):
    """The same node as a handler without ``deliver_now``: every durable delivery goes through ``serve``."""

    deliver_now = None  # type: ignore[assignment]


MakeNode = Callable[..., Awaitable[RecordingNode]]


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    d = tmp_path / "plugins"
    d.mkdir()
    (tmp_path / "policy.toml").write_text(POLICY)
    return d


@pytest.fixture
async def make_node(nats_server: NatsServer) -> AsyncIterator[MakeNode]:
    """In-process nodes on the test's loop (two deliveries before a dead letter), stopped in teardown."""
    nodes: list[Node] = []

    async def make(d: Path, cls: type[RecordingNode] = RecordingNode, **kwargs: Any) -> RecordingNode:
        node = cls.create(d, ConnectOptions.from_urls(nats_server.url), policy=load_policy(d.parent / "policy.toml"),
                          **kwargs)
        assert isinstance(node, RecordingNode)
        nodes.append(node)
        report = node.manager.discover_and_load()
        assert report.ok, report.failed
        node.bus.max_deliver = 2
        await node.start()
        assert node.bus.durable_topics
        return node

    yield make
    for node in nodes:
        if not node.bus.stopping:
            await node.stop()
        node.manager.close()


async def settled(js: Any, plugins: Sequence[str]) -> bool:
    """Every message the plugins' consumers were given is acked or terminated, and none waits."""
    for plugin in plugins:
        info = await js.consumer_info(TOPIC_STREAM, DurableTopics.durable_name(plugin))
        if info.num_ack_pending or info.num_pending:
            return False
    return True


async def wait_settled(js: Any, plugins: Sequence[str], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await settled(js, plugins):
        assert loop.time() < deadline, f"the consumers of {plugins} did not settle in {timeout} s"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("cls", [RecordingNode, ServeOnlyNode], ids=["deliver_now", "serve"])
async def test_acks_naks_and_dead_letters_are_the_same_on_both_paths(
        cls: type[RecordingNode], plugin_dir: Path, plugins_dir: Path, make_node: MakeNode,
        nats_server: NatsServer) -> None:
    """Three good messages are acked once each; a body that is not JSON is refused (counted as the
    plugin's ``rejected``) and dead-lettered at its first delivery; a trap is nak'ed, redelivered and
    dead-lettered at the last delivery (retryable); a function the module does not have is
    dead-lettered at once (not retryable). The same whichever path delivered them."""
    add_plugin(plugin_dir, "fastok", plugins_dir / "echo.wasm", "fast.ok")
    add_plugin(plugin_dir, "trapper", bytes(wasmtime.wat2wasm(TRAPPER_WAT)), "fast.trap")
    add_plugin(plugin_dir, "nofunc", bytes(wasmtime.wat2wasm(NOFUNC_WAT)), "fast.nofunc")
    node = await make_node(plugin_dir, cls)
    assert all(node.runs_inline(p) for p in ("fastok", "trapper", "nofunc"))
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        dead = await collect(nc, "sandbus.dlq.>")
        for i in range(3):
            await js.publish("sandbus.topic.fast.ok", orjson.dumps({"i": i}))
        await js.publish("sandbus.topic.fast.ok", b"{not json")
        await js.publish("sandbus.topic.fast.trap", b'{"boom": 1}')
        await js.publish("sandbus.topic.fast.nofunc", b'{"where": "nowhere"}')
        await until(lambda: len(dead) == 3, 15, "three dead letters")
        await wait_settled(js, ("fastok", "trapper", "nofunc"))
    finally:
        await nc.close()
    letters = sorted((m.subject, (m.headers or {}).get("Sandbus-Original-Subject"),
                      (m.headers or {}).get(H_ERROR_CODE), (m.headers or {}).get("Sandbus-Deliveries")) for m in dead)
    assert letters == sorted([
        ("sandbus.dlq.fastok", "sandbus.topic.fast.ok", InvalidJsonError.code, "1"),
        ("sandbus.dlq.nofunc", "sandbus.topic.fast.nofunc", UnknownFunctionError.code, "1"),
        ("sandbus.dlq.trapper", "sandbus.topic.fast.trap", TrapError.code, "2"),
    ])
    info = node.manager.info("fastok")
    assert (info.executions, info.errors, info.rejected) == (3, 0, 1)
    assert node.manager.info("trapper").errors == 2
    if cls is ServeOnlyNode:
        assert node.now == []
        assert node.served_async.count("fastok") == 3
    else:
        # The good messages never went through serve(): each was handled by deliver_now.
        assert node.now.count(("fastok", True)) == 3
        assert "fastok" not in node.served_async
        assert ("nofunc", True) not in node.now
        assert ("trapper", True) not in node.now


async def test_two_busy_inline_plugins_take_turns(plugin_dir: Path, make_node: MakeNode,
                                                  nats_server: NatsServer) -> None:
    """Two plugins with a backlog of 8 ms calls each (longer than the loop's 5 ms slice), both inline:
    their calls alternate once both have messages, so neither plugin's backlog holds the other's
    back. The first call of each loop iteration went through ``deliver_now``, the rest waited for
    their turn through ``serve``."""
    add_plugin(plugin_dir, "busy_a", busy(8), "fair.a", caps=("compute", "clock"))
    add_plugin(plugin_dir, "busy_b", busy(8), "fair.b", caps=("compute", "clock"))
    node = await make_node(plugin_dir)
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await asyncio.gather(*(js.publish(f"sandbus.topic.fair.{p}", b"[%d]" % i)
                               for i in range(25) for p in "ab"))
        await until(lambda: len(node.ran_inline) == 50, 20, "all fifty calls")
        await wait_settled(js, ("busy_a", "busy_b"))
    finally:
        await nc.close()
    assert node.runs_inline("busy_a"), "demoted to threads: nothing was measured"
    assert node.runs_inline("busy_b"), "demoted to threads: nothing was measured"
    order = node.ran_inline
    both = max(order.index("busy_a"), order.index("busy_b"))
    last = max(len(order) - 1 - order[::-1].index("busy_a"), len(order) - 1 - order[::-1].index("busy_b"))
    # While both have messages, neither runs more than a couple of calls in a row.
    runs = [len(list(group)) for _, group in itertools.groupby(order[both:last])]
    assert max(runs) <= 3, order
    assert any(handled for _, handled in node.now), "deliver_now never ran a call"
    assert node.served_async, "no call waited for its turn"


async def test_a_traced_delivery_keeps_its_spans(plugin_dir: Path, plugins_dir: Path, make_node: MakeNode,
                                                 nats_server: NatsServer) -> None:
    """With tracing on, a durable delivery is not run by ``deliver_now``: it goes through ``serve``, and
    has its ``process`` span (CONSUMER, parented by the publisher's trace, with the delivery count)
    around its ``execute`` span."""
    add_plugin(plugin_dir, "fastok", plugins_dir / "echo.wasm", "fast.ok")
    exporter = InMemorySpanExporter()
    tel = Telemetry("sandbus-node", "traced", enabled=True, export=False, set_global=False,
                    extra_processors=[SimpleSpanProcessor(exporter)])
    node = await make_node(plugin_dir, telemetry=tel)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.publish("sandbus.topic.fast.ok", b'{"traced": true}',
                         headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
        await until(lambda: node.manager.info("fastok").executions == 1, 10, "the delivery")
        await wait_settled(js, ("fastok",))
        await until(lambda: len(exporter.get_finished_spans()) >= 2, 5, "the spans")
    finally:
        await nc.close()
    assert node.now == [("fastok", False)]
    assert node.served_async == ["fastok"]
    spans = {s.name: s for s in exporter.get_finished_spans()}
    process = spans["process sandbus.topic.fast.ok"]
    execute = next(s for name, s in spans.items() if name.startswith("execute"))
    assert process.kind == SpanKind.CONSUMER
    assert process.context is not None
    assert format(process.context.trace_id, "032x") == trace_id
    assert process.attributes is not None
    assert process.attributes["messaging.nats.delivery_count"] == 1
    assert execute.parent is not None
    assert execute.parent.span_id == process.context.span_id


async def test_a_call_over_the_inline_budget_is_run_again_in_a_thread_and_demotes_the_plugin(
        plugin_dir: Path, make_node: MakeNode, nats_server: NatsServer) -> None:
    """A delivery whose call overruns the inline budget inside ``deliver_now`` is interrupted, handed to
    ``serve`` (which runs it from the start in a worker thread) and acked once; the plugin stays on
    threads, so its next deliveries do not try inline first."""
    add_plugin(plugin_dir, "slow", busy(60), "slow.x", caps=("compute", "clock"))
    node = await make_node(plugin_dir, inline_budget_s=0.02)
    assert node.runs_inline("slow")
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        dead = await collect(nc, "sandbus.dlq.>")
        await js.publish("sandbus.topic.slow.x", b"[1]")
        await until(lambda: node.served_async == ["slow"], 10, "the delivery handed to serve()")
        await wait_settled(js, ("slow",))
        await js.publish("sandbus.topic.slow.x", b"[2]")
        await until(lambda: node.served_async == ["slow", "slow"], 10, "the second delivery")
        await wait_settled(js, ("slow",))
    finally:
        await nc.close()
    assert node.now == [("slow", False)], "the demoted plugin was tried inline again"
    assert not node.runs_inline("slow")
    assert node.ran_inline == []
    assert dead == []
    assert node.manager.info("slow").errors == 0


class InlinePlainHandler(PlainHandler):
    """The bus tests' plain-Python BusHandler (no ``deliver_now``), serving one durable plugin whose calls
    "run inline"."""

    def __init__(self) -> None:
        super().__init__([Served("plain", topics=("plain.*",), durable=True, message_function="handle_message")])

    def runs_inline(self, plugin: str) -> bool:
        return True


def delivered(handler: PlainHandler) -> list[tuple[str, Any, int | None]]:
    """(function, the envelope's payload, delivery) of each call the handler served."""
    return [(c.function, orjson.loads(c.payload)["payload"], c.delivery) for c in handler.calls]


async def test_a_handler_without_deliver_now_gets_every_delivery_through_serve(nats_server: NatsServer) -> None:
    handler = InlinePlainHandler()
    assert not hasattr(handler, "deliver_now")
    bus = PluginBus(handler, ConnectOptions.from_urls(nats_server.url), node_id="plain")
    await bus.start()
    nc = await nats.connect(nats_server.url)
    try:
        assert bus.durable_topics
        js = nc.jetstream()
        for i in range(5):
            await js.publish("sandbus.topic.plain.x", b"[%d]" % i)
        await until(lambda: len(handler.calls) == 5, 10, "five deliveries")
        await wait_settled(js, ("plain",))
    finally:
        await nc.close()
        await bus.stop(timeout=5)
    assert delivered(handler) == [("handle_message", [i], 1) for i in range(5)]


async def test_the_pull_inbox_is_read_in_the_read_loop_and_a_plain_client_keeps_its_callback(
        nats_server: NatsServer) -> None:
    """On the bus's own connection (a GuardedNatsClient) the pull inbox's messages are noted in the read
    loop (direct dispatch); a durable consumer on a plain nats-py client gets them through the
    subscription's callback. Both deliver every message once."""
    handler = InlinePlainHandler()
    bus = PluginBus(handler, ConnectOptions.from_urls(nats_server.url), node_id="plain")
    await bus.start()
    plain = await nats.connect(nats_server.url)
    try:
        assert isinstance(bus.nc, GuardedNatsClient)
        durable = bus._durable
        assert durable is not None
        assert durable._psubs["plain"]._id in bus.nc._direct
        # A second consumer of another plugin, over a plain client.
        other = DurableTopics(plain, bus, handler)
        served = Served("other", topics=("other.*",), durable=True, message_function="handle_message")
        await other.consume(served)
        assert not hasattr(plain, "_direct")
        js = plain.jetstream()
        for i in range(3):
            await js.publish("sandbus.topic.plain.x", b"[%d]" % i)
            await js.publish("sandbus.topic.other.x", b"[%d]" % (10 + i))
        await until(lambda: len(handler.calls) == 6, 10, "six deliveries")
        await wait_settled(js, ("plain", "other"))
        await other.stop()
    finally:
        await plain.close()
        await bus.stop(timeout=5)
    assert sorted(payload[0] for _, payload, _ in delivered(handler)) == [0, 1, 2, 10, 11, 12]


def test_an_ack_subject_is_written_raw_only_when_printable_ascii_without_a_space() -> None:
    """What decides whether an ack subject is copied into a protocol line is exactly ``[!-~]{1,1024}``."""
    rule = re.compile(r"[!-~]{1,1024}")
    base = "$JS.ACK.S.C.1.2.3.4.5"
    samples = ["", base, base + "x" * (1024 - len(base)), base + "x" * (1025 - len(base))]
    for code in range(0x3000):
        c = chr(code)
        samples += [c, base + c, c + base, base[:10] + c + base[10:]]
    for reply in samples:
        assert _ack_subject(reply) == (rule.fullmatch(reply) is not None), repr(reply)
