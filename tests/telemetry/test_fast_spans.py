"""The node's request spans without the SDK: what host/telemetry/otlp_wire.py writes must decode, with the
official opentelemetry-proto classes, to exactly the spans the SDK path produces."""

from __future__ import annotations

import io
import random
import struct
import threading
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

from sandbus.host.telemetry import otlp_wire as wire
from sandbus.host.telemetry.export import SpanEncoder, serve
from sandbus.host.telemetry.fast_spans import FastSpans, parse_traceparent, sampler_from_env

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


def _decode(data: bytes) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    req.ParseFromString(data)
    return req


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in kvs}


def _keep(posted: list[bytes]) -> Callable[[bytes], bool]:
    """A ``send`` for serve() that keeps what it is given and reports it taken."""

    def send(data: bytes) -> bool:
        posted.append(data)
        return True

    return send


def test_the_sdk_exporter_still_has_the_client_we_send_through() -> None:
    # host/telemetry/fast_spans.py posts through OTLPSpanExporter()._client.export (the exporter's own
    # endpoint, headers, TLS, compression and retries); the major version is pinned for it.
    exporter = OTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces")
    try:
        assert callable(exporter._client.export)
    finally:
        exporter.shutdown()  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("value", ["", "a", "é" * 300, 0, 1, 127, 128, 2**40, -1, -(2**63), 2**63 - 1, 0.5, -2.25,
                                   True, False, ["a", "b"], [1, 2]])
def test_any_value_of_every_type_decodes(value: Any) -> None:
    span = wire.encode_span(bytes(range(16)), bytes(range(8)), None, None,
                            wire.span_constant("x", wire.SPAN_KIND_INTERNAL, {"k": value}), 1, 2)
    decoded = Span()
    decoded.ParseFromString(span)
    got = decoded.attributes[0].value
    kind = got.WhichOneof("value")
    if isinstance(value, list):
        assert [getattr(v, v.WhichOneof("value")) for v in got.array_value.values] == value
    else:
        assert getattr(got, kind) == value
        assert kind == {bool: "bool_value", int: "int_value", float: "double_value", str: "string_value"}[type(value)]


def test_a_span_with_every_field_decodes() -> None:
    data = wire.encode_span(
        bytes.fromhex(TRACE), bytes.fromhex("00f067aa0ba902b7"), bytes.fromhex(PARENT), "congo=t61rcWkgMzE",
        wire.span_constant("process sandbus.req.echo.handle_request", wire.SPAN_KIND_CONSUMER,
                           {"messaging.system": "nats"}),
        1_700_000_000_000_000_001, 1_700_000_000_000_500_000,
        {"messaging.message.body.size": 100, "sandbus.duration_ms": 0.125},
        events=[(1_700_000_000_000_100_000, "audit.limit.fuel", {"audit.level": "warning", "audit.limit": 10})],
        status=wire.STATUS_ERROR, status_message="fuel exhausted", remote_parent=True)
    s = Span()
    s.ParseFromString(data)
    assert s.trace_id.hex() == TRACE
    assert s.span_id.hex() == "00f067aa0ba902b7"
    assert s.parent_span_id.hex() == PARENT
    assert s.trace_state == "congo=t61rcWkgMzE"
    assert s.name == "process sandbus.req.echo.handle_request"
    assert s.kind == Span.SPAN_KIND_CONSUMER
    assert (s.start_time_unix_nano, s.end_time_unix_nano) == (1_700_000_000_000_000_001, 1_700_000_000_000_500_000)
    assert _attrs(s.attributes) == {"messaging.system": "nats", "messaging.message.body.size": 100,
                                    "sandbus.duration_ms": 0.125}
    assert [(e.name, e.time_unix_nano, _attrs(e.attributes)) for e in s.events] == [
        ("audit.limit.fuel", 1_700_000_000_000_100_000, {"audit.level": "warning", "audit.limit": 10})]
    assert (s.status.code, s.status.message) == (2, "fuel exhausted")
    assert s.flags == 0x300  # has-is-remote + is-remote, as the SDK's encoder sets them


RESOURCE = {"service.name": "sandbus-node", "service.instance.id": "n1"}


def _spans(fast: FastSpans, shipped: list[bytes]) -> list[tuple[dict[str, Any], Span]]:
    """What the exporter process would post for what ``fast`` shipped, decoded by opentelemetry-proto."""
    fast.ship_pending()
    stream = io.BytesIO(b"".join(struct.pack(">I", len(d)) + d for d in shipped))
    posted: list[bytes] = []
    latencies: list[tuple[str, float]] = []
    serve(stream, SpanEncoder(RESOURCE), _keep(posted), latencies.extend)
    out: list[tuple[dict[str, Any], Span]] = []
    for data in posted:
        for rs in _decode(data).resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                assert ss.scope.name == "sandbus"
                out.extend((resource, s) for s in ss.spans)
    return out


@pytest.fixture
def fast() -> Any:
    shipped: list[bytes] = []

    def ship(document: bytes) -> bool:
        shipped.append(document)
        return True

    sample = sampler_from_env({})[0]
    assert sample is not None
    # The shipping thread sleeps for an hour: the tests ship by hand, when they are ready.
    spans = FastSpans(ship, sample, schedule_delay_s=3600)
    yield spans, shipped
    spans.shutdown()


def test_a_request_becomes_a_process_and_an_execute_span(fast: tuple[FastSpans, list[bytes]]) -> None:
    spans, shipped = fast
    rt = spans.begin({"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "k=v"})
    assert rt is not None
    spans.current, spans.current_thread = rt, threading.get_ident()
    assert spans.audit("audit.security.file_denied", {"audit.level": "critical"})
    spans.current = None
    spans.finish(rt, "sandbus.req.echo.handle_request", "sandbus.echo", "m-1", 100, "echo", "1.0.0",
                 "handle_request", rt.start_ns + 10, rt.start_ns + 20, (1234, 65536, 0.0000125), None)
    (res1, process), (res2, execute) = _spans(spans, shipped)
    assert res1 == res2 == RESOURCE
    assert process.trace_id.hex() == execute.trace_id.hex() == TRACE
    assert process.parent_span_id.hex() == PARENT
    assert execute.parent_span_id == process.span_id
    assert bytes(8) not in (process.span_id, execute.span_id)
    assert process.span_id != execute.span_id
    assert process.trace_state == execute.trace_state == "k=v"
    assert (process.name, process.kind) == ("process sandbus.req.echo.handle_request", Span.SPAN_KIND_CONSUMER)
    assert (execute.name, execute.kind) == ("execute echo.handle_request", Span.SPAN_KIND_INTERNAL)
    assert process.start_time_unix_nano <= execute.start_time_unix_nano < execute.end_time_unix_nano \
        <= process.end_time_unix_nano
    assert _attrs(process.attributes) == {
        "messaging.system": "nats", "messaging.destination.name": "sandbus.req.echo.handle_request",
        "messaging.operation.name": "process", "messaging.operation.type": "process",
        "messaging.consumer.group.name": "sandbus.echo", "messaging.message.id": "m-1",
        "messaging.message.body.size": 100}
    assert _attrs(execute.attributes) == {
        "sandbus.plugin.name": "echo", "sandbus.plugin.version": "1.0.0", "sandbus.function": "handle_request",
        "sandbus.fuel_consumed": 1234, "sandbus.memory_bytes": 65536, "sandbus.duration_ms": 0.013,
        "sandbus.outcome": "ok"}
    assert [e.name for e in execute.events] == ["audit.security.file_denied"]
    assert process.flags == 0x300
    assert execute.flags == 0x100
    assert process.status.code == execute.status.code == 0


def test_a_failed_call_marks_both_spans(fast: tuple[FastSpans, list[bytes]]) -> None:
    spans, shipped = fast
    rt = spans.begin(None)  # no parent: a new trace
    assert rt is not None
    spans.finish(rt, "sandbus.req.x.f", "sandbus.x", None, 2, "x", "1.0.0", "f", 1, 2, None,
                 ("limit.fuel", "fuel exhausted after 1000 units"))
    (_, process), (_, execute) = _spans(spans, shipped)
    assert process.parent_span_id == b""
    assert process.flags == 0x100
    assert len(process.trace_id) == 16
    assert process.trace_id != bytes(16)
    assert _attrs(execute.attributes)["error.type"] == "limit.fuel"
    assert _attrs(execute.attributes)["sandbus.outcome"] == "error"
    assert "messaging.message.id" not in _attrs(process.attributes)
    for s in (process, execute):
        assert (s.status.code, s.status.message) == (2, "fuel exhausted after 1000 units")


def test_an_audit_event_from_another_thread_does_not_attach(fast: tuple[FastSpans, list[bytes]]) -> None:
    spans, _ = fast
    rt = spans.begin(None)
    assert rt is not None
    spans.current, spans.current_thread = rt, -1
    assert not spans.audit("audit.x", {})
    assert rt.events is None


@pytest.mark.parametrize(("value", "expected"), [
    (f"00-{TRACE}-{PARENT}-01", (TRACE, PARENT, True)),
    (f"00-{TRACE}-{PARENT}-00", (TRACE, PARENT, False)),
    (f"01-{TRACE}-{PARENT}-01-future", (TRACE, PARENT, True)),
    (f"00-{TRACE}-{PARENT}-01-extra", None),  # version 00 has exactly four fields
    (f"ff-{TRACE}-{PARENT}-01", None),
    (f"00-{'0' * 32}-{PARENT}-01", None),
    (f"00-{TRACE}-{'0' * 16}-01", None),
    (f"00-{TRACE.upper()}-{PARENT}-01", None),
    (f"00-{TRACE[:-1]}g-{PARENT}-01", None),
    (f"00-{TRACE[:-2]} 1-{PARENT}-01", None),
    (f"00-{TRACE}-{PARENT}-0x", None),
    ("garbage", None), ("", None), (None, None),
])
def test_traceparent_is_parsed_like_the_w3c_propagator(value: str | None, expected: Any) -> None:
    assert parse_traceparent(value) == expected


def test_traceparent_parsing_agrees_with_the_sdk_propagator() -> None:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    sdk = TraceContextTextMapPropagator()
    rng = random.Random(3)
    for _ in range(300):
        tid, sid, flags = format(rng.getrandbits(128), "032x"), format(rng.getrandbits(64), "016x"), rng.choice(
            ["00", "01", "03", "zz"])
        value = f"00-{tid}-{sid}-{flags}"
        ctx = trace.get_current_span(sdk.extract({"traceparent": value})).get_span_context()
        ours = parse_traceparent(value)
        if not ctx.is_valid:
            assert ours is None
        else:
            assert ours == (tid, sid, ctx.trace_flags.sampled)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 1.0])
def test_ratio_sampling_agrees_with_the_sdk(ratio: float) -> None:
    ours = sampler_from_env({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": str(ratio)})[0]
    assert ours is not None
    sdk = TraceIdRatioBased(ratio)
    rng = random.Random(7)
    for _ in range(2000):
        tid = rng.getrandbits(128) or 1
        expected = sdk.should_sample(None, tid, "x").decision.is_sampled()  # type: ignore[no-untyped-call]
        assert ours(None, format(tid, "032x")) == expected


def test_parent_based_sampling_follows_the_parent_flag() -> None:
    ours = sampler_from_env({"OTEL_TRACES_SAMPLER": "parentbased_always_off"})[0]
    assert ours is not None
    assert ours((TRACE, PARENT, True), TRACE) is True
    assert ours((TRACE, PARENT, False), TRACE) is False
    assert ours(None, TRACE) is False


def test_configurations_it_does_not_reproduce_go_to_the_sdk() -> None:
    assert FastSpans.from_env({}, env={"OTEL_TRACES_EXPORTER": "console"})[0] is None
    assert FastSpans.from_env({}, env={"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})[0] is None
    fast, why = FastSpans.from_env({}, env={"OTEL_TRACES_SAMPLER": "jaeger_remote"})
    assert fast is None
    assert "jaeger_remote" in why


def test_the_latency_histogram_exports_every_call_in_its_bucket() -> None:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    from sandbus.host.telemetry.export import LATENCY_BOUNDS, LatencyHistogram

    exporter = OTLPMetricExporter(endpoint="http://127.0.0.1:9/v1/metrics")
    assert callable(exporter._client.export)  # what the exporter process posts through
    histogram = LatencyHistogram(RESOURCE)
    assert histogram.export_request() is None
    samples = {"echo": [0.00005, 0.0001, 0.0003, 0.0003, 2.0, 50.0], "text": [0.001]}
    for plugin, values in samples.items():
        for v in values:
            histogram.record(plugin, v)
    req = ExportMetricsServiceRequest()
    data = histogram.export_request()
    assert data is not None
    req.ParseFromString(data)
    (rm,) = req.resource_metrics
    assert _attrs(rm.resource.attributes) == RESOURCE
    (metric,) = rm.scope_metrics[0].metrics
    assert (metric.name, metric.unit) == ("sandbus.call.duration", "s")
    points = {_attrs(p.attributes)["sandbus.plugin.name"]: p for p in metric.histogram.data_points}
    assert set(points) == set(samples)
    echo = points["echo"]
    assert list(echo.explicit_bounds) == list(LATENCY_BOUNDS)
    assert echo.count == 6
    assert sum(echo.bucket_counts) == 6
    assert echo.bucket_counts[0] == 2  # upper bounds are inclusive: 0.0001 counts in the first bucket
    assert echo.bucket_counts[LATENCY_BOUNDS.index(0.0005)] == 2
    assert echo.bucket_counts[-1] == 1  # above the last bound
    assert (echo.min, echo.max) == (0.00005, 50.0)
    assert echo.sum == pytest.approx(sum(samples["echo"]))
    assert metric.histogram.aggregation_temporality == 2  # cumulative


def test_the_compiled_encoder_writes_the_same_bytes_as_the_python_one() -> None:
    from sandbus.host.telemetry.export import _encode_native

    assert _encode_native is not None, "host/sandbox/_native.c is not built"
    rng = random.Random(11)
    records = []
    for i in range(200):
        parent = format(rng.getrandbits(64) or 1, "016x") if i % 2 else None
        result = [rng.getrandbits(rng.choice([1, 20, 40])), rng.getrandbits(30), rng.random() / 100]
        records.append([format(rng.getrandbits(128) or 1, "032x"), parent, None, rng.getrandbits(64) or 1,
                        rng.getrandbits(64) or 2, 1_700_000_000_000_000_000 + i, 1_700_000_000_000_900_000 + i,
                        f"sandbus.req.p{i % 3}.f", f"sandbus.p{i % 3}", None if i % 3 else f"m-{i}" * (i % 50),
                        rng.getrandbits(16), f"p{i % 3}", "1.2.3", "f", 1_700_000_000_000_100_000 + i,
                        1_700_000_000_000_800_000 + i, result, None, None])
    native, python = SpanEncoder(RESOURCE, native=True), SpanEncoder(RESOURCE, native=False)
    for r in records:
        assert b"".join(native.spans(r)) == b"".join(python.spans(r))
    assert native.request(records) == python.request(records)
    # the uncommon shapes go to the Python encoder in both
    odd = [*records[0][:17], ["limit.fuel", "out of fuel"], [[1, "audit.x", {"a": 1}]]]
    assert native.spans(odd) == python.spans(odd)
