"""The exporter process of a node's request spans (see host/telemetry/fast_spans.py for why it exists).

The node writes batches to the process's stdin, each framed as a 4-byte big-endian length and an
orjson document ``{"requests": [record...], "latencies": [[plugin, seconds]...]}``. A record is:

    [trace_id_hex, parent_span_id_hex | null, tracestate | null, process_span_id, execute_span_id
     (the node's, so a reply can name its span; 0, 0: made here),
     start_ns, end_ns, subject, queue_group, message_id | null, body_size, plugin, version, function,
     execute_start_ns, execute_end_ns, [fuel, memory_bytes, seconds] | null,
     [error_type, message] | null, [[time_ns, event_name, {attributes}]...] | null]

The process encodes each record as a ``process`` CONSUMER span and an ``execute`` INTERNAL span,
posts them with the OTLP/HTTP exporter client the ``OTEL_*`` variables configure, and keeps
``sandbus.call.duration`` (the node's latency histogram: it sees every call's latency), exported as
OTLP metrics every ``OTEL_METRIC_EXPORT_INTERVAL`` when metrics are on (host/telemetry/config.py).
It exits when stdin closes, after exporting what it has: the node closing the pipe, or dying, ends it.

    python -m sandbus.host.telemetry.export '<resource attributes as JSON>'

Why the spans are encoded by hand (:class:`SpanEncoder`: host/telemetry/otlp_wire.py, and
host/sandbox/_native.c for the common shape) and not by the official encoder
(:class:`SdkSpanEncoder`: SDK ``ReadableSpan`` objects through
``opentelemetry-exporter-otlp-proto-common``'s ``encode_spans``), measured with
bench/bench_tracing.py: a node tracing every request vs one with tracing off, the wasm echo plugin,
c=64, 100-byte requests, 6 alternating 2 s runs per row, on a 2-core machine shared with other work
(protobuf 7.36 with its upb backend, opentelemetry 1.45). Two runs, beside a full test run on the same
two cores:

    encoder        off req/s  traced req/s  ratio  spans dropped by the node  exporter CPU a request
    hand-written   16,950     12,660        0.78x  6,772 of 298,916   (2.3%)  8 us
    official       13,404     13,099        0.99x  143,402 of 310,496 (46%)   104 us
    hand-written   18,614     14,216        0.83x  38,270 of 352,592  (11%)   8 us
    official       18,067     14,606        0.91x  158,806 of 370,838 (43%)   92 us

The hand-written row alone, on a quieter machine: 0.75x and 0.78x, nothing dropped. Five runs of both
with an earlier version of the shipping path: hand-written 0.77-0.87x, 6-8 us, 0-1.2% dropped;
official 0.74-0.92x, 82-106 us, 3-47% dropped.

The official encoder's ratio holds only because the node sheds what its exporter cannot take: at
~90 us of CPU a request, the exporter process needs more than a core of the two to keep up with the
node at full speed. It lost little (3%) only in a run where the busy machine held the node to ~8k
requests/s: about its ceiling here, roughly half the untraced rate. Encoding alone, 2048 requests in
one process: 1.7 us a request in C, 8.9 us in otlp_wire.py, 122 us with ``encode_spans``.
``SANDBUS_SPAN_ENCODER=sdk`` selects the official encoder anyway; the tests hold the two to the same
output.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import gc
import logging
import os
import queue
import random
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import orjson

from sandbus.host.telemetry import otlp_wire as wire
from sandbus.host.telemetry.config import metrics_configured
from sandbus.sdk.tracing import MAX_TRACESTATE, TRACER_NAME

__all__ = ["LATENCY_BOUNDS", "Encoder", "ExporterProcess", "LatencyHistogram", "SdkSpanEncoder", "SpanEncoder",
           "encoder_from_env", "main", "serve"]

log = logging.getLogger("sandbus.telemetry")

_frame = struct.Struct(">I")
_getrandbits = random.getrandbits
#: bounded caches of encoded constant parts (subjects come from clients: unbounded otherwise)
_CACHE_MAX = 4096
#: requests (two spans each) posted to the collector at once, at most
POST_RECORDS = 2048
#: the pipe to the exporter process (Linux caps it at /proc/sys/fs/pipe-max-size, 1 MiB by default)
_PIPE_BYTES = 1 << 20
#: the largest batch the process takes (a node's are far smaller: 512 requests of bounded fields)
_MAX_FRAME = 64 << 20
#: restart a dead exporter process at most this often
_RESTART_EVERY_S = 10.0


_encode_native: Callable[[list[Any], bytes, bytes, float], bytes | None] | None
try:
    from sandbus.host.sandbox._native import encode_request as _encode_native
except ImportError:  # not built: the Python encoder does every span (~8 us a request instead of ~1)
    _encode_native = None


class SpanEncoder:
    """Request records -> one ExportTraceServiceRequest, written directly (host/telemetry/otlp_wire.py;
    host/sandbox/_native.c for the common shape when it is built)."""

    def __init__(self, resource_attrs: Mapping[str, Any], *, native: bool = True) -> None:
        self._resource = wire.resource(resource_attrs)
        self._scope = wire.scope(TRACER_NAME)
        #: the common shape (no error, no audit event, no tracestate) in host/sandbox/_native.c when built
        self.native = native
        #: (subject, group, plugin, version, function) -> the constant parts of the two spans
        self._consts: dict[tuple[str, str, str, str, str], tuple[bytes, bytes]] = {}

    def request(self, records: list[list[Any]]) -> bytes:
        spans: list[bytes] = []
        for r in records:
            try:
                spans += self.spans(r)
            except Exception:  # one bad record must not lose the batch
                log.exception("could not encode a request record")
        return wire.export_request(self._resource, self._scope, spans)

    def _constants(self, key: tuple[str, str, str, str, str]) -> tuple[bytes, bytes]:
        subject, group, plugin, version, function = key
        if len(self._consts) >= _CACHE_MAX:
            self._consts.clear()
        consts = self._consts[key] = (
            wire.span_constant(f"process {subject}", wire.SPAN_KIND_CONSUMER, {
                "messaging.system": "nats", "messaging.destination.name": subject,
                "messaging.operation.name": "process", "messaging.operation.type": "process",
                "messaging.consumer.group.name": group}),
            wire.span_constant(f"execute {plugin}.{function}", wire.SPAN_KIND_INTERNAL, {
                "sandbus.plugin.name": plugin, "sandbus.plugin.version": version, "sandbus.function": function}),
        )
        return consts

    def spans(self, r: list[Any]) -> list[bytes]:
        """The two Span messages of a request, each framed as a ScopeSpans.spans field.

        Protobuf fields may come in any order, so everything constant for a (subject, group) or a
        (plugin, version, function) is one cached byte string, and per span only ids, times and a
        few numbers are encoded.
        """
        if not r[3]:  # the node leaves the span ids to us (0): nothing there needs them
            if type(r) is not list:
                r = list(r)
            r[3], r[4] = _getrandbits(64) or 1, _getrandbits(64) or 2
        key = (r[7], r[8], r[11], r[12], r[13])  # subject, group, plugin, version, function
        consts = self._consts.get(key)
        if consts is None:
            consts = self._constants(key)
        result = r[16]
        # The common shape in C: a reply, no error, no audit event, no tracestate.
        if (result is not None and r[17] is None and not r[18] and not r[2] and self.native
                and _encode_native is not None and type(r) is list):
            both = _encode_native(r, consts[0], consts[1], round(result[2] * 1e3, 3))
            if both is not None:
                return [both]
        (trace_hex, parent_hex, trace_state, process_sid, exec_sid, start, end, _, _, message_id,
         body_size, _, _, _, exec_start, exec_end, result, error, events) = r
        process_const, exec_const = consts
        if trace_state and len(trace_state) > MAX_TRACESTATE:  # the node bounds it; so does this process
            trace_state = None
        trace_id, process_id = bytes.fromhex(trace_hex), process_sid.to_bytes(8, "big")
        status, message = (wire.STATUS_ERROR, error[1][:256]) if error else (wire.STATUS_UNSET, "")
        process = wire.encode_span(
            trace_id, process_id, bytes.fromhex(parent_hex) if parent_hex else None, trace_state, process_const,
            start, end, {"messaging.message.body.size": body_size, "messaging.message.id": message_id or None},
            status=status, status_message=message, remote_parent=bool(parent_hex))
        attrs: dict[str, Any] = {}
        if result is not None:
            attrs = {"sandbus.fuel_consumed": result[0], "sandbus.memory_bytes": result[1],
                     "sandbus.duration_ms": round(result[2] * 1e3, 3), "sandbus.outcome": "ok"}
        if error is not None:
            attrs = {"sandbus.outcome": "error", "error.type": error[0]}
        execute = wire.encode_span(trace_id, exec_sid.to_bytes(8, "big"), process_id, trace_state, exec_const,
                                   exec_start, exec_end, attrs, events or (), status=status, status_message=message)
        return [wire.frame(2, process), wire.frame(2, execute)]


class SdkSpanEncoder:
    """Request records -> one ExportTraceServiceRequest, through the official encoder.

    The same spans as :class:`SpanEncoder`, built as SDK ``ReadableSpan`` objects and encoded by
    ``opentelemetry-exporter-otlp-proto-common``'s ``encode_spans``. Over ten times the CPU a request
    (module docstring), so it is not the default: ``SANDBUS_SPAN_ENCODER=sdk`` selects it (to measure,
    or to rule the hand-written encoder out), and the tests hold :class:`SpanEncoder` to its output.
    """

    def __init__(self, resource_attrs: Mapping[str, Any]) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import TraceFlags

        self._resource = Resource(dict(resource_attrs))
        self._scope = InstrumentationScope(TRACER_NAME)
        self._sampled = TraceFlags(TraceFlags.SAMPLED)

    def request(self, records: list[list[Any]]) -> bytes:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        spans: list[Any] = []
        for r in records:
            try:
                spans += self.spans(r)
            except Exception:  # one bad record must not lose the batch
                log.exception("could not encode a request record")
        data: bytes = encode_spans(spans).SerializeToString()
        return data

    def spans(self, r: list[Any]) -> list[Any]:
        """The ``process`` and ``execute`` ``ReadableSpan`` of one record."""
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind
        from opentelemetry.trace.span import TraceState
        from opentelemetry.trace.status import Status, StatusCode

        (trace_hex, parent_hex, trace_state, process_sid, exec_sid, start, end, subject, group, message_id,
         body_size, plugin, version, function, exec_start, exec_end, result, error, events) = r
        if trace_state and len(trace_state) > MAX_TRACESTATE:  # the node bounds it; so does this process
            trace_state = None
        state = TraceState.from_header([trace_state]) if trace_state else TraceState()
        trace_id = int(trace_hex, 16)
        sampled = self._sampled
        parent = SpanContext(trace_id, int(parent_hex, 16), True, sampled, state) if parent_hex else None
        process_ctx = SpanContext(trace_id, process_sid or _getrandbits(64) or 1, False, sampled, state)
        exec_ctx = SpanContext(trace_id, exec_sid or _getrandbits(64) or 2, False, sampled, state)
        status = Status(StatusCode.ERROR, error[1][:256]) if error else Status(StatusCode.UNSET)
        process_attrs: dict[str, Any] = {
            "messaging.system": "nats", "messaging.destination.name": subject,
            "messaging.operation.name": "process", "messaging.operation.type": "process",
            "messaging.consumer.group.name": group, "messaging.message.body.size": body_size}
        if message_id:
            process_attrs["messaging.message.id"] = message_id
        exec_attrs: dict[str, Any] = {"sandbus.plugin.name": plugin, "sandbus.plugin.version": version,
                                      "sandbus.function": function}
        if result is not None:
            exec_attrs.update({"sandbus.fuel_consumed": result[0], "sandbus.memory_bytes": result[1],
                               "sandbus.duration_ms": round(result[2] * 1e3, 3), "sandbus.outcome": "ok"})
        if error is not None:
            exec_attrs.update({"sandbus.outcome": "error", "error.type": error[0]})
        return [
            ReadableSpan(f"process {subject}", process_ctx, parent, self._resource, process_attrs,
                         kind=SpanKind.CONSUMER, status=status, start_time=start, end_time=end,
                         instrumentation_scope=self._scope),
            ReadableSpan(f"execute {plugin}.{function}", exec_ctx, process_ctx, self._resource, exec_attrs,
                         [Event(name, attrs, at) for at, name, attrs in events or ()], kind=SpanKind.INTERNAL,
                         status=status, start_time=exec_start, end_time=exec_end, instrumentation_scope=self._scope),
        ]


class Encoder(Protocol):
    """What :func:`serve` needs: request records -> one serialized ExportTraceServiceRequest."""

    def request(self, records: list[list[Any]]) -> bytes: ...


def encoder_from_env(resource_attrs: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Encoder:
    """``SANDBUS_SPAN_ENCODER``: ``wire`` (default: the hand-written encoder), or ``sdk`` (the official one)."""
    kind = (os.environ if env is None else env).get("SANDBUS_SPAN_ENCODER", "wire").strip().lower()
    if kind == "sdk":
        return SdkSpanEncoder(resource_attrs)
    if kind != "wire":
        log.warning("SANDBUS_SPAN_ENCODER=%r is neither 'wire' nor 'sdk': using 'wire'", kind[:64])
    return SpanEncoder(resource_attrs)


class ExporterProcess:
    """The node's side: starts ``python -m sandbus.host.telemetry.export`` and writes batches to it.

    A dead process is restarted (at most every ``restart_every_s``, 10 s by default); batches offered
    while it is down are refused, and the caller counts them as dropped.
    """

    def __init__(self, resource_attrs: Mapping[str, Any], *, restart_every_s: float = _RESTART_EVERY_S) -> None:
        self._args = [sys.executable, "-m", "sandbus.host.telemetry.export",
                      orjson.dumps(dict(resource_attrs)).decode()]
        self._restart_every_s = restart_every_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _start(self) -> None:
        self._started_at = time.monotonic()
        try:
            # Unbuffered: one batch is one write(2), the only point where the shipper lets go of the GIL
            # (and then waits up to a switch interval to get it back from the busy event loop).
            self._proc = subprocess.Popen(self._args, stdin=subprocess.PIPE, bufsize=0, env=os.environ.copy(),
                                          start_new_session=True)  # a Ctrl-C for the node is not one for it
        except OSError as e:
            log.warning("could not start the span exporter process: %s", e)
            self._proc = None
            return
        if self._proc.stdin is not None and hasattr(fcntl, "F_SETPIPE_SZ"):
            # A few batches of room (Linux's default pipe holds 64 KiB, half a 512-request batch): while
            # the exporter waits for a core on a busy machine, the shipper's write does not block and
            # the node's span queue does not fill up and drop.
            with contextlib.suppress(OSError):
                fcntl.fcntl(self._proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)

    def ship(self, document: bytes) -> bool:
        """Write one batch to the process; False when it is down (restarted here, at most every
        ``restart_every_s``)."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.returncode is not None:
                if time.monotonic() - self._started_at < self._restart_every_s:
                    return False
                if proc is not None:
                    log.warning("the span exporter process exited with %s: restarting it", proc.returncode)
                    if proc.stdin is not None:
                        with contextlib.suppress(OSError):
                            proc.stdin.close()
                self._start()
                proc = self._proc
            if proc is None or proc.stdin is None:
                return False
            data = memoryview(_frame.pack(len(document)) + document)
            try:
                while data:  # a blocking pipe takes it all at once unless a signal interrupts the write
                    written = proc.stdin.write(data)
                    if not written:
                        return False
                    data = data[written:]
            except OSError:  # EPIPE: it exited (noticed here, with no wait syscall on every batch)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(1.0)
                return False
            return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Close the pipe: the process exports what it has and exits (killed past ``timeout_s``)."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()


#: Call latency buckets, in seconds: plugin calls take microseconds to seconds (shared with the SDK
#: path's histogram in host/telemetry/otel.py, so both report the same buckets).
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                  5.0, 10.0)


class LatencyHistogram:
    """``sandbus.call.duration`` per plugin, aggregated here and exported as OTLP (cumulative).

    Why not the SDK's histogram: its ``record`` costs ~10 us a call on the reference machine, more
    than the rest of a traced request's export; adding to a bucket costs a bisect.
    """

    def __init__(self, resource_attrs: Mapping[str, Any]) -> None:
        self._resource_attrs = dict(resource_attrs)
        self._start_ns = time.time_ns()
        self._lock = threading.Lock()
        #: plugin -> [bucket counts, count, sum, min, max]
        self._points: dict[str, list[Any]] = {}

    def record(self, plugin: str, seconds: float) -> None:
        self.record_many([(plugin, seconds)])

    def record_many(self, samples: Iterable[tuple[str, float]]) -> None:
        """Add (plugin, seconds) samples: a batch at a time, the lock taken once."""
        points, bounds, buckets = self._points, LATENCY_BOUNDS, len(LATENCY_BOUNDS) + 1
        where = bisect.bisect_left
        with self._lock:
            for plugin, seconds in samples:
                point = points.get(plugin)
                if point is None:
                    point = points[plugin] = [[0] * buckets, 0, 0.0, seconds, seconds]
                point[0][where(bounds, seconds)] += 1
                point[1] += 1
                point[2] += seconds
                if seconds < point[3]:
                    point[3] = seconds
                elif seconds > point[4]:
                    point[4] = seconds

    def export_request(self) -> bytes | None:
        """The ExportMetricsServiceRequest of the histogram now; None before the first call."""
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
        from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
        from opentelemetry.proto.metrics.v1 import metrics_pb2 as pb
        from opentelemetry.proto.resource.v1.resource_pb2 import Resource

        with self._lock:
            points = {plugin: [list(p[0]), *p[1:]] for plugin, p in self._points.items()}
        if not points:
            return None
        now = time.time_ns()

        def kv(key: str, value: Any) -> KeyValue:
            if isinstance(value, bool):
                return KeyValue(key=key, value=AnyValue(bool_value=value))
            if isinstance(value, int):
                return KeyValue(key=key, value=AnyValue(int_value=value))
            if isinstance(value, float):
                return KeyValue(key=key, value=AnyValue(double_value=value))
            return KeyValue(key=key, value=AnyValue(string_value=str(value)))

        histogram = pb.Histogram(aggregation_temporality=pb.AGGREGATION_TEMPORALITY_CUMULATIVE, data_points=[
            pb.HistogramDataPoint(attributes=[kv("sandbus.plugin.name", plugin)], start_time_unix_nano=self._start_ns,
                                  time_unix_nano=now, count=count, sum=total, bucket_counts=buckets,
                                  explicit_bounds=LATENCY_BOUNDS, min=low, max=high)
            for plugin, (buckets, count, total, low, high) in points.items()])
        metric = pb.Metric(name="sandbus.call.duration", unit="s", description="plugin call latency",
                           histogram=histogram)
        request = ExportMetricsServiceRequest(resource_metrics=[pb.ResourceMetrics(
            resource=Resource(attributes=[kv(k, v) for k, v in self._resource_attrs.items()]),
            scope_metrics=[pb.ScopeMetrics(scope=InstrumentationScope(name=TRACER_NAME), metrics=[metric])],
        )])
        data: bytes = request.SerializeToString()
        return data


class Readable(Protocol):
    """A buffered binary stream (the process's stdin; ``io.BytesIO`` in tests)."""

    def read1(self, size: int = ..., /) -> bytes: ...


def _read_frames(stream: Readable) -> Iterator[Any]:
    """The decoded batches of ``stream`` until it ends.

    ``read1`` makes at most one read(2), taking whatever the pipe holds (up to its size): this thread
    gives up the GIL once per read, and waits for it back from the encoding thread once, rather than
    once for every frame header and body.
    """
    buf = b""
    while True:
        chunk = stream.read1(_PIPE_BYTES)
        if not chunk:
            return
        buf = buf + chunk if buf else chunk
        at = 0
        while len(buf) - at >= 4:
            (size,) = _frame.unpack_from(buf, at)
            if size > _MAX_FRAME:  # not a batch of the node's: the framing is lost, and so is the stream
                log.error("a span batch of %d bytes: giving up on the stream", size)
                return
            if len(buf) - at - 4 < size:
                break
            try:
                yield orjson.loads(memoryview(buf)[at + 4:at + 4 + size])
            except orjson.JSONDecodeError as e:  # the framing still holds: skip this batch only
                log.warning("a span batch that is not JSON: %s", e)
            at += 4 + size
        buf = buf[at:]


def serve(stream: Readable, encoder: Encoder, send: Callable[[bytes], bool],
          record_latencies: Callable[[list[tuple[str, float]]], None], *, post_records: int = POST_RECORDS,
          max_wait_s: float = 1.0) -> None:
    """Export every batch read from ``stream`` until it closes.

    Batches are posted together, up to ``post_records`` requests at a time: a POST costs ~1.5 ms of
    CPU here whatever its size (the HTTP client re-reads the environment for proxies, among other
    things), so fewer, larger posts cost less per span. Nothing waits longer than ``max_wait_s``.
    """
    frames: queue.Queue[Any] = queue.Queue(maxsize=64)  # bounded: a slow collector slows the node's shipper

    def read() -> None:
        for frame in _read_frames(stream):
            frames.put(frame)
        frames.put(None)

    threading.Thread(target=read, name="sandbus-span-read", daemon=True).start()
    pending: list[list[Any]] = []
    first_at = 0.0

    def post() -> None:
        if not pending:
            return
        try:
            if not send(encoder.request(pending)):
                log.warning("the collector refused %d spans", 2 * len(pending))
        except Exception as e:
            log.warning("span export failed: %s", e)
        pending.clear()

    while True:
        try:
            batch = frames.get(timeout=max(0.0, first_at + max_wait_s - time.monotonic()) if pending else None)
        except queue.Empty:
            post()
            continue
        if batch is None:
            post()
            return
        records = batch.get("requests") or []
        if records:
            if not pending:
                first_at = time.monotonic()
            pending += records
            if len(pending) >= post_records:
                post()
        latencies = [(r[11], r[16][2]) for r in records if r[16] is not None]
        latencies += batch.get("latencies") or ()
        record_latencies(latencies)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s span-export %(levelname)s %(message)s")
    # Batches are lists of scalars, freed by reference counting: the cyclic collector would only
    # rescan them (measurably, at thousands of records a second).
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    resource_attrs = orjson.loads(args[0]) if args else {}
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter()
    # The exporter's HTTP client (endpoint, headers, TLS, compression, retries) is internal to
    # opentelemetry-exporter-otlp-proto-http 1.x, whose major is pinned; tests/telemetry checks it.
    client_export = exporter._client.export

    def send(data: bytes) -> bool:
        return bool(getattr(client_export(data), "success", False))

    histogram = LatencyHistogram(resource_attrs)
    stop = threading.Event()
    metrics_thread: threading.Thread | None = None
    if metrics_configured():  # the same switch as the node's meters (host/telemetry/config.py)
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        metric_exporter = OTLPMetricExporter()
        metrics_export = metric_exporter._client.export  # the same pinned reliance as the span exporter
        try:
            interval_s = float(os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", "60000")) / 1000
        except ValueError:
            interval_s = 60.0

        def export_metrics() -> None:
            data = histogram.export_request()
            if data is not None:
                try:
                    metrics_export(data)
                except Exception as e:
                    log.warning("metric export failed: %s", e)

        def export_periodically() -> None:
            while not stop.wait(interval_s):
                export_metrics()
            export_metrics()  # the last values, at exit

        metrics_thread = threading.Thread(target=export_periodically, name="sandbus-metrics", daemon=True)
        metrics_thread.start()
    try:
        with open(sys.stdin.fileno(), "rb", closefd=False) as stdin:
            serve(stdin, encoder_from_env(resource_attrs), send, histogram.record_many)
    finally:
        stop.set()
        if metrics_thread is not None:
            metrics_thread.join(10)
        exporter.shutdown()  # type: ignore[no-untyped-call]
    return 0


if __name__ == "__main__":
    sys.exit(main())
