"""Telemetry: the OpenTelemetry SDK setup, the fast span path of inline requests, the exporter process."""
