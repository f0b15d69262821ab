"""Trace context from the bus is hostile input: traceparent/tracestate are validated and bounded as W3C says."""

from __future__ import annotations

import asyncio
import io
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sandbus.bus.connection import ConnectOptions
from sandbus.bus.server import NatsServer
from sandbus.host.lifecycle.policy import load_policy
from sandbus.host.node.node import Node
from sandbus.host.telemetry.export import SpanEncoder, serve
from sandbus.host.telemetry.fast_spans import MAX_MESSAGE_ID, FastSpans, parse_traceparent, sampler_from_env
from sandbus.host.telemetry.otel import Telemetry
from sandbus.sdk.client import Client
from sandbus.sdk.tracing import MAX_TRACESTATE, MAX_TRACESTATE_MEMBERS, extract, valid_tracestate
from tests.bus.conftest import POLICY

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
HUGE = "k=" + "v" * (900 * 1024)  # what a client can put in one header: NATS allows ~1 MB a message


@pytest.mark.parametrize(("value", "expected"), [
    ("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
    ("rojo=1 ,\t, congo=2", "rojo=1,congo=2"),  # optional whitespace and empty members (W3C allows both)
    ("tenant@system=x", "tenant@system=x"),
    ("a=value with spaces", "a=value with spaces"),
    (None, None),
    ("", None),
    ("Upper=1", None),  # keys are lower case
    ("a=1,a=2", None),  # a key twice
    ("a=", None),  # an empty value
    ("a=b=c", None),  # '=' is not a value character
    ("a=\x7f", None),
    ("k" * 257 + "=1", None),  # keys are at most 256 characters
    ("k=" + "v" * 257, None),  # values at most 256
    (",".join(f"k{i}=v" for i in range(MAX_TRACESTATE_MEMBERS + 1)), None),  # 33 members
    (HUGE, None),
])
def test_f15_tracestate_is_validated_as_w3c_says(value: str | None, expected: str | None) -> None:
    assert valid_tracestate(value) == expected


def test_f15_a_long_tracestate_is_shortened_in_w3c_order() -> None:
    big = "big=" + "b" * 200  # over 128 characters: the first to go
    small = [f"k{i}=" + "v" * 40 for i in range(16)]
    state = valid_tracestate(",".join([small[0], big, *small[1:]]))
    assert state is not None
    assert len(state) <= MAX_TRACESTATE
    members = state.split(",")
    assert big not in members
    assert members == small[:len(members)]  # then from the end
    assert len(members) == (MAX_TRACESTATE + 1) // (len(small[0]) + 1)
    full = ",".join(f"k{i}=v" for i in range(MAX_TRACESTATE_MEMBERS))
    assert valid_tracestate(full) == full  # 32 members, short: kept whole


def test_f15_huge_tracestate_is_refused_without_being_parsed() -> None:
    start = time.perf_counter()
    for _ in range(100):
        assert valid_tracestate(HUGE) is None
        assert valid_tracestate("a=1," * 250_000) is None
    assert time.perf_counter() - start < 0.5  # a length check, not a parse of a megabyte


def test_f15_traceparent_is_bounded() -> None:
    assert parse_traceparent(TRACEPARENT) == (TRACE, PARENT, True)
    future = f"01-{TRACE}-{PARENT}-01-" + "x" * 1000  # a future version may add fields, but not without end
    assert parse_traceparent(future) is None
    sc = trace.get_current_span(extract({"traceparent": future})).get_span_context()
    assert not sc.is_valid


def test_f15_sdk_extract_keeps_a_valid_tracestate_and_drops_a_bad_one() -> None:
    def state(headers: dict[str, str]) -> str:
        return trace.get_current_span(extract(headers)).get_span_context().trace_state.to_header()

    assert state({"traceparent": TRACEPARENT, "tracestate": "a=1,b=2"}) == "a=1,b=2"
    assert state({"traceparent": TRACEPARENT, "tracestate": HUGE}) == ""
    assert state({"traceparent": TRACEPARENT, "tracestate": "a=1,a=2"}) == ""
    long_state = ",".join(f"k{i}=" + "v" * 40 for i in range(16))
    assert len(state({"traceparent": TRACEPARENT, "tracestate": long_state})) <= MAX_TRACESTATE


@pytest.fixture
def fast() -> Iterator[tuple[FastSpans, list[bytes]]]:
    shipped: list[bytes] = []

    def ship(document: bytes) -> bool:
        shipped.append(document)
        return True

    sample = sampler_from_env({})[0]
    assert sample is not None
    spans = FastSpans(ship, sample, schedule_delay_s=3600)  # shipped by hand below
    yield spans, shipped
    spans.shutdown()


def test_f15_fast_spans_hold_no_unbounded_header(fast: tuple[FastSpans, list[bytes]]) -> None:
    spans, shipped = fast
    for _ in range(200):
        rt = spans.begin({"traceparent": TRACEPARENT, "tracestate": HUGE, "Sandbus-Msg-Id": "m" * 100_000})
        assert rt is not None
        assert rt.trace_state is None
        spans.finish(rt, "sandbus.req.echo.f", "sandbus.echo", "m" * 100_000, 10, "echo", "1", "f",
                     rt.start_ns, rt.start_ns + 1, (1, 1, 0.001), None)
    rt = spans.begin({"traceparent": TRACEPARENT, "tracestate": "a=1,b=2"})
    assert rt is not None
    assert rt.trace_state == "a=1,b=2"
    spans.finish(rt, "sandbus.req.echo.f", "sandbus.echo", "m-1", 10, "echo", "1", "f", rt.start_ns,
                 rt.start_ns + 1, (1, 1, 0.001), None)
    spans.ship_pending()
    # 201 requests: before, each record carried its ~1 MB of tracestate and message id (200+ MB queued).
    assert sum(len(d) for d in shipped) < 201 * (MAX_MESSAGE_ID + 1024)
    posted: list[bytes] = []
    stream = io.BytesIO(b"".join(struct.pack(">I", len(d)) + d for d in shipped))
    serve(stream, SpanEncoder({"service.name": "n"}), _keep(posted), lambda _: None)
    states: set[str] = set()
    for data in posted:
        req = ExportTraceServiceRequest()
        req.ParseFromString(data)
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                states.update(s.trace_state for s in ss.spans)
                assert all(len(s.trace_state) <= MAX_TRACESTATE for s in ss.spans)
    assert states == {"", "a=1,b=2"}


def _keep(posted: list[bytes]) -> Callable[[bytes], bool]:
    """A ``send`` for serve() that keeps what it is given and reports it taken."""

    def send(data: bytes) -> bool:
        posted.append(data)
        return True

    return send


def test_f15_exporter_process_drops_an_oversized_tracestate() -> None:
    record = [TRACE, PARENT, "k=" + "v" * 5000, 1, 2, 10, 20, "s", "g", None, 1, "p", "1", "f", 11, 19,
              [1, 1, 0.001], None, None]
    (process, _execute) = SpanEncoder({"service.name": "n"}).spans(record)
    assert b"v" * 600 not in process


@pytest.fixture
async def traced_node(tmp_path: Path, plugins_dir: Path) -> Any:
    d = tmp_path / "plugins"
    d.mkdir()
    for ext in ("wasm", "toml"):
        shutil.copy(plugins_dir / f"echo.{ext}", d / f"echo.{ext}")
    (tmp_path / "policy.toml").write_text(POLICY)
    exporter = InMemorySpanExporter()
    tel = Telemetry("sandbus-node", "h5", enabled=True, export=False, set_global=False,
                    extra_processors=[SimpleSpanProcessor(exporter)])
    with NatsServer(jetstream=False) as server:
        node = Node.create(d, ConnectOptions.from_urls(server.url), policy=load_policy(tmp_path / "policy.toml"),
                           node_id="h5", telemetry=tel, inline_budget_s=None)
        node.manager.discover_and_load()
        await node.start()
        try:
            yield server, node, exporter
        finally:
            await node.stop()
            node.manager.close()


async def test_f15_a_node_traces_a_request_with_a_huge_tracestate_without_keeping_it(
        traced_node: tuple[NatsServer, Node, InMemorySpanExporter]) -> None:
    server, _node, exporter = traced_node
    async with await Client.connect(server.url) as c:
        for state, msg_id in ((HUGE, "m" * 50_000), ("a=1,b=2", "m-2")):  # within the 1 MB max payload
            reply = await c.nc.request("sandbus.req.echo.handle_request", b"[1]", timeout=5, headers={
                "traceparent": TRACEPARENT, "tracestate": state, "Sandbus-Msg-Id": msg_id})
            assert reply.data == b"[1]"

    def process_spans() -> list[ReadableSpan]:
        return [s for s in exporter.get_finished_spans() if s.name.startswith("process ")]

    deadline = time.monotonic() + 5
    while len(process_spans()) < 2:
        assert time.monotonic() < deadline, "the node did not trace both requests"
        # Polls without blocking the loop: a span may end in a callback on this loop or in a node thread.
        await asyncio.sleep(0.01)
    huge, normal = process_spans()
    for span in (huge, normal):
        assert span.parent is not None
        assert format(span.parent.span_id, "016x") == PARENT
        assert span.context is not None
        assert format(span.context.trace_id, "032x") == TRACE
    assert huge.context is not None
    assert normal.context is not None
    assert huge.context.trace_state.to_header() == ""
    assert normal.context.trace_state.to_header() == "a=1,b=2"
    assert huge.attributes is not None
    message_id = huge.attributes["messaging.message.id"]
    assert isinstance(message_id, str)
    assert len(message_id) == MAX_MESSAGE_ID


@pytest.mark.parametrize(("value", "valid"), [
    (TRACEPARENT, True),
    (TRACEPARENT.upper(), False),  # W3C: lower-case hex only
    (f"ff-{TRACE}-{PARENT}-01", False),  # version ff is invalid
    (f"00-{'0' * 32}-{PARENT}-01", False),  # all-zero trace id
    (f"00-{TRACE}-{'0' * 16}-01", False),  # all-zero parent id
    (f"00-{TRACE}-{PARENT}-01-extra", False),  # version 00 has exactly four fields
    (f"01-{TRACE}-{PARENT}-01-extra", True),  # a later version may add fields after a '-'
    (f"01-{TRACE}-{PARENT}-01extra", False),
    (f"00-{TRACE}-{PARENT}-0\uff11", False),  # a non-ASCII digit
])
def test_f15_traceparent_follows_w3c_like_the_opentelemetry_sdk(value: str, valid: bool) -> None:
    assert (parse_traceparent(value) is not None) is valid
    sc = trace.get_current_span(extract({"traceparent": value})).get_span_context()
    assert sc.is_valid is valid


@pytest.mark.parametrize("value", [
    "vendor@tenant=1", "1tenant@vendor=x", "a@1b=1", "a@b@c=1", "a=1,a=2", "a= 1", "a=1 , b=2", "a=é", "é=1",
    "*=1", "a*/_-=1", "a=1;b=2", ",".join(f"k{i}=v" for i in range(MAX_TRACESTATE_MEMBERS + 1)),
    ",".join(f"k{i}=v" for i in range(MAX_TRACESTATE_MEMBERS)), "a=1,\u00a0b=2",
])
def test_f15_tracestate_validity_agrees_with_the_opentelemetry_sdk(value: str) -> None:
    from opentelemetry.trace.span import TraceState

    ours = valid_tracestate(value)
    theirs = TraceState.from_header([value]).to_header() or None
    assert (ours is None) == (theirs is None)
    if ours is not None and theirs is not None:
        assert ours.replace(" ", "") == theirs.replace(" ", "")
