"""A node's traces and metrics, exported over OTLP as the standard ``OTEL_*`` variables configure.

The modules, from the node's side to the collector's:

* :mod:`~sandbus.host.telemetry.config` -- which signals the ``OTEL_*`` variables switch on
  (:func:`tracing_configured`, :func:`metrics_configured`), read without the SDK: the CLI's client
  commands decide with it before importing anything of OpenTelemetry.
* :mod:`~sandbus.host.telemetry.otel` -- :class:`Telemetry`, the OpenTelemetry SDK setup of a node (tracer,
  meters, exporters, audit events as span events) and the spans of everything the fast path does not
  take; :class:`SpanCollector` keeps the spans ``sandbus trace`` shows.
* :mod:`~sandbus.host.telemetry.fast_spans` -- :class:`FastSpans`, the span path of requests served
  inline: one tuple per request (:class:`RequestTrace` while it runs), shipped in batches from a
  background thread to the exporter process; W3C ``traceparent`` parsing and the SDK's samplers, reproduced.
* :mod:`~sandbus.host.telemetry.export` -- the exporter process (``python -m sandbus.host.telemetry.export``)
  and :class:`ExporterProcess`, the node's handle on it: it turns batches into OTLP spans
  (:class:`SpanEncoder`, or the official encoder, :class:`SdkSpanEncoder`), posts them with the SDK's
  OTLP/HTTP client, and keeps the ``sandbus.call.duration`` histogram (:class:`LatencyHistogram`).
* :mod:`~sandbus.host.telemetry.otlp_wire` -- OTLP trace protobuf written directly, the Python half of
  :class:`SpanEncoder` (the common request shape is written by ``host/sandbox/_native.c``).

Names load on first use (:mod:`sandbus._lazy`): the exporter process runs this package's ``export``
module as ``__main__`` and must not load the SDK setup, nor a second copy of itself. Nothing here
imports the node: the node imports telemetry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sandbus._lazy import lazy_attributes

if TYPE_CHECKING:
    from sandbus.host.telemetry.config import metrics_configured, tracing_configured
    from sandbus.host.telemetry.export import (
        LATENCY_BOUNDS,
        ExporterProcess,
        LatencyHistogram,
        SdkSpanEncoder,
        SpanEncoder,
    )
    from sandbus.host.telemetry.fast_spans import FastSpans, RequestTrace, parse_traceparent, sampler_from_env
    from sandbus.host.telemetry.otel import SpanCollector, Telemetry

__all__ = [
    "ExporterProcess",
    "FastSpans",
    "LATENCY_BOUNDS",
    "LatencyHistogram",
    "RequestTrace",
    "SdkSpanEncoder",
    "SpanCollector",
    "SpanEncoder",
    "Telemetry",
    "metrics_configured",
    "parse_traceparent",
    "sampler_from_env",
    "tracing_configured",
]

#: public name -> the module that defines it
_WHERE = {
    "LATENCY_BOUNDS": "sandbus.host.telemetry.export",
    "ExporterProcess": "sandbus.host.telemetry.export",
    "FastSpans": "sandbus.host.telemetry.fast_spans",
    "LatencyHistogram": "sandbus.host.telemetry.export",
    "RequestTrace": "sandbus.host.telemetry.fast_spans",
    "SdkSpanEncoder": "sandbus.host.telemetry.export",
    "SpanCollector": "sandbus.host.telemetry.otel",
    "SpanEncoder": "sandbus.host.telemetry.export",
    "Telemetry": "sandbus.host.telemetry.otel",
    "metrics_configured": "sandbus.host.telemetry.config",
    "parse_traceparent": "sandbus.host.telemetry.fast_spans",
    "sampler_from_env": "sandbus.host.telemetry.fast_spans",
    "tracing_configured": "sandbus.host.telemetry.config",
}

if not TYPE_CHECKING:  # type checkers see the imports above, and an unknown name is an error to them
    __getattr__, __dir__ = lazy_attributes(__name__, _WHERE)
