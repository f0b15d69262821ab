"""A client process's spans, kept while it works and exported in one request when it ends.

For short-lived clients (the CLI's ``request``, ``pub``, ``ls``, ``trace``): no background thread, no
batching delay; the whole export, the exporter's own retries included, is bounded by the exporter's
timeout. host/cli/client_otel.py imports this module only when ``OTEL_*`` asks for span export.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import IO

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from sandbus.host.telemetry.exporters import service_resource, span_exporter

__all__ = ["ClientExport", "client_tracer_provider"]

#: how long past its timeout an export may take before it is abandoned (connection set-up, encoding)
_EXPORT_MARGIN_S = 0.5


def client_tracer_provider(service_name: str) -> TracerProvider:
    """The process's SDK tracer provider: the global one if it is already an SDK provider, else a new one
    (``service.name``: ``OTEL_SERVICE_NAME`` or ``OTEL_RESOURCE_ATTRIBUTES`` when they set it, else
    ``service_name``), installed as the global provider: sdk/tracing.py makes the client's spans on that."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    provider = TracerProvider(resource=service_resource(service_name))  # sampler: OTEL_TRACES_SAMPLER
    trace.set_tracer_provider(provider)
    return provider


class _Pending(SpanProcessor):
    """Keeps the sampled spans that end, up to ``limit``."""

    def __init__(self, limit: int) -> None:
        self.spans: list[ReadableSpan] = []
        self.dropped = 0
        self._limit = limit
        self._lock = threading.Lock()
        self.closed = False

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.context
        if ctx is None or not ctx.trace_flags.sampled:
            return
        with self._lock:
            if self.closed or len(self.spans) >= self._limit:
                self.dropped += 1
            else:
                self.spans.append(span)

    def take(self) -> list[ReadableSpan]:
        with self._lock:
            self.closed = True
            spans, self.spans = self.spans, []
        return spans


class ClientExport:
    """Installs a span keeper on the client's tracer provider; :meth:`finish` exports what it kept.

    Parameters:
        service_name: ``service.name`` when the process has no SDK tracer provider yet.
        timeout_s: the longest :meth:`finish` waits for the collector.
        max_spans: spans kept for export (a client command makes a handful).
        console: where ``OTEL_TRACES_EXPORTER=console`` writes.

    Raises:
        RuntimeError: the environment names an exporter that cannot be built (see exporters.py).
    """

    def __init__(self, service_name: str, *, timeout_s: float, max_spans: int, console: IO[str] | None = None) -> None:
        self._exporter: SpanExporter = span_exporter(timeout_s=timeout_s, console=console)
        self._timeout_s = timeout_s
        #: where the spans go, for the one line a failed export prints (the exporter keeps it private)
        self._endpoint = str(getattr(self._exporter, "_endpoint", "") or "")[:200]
        self._pending = _Pending(max_spans)
        client_tracer_provider(service_name).add_span_processor(self._pending)

    def finish(self) -> str | None:
        """Export the kept spans (once); None when they were taken (or there were none), else why not."""
        spans = self._pending.take()
        # The exporter logs each failed attempt (with a traceback for a refused connection): the caller
        # reports the outcome once, in one line.
        logger = logging.getLogger("opentelemetry")
        level = logger.level
        logger.setLevel(logging.CRITICAL + 1)
        try:
            outcome = self._export(spans) if spans else SpanExportResult.SUCCESS
        finally:
            logger.setLevel(level)
        if isinstance(outcome, str):
            return outcome
        if outcome is not SpanExportResult.SUCCESS:
            where = f" at {self._endpoint}" if self._endpoint else ""
            return f"the collector{where} did not take {len(spans)} span(s) within {self._timeout_s:g} s"
        if self._pending.dropped:
            return f"{self._pending.dropped} span(s) beyond the first {len(spans)} were dropped"
        return None

    def _export(self, spans: list[ReadableSpan]) -> SpanExportResult | str:
        """The exporter's result, or why there is none, within :attr:`_timeout_s` (plus a margin).

        The exporter's own timeout bounds each socket operation, not the export: a collector that
        answers one byte at a time holds it (and the command) for as long as it likes. So the export
        runs in a daemon thread that is abandoned at the deadline (the process is ending anyway).
        """
        box: list[SpanExportResult | str] = []

        def run() -> None:
            try:
                box.append(self._exporter.export(spans))
            except Exception as e:  # an exporter bug must not become the command's failure
                box.append(f"{type(e).__name__}: {str(e)[:200]}")
            finally:
                with contextlib.suppress(Exception):
                    self._exporter.shutdown()

        worker = threading.Thread(target=run, name="sandbus-client-export", daemon=True)
        worker.start()
        worker.join(self._timeout_s + _EXPORT_MARGIN_S)
        return box[0] if box else SpanExportResult.FAILURE
