"""The span and metric exporters and the resource the ``OTEL_*`` variables configure, for a node and for
the CLI's clients.

``OTEL_TRACES_EXPORTER``: ``otlp`` (default) or ``console``. OTLP speaks ``http/protobuf`` (default) or
``grpc`` (``OTEL_EXPORTER_OTLP_PROTOCOL``, or the per-signal ``..._TRACES_PROTOCOL`` /
``..._METRICS_PROTOCOL``; gRPC needs the optional ``opentelemetry-exporter-otlp-proto-grpc``). Endpoints,
headers, TLS, compression and timeouts are read by the exporters themselves from the standard variables
(``OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]ENDPOINT`` ...).
"""

from __future__ import annotations

import os
from typing import IO, TYPE_CHECKING

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter

from sandbus.host.telemetry.config import exporter_names, otlp_protocol

if TYPE_CHECKING:  # the CLI's clients export spans only: the metrics SDK is not loaded for them
    from opentelemetry.sdk.metrics.export import MetricExporter

__all__ = ["metric_exporter", "service_resource", "span_exporter"]

_GRPC_EXTRA = "OTLP over gRPC needs: pip install opentelemetry-exporter-otlp-proto-grpc"


def service_resource(default_service: str, attributes: dict[str, str] | None = None) -> Resource:
    """The resource of what exports: ``attributes``, ``OTEL_RESOURCE_ATTRIBUTES`` and the SDK's own, with
    ``service.name`` from ``OTEL_SERVICE_NAME``, else ``OTEL_RESOURCE_ATTRIBUTES``, else ``default_service``."""
    resource = Resource.create(attributes or {})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": default_service}))
    return resource


def span_exporter(*, timeout_s: float | None = None, console: IO[str] | None = None) -> SpanExporter:
    """The configured span exporter. ``timeout_s``: the longest an export may take, retries included
    (default: the exporter's, from ``OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT``); ``console``: where the
    console exporter writes (default stdout).

    Raises:
        RuntimeError: the environment names an exporter that cannot be built here (unknown, or its
            package is not installed).
    """
    kind = (exporter_names(os.environ, "traces") or ["otlp"])[0]
    if kind == "console":
        return ConsoleSpanExporter() if console is None else ConsoleSpanExporter(out=console)
    if kind != "otlp":
        raise RuntimeError(f"OTEL_TRACES_EXPORTER={kind[:64]!r} is not supported: otlp, console or none")
    if otlp_protocol(os.environ, "traces") == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
        except ImportError:
            raise RuntimeError(_GRPC_EXTRA) from None
        exporter: SpanExporter = Grpc(timeout=timeout_s)
        return exporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(timeout=timeout_s)


def metric_exporter() -> MetricExporter:
    """The configured OTLP metric exporter (its endpoint: ``..._METRICS_ENDPOINT``, else
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/metrics``)."""
    kind = (exporter_names(os.environ, "metrics") or ["otlp"])[0]
    if kind != "otlp":
        raise RuntimeError(f"OTEL_METRICS_EXPORTER={kind[:64]!r} is not supported: otlp or none")
    if otlp_protocol(os.environ, "metrics") == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as Grpc
        except ImportError:
            raise RuntimeError(_GRPC_EXTRA) from None
        exporter: MetricExporter = Grpc()
        return exporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter()
