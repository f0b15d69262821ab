"""Client-side tracing for the CLI's client commands: their ``send`` spans exported when ``OTEL_*`` says so.

``sandbus request`` / ``pub`` / ``ls`` / ``trace`` make their ``send`` spans through sdk/tracing.py on the
global tracer provider. With no ``OTEL_*`` variable asking for span export (host/telemetry/config.py
decides, exactly as for a node) nothing here imports the OpenTelemetry SDK: the spans are the API's
no-ops and the command starts as fast as it can. With export on, the command installs an SDK tracer
provider (service ``sandbus-cli`` unless ``OTEL_SERVICE_NAME`` names another; ``OTEL_RESOURCE_ATTRIBUTES``
and the sampler variables apply), keeps its finished spans, and exports them in one request when the
command ends (host/telemetry/client_export.py), through the exporter the variables configure (OTLP/HTTP
by default, gRPC when asked; ``console`` writes to stderr, as stdout carries the command's output).
The trace then has its root at the client.

The export waits at most :data:`EXPORT_TIMEOUT_S` for the collector, retries included: a collector that
is down costs the command about that long and one line on stderr, never its output or exit code.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from sandbus.host.telemetry.config import tracing_configured

__all__ = ["EXPORT_TIMEOUT_S", "MAX_SPANS", "SERVICE_NAME", "client_tracing"]

#: ``service.name`` of the CLI's spans unless ``OTEL_SERVICE_NAME`` says otherwise
SERVICE_NAME = "sandbus-cli"
#: longest wait for the collector when the command ends (the exporter's own retries included)
EXPORT_TIMEOUT_S = 1.0
#: spans a command keeps for export (it makes a handful)
MAX_SPANS = 256


@contextlib.contextmanager
def client_tracing() -> Iterator[None]:
    """Around a client command: export its spans when it ends, if the environment asks for span export."""
    if not tracing_configured():
        yield
        return
    from sandbus.host.telemetry.client_export import ClientExport

    try:
        export = ClientExport(SERVICE_NAME, timeout_s=EXPORT_TIMEOUT_S, max_spans=MAX_SPANS, console=sys.stderr)
    except Exception as e:  # a broken telemetry setup must not cost the command its work
        _warn(f"client spans are not exported: {e}")
        yield
        return
    try:
        yield
    finally:
        problem = export.finish()
        if problem is not None:
            _warn(f"client spans not exported: {problem}")


def _warn(message: str) -> None:
    print(f"sandbus: warning: {message}", file=sys.stderr)
