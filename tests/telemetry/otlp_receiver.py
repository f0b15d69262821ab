"""An OTLP/HTTP receiver on 127.0.0.1 for the tests: a real HTTP server that decodes the real exporters'
protobuf requests (traces and metrics) into plain dicts."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

__all__ = ["Receiver"]


class Receiver:
    """An OTLP/HTTP receiver: decodes every export into plain dicts.

    ``spans``: one dict per span (ids in hex, ``parent`` None for a root, the resource's service name,
    instance id and all its attributes); ``metrics``: one dict per data point; ``posts``: the path of
    every request received, in order (``/v1/traces``, ``/v1/metrics``, anything else a client sent).
    """

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.metrics: list[dict[str, Any]] = []
        self.posts: list[str] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                with receiver.lock:
                    receiver.posts.append(self.path)
                if self.path.endswith("/v1/metrics"):
                    mreq = ExportMetricsServiceRequest()
                    mreq.ParseFromString(body)
                    receiver._add_metrics(mreq)
                else:
                    req = ExportTraceServiceRequest()
                    req.ParseFromString(body)
                    receiver._add(req)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _add(self, req: ExportTraceServiceRequest) -> None:
        out = []
        for rs in req.resource_spans:
            res = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append({
                        "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                        "parent": s.parent_span_id.hex() or None, "name": s.name, "kind": s.kind,
                        "attributes": {a.key: _value(a.value) for a in s.attributes},
                        "events": [{"name": e.name, "attributes": {a.key: _value(a.value) for a in e.attributes}}
                                   for e in s.events],
                        "links": [ln.span_id.hex() for ln in s.links],
                        "service": res.get("service.name"), "instance": res.get("service.instance.id"),
                        "resource": res,
                    })
        with self.lock:
            self.spans.extend(out)

    def _add_metrics(self, req: ExportMetricsServiceRequest) -> None:
        with self.lock:
            for rm in req.resource_metrics:
                res = {a.key: _value(a.value) for a in rm.resource.attributes}
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        kind = m.WhichOneof("data")
                        for dp in getattr(m, kind).data_points:
                            attrs = {a.key: _value(a.value) for a in dp.attributes}
                            value = dp.as_int if kind == "sum" and dp.HasField("as_int") else (
                                dp.count if kind == "histogram" else getattr(dp, dp.WhichOneof("value")))
                            self.metrics.append({"name": m.name, "instance": res.get("service.instance.id"),
                                                 "plugin": attrs.get("sandbus.plugin.name"), "value": value,
                                                 "kind": kind, "unit": m.unit, "attributes": attrs,
                                                 "monotonic": getattr(getattr(m, kind), "is_monotonic", None)})

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def find(self, condition: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """The spans received so far that meet ``condition``."""
        with self.lock:
            return [s for s in self.spans if condition(s)]

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; have {len(self.spans)} spans")
            time.sleep(0.02)  # the exporters post from their own threads and processes

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
