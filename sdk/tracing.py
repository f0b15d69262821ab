"""Trace context over NATS, and span names/attributes per the current OTel messaging conventions.

Conventions (semconv 1.2x messaging): span name ``{operation} {destination}``; operation types
``send`` (PRODUCER) and ``process`` (CONSUMER); attributes ``messaging.system="nats"``,
``messaging.destination.name``, ``messaging.operation.name`` / ``.type``,
``messaging.consumer.group.name``, ``messaging.message.id``, ``messaging.message.body.size``,
``error.type``. The deprecated ``publish``/``deliver`` names are not used.

Only the OpenTelemetry *API* is imported here: with no SDK configured every call is a cheap no-op,
so the client costs nothing when the application does not trace.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

__all__ = [
    "H_TRACE_DEBUG",
    "H_TRACE_SPANS",
    "TRACER_NAME",
    "extract",
    "inject",
    "messaging_attributes",
    "record_error",
    "send_span",
    "tracer",
]

TRACER_NAME = "sandbus"
#: tracer providers that record nothing: the API's defaults before an SDK is installed
_NO_SDK = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
#: A request carrying this header is traced by the node whatever its sampling, and the node's spans
#: come back in the reply's ``Sandbus-Trace-Spans`` header (JSON list): ``sandbus trace`` uses it.
H_TRACE_DEBUG = "Sandbus-Trace-Debug"
H_TRACE_SPANS = "Sandbus-Trace-Spans"


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def inject(headers: dict[str, str], context: Context | None = None) -> dict[str, str]:
    """Add W3C ``traceparent``/``tracestate`` (and baggage) of ``context`` (default: current) to headers."""
    propagate.inject(headers, context=context)
    return headers


def extract(headers: Mapping[str, str] | None) -> Context:
    return propagate.extract(dict(headers or {}))


def messaging_attributes(operation: str, destination: str, *, message_id: str | None = None,
                         body_size: int | None = None, group: str | None = None) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "messaging.system": "nats",
        "messaging.destination.name": destination,
        "messaging.operation.name": operation,
        "messaging.operation.type": operation,
    }
    if message_id is not None:
        attrs["messaging.message.id"] = message_id
    if body_size is not None:
        attrs["messaging.message.body.size"] = body_size
    if group is not None:
        attrs["messaging.consumer.group.name"] = group
    return attrs


@contextmanager
def send_span(destination: str, headers: dict[str, str], *, message_id: str | None = None,
              body_size: int | None = None, context: Context | None = None,
              links: list[Link] | None = None) -> Iterator[Span]:
    """A ``send <destination>`` PRODUCER span whose context is injected into ``headers``.

    With no OpenTelemetry SDK installed as the tracer provider and no trace context to carry on,
    nothing is done: building a no-op span and injecting nothing still cost a quarter of a
    publish (measured with bench/bench_bus.py's durable topics).
    """
    if isinstance(trace.get_tracer_provider(), _NO_SDK) and (
            context is None and not trace.get_current_span().get_span_context().is_valid):
        yield trace.INVALID_SPAN
        return
    with tracer().start_as_current_span(
        f"send {destination}", context=context, kind=SpanKind.PRODUCER, links=links,
        attributes=messaging_attributes("send", destination, message_id=message_id, body_size=body_size),
    ) as span:
        inject(headers)
        yield span


def record_error(span: Span, err: BaseException) -> None:
    code = getattr(err, "code", None) or type(err).__name__
    span.set_attribute("error.type", str(code))
    span.set_status(Status(StatusCode.ERROR, str(err)[:256]))
