"""Which signals the standard ``OTEL_*`` variables switch on: read without importing the OpenTelemetry SDK.

The node (host/telemetry/otel.py) and the CLI's client commands (host/cli/client_otel.py) decide the
same way, and a client command must decide before it imports any of the SDK (its start-up time counts).

Each signal is on when something asks for its export and nothing turns it off:

* ``OTEL_SDK_DISABLED=true`` turns everything off;
* ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``: ``none`` turns the signal off; any other value
  turns it on (``otlp``; ``console`` for traces);
* else an OTLP endpoint that applies to the signal turns it on: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (every
  signal), ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (traces only), ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``
  (metrics only).

So a setup with only a traces endpoint (Jaeger) sends no metrics anywhere, and one with only a
metrics endpoint (Prometheus) sends no spans.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["exporter_names", "metrics_configured", "otlp_protocol", "tracing_configured"]


def _disabled(env: Mapping[str, str]) -> bool:
    return env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def exporter_names(env: Mapping[str, str], signal: str) -> list[str]:
    """The exporters ``OTEL_<SIGNAL>_EXPORTER`` names (a comma-separated list), lowercased; [] when unset."""
    raw = env.get(f"OTEL_{signal.upper()}_EXPORTER", "")
    return [name for part in raw.split(",") if (name := part.strip().lower())]


def _configured(env: Mapping[str, str], signal: str) -> bool:
    if _disabled(env):
        return False
    names = exporter_names(env, signal)
    if names:
        return names != ["none"]
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"))


def tracing_configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether spans are to be exported (module docstring)."""
    return _configured(os.environ if env is None else env, "traces")


def metrics_configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether metrics are to be exported (module docstring)."""
    return _configured(os.environ if env is None else env, "metrics")


def otlp_protocol(env: Mapping[str, str], signal: str) -> str:
    """``OTEL_EXPORTER_OTLP_<SIGNAL>_PROTOCOL``, else ``OTEL_EXPORTER_OTLP_PROTOCOL``, else ``http/protobuf``."""
    value = env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    return (value or "http/protobuf").strip().lower()
