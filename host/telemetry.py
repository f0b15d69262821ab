"""Traces and metrics of a node, exported over OTLP, configured by the standard ``OTEL_*`` variables.

Tracing is on when an exporter is configured: ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``,
``none``) or an OTLP endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``..._TRACES_ENDPOINT``).
``OTEL_EXPORTER_OTLP_PROTOCOL`` picks ``http/protobuf`` (default) or ``grpc`` (needs the optional
``opentelemetry-exporter-otlp-proto-grpc``). Sampling follows ``OTEL_TRACES_SAMPLER`` /
``OTEL_TRACES_SAMPLER_ARG`` (default ``parentbased_always_on``). ``OTEL_SDK_DISABLED=true`` turns it
all off. With tracing off the node takes no span path at all: a flag check per request.

Audit events become span events (``audit.<kind>``, with their level) on the span that is current
when they happen -- the execution span of the call that hit a limit -- or a span of their own when
none is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, Span, SpanKind

from sdk.tracing import TRACER_NAME, extract, messaging_attributes, record_error

from .sandbox import AuditEvent, AuditLevel, CallResult

__all__ = ["Telemetry", "tracing_configured"]

log = logging.getLogger("sandbus.telemetry")


def tracing_configured(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").lower()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _exporter() -> SpanExporter:
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")[0]
    if kind == "console":
        return ConsoleSpanExporter()
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
        except ImportError as e:
            raise RuntimeError("OTLP over gRPC needs: pip install opentelemetry-exporter-otlp-proto-grpc") from e
        exporter: SpanExporter = Grpc()
        return exporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


class Telemetry:
    """One node's tracer and meters.

    Parameters:
        service_name: ``service.name`` (``OTEL_SERVICE_NAME`` wins when set).
        instance_id: ``service.instance.id`` (the node id).
        enabled: force on/off; default: :func:`tracing_configured`.
        extra_processors: more span processors (tests and ``sandbus trace`` use in-memory ones).
    """

    def __init__(self, service_name: str, instance_id: str, *, enabled: bool | None = None,
                 extra_processors: list[SpanProcessor] | None = None) -> None:
        self.enabled = tracing_configured() if enabled is None else enabled
        self.provider: TracerProvider | None = None
        if self.enabled:
            resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name),
                                        "service.instance.id": instance_id})
            self.provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER
            if tracing_configured():
                self.provider.add_span_processor(BatchSpanProcessor(_exporter()))
            for p in extra_processors or []:
                self.provider.add_span_processor(p)
            # The global provider too: sdk.client spans made in this process (sandbus trace) join it.
            trace.set_tracer_provider(self.provider)
            self.tracer: trace.Tracer = self.provider.get_tracer(TRACER_NAME)
        else:
            self.tracer = trace.NoOpTracer()
        meter = metrics.get_meter(TRACER_NAME)
        self._latency = meter.create_histogram("sandbus.call.duration", unit="s",
                                               description="plugin call latency")
        self._calls = meter.create_counter("sandbus.calls", description="plugin calls")
        self._errors = meter.create_counter("sandbus.call.errors", description="failed plugin calls")
        self._fuel = meter.create_counter("sandbus.call.fuel", description="fuel consumed")

    @contextmanager
    def process_span(self, subject: str, headers: Mapping[str, str] | None, *, group: str | None,
                     message_id: str | None, body_size: int, delivery: int | None = None) -> Iterator[Span]:
        """``process <subject>`` CONSUMER, parented by the sender's context from the headers.

        A JetStream redelivery (``delivery`` > 1) is also linked to the original message's context.
        """
        parent = extract(headers)
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
            self._latency.record(result.duration_s, attrs)
            self._fuel.add(result.fuel_used, attrs)
        if err is not None:
            span.set_attribute("sandbus.outcome", "error")
            record_error(span, err)
            self._errors.add(1, attrs)
        self._calls.add(1, attrs)

    def on_audit(self, event: AuditEvent) -> None:
        """Audit events as span events on the current span, or on a span of their own."""
        if not self.enabled:
            return
        attrs: dict[str, Any] = {"audit.level": event.level.value, "audit.kind": event.kind,
                                 "sandbus.plugin.name": event.plugin, "audit.message": event.message}
        for k, v in event.details.items():
            if isinstance(v, str | int | float | bool):
                attrs[f"audit.{k}"] = v
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(f"audit.{event.kind}", attrs)
            return
        with self.tracer.start_as_current_span(f"audit {event.kind}", attributes=attrs) as own:
            own.add_event(f"audit.{event.kind}", attrs)
            if event.level is AuditLevel.CRITICAL:
                own.set_attribute("error.type", event.kind)

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.force_flush(5000)
            self.provider.shutdown()
