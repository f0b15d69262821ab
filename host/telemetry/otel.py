"""Traces and metrics of a node, exported over OTLP, configured by the standard ``OTEL_*`` variables.

Traces and metrics are switched on each by its own variables (host/telemetry/config.py): an exporter
(``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``; ``none`` turns one off) or an OTLP endpoint that
applies to the signal (``OTEL_EXPORTER_OTLP_ENDPOINT``, or ``..._TRACES_ENDPOINT`` / ``..._METRICS_ENDPOINT``).
``OTEL_EXPORTER_OTLP_PROTOCOL`` (or the per-signal ``..._TRACES_PROTOCOL`` / ``..._METRICS_PROTOCOL``)
picks ``http/protobuf`` (default) or ``grpc`` (needs the optional ``opentelemetry-exporter-otlp-proto-grpc``).
Sampling follows ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` (default ``parentbased_always_on``).
``OTEL_SDK_DISABLED=true`` turns it all off. With tracing off the node takes no span path at all: a flag
check per request (and ``sandbus.call.duration``, recorded on the span path, is then not kept).

Requests served inline are traced without the SDK's per-span cost (host/telemetry/fast_spans.py): same
spans, same exporter settings, encoded and sent by an exporter process of the node's
(host/telemetry/export.py), which also keeps the latency histogram. ``SANDBUS_FAST_SPANS=0`` sends
everything through the SDK, in the node's process.

Audit events become span events (``audit.<kind>``, with their level) on the span that is current
when they happen -- the execution span of the call that hit a limit -- or a span of their own when
none is.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, Span, SpanKind

from sandbus.host.sandbox import AuditEvent, AuditLevel
from sandbus.host.telemetry.config import metrics_configured, tracing_configured
from sandbus.host.telemetry.export import LATENCY_BOUNDS
from sandbus.host.telemetry.exporters import metric_exporter, service_resource, span_exporter
from sandbus.host.telemetry.fast_spans import MAX_MESSAGE_ID, FastSpans
from sandbus.sdk.tracing import TRACER_NAME, extract, messaging_attributes, record_error

if TYPE_CHECKING:  # `sandbus trace` (a client command) uses SpanCollector without loading wasmtime
    from sandbus.host.sandbox import CallResult

__all__ = ["SpanCollector", "Telemetry", "tracing_configured"]

log = logging.getLogger("sandbus.telemetry")


class SpanCollector(SpanProcessor):
    """Keeps the finished spans of traces someone is watching (``sandbus trace``), nothing else."""

    def __init__(self) -> None:
        self._watched: dict[int, list[ReadableSpan]] = {}
        self._lock = threading.Lock()

    def watch(self, trace_id: int) -> None:
        with self._lock:
            self._watched.setdefault(trace_id, [])

    def take(self, trace_id: int) -> list[dict[str, Any]]:
        with self._lock:
            spans = self._watched.pop(trace_id, [])
        return [_summary(s) for s in spans]

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.get_span_context()
        if ctx is None:
            return
        with self._lock:
            bucket = self._watched.get(ctx.trace_id)
            if bucket is not None and len(bucket) < 256:
                bucket.append(span)


def _summary(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.get_span_context()
    start, end = span.start_time or 0, span.end_time or 0
    return {
        "name": span.name,
        "span_id": format(ctx.span_id, "016x") if ctx else None,
        "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
        "service": span.resource.attributes.get("service.instance.id") or span.resource.attributes.get("service.name"),
        "duration_ms": round((end - start) / 1e6, 3),
        "attributes": {k: v for k, v in (span.attributes or {}).items() if not k.startswith("messaging.message")},
        "events": [e.name for e in span.events],
    }


class Telemetry:
    """One node's tracer and meters.

    Parameters:
        service_name: ``service.name`` unless ``OTEL_SERVICE_NAME`` or ``OTEL_RESOURCE_ATTRIBUTES`` sets it.
        instance_id: ``service.instance.id`` (the node id).
        enabled: force on/off; default: :func:`tracing_configured`.
        extra_processors: more span processors (tests and ``sandbus trace`` use in-memory ones).
    """

    def __init__(self, service_name: str, instance_id: str, *, enabled: bool | None = None,
                 extra_processors: list[SpanProcessor] | None = None, export: bool = True,
                 set_global: bool = True) -> None:
        self.enabled = tracing_configured() if enabled is None else enabled
        self.provider: TracerProvider | None = None
        self.collector = SpanCollector()
        resource = service_resource(service_name, {"service.instance.id": instance_id})
        if self.enabled:
            self.provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER
            if export and tracing_configured():
                try:
                    self.provider.add_span_processor(BatchSpanProcessor(span_exporter()))
                except RuntimeError as e:
                    log.error("spans are not exported: %s", e)
            for p in [self.collector, *(extra_processors or [])]:
                self.provider.add_span_processor(p)
            if set_global:
                # Host-function publishes and client spans made in this process join the same provider.
                trace.set_tracer_provider(self.provider)
            self.tracer: trace.Tracer = self.provider.get_tracer(TRACER_NAME)
        else:
            self.tracer = trace.NoOpTracer()
        self.meter_provider: MeterProvider | None = None
        # Metrics have their own switch: a traces-only setup (Jaeger takes no metrics) sends none.
        if export and metrics_configured():
            try:
                reader = PeriodicExportingMetricReader(metric_exporter())
            except RuntimeError as e:
                log.error("metrics are not exported: %s", e)
            else:
                self.meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
                if set_global:
                    metrics.set_meter_provider(self.meter_provider)
        meter = (self.meter_provider or metrics.get_meter_provider()).get_meter(TRACER_NAME)
        self.meter = meter
        self._latency = meter.create_histogram("sandbus.call.duration", unit="s",
                                               description="plugin call latency",
                                               explicit_bucket_boundaries_advisory=list(LATENCY_BOUNDS))
        #: request spans of inline calls, recorded without the SDK (host/telemetry/fast_spans.py); None: all SDK
        self.fast: FastSpans | None = None
        if self.enabled and export and tracing_configured() and not extra_processors and \
                os.environ.get("SANDBUS_FAST_SPANS", "1") != "0":
            self.fast, why = FastSpans.from_env(dict(resource.attributes))
            if self.fast is None:
                log.info("request spans go through the OpenTelemetry SDK: %s", why)


    @contextmanager
    def process_span(self, subject: str, headers: Mapping[str, str] | None, *, group: str | None,
                     message_id: str | None, body_size: int, delivery: int | None = None) -> Iterator[Span]:
        """``process <subject>`` CONSUMER, parented by the sender's context from the headers.

        A JetStream redelivery (``delivery`` > 1) is also linked to the original message's context.
        """
        parent = extract(headers)  # traceparent/tracestate validated and bounded there
        if message_id is not None:
            message_id = message_id[:MAX_MESSAGE_ID]  # a header anyone on the bus writes
        attrs = messaging_attributes("process", subject, message_id=message_id, body_size=body_size, group=group)
        links = None
        if delivery is not None:
            attrs["messaging.nats.delivery_count"] = delivery
            if delivery > 1:
                sc = trace.get_current_span(parent).get_span_context()
                if sc.is_valid:
                    links = [Link(sc, {"sandbus.link": "redelivery of the original message"})]
        with self.tracer.start_as_current_span(f"process {subject}", context=parent, kind=SpanKind.CONSUMER,
                                               attributes=attrs, links=links) as span:
            yield span

    @contextmanager
    def execute_span(self, plugin: str, version: str | None, function: str) -> Iterator[Span]:
        with self.tracer.start_as_current_span(
            f"execute {plugin}.{function}", kind=SpanKind.INTERNAL,
            attributes={"sandbus.plugin.name": plugin, "sandbus.plugin.version": version or "",
                        "sandbus.function": function},
        ) as span:
            yield span

    def finish_call(self, span: Span, plugin: str, result: CallResult | None, err: BaseException | None) -> None:
        attrs = {"sandbus.plugin.name": plugin}
        if result is not None:
            span.set_attribute("sandbus.fuel_consumed", result.fuel_used)
            span.set_attribute("sandbus.memory_bytes", result.memory_bytes)
            span.set_attribute("sandbus.duration_ms", round(result.duration_s * 1e3, 3))
            span.set_attribute("sandbus.outcome", "ok")
            if self.fast is not None:  # its exporter process keeps the histogram of every call
                self.fast.latency(plugin, result.duration_s)
            else:
                self._latency.record(result.duration_s, attrs)
        if err is not None:
            span.set_attribute("sandbus.outcome", "error")
            record_error(span, err)

    def on_audit(self, event: AuditEvent) -> None:
        """Audit events as span events on the current span, or on a span of their own."""
        if not self.enabled:
            return
        attrs: dict[str, Any] = {"audit.level": event.level.value, "audit.kind": event.kind,
                                 "sandbus.plugin.name": event.plugin, "audit.message": event.message}
        for k, v in event.details.items():
            if isinstance(v, str | int | float | bool):
                attrs[f"audit.{k}"] = v
        if self.fast is not None and self.fast.audit(f"audit.{event.kind}", attrs):
            return
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(f"audit.{event.kind}", attrs)
            return
        with self.tracer.start_as_current_span(f"audit {event.kind}", attributes=attrs) as own:
            own.add_event(f"audit.{event.kind}", attrs)
            if event.level is AuditLevel.CRITICAL:
                own.set_attribute("error.type", event.kind)

    def observe(self, values: Callable[[], dict[str, dict[str, float]]]) -> None:
        """Per-plugin values read at export time, so they cost nothing per call:
        ``{metric: {plugin: value}}`` (the manager already counts calls, errors and fuel)."""

        def callback(name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
            def read(_options: CallbackOptions) -> Iterable[Observation]:
                return [Observation(v, {"sandbus.plugin.name": p}) for p, v in values().get(name, {}).items()]

            return read

        for name, unit, desc in (("sandbus.calls", "{call}", "plugin calls"),
                                 ("sandbus.call.errors", "{call}", "failed plugin calls"),
                                 ("sandbus.call.fuel", "{fuel}", "fuel consumed")):
            self.meter.create_observable_counter(name, callbacks=[callback(name)], unit=unit, description=desc)
        for name, unit, desc in (("sandbus.plugin.in_flight", "{call}", "calls running"),
                                 ("sandbus.plugin.queue_depth", "{call}", "calls waiting for an instance"),
                                 ("sandbus.plugin.memory", "By", "linear memory held by the plugin's instances")):
            self.meter.create_observable_gauge(name, callbacks=[callback(name)], unit=unit, description=desc)

    def shutdown(self) -> None:
        if self.fast is not None:
            self.fast.shutdown()  # its last batch feeds the latency histogram: before the meters
        if self.meter_provider is not None:
            self.meter_provider.shutdown()
        if self.provider is not None:
            self.provider.force_flush(5000)
            self.provider.shutdown()
