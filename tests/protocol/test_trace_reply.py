"""A traced node's replies carry its own ``process`` span as their ``traceparent``, in the client's trace.

docs/protocol.md: the reply's ``traceparent`` is the node's ``process`` span context when the node
traced the call, else the request's own echoed. tests/protocol/test_schemas.py checks the echo (tracing
off); here a second real node has tracing on, exporting to a local OTLP/HTTP sink that accepts
everything, and a request (traced on the node's fast path) and a direct message (traced through the
OpenTelemetry SDK) are checked.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.bus.conftest import example_plugins, served
from tests.protocol.wire import ENVELOPE_KEYS, body_of, connected, headers_of, request, validate

TRACE_ID = "5b8efff798038103d269b633813fc60c"
CLIENT_SPAN = "eee19b7ec3c1b174"
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01")
NODE_ID = "traced-node"


class _Sink(BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that takes every export (an empty 200 is a valid export response)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def otlp_sink() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def traced_url(plugins_dir: Path, tmp_path_factory: pytest.TempPathFactory, otlp_sink: str) -> Iterator[str]:
    base = tmp_path_factory.mktemp("traced")
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": otlp_sink, "OTEL_METRICS_EXPORTER": "none"}
    with served(NODE_ID, example_plugins(base, plugins_dir), base / "node.log", jetstream=False, env=env) as (url, _):
        yield url


@pytest.mark.parametrize("subject", ["sandbus.req.echo.handle_request", "sandbus.msg.echo"],
                         ids=["request_fast_path", "direct_message_sdk"])
async def test_traced_reply_carries_the_process_span(traced_url: str, subject: str) -> None:
    async with connected(traced_url) as nc:
        msg = await request(nc, subject, {"traced": True},
                            {"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01", "tracestate": "vendor=v1"})
        stats = body_of(await request(nc, f"sandbus.node.{NODE_ID}.stats", b""))
    headers = headers_of(msg)
    assert "Sandbus-Error-Code" not in headers, msg.data[:300]
    match = TRACEPARENT.fullmatch(headers.get("traceparent", ""))
    assert match is not None, headers
    assert match[1] == TRACE_ID, "the client's trace"
    assert match[2] != CLIENT_SPAN, "the node's own process span, not the client's echoed"
    assert headers.get("tracestate") == "vendor=v1", headers
    validate("control-stats", stats)
    assert stats["request_spans"] in ("fast", "sdk"), stats["request_spans"]
    if subject.startswith("sandbus.msg"):
        assert set(body_of(msg)) == ENVELOPE_KEYS


async def test_traced_reply_starts_a_trace_for_a_client_that_sent_none(traced_url: str) -> None:
    async with connected(traced_url) as nc:
        first = headers_of(await request(nc, "sandbus.req.echo.handle_request", {"n": 1}))
        second = headers_of(await request(nc, "sandbus.req.echo.handle_request", {"n": 2}))
    ids = []
    for headers in (first, second):
        match = TRACEPARENT.fullmatch(headers.get("traceparent", ""))
        assert match is not None, headers
        ids.append(match[1])
    assert ids[0] != ids[1], "each call its own trace"
