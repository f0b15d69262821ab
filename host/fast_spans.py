"""The node's request spans (``process`` + ``execute``) recorded without the OpenTelemetry SDK.

Why: with the SDK, a span costs ~28 us to build and ~100 us to encode on this project's reference
machine, so a node tracing every request served a seventh of its untraced rate
(bench/bench_bus.py). A request served inline on the event loop has a fixed shape, so the node
records it as one tuple (ids, times, a few numbers: a few microseconds) and a background thread
encodes batches with host/otlp_wire.py and sends them through the SDK's own OTLP/HTTP exporter
client -- the same endpoint, headers, TLS, compression, timeout and retries the ``OTEL_*``
variables configure for every other span.

What stays on the SDK: calls that run in worker threads (their host functions publish and need
the current span), JetStream deliveries (links to the original message), ``sandbus trace``,
audit-only spans, and every configuration this module does not reproduce exactly (an exporter
other than OTLP/HTTP, a sampler other than the standard ones). :meth:`FastSpans.from_env` says why
it declines, and the node then uses the SDK for everything.

Sampling follows ``OTEL_TRACES_SAMPLER``/``_ARG`` with the SDK's rules: parent-based samplers obey
the ``sampled`` flag of the incoming ``traceparent``; ``traceidratio`` compares the low 64 bits of
the trace id with ``round(ratio * 2**64)``. Like the SDK's batch processor, spans beyond
``OTEL_BSP_MAX_QUEUE_SIZE`` waiting for export are dropped (and counted), never the requests.
"""

from __future__ import annotations

import logging
import os
import random
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from sdk.tracing import TRACER_NAME

from . import otlp_wire as wire

__all__ = ["FastSpans", "RequestTrace", "parse_traceparent"]

log = logging.getLogger("sandbus.telemetry")

_ZERO_TRACE = bytes(16)
_getrandbits = random.getrandbits
_time_ns = time.time_ns
_ZERO_SPAN = bytes(8)
_LIMIT_64 = (1 << 64) - 1
_pack_q = struct.Struct("<Q").pack
_K_BODY_SIZE = wire.key_field("messaging.message.body.size")
_K_MESSAGE_ID = wire.key_field("messaging.message.id")
_K_FUEL = wire.key_field("sandbus.fuel_consumed")
_K_MEMORY = wire.key_field("sandbus.memory_bytes")
_K_DURATION = wire.key_field("sandbus.duration_ms")
_K_ERROR_TYPE = wire.key_field("error.type")
_OUTCOME_OK = wire.attributes(9, {"sandbus.outcome": "ok"})
_OUTCOME_ERROR = wire.attributes(9, {"sandbus.outcome": "error"})
_FLAGS_LOCAL = wire.flags_field(remote_parent=False)
_FLAGS_REMOTE = wire.flags_field(remote_parent=True)
#: bounded caches of encoded constant parts (subjects come from clients: unbounded otherwise)
_CACHE_MAX = 4096


def parse_traceparent(value: str | None) -> tuple[bytes, bytes, bool] | None:
    """(trace id, parent span id, sampled) of a W3C ``traceparent``; None when absent or invalid."""
    if not value or len(value) < 55 or value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    version = value[:2]
    if version == "ff" or (version == "00" and len(value) != 55) or (len(value) > 55 and value[55] != "-"):
        return None
    head = value[:55]
    if head != head.lower():
        return None
    try:
        int(version, 16)
        trace_id, span_id, flags = bytes.fromhex(value[3:35]), bytes.fromhex(value[36:52]), int(value[53:55], 16)
    except ValueError:
        return None
    if len(trace_id) != 16 or len(span_id) != 8 or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, bool(flags & 1)


def _sampler(env: Mapping[str, str]) -> tuple[Callable[[tuple[bytes, bytes, bool] | None, bytes], bool] | None, str]:
    """The configured sampler as ``(parent, trace id) -> sampled``, or (None, why) if not reproduced here."""
    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    ratio = 1.0
    if name.endswith("traceidratio"):
        try:
            ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
        except ValueError:
            ratio = 1.0  # the SDK's fallback too
        if not 0.0 <= ratio <= 1.0:
            return None, f"sampler ratio {ratio} out of range"
    bound = round(ratio * (_LIMIT_64 + 1))

    def by_ratio(trace_id: bytes) -> bool:
        return int.from_bytes(trace_id[8:], "big") < bound

    root: Callable[[bytes], bool]
    if name in ("always_on", "parentbased_always_on"):
        root = _always
    elif name in ("always_off", "parentbased_always_off"):
        root = _never
    elif name in ("traceidratio", "parentbased_traceidratio"):
        root = by_ratio
    else:
        return None, f"sampler {name!r} is only available through the SDK"
    if name.startswith("parentbased_"):
        def parent_based(parent: tuple[bytes, bytes, bool] | None, trace_id: bytes) -> bool:
            return parent[2] if parent is not None else root(trace_id)

        return parent_based, ""

    def plain(parent: tuple[bytes, bytes, bool] | None, trace_id: bytes) -> bool:
        return root(trace_id)

    return plain, ""


def _always(trace_id: bytes) -> bool:
    return True


def _never(trace_id: bytes) -> bool:
    return False


class RequestTrace:
    """One traced request while it runs: its ids, start, and the audit events raised during the call.

    Ids stay ints here (bytes are made by the export thread): this object is built on the request path.
    """

    __slots__ = ("events", "exec_id", "parent", "process_id", "start_ns", "trace_id", "trace_state")

    def __init__(self, trace_id: bytes, parent: tuple[bytes, bytes, bool] | None, trace_state: str | None,
                 start_ns: int) -> None:
        self.trace_id = trace_id
        self.parent = parent
        self.trace_state = trace_state
        self.start_ns = start_ns
        # Never the all-zero (invalid) id, as the SDK's generator.
        self.process_id = _getrandbits(64) or 1
        self.exec_id = _getrandbits(64) or 2
        self.events: list[tuple[int, str, dict[str, Any]]] | None = None


class FastSpans:
    """Records request spans and exports them in batches from a background thread.

    Parameters:
        resource_attrs: the node's resource (``service.name``, ``service.instance.id``...).
        send: posts one encoded ExportTraceServiceRequest; returns whether it was accepted.
        sample: ``(parent, trace id) -> sampled`` (see :func:`_sampler`).
        on_call: told ``(plugin, seconds)`` of each exported call (the latency histogram), off the request path.
    """

    def __init__(self, resource_attrs: Mapping[str, Any], send: Callable[[bytes], bool],
                 sample: Callable[[tuple[bytes, bytes, bool] | None, bytes], bool], *,
                 schedule_delay_s: float = 5.0, max_batch: int = 512, max_queue: int = 2048,
                 on_call: Callable[[str, float], None] | None = None, on_close: Callable[[], None] | None = None
                 ) -> None:
        self._resource = wire.resource(resource_attrs)
        self._scope = wire.scope(TRACER_NAME)
        self._send = send
        self.sample = sample
        self._delay = schedule_delay_s
        self._batch = max_batch
        self._max_queue = max_queue
        self._on_call = on_call
        self._on_close = on_close
        self._queue: deque[tuple[Any, ...]] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self.dropped = 0
        self.exported = 0
        self.failed_exports = 0
        self._process_const: dict[tuple[str, str], bytes] = {}
        self._exec_const: dict[tuple[str, str, str], bytes] = {}
        #: the request whose call is running inline on the event loop (audit events attach to it)
        self.current: RequestTrace | None = None
        self.current_thread = 0
        self._thread = threading.Thread(target=self._run, name="sandbus-span-export", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls, resource_attrs: Mapping[str, Any], *, on_call: Callable[[str, float], None] | None = None,
                 env: Mapping[str, str] | None = None) -> tuple[FastSpans | None, str]:
        """Built from the ``OTEL_*`` variables, or (None, why) when the SDK must do the work."""
        env = os.environ if env is None else env
        exporter_kind = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
        if exporter_kind != "otlp":
            return None, f"OTEL_TRACES_EXPORTER={exporter_kind}"
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL",
                                                                             "http/protobuf")
        if protocol != "http/protobuf":
            return None, f"OTLP protocol {protocol}"
        sample, why = _sampler(env)
        if sample is None:
            return None, why
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
        # The exporter's HTTP client (endpoint, headers, TLS, compression, retries) is internal to
        # opentelemetry-exporter-otlp-proto-http 1.x, whose major is pinned; tests/telemetry checks it.
        client_export = getattr(getattr(exporter, "_client", None), "export", None)
        if not callable(client_export):
            exporter.shutdown()  # type: ignore[no-untyped-call]
            return None, "the OTLP/HTTP exporter has no _client.export (opentelemetry-exporter-otlp-proto-http changed)"

        def send(data: bytes) -> bool:
            return bool(getattr(client_export(data), "success", False))

        def number(name: str, default: float) -> float:
            try:
                return float(env.get(name, default))
            except ValueError:
                return default

        return cls(resource_attrs, send, sample, schedule_delay_s=number("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000,
                   max_batch=int(number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)),
                   max_queue=int(number("OTEL_BSP_MAX_QUEUE_SIZE", 2048)), on_call=on_call,
                   on_close=lambda: exporter.shutdown()), ""  # type: ignore[no-untyped-call]

    # -- request path (event loop thread) ------------------------------------------------------------

    def begin(self, headers: Mapping[str, str] | None) -> RequestTrace | None:
        """Start tracing a request, or None when the sampler says no (then nothing more is recorded)."""
        start = _time_ns()
        parent = parse_traceparent(headers.get("traceparent")) if headers else None
        trace_id = parent[0] if parent is not None else (random.getrandbits(128) or 1).to_bytes(16, "big")
        if not self.sample(parent, trace_id):
            return None
        state = headers.get("tracestate") if headers and parent is not None else None
        return RequestTrace(trace_id, parent, state, start)

    def finish(self, rt: RequestTrace, subject: str, group: str, message_id: str | None, body_size: int,
               plugin: str, version: str, function: str, exec_start_ns: int, exec_end_ns: int,
               result: tuple[int, int, float] | None, error: tuple[str, str] | None) -> None:
        """Queue the request's two spans for export.

        ``result``: (fuel, memory, seconds) of a call that returned; ``error``: (error.type, message).
        """
        queue = self._queue
        if len(queue) >= self._max_queue:
            self.dropped += 2
            return
        queue.append((rt, _time_ns(), subject, group, message_id, body_size, plugin, version, function,
                      exec_start_ns, exec_end_ns, result, error))
        if len(queue) == self._batch:
            self._wake.set()

    def audit(self, name: str, attrs: dict[str, Any]) -> bool:
        """Attach an audit event to the request running inline on this thread, if there is one."""
        rt = self.current
        if rt is None or threading.get_ident() != self.current_thread:
            return False
        if rt.events is None:
            rt.events = []
        rt.events.append((time.time_ns(), name, attrs))
        return True

    # -- export (background thread) -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self._delay)
            self._wake.clear()
            self._export_pending()
            if self._stopping:
                return

    def _export_pending(self) -> None:
        queue = self._queue
        while queue:
            records: list[tuple[Any, ...]] = []
            while queue and len(records) < self._batch:
                records.append(queue.popleft())
            spans: list[bytes] = []
            for r in records:
                try:
                    spans += self._encode(r)
                except Exception:  # a bug of ours must not kill the export thread
                    log.exception("could not encode a request span")
            data = wire.export_request_framed(self._resource, self._scope, spans)
            try:
                ok = self._send(data)
            except Exception as e:
                log.warning("span export failed: %s", e)
                ok = False
            if ok:
                self.exported += len(spans)
            else:
                self.failed_exports += 1
            if self._on_call is not None:
                for r in records:
                    if r[11] is not None:
                        self._on_call(r[6], r[11][2])

    def _encode(self, r: tuple[Any, ...]) -> list[bytes]:
        """The two Span messages of a request, each already framed as a ScopeSpans.spans field.

        Protobuf fields may come in any order, so everything constant for a (subject, group) or a
        (plugin, version, function) is one cached byte string, and per span only ids, times and a
        few numbers are encoded.
        """
        (rt, end, subject, group, message_id, body_size, plugin, version, function, exec_start, exec_end,
         result, error) = r
        process_const = self._process_const.get((subject, group))
        if process_const is None:
            process_const = self._cache(self._process_const, (subject, group), wire.span_name(f"process {subject}")
                                        + bytes((0x30, wire.SPAN_KIND_CONSUMER)) + wire.attributes(9, {
                                            "messaging.system": "nats", "messaging.destination.name": subject,
                                            "messaging.operation.name": "process",
                                            "messaging.operation.type": "process",
                                            "messaging.consumer.group.name": group}))
        exec_const = self._exec_const.get((plugin, version, function))
        if exec_const is None:
            exec_const = self._cache(self._exec_const, (plugin, version, function),
                                     wire.span_name(f"execute {plugin}.{function}")
                                     + bytes((0x30, wire.SPAN_KIND_INTERNAL)) + wire.attributes(9, {
                                         "sandbus.plugin.name": plugin, "sandbus.plugin.version": version,
                                         "sandbus.function": function}))
        trace_id, parent = rt.trace_id, rt.parent
        process_id = rt.process_id.to_bytes(8, "big")
        common = b"\x0a\x10" + trace_id + (wire.trace_state_field(rt.trace_state) if rt.trace_state else b"")
        process = [common, b"\x12\x08", process_id, b"\x39", _pack_q(rt.start_ns), b"\x41", _pack_q(end),
                   process_const, wire.int_attr(_K_BODY_SIZE, body_size)]
        if parent is not None:
            process += (b"\x22\x08", parent[1], _FLAGS_REMOTE)
        else:
            process.append(_FLAGS_LOCAL)
        if message_id:
            process.append(wire.str_attr(_K_MESSAGE_ID, message_id))
        execute = [common, b"\x12\x08", rt.exec_id.to_bytes(8, "big"), b"\x22\x08", process_id, b"\x39",
                   _pack_q(exec_start), b"\x41", _pack_q(exec_end), exec_const, _FLAGS_LOCAL]
        if result is not None:
            execute += (wire.int_attr(_K_FUEL, result[0]), wire.int_attr(_K_MEMORY, result[1]),
                        wire.double_attr(_K_DURATION, round(result[2] * 1e3, 3)), _OUTCOME_OK)
        if error is not None:
            status = wire.status_field(wire.STATUS_ERROR, error[1][:256])
            process.append(status)
            execute += (_OUTCOME_ERROR, wire.str_attr(_K_ERROR_TYPE, error[0]), status)
        if rt.events:
            execute += [wire.event_field(t, name, attrs) for t, name, attrs in rt.events]
        return [wire.frame(2, b"".join(process)), wire.frame(2, b"".join(execute))]

    @staticmethod
    def _cache(cache: dict[Any, bytes], key: Any, value: bytes) -> bytes:
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[key] = value
        return value

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)
        if self._on_close is not None:
            self._on_close()
