"""The node's request spans (``process`` + ``execute``) recorded without the OpenTelemetry SDK.

Why: with the SDK, a span is built through the tracer and its processors and then encoded for OTLP
in the node's own process: a node tracing every request that way served 0.12x of its untraced rate
(bench/bench_tracing.py, c=64 on a 2-core machine; 0.75-0.87x with this module). Encoding in a
thread of the node does not help either: the thread holds the GIL in bursts and every syscall of
the event loop then waits for it. So:

* on the request path, a request served inline is one flat record (ids, times, a few numbers:
  a few microseconds), queued;
* a shipper thread sends the queue, as one ``orjson`` document per batch (one C call, one pipe
  write), to an exporter process (host/telemetry/export.py);
* the exporter process encodes the spans (by hand: host/telemetry/otlp_wire.py and
  host/sandbox/_native.c; export.py gives the numbers against the official encoder), posts them
  through the SDK's own OTLP/HTTP exporter client -- the endpoint, headers, TLS, compression, timeout
  and retries that the ``OTEL_*`` variables configure -- and keeps the ``sandbus.call.duration``
  histogram.

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
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from sandbus.host.telemetry.config import metrics_configured, otlp_protocol
from sandbus.sdk.tracing import MAX_TRACEPARENT, valid_tracestate

__all__ = ["FastSpans", "RequestTrace", "parse_traceparent", "sampler_from_env"]

log = logging.getLogger("sandbus.telemetry")

_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_LIMIT_64 = (1 << 64) - 1
_getrandbits = random.getrandbits
_time_ns = time.time_ns

#: (trace id hex, parent span id hex, sampled)
Parent = tuple[str, str, bool]
#: characters of a client-chosen message id kept in a span (headers come from anyone on the bus)
MAX_MESSAGE_ID = 256
Sampler = Callable[[Parent | None, str], bool]


_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?")


def parse_traceparent(value: str | None) -> Parent | None:
    """(trace id, parent span id, sampled) of a W3C ``traceparent``; None when absent or invalid."""
    if not value or len(value) > MAX_TRACEPARENT:
        return None
    m = _TRACEPARENT.fullmatch(value)
    if m is None:
        return None
    version, trace_id, span_id, flags = m.groups()
    if version == "ff" or (version == "00" and len(value) != 55) or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, flags[1] in "13579bdf"  # the sampled bit is the lowest


def sampler_from_env(env: Mapping[str, str]) -> tuple[Sampler | None, str]:
    """The configured sampler as ``(parent, trace id hex) -> sampled``, or (None, why) if not reproduced here."""
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

    def by_ratio(trace_id: str) -> bool:
        return int(trace_id[16:], 16) < bound

    root: Callable[[str], bool]
    if name in ("always_on", "parentbased_always_on"):
        root = _always
    elif name in ("always_off", "parentbased_always_off"):
        root = _never
    elif name in ("traceidratio", "parentbased_traceidratio"):
        root = by_ratio
    else:
        return None, f"sampler {name!r} is only available through the SDK"
    if name.startswith("parentbased_"):
        def parent_based(parent: Parent | None, trace_id: str) -> bool:
            return parent[2] if parent is not None else root(trace_id)

        return parent_based, ""

    def plain(parent: Parent | None, trace_id: str) -> bool:
        return root(trace_id)

    return plain, ""


def _always(trace_id: str) -> bool:
    return True


def _never(trace_id: str) -> bool:
    return False


class RequestTrace:
    """One traced request while it runs: its trace, start, and the audit events raised during the call.

    ``span_id`` is its ``process`` span's id, made here because the reply carries it (``traceparent``);
    the ``execute`` span's id is made when the record is queued.
    """

    __slots__ = ("events", "parent", "span_id", "start_ns", "trace_id", "trace_state")

    def __init__(self, trace_id: str, parent: Parent | None, trace_state: str | None, start_ns: int,
                 span_id: int = 0) -> None:
        self.trace_id = trace_id
        self.parent = parent
        self.trace_state = trace_state
        self.start_ns = start_ns
        self.span_id = span_id or (_getrandbits(64) or 1)
        self.events: list[tuple[int, str, dict[str, Any]]] | None = None

    def traceparent(self) -> str:
        """The W3C ``traceparent`` of the ``process`` span (sampled: it is recorded)."""
        return f"00-{self.trace_id}-{self.span_id:016x}-01"


class FastSpans:
    """Records request spans and ships them in batches from a background thread.

    Parameters:
        ship: hands one batch (an orjson document, see :meth:`batch_document`) to the exporter;
            returns whether it was taken.
        sample: ``(parent, trace id) -> sampled`` (see :func:`sampler_from_env`).
        on_close: called once the last batch is shipped (the exporter process flushes and exits).
    """

    def __init__(self, ship: Callable[[bytes], bool], sample: Sampler, *, schedule_delay_s: float = 5.0,
                 max_batch: int = 512, max_queue: int = 2048, on_close: Callable[[], None] | None = None) -> None:
        self._ship = ship
        self.sample = sample
        self._delay = schedule_delay_s
        self._batch = max_batch
        self._max_queue = max_queue
        self._on_close = on_close
        # Plain lists swapped whole under a lock: the shipper takes everything in O(1), with no
        # Python loop holding the GIL against the event loop.
        self._lock = threading.Lock()
        self._queue: list[tuple[Any, ...]] = []
        self._latencies: list[tuple[str, float]] = []
        self._wake = threading.Event()
        self._stopping = False
        self.dropped = 0
        self.shipped = 0
        self.failed_batches = 0
        #: the request whose call is running inline on the event loop (audit events attach to it)
        self.current: RequestTrace | None = None
        self.current_thread = 0
        self._thread = threading.Thread(target=self._run, name="sandbus-span-ship", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls, resource_attrs: Mapping[str, Any], *,
                 env: Mapping[str, str] | None = None) -> tuple[FastSpans | None, str]:
        """Built from the ``OTEL_*`` variables with an exporter process, or (None, why) when the SDK must
        do the work."""
        env = os.environ if env is None else env
        exporter_kind = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
        if exporter_kind != "otlp":
            return None, f"OTEL_TRACES_EXPORTER={exporter_kind}"
        for signal in ("traces", "metrics") if metrics_configured(env) else ("traces",):
            # the exporter process posts spans and the latency histogram over OTLP/HTTP only
            protocol = otlp_protocol(env, signal)
            if protocol != "http/protobuf":
                return None, f"OTLP protocol {protocol} for {signal}"
        sample, why = sampler_from_env(env)
        if sample is None:
            return None, why
        from sandbus.host.telemetry.export import ExporterProcess

        process = ExporterProcess(resource_attrs)

        def number(name: str, default: float) -> float:
            try:
                return float(env.get(name, default))
            except ValueError:
                return default

        return cls(process.ship, sample, schedule_delay_s=number("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000,
                   max_batch=int(number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)),
                   max_queue=int(number("OTEL_BSP_MAX_QUEUE_SIZE", 2048)), on_close=process.close), ""

    # -- request path (event loop thread) ------------------------------------------------------------

    def begin(self, headers: Mapping[str, str] | None) -> RequestTrace | None:
        """Start tracing a request, or None when the sampler says no (then nothing more is recorded)."""
        start = _time_ns()
        parent = parse_traceparent(headers.get("traceparent")) if headers else None
        trace_id = parent[0] if parent is not None else format(_getrandbits(128) or 1, "032x")
        if not self.sample(parent, trace_id):
            return None
        # Validated and bounded as W3C says (sdk/tracing.py): a record holds at most 512 characters of it.
        state = valid_tracestate(headers.get("tracestate")) if headers and parent is not None else None
        return RequestTrace(trace_id, parent, state, start)

    def finish(self, rt: RequestTrace, subject: str, group: str, message_id: str | None, body_size: int,
               plugin: str, version: str, function: str, exec_start_ns: int, exec_end_ns: int,
               result: tuple[int, int, float] | None, error: tuple[str, str] | None) -> None:
        """Queue the request's two spans for export.

        ``result``: (fuel, memory, seconds) of a call that returned; ``error``: (error.type, message).
        """
        parent = rt.parent
        if message_id is not None and len(message_id) > MAX_MESSAGE_ID:
            message_id = message_id[:MAX_MESSAGE_ID]
        record = (rt.trace_id, parent[1] if parent else None, rt.trace_state, rt.span_id, _getrandbits(64) or 2,
                  rt.start_ns, _time_ns(),
                  subject, group, message_id, body_size, plugin, version, function, exec_start_ns, exec_end_ns,
                  result, error, rt.events)
        with self._lock:
            queue = self._queue
            if len(queue) >= self._max_queue:
                self.dropped += 2
                return
            queue.append(record)
            if len(queue) == self._batch:
                self._wake.set()

    def latency(self, plugin: str, seconds: float) -> None:
        """A call traced elsewhere (or not sampled): only its latency, for the histogram."""
        with self._lock:
            if len(self._latencies) < self._max_queue:
                self._latencies.append((plugin, seconds))

    def audit(self, name: str, attrs: dict[str, Any]) -> bool:
        """Attach an audit event to the request running inline on this thread, if there is one."""
        rt = self.current
        if rt is None or threading.get_ident() != self.current_thread:
            return False
        if rt.events is None:
            rt.events = []
        rt.events.append((time.time_ns(), name, attrs))
        return True

    # -- shipping (background thread) ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self._delay)
            self._wake.clear()
            self.ship_pending()
            if self._stopping:
                return

    def ship_pending(self) -> None:
        """Ship everything queued now, in batches (called by the background thread)."""
        with self._lock:
            records, self._queue = self._queue, []
            latencies, self._latencies = self._latencies, []
        batch = self._batch
        for i in range(0, max(len(records), 1 if latencies else 0), batch):
            chunk = records[i:i + batch]
            lat = latencies if i == 0 else []
            if not chunk and not lat:
                continue
            try:
                ok = self._ship(self.batch_document(chunk, lat))
            except Exception as e:  # the exporter's problem must not kill this thread
                log.warning("span shipping failed: %s", e)
                ok = False
            if ok:
                self.shipped += 2 * len(chunk)
            else:
                self.failed_batches += 1
                self.dropped += 2 * len(chunk)

    @staticmethod
    def batch_document(records: list[tuple[Any, ...]], latencies: list[tuple[str, float]]) -> bytes:
        """One batch as JSON: ``{"requests": [record...], "latencies": [[plugin, seconds]...]}``.

        A record is the tuple :meth:`finish` queued (see host/telemetry/export.py for its fields); orjson
        writes it in one C call, holding the GIL once per batch.
        """
        return orjson.dumps({"requests": records, "latencies": latencies})

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)
        if self._on_close is not None:
            self._on_close()
