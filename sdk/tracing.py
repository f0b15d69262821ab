"""Trace context over NATS, and span names/attributes per the current OTel messaging conventions.

Conventions (semconv 1.2x messaging): span name ``{operation} {destination}``; operation types
``send`` (PRODUCER) and ``process`` (CONSUMER); attributes ``messaging.system="nats"``,
``messaging.destination.name``, ``messaging.operation.name`` / ``.type``,
``messaging.consumer.group.name``, ``messaging.message.id``, ``messaging.message.body.size``,
``error.type``. The deprecated ``publish``/``deliver`` names are not used.

Trace context arrives in headers anyone on the bus can write, so it is validated before use, as
W3C Trace Context says: a ``traceparent`` longer than 512 characters or malformed is ignored; a
``tracestate`` that is not a valid list of at most 32 unique ``key=value`` members is dropped whole,
and a valid one longer than 512 characters (the length W3C asks every vendor to propagate) is
shortened the way W3C recommends: members over 128 characters go first, then members from the end.
Nothing longer than :data:`MAX_TRACESTATE_INPUT` is even parsed.

Only the OpenTelemetry *API* is imported here: with no SDK configured every call is a cheap no-op,
so the client costs nothing when the application does not trace.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import baggage, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

__all__ = [
    "H_TRACE_DEBUG",
    "H_TRACE_SPANS",
    "MAX_TRACEPARENT",
    "MAX_TRACESTATE",
    "MAX_TRACESTATE_INPUT",
    "MAX_TRACESTATE_MEMBERS",
    "TRACER_NAME",
    "extract",
    "inject",
    "messaging_attributes",
    "record_error",
    "send_span",
    "tracer",
    "valid_tracestate",
]

TRACER_NAME = "sandbus"
#: tracer providers that record nothing: the API's defaults before an SDK is installed
_NO_SDK = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
#: A request carrying this header is traced by the node whatever its sampling, and the node's spans
#: come back in the reply's ``Sandbus-Trace-Spans`` header (JSON list): ``sandbus trace`` uses it.
H_TRACE_DEBUG = "Sandbus-Trace-Debug"
H_TRACE_SPANS = "Sandbus-Trace-Spans"

#: a ``traceparent`` longer than this is ignored (as the OpenTelemetry SDK does)
MAX_TRACEPARENT = 512
#: W3C: at most 32 list members in ``tracestate``
MAX_TRACESTATE_MEMBERS = 32
#: W3C: every vendor propagates at least 512 characters; longer states are shortened to this
MAX_TRACESTATE = 512
#: W3C: members over 128 characters are the first dropped when shortening
_LARGE_MEMBER = 128
#: the longest valid tracestate (32 members of a 256-character key and value, with separators):
#: anything longer is dropped without being parsed
MAX_TRACESTATE_INPUT = MAX_TRACESTATE_MEMBERS * (256 + 1 + 256) + 4 * MAX_TRACESTATE_MEMBERS

_KEY_CHARS = r"[a-z0-9_\-*/]"
_TRACESTATE_MEMBER = re.compile(
    rf"(?:[a-z]{_KEY_CHARS}{{0,255}}|[a-z0-9]{_KEY_CHARS}{{0,240}}@[a-z]{_KEY_CHARS}{{0,13}})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")


def valid_tracestate(value: str | None) -> str | None:
    """A W3C ``tracestate`` fit to propagate, or None when absent or invalid (then it is dropped whole).

    Valid: list members ``key=value`` (W3C key and value grammar) separated by commas and optional
    spaces/tabs, at most 32 of them, no key twice. The result is at most :data:`MAX_TRACESTATE`
    characters: W3C's truncation order (members over 128 characters first, then from the end).
    """
    if not value or len(value) > MAX_TRACESTATE_INPUT:
        return None
    members: list[str] = []
    keys: set[str] = set()
    for raw in value.split(","):
        member = raw.strip(" \t")
        if not member:
            continue  # W3C allows empty list members
        if len(members) == MAX_TRACESTATE_MEMBERS or _TRACESTATE_MEMBER.fullmatch(member) is None:
            return None
        key = member.split("=", 1)[0]
        if key in keys:
            return None
        keys.add(key)
        members.append(member)
    if not members:
        return None
    if len(",".join(members)) > MAX_TRACESTATE:
        members = [m for m in members if len(m) <= _LARGE_MEMBER]
        while members and len(",".join(members)) > MAX_TRACESTATE:
            members.pop()
    return ",".join(members) or None


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def inject(headers: dict[str, str], context: Context | None = None) -> dict[str, str]:
    """Add W3C ``traceparent``/``tracestate`` (and baggage) of ``context`` (default: current) to headers."""
    if not trace.get_current_span(context).get_span_context().is_valid and not baggage.get_all(context):
        return headers  # nothing to propagate (tracing off): and no propagator to load, which costs a CLI ~14 ms
    from opentelemetry import propagate  # reads OTEL_PROPAGATORS and loads entry points on first import

    propagate.inject(headers, context=context)
    return headers


def extract(headers: Mapping[str, str] | None) -> Context:
    """The trace context in ``headers``, with ``traceparent``/``tracestate`` validated first (module docstring)."""
    carrier = dict(headers or {})
    parent = carrier.get("traceparent")
    if parent is not None and len(parent) > MAX_TRACEPARENT:
        del carrier["traceparent"]
    if "tracestate" in carrier:
        state = valid_tracestate(carrier.pop("tracestate"))
        if state is not None:
            carrier["tracestate"] = state
    from opentelemetry import propagate

    return propagate.extract(carrier)


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
