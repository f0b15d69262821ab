"""The span exporter process: what it posts is OTLP the official classes decode, to the spans the node
recorded, with either encoder; the hand-written encoder writes what the official one writes; batches
survive any split of the pipe's reads; a dead process is restarted; the telemetry package is one
package with a lazy public face and no import of the node."""

from __future__ import annotations

import ast
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

import sandbus.host.telemetry as telemetry
from sandbus.host.telemetry.export import (
    ExporterProcess,
    SdkSpanEncoder,
    SpanEncoder,
    _encode_native,
    encoder_from_env,
    serve,
)
from sandbus.host.telemetry.fast_spans import FastSpans, sampler_from_env

ROOT = Path(__file__).resolve().parents[2]
RESOURCE = {"service.name": "sandbus-node", "service.instance.id": "n1"}
TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in kvs}


class Collector:
    """An OTLP/HTTP receiver on 127.0.0.1 keeping every trace export it is sent, decoded."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    req = ExportTraceServiceRequest()
                    req.ParseFromString(body)  # raises (and the test sees no spans) unless it is valid OTLP
                    with collector.lock:
                        collector.requests.append(req)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def spans(self) -> list[tuple[dict[str, Any], str, Span]]:
        """(resource attributes, scope name, span) of everything received."""
        with self.lock:
            return [(_attrs(rs.resource.attributes), ss.scope.name, s) for req in self.requests
                    for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


@pytest.mark.parametrize("encoder", ["wire", "sdk"])
def test_the_exporter_process_posts_the_recorded_spans_as_otlp(encoder: str, collector: Collector,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{collector.url}/v1/traces")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    monkeypatch.setenv("SANDBUS_SPAN_ENCODER", encoder)
    process = ExporterProcess(RESOURCE)
    sample = sampler_from_env({})[0]
    assert sample is not None
    fast = FastSpans(process.ship, sample, schedule_delay_s=3600, on_close=process.close)
    try:
        ok = fast.begin({"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "k=v"})
        assert ok is not None
        fast.finish(ok, "sandbus.req.echo.handle_request", "sandbus.echo", "m-1", 100, "echo", "1.0.0",
                    "handle_request", ok.start_ns + 10, ok.start_ns + 20, (1234, 65536, 0.0000125), None)
        failed = fast.begin(None)  # a new trace
        assert failed is not None
        failed.events = [(failed.start_ns + 15, "audit.limit.fuel", {"audit.level": "warning", "audit.limit": 7})]
        fast.finish(failed, "sandbus.req.x.f", "sandbus.x", None, 2, "x", "2.0.0", "f", failed.start_ns + 10,
                    failed.start_ns + 20, None, ("limit.fuel", "fuel exhausted"))
        fast.ship_pending()
        assert fast.shipped == 4
    finally:
        fast.shutdown()  # closes the pipe: the process posts what it has and exits
    assert process.pid is None
    spans = collector.spans()
    assert {(res["service.instance.id"], scope) for res, scope, _ in spans} == {("n1", "sandbus")}
    by_name = {s.name: s for _, _, s in spans}
    assert set(by_name) == {"process sandbus.req.echo.handle_request", "execute echo.handle_request",
                            "process sandbus.req.x.f", "execute x.f"}
    process_ok, execute_ok = by_name["process sandbus.req.echo.handle_request"], by_name["execute echo.handle_request"]
    assert process_ok.trace_id.hex() == execute_ok.trace_id.hex() == TRACE
    assert process_ok.parent_span_id.hex() == PARENT
    assert execute_ok.parent_span_id == process_ok.span_id
    assert len(process_ok.span_id) == len(execute_ok.span_id) == 8
    assert process_ok.span_id != execute_ok.span_id
    assert process_ok.trace_state == execute_ok.trace_state == "k=v"
    assert (process_ok.kind, execute_ok.kind) == (Span.SPAN_KIND_CONSUMER, Span.SPAN_KIND_INTERNAL)
    assert _attrs(process_ok.attributes) == {
        "messaging.system": "nats", "messaging.destination.name": "sandbus.req.echo.handle_request",
        "messaging.operation.name": "process", "messaging.operation.type": "process",
        "messaging.consumer.group.name": "sandbus.echo", "messaging.message.body.size": 100,
        "messaging.message.id": "m-1"}
    assert _attrs(execute_ok.attributes) == {
        "sandbus.plugin.name": "echo", "sandbus.plugin.version": "1.0.0", "sandbus.function": "handle_request",
        "sandbus.fuel_consumed": 1234, "sandbus.memory_bytes": 65536, "sandbus.duration_ms": 0.013,
        "sandbus.outcome": "ok"}
    assert (process_ok.flags, execute_ok.flags) == (0x300, 0x100)
    process_bad, execute_bad = by_name["process sandbus.req.x.f"], by_name["execute x.f"]
    assert process_bad.trace_id == execute_bad.trace_id
    assert process_bad.trace_id.hex() not in (TRACE, "0" * 32)
    assert process_bad.parent_span_id == b""
    assert execute_bad.parent_span_id == process_bad.span_id
    assert _attrs(execute_bad.attributes)["error.type"] == "limit.fuel"
    assert [(e.name, _attrs(e.attributes)) for e in execute_bad.events] == [
        ("audit.limit.fuel", {"audit.level": "warning", "audit.limit": 7})]
    for s in (process_bad, execute_bad):
        assert (s.status.code, s.status.message) == (2, "fuel exhausted")


def test_a_dead_exporter_process_is_restarted(collector: Collector, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{collector.url}/v1/traces")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    process = ExporterProcess(RESOURCE, restart_every_s=0.0)
    first = process.pid
    assert first is not None
    record = _records(1, seed=1)[0]
    document = FastSpans.batch_document([tuple(record)], [])
    try:
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        # a zombie until reaped: its end of the pipe is closed once it is one
        while Path(f"/proc/{first}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the killed exporter process did not die"
            time.sleep(0.01)
        assert not process.ship(document)  # the broken pipe: refused, and the death noticed
        assert not Path(f"/proc/{first}").exists()  # reaped
        assert process.ship(document)  # a new process took it
        assert process.pid not in (None, first)
    finally:
        process.close()
    spans = collector.spans()
    assert {s.trace_id.hex() for _, _, s in spans} == {record[0]}
    assert len(spans) == 2


def _records(n: int, seed: int) -> list[list[Any]]:
    """Request records as the node queues them (fast_spans.FastSpans.finish), in every shape."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        failed = i % 5 == 0
        records.append([
            format(rng.getrandbits(128) or 1, "032x"), format(rng.getrandbits(64) or 1, "016x") if i % 2 else None,
            "a=1,b=2" if i % 3 == 0 else None, rng.getrandbits(64) or 1, rng.getrandbits(64) or 2,
            1_700_000_000_000_000_000 + i, 1_700_000_000_000_900_000 + i, f"sandbus.req.p{i % 3}.f",
            f"sandbus.p{i % 3}", None if i % 4 else f"m-{i}" * (i % 40), rng.getrandbits(16), f"p{i % 3}", "1.2.3",
            "f", 1_700_000_000_000_100_000 + i, 1_700_000_000_000_800_000 + i,
            None if failed else [rng.getrandbits(rng.choice([1, 20, 40])), rng.getrandbits(30), rng.random() / 100],
            ["limit.fuel", "out of fuel"] if failed else None,
            [[1_700_000_000_000_200_000, "audit.x", {"audit.level": "info", "n": 3, "f": 0.5, "b": True}]]
            if i % 7 == 0 else None])
    return records


def _decoded(data: bytes) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    req.ParseFromString(data)
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            for s in ss.spans:
                if not s.status.code and not s.status.message:
                    s.ClearField("status")  # the official encoder writes an empty Status, ours none: same value
    return req


@pytest.mark.parametrize("native", [True, False])
def test_the_hand_written_encoder_writes_what_the_official_one_writes(native: bool) -> None:
    if native:
        assert _encode_native is not None, "host/sandbox/_native.c is not built"
    records = _records(300, seed=5)
    ours = _decoded(SpanEncoder(RESOURCE, native=native).request(records))
    official = _decoded(SdkSpanEncoder(RESOURCE).request(records))
    assert len(official.resource_spans[0].scope_spans[0].spans) == 600
    assert ours == official


class Trickle:
    """A stream whose reads return at most ``step`` bytes: frames arrive split anywhere, as from a pipe."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.at = data, step, 0

    def read1(self, size: int = -1, /) -> bytes:
        n = self.step if size < 0 else min(size, self.step)
        chunk = self.data[self.at:self.at + n]
        self.at += len(chunk)
        return chunk


@pytest.mark.parametrize("step", [1, 3, 7, 4096, 1 << 20])
def test_batches_split_across_reads_are_put_back_together(step: int) -> None:
    records = _records(40, seed=9)
    documents = [FastSpans.batch_document([tuple(r) for r in records[i:i + 10]], [("p0", 0.5)])
                 for i in range(0, 40, 10)]
    documents.insert(2, b"{not json")  # a broken batch costs itself only
    stream = Trickle(b"".join(struct.pack(">I", len(d)) + d for d in documents), step)
    posted: list[bytes] = []
    latencies: list[tuple[str, float]] = []

    def send(data: bytes) -> bool:
        posted.append(data)
        return True

    serve(stream, SpanEncoder(RESOURCE), send, latencies.extend)
    trace_ids = [s.trace_id.hex() for data in posted for rs in _decoded(data).resource_spans
                 for ss in rs.scope_spans for s in ss.spans]
    assert sorted(trace_ids) == sorted(r[0] for r in records for _ in range(2))
    assert [tuple(x) for x in latencies].count(("p0", 0.5)) == 4  # the batches' own, besides the calls'


def test_a_batch_header_beyond_any_batch_ends_the_stream_after_what_came_before() -> None:
    (record,) = _records(1, seed=2)
    document = FastSpans.batch_document([tuple(record)], [])
    data = struct.pack(">I", len(document)) + document + struct.pack(">I", 1 << 30) + b"x" * 100
    posted: list[bytes] = []

    def send(data: bytes) -> bool:
        posted.append(data)
        return True

    serve(Trickle(data, 1 << 20), SpanEncoder(RESOURCE), send, lambda _: None)  # returns: nothing waits for 1 GiB
    assert [s.trace_id.hex() for data in posted for s in _decoded(data).resource_spans[0].scope_spans[0].spans] \
        == [record[0], record[0]]


def test_the_encoder_comes_from_the_environment() -> None:
    assert isinstance(encoder_from_env(RESOURCE, {}), SpanEncoder)
    assert isinstance(encoder_from_env(RESOURCE, {"SANDBUS_SPAN_ENCODER": "SDK "}), SdkSpanEncoder)
    assert isinstance(encoder_from_env(RESOURCE, {"SANDBUS_SPAN_ENCODER": "bogus"}), SpanEncoder)


def test_telemetry_exports_its_public_names_sorted() -> None:
    assert telemetry.__all__ == sorted(telemetry.__all__)
    from sandbus.host.telemetry import config, export, fast_spans, otel

    for name in telemetry.__all__:
        assert any(getattr(telemetry, name) is getattr(m, name, None)
                   for m in (config, export, fast_spans, otel)), name
    assert {"Telemetry", "FastSpans", "RequestTrace", "ExporterProcess", "SpanEncoder"} <= set(telemetry.__all__)


def test_no_telemetry_module_imports_the_node() -> None:
    for path in sorted((ROOT / "host" / "telemetry").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else []
            for target in targets:
                assert not target.startswith("sandbus.host.node"), f"{path.name} imports {target}"


def test_importing_telemetry_loads_none_of_its_modules() -> None:
    # The exporter process runs ``export`` as __main__: a package that imported it eagerly would load it
    # twice, and one that imported otel would load the SDK setup and the sandbox it never uses.
    code = "import sys, sandbus.host.telemetry; print(sorted(m for m in sys.modules if 'telemetry.' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_the_exporter_process_runs_as_a_module_without_warnings() -> None:
    run = subprocess.run([sys.executable, "-W", "error", "-m", "sandbus.host.telemetry.export", "{}"],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "OTEL_METRICS_EXPORTER": "none"})
    assert run.returncode == 0, run.stderr  # stdin closed at once: nothing to export, a clean exit
    assert run.stderr == ""
