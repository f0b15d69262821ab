"""Traces start at the client: ``sandbus request`` / ``pub`` / ``trace`` run as real processes export their
``send`` spans through the real OTLP exporter to a receiver on 127.0.0.1, and a real node's ``process`` span
is their child. Without ``OTEL_*`` the CLI loads none of the OpenTelemetry SDK; a collector that is down
costs the command a bounded wait; a node told ``OTEL_METRICS_EXPORTER=none`` sends traces and no metrics."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer

from sandbus.bus.server import NatsServer
from sandbus.host.cli.trace_cmd import MAX_JAEGER_URL, jaeger_base
from sandbus.host.telemetry.config import metrics_configured, tracing_configured
from sandbus.sdk.client import Client
from tests.bus.conftest import POLICY, NodeProcess
from tests.telemetry.otlp_receiver import Receiver

ROOT = Path(__file__).resolve().parents[2]
LISTENER_TOML = """
[plugin]
name = "listener"
version = "1.0.0"
description = "echo, subscribed to client topics"
author = "tests"
license = "Apache-2.0"
min_runtime_version = "0.1.0"
[capabilities]
required = ["compute"]
[subscriptions]
topics = ["client.*"]
"""
PRODUCER, CONSUMER = 4, 5  # OTLP span kinds


@dataclass
class Bus:
    url: str
    receiver: Receiver
    node: NodeProcess


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory, plugins_dir: Path) -> Iterator[Bus]:
    """One traced node (echo, and listener subscribed to ``client.*``) whose metrics are switched off."""
    root = tmp_path_factory.mktemp("client-export")
    d = root / "plugins"
    d.mkdir()
    shutil.copy(plugins_dir / "echo.wasm", d / "echo.wasm")
    shutil.copy(plugins_dir / "echo.toml", d / "echo.toml")
    shutil.copy(plugins_dir / "echo.wasm", d / "listener.wasm")
    (d / "listener.toml").write_text(LISTENER_TOML)
    (root / "policy.toml").write_text(POLICY)
    receiver = Receiver()
    # Metrics off, exported every 100 ms if they were not: any metrics request would come at once.
    env = {**_no_otel(), "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50",
           "OTEL_METRICS_EXPORTER": "none", "OTEL_METRIC_EXPORT_INTERVAL": "100"}
    try:
        with NatsServer() as server:
            node = NodeProcess("traced", d, server.url, root / "node.log", env=env)
            try:
                node.wait_ready()
                yield Bus(server.url, receiver, node)
            finally:
                node.terminate()
    finally:
        receiver.close()


def _no_otel() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SANDBUS_JAEGER"))}


def _cli(*args: str, env: dict[str, str], timeout: float = 30) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    return r, time.monotonic() - start


def _exporting(bus: Bus, **more: str) -> tuple[dict[str, str], str]:
    """The environment of a CLI run exporting to the receiver, and the resource mark of its spans."""
    run = uuid.uuid4().hex
    return {**_no_otel(), "OTEL_EXPORTER_OTLP_ENDPOINT": bus.receiver.url,
            "OTEL_RESOURCE_ATTRIBUTES": f"test.run={run}", **more}, run


def _client_span(bus: Bus, run: str, name: str, service: str = "sandbus-cli") -> dict[str, Any]:
    """The one span named ``name`` that the CLI run marked ``run`` exported (it exported before exiting)."""
    spans = bus.receiver.find(lambda s: s["resource"].get("test.run") == run)
    matching = [s for s in spans if s["name"] == name]
    assert len(matching) == 1, f"{name} among {[s['name'] for s in spans]}"
    assert matching[0]["service"] == service
    return matching[0]


def _child_of(bus: Bus, span: dict[str, Any], name: str) -> dict[str, Any]:
    """The node's span ``name`` whose parent is ``span``, waited for (the node exports in batches)."""
    def found() -> list[dict[str, Any]]:
        return [s for s in bus.receiver.trace(span["trace_id"]) if s["name"] == name]

    bus.receiver.wait_for(lambda: bool(found()), 20, name)
    (child,) = found()
    assert child["parent"] == span["span_id"], f"{name} is not a child of {span['name']}"
    assert child["instance"] == "traced"
    return child


def test_request_exports_its_send_span_as_the_root_of_the_nodes_process_span(bus: Bus) -> None:
    env, run = _exporting(bus)
    r, _ = _cli("-m", "sandbus", "request", "echo", "handle_request", '{"n": 1}', "--nats", bus.url, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == '{"n": 1}'
    assert r.stderr == ""
    # The command exported before it exited: the span is there now, not eventually.
    send = _client_span(bus, run, "send sandbus.req.echo.handle_request")
    assert send["parent"] is None, "the client's send span is the root of the trace"
    assert send["kind"] == PRODUCER
    assert send["attributes"]["messaging.destination.name"] == "sandbus.req.echo.handle_request"
    process = _child_of(bus, send, "process sandbus.req.echo.handle_request")
    assert process["kind"] == CONSUMER
    assert process["service"] == "sandbus-node"


def test_pub_exports_its_send_span_as_the_parent_of_the_delivery(bus: Bus) -> None:
    env, run = _exporting(bus, OTEL_SERVICE_NAME="checkout-script")
    r, _ = _cli("-m", "sandbus", "pub", "client.created", '{"order": 7}', "--nats", bus.url, env=env)
    assert r.returncode == 0, r.stderr
    msg_id = r.stdout.strip()
    send = _client_span(bus, run, "send sandbus.topic.client.created", service="checkout-script")
    assert send["parent"] is None
    assert send["kind"] == PRODUCER
    assert send["attributes"]["messaging.message.id"] == msg_id
    process = _child_of(bus, send, "process sandbus.topic.client.created")
    assert process["attributes"]["messaging.consumer.group.name"] == "sandbus.listener"


def test_the_console_exporter_writes_to_stderr_and_leaves_the_output_alone(bus: Bus) -> None:
    env = {**_no_otel(), "OTEL_TRACES_EXPORTER": "console"}
    r, _ = _cli("-m", "sandbus", "request", "echo", "handle_request", '{"c": 1}', "--nats", bus.url, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == '{"c": 1}\n'
    assert '"name": "send sandbus.req.echo.handle_request"' in r.stderr
    assert '"service.name": "sandbus-cli"' in r.stderr


def test_without_otel_the_cli_loads_no_sdk_and_exports_nothing(bus: Bus) -> None:
    # -X importtime lists every module the command imported, on stderr
    r, _ = _cli("-X", "importtime", "-m", "sandbus", "request", "echo", "handle_request", "[3]", "--nats", bus.url,
                env=_no_otel())
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[3]"
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "sandbus.host.cli.client_otel" in imported  # the listing is the command's, which decided
    loaded = sorted(m for m in imported if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter",
                                                         "sandbus.host.telemetry.client_export", "requests")))
    assert loaded == [], "the CLI loaded SDK or exporter modules with OTEL_* unset: it could have exported"
    assert not [line for line in r.stderr.splitlines() if not line.startswith("import time:")]


def test_a_collector_that_does_not_answer_holds_the_command_about_a_second(bus: Bus) -> None:
    """The worst case (a refused connection fails at once): the collector accepts the connection, reads the
    request and never answers. The wait it imposes: from the exporter's connection until the exporter gives
    up and closes it."""
    connected: list[float] = []
    closed: list[float] = []
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        hole.settimeout(30)

        def accept() -> None:
            with contextlib.suppress(OSError):
                conn, _ = hole.accept()
                connected.append(time.monotonic())
                with conn:
                    conn.settimeout(30)
                    while conn.recv(65536):  # the request, never answered, until the client hangs up
                        pass
                    closed.append(time.monotonic())

        acceptor = threading.Thread(target=accept, daemon=True)
        acceptor.start()
        env = {**_no_otel(), "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{hole.getsockname()[1]}"}
        r, _ = _cli("-m", "sandbus", "request", "echo", "handle_request", "[4]", "--nats", bus.url, env=env)
        exited = time.monotonic()
        acceptor.join(5)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[4]"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("sandbus: warning: client spans not exported"), r.stderr
    assert connected, "the CLI never tried the collector"
    assert closed, "the CLI exited without closing its connection to the collector"
    assert closed[0] - connected[0] < 1.5, f"the silent collector held the command {closed[0] - connected[0]:.2f} s"
    # and then it exits (generous: interpreter shutdown on a loaded machine)
    assert exited - closed[0] < 2.0


def test_a_refused_collector_is_one_line_and_the_same_result(bus: Bus) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        env = {**_no_otel(), "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}/v1/traces"}
        r, _ = _cli("-m", "sandbus", "request", "echo", "handle_request", "[5]", "--nats", bus.url, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[5]"
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_sandbus_trace_prints_the_jaeger_link_and_exports_the_clients_spans(bus: Bus) -> None:
    env, run = _exporting(bus, SANDBUS_JAEGER_URL="http://127.0.0.1:16686/")
    r, _ = _cli("-m", "sandbus", "trace", "echo", "handle_request", '{"t": 1}', "--nats", bus.url, env=env)
    assert r.returncode == 0, r.stderr
    first, *_, last = r.stdout.strip().splitlines()
    root = _client_span(bus, run, "sandbus trace echo.handle_request")
    trace_id = root["trace_id"]
    assert first == f"trace id {trace_id}  (Jaeger: http://127.0.0.1:16686/trace/{trace_id})"
    assert last == '{"t": 1}'
    assert "sandbus trace echo.handle_request" in r.stderr  # the span tree
    assert "sandbus-cli" in r.stderr
    assert "traced" in r.stderr  # the node's spans, under its node id
    send = _client_span(bus, run, "send sandbus.req.echo.handle_request")
    assert send["parent"] == root["span_id"]
    _child_of(bus, send, "process sandbus.req.echo.handle_request")


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/", "127.0.0.1:16686", "http://", "http://h:99999/", "http://h:x/",
                                 "http://h/?q=1", "http://h/#top", "http://u:p@h/", "http://h/\x1b[31m", "http://h/a b",
                                 "javascript:alert(1)", "http://h/" + "a" * MAX_JAEGER_URL])
def test_a_jaeger_url_that_is_not_an_http_url_is_refused(url: str) -> None:
    with pytest.raises(typer.BadParameter):
        jaeger_base(url)


@pytest.mark.parametrize(("url", "base"), [
    ("http://127.0.0.1:16686", "http://127.0.0.1:16686"), ("http://127.0.0.1:16686/", "http://127.0.0.1:16686"),
    ("https://ops.example/jaeger/", "https://ops.example/jaeger"), ("", None), (None, None)])
def test_a_jaeger_url_is_taken_without_its_trailing_slash(url: str | None, base: str | None) -> None:
    assert jaeger_base(url) == base


def test_a_bad_jaeger_url_is_a_usage_error_of_one_line() -> None:
    r, _ = _cli("-m", "sandbus", "trace", "echo", "--nats", "nats://127.0.0.1:1", "--jaeger", "ftp://127.0.0.1/",
                env={**_no_otel(), "SANDBUS_JAEGER_URL": "http://127.0.0.1:16686"})  # the option wins
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "jaeger" in r.stderr.lower()


async def test_a_traced_node_without_metrics_sends_no_metrics_requests(bus: Bus) -> None:
    """Runs last of the tests on ``bus``: it stops the node."""
    async with await Client.connect(bus.url) as c:
        assert await c.request("echo", "handle_request", [6]) == [6]

    def posted_traces() -> bool:
        with bus.receiver.lock:
            return "/v1/traces" in bus.receiver.posts

    bus.receiver.wait_for(posted_traces, 20, "the node's spans")
    assert bus.node.terminate() == 0  # the node's shutdown exports whatever it still has, metrics included
    with bus.receiver.lock:
        posts = list(bus.receiver.posts)
    assert [p for p in posts if p != "/v1/traces"] == []


@pytest.mark.parametrize(("env", "traces", "metrics"), [
    ({}, False, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://jaeger:4318/v1/traces"}, True, False),
    ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://prometheus:9090/api/v1/otlp/v1/metrics"}, False, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_METRICS_EXPORTER": "none"}, True, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "TRUE"}, False, False),
    ({"OTEL_TRACES_EXPORTER": "console"}, True, False),
    ({"OTEL_METRICS_EXPORTER": "otlp"}, False, True),
    ({"OTEL_TRACES_EXPORTER": " None "}, False, False),
    ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, False, False),
])
def test_which_variables_switch_each_signal_on(env: dict[str, str], traces: bool, metrics: bool) -> None:
    assert tracing_configured(env) is traces
    assert metrics_configured(env) is metrics


@pytest.mark.parametrize(("env", "spans", "meters"), [
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces"}, True, False),
    ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://127.0.0.1:9/api/v1/otlp/v1/metrics"}, False, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_METRICS_EXPORTER": "none"}, True, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, True, True),
])
def test_a_nodes_telemetry_sets_up_each_signal_its_variables_ask_for(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], spans: bool, meters: bool) -> None:
    from sandbus.host.telemetry.otel import Telemetry

    for name in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    for name, value in {**env, "SANDBUS_FAST_SPANS": "0"}.items():  # no exporter process for this
        monkeypatch.setenv(name, value)
    tel = Telemetry("sandbus-node", "unit", set_global=False)
    try:
        assert tel.enabled is spans
        assert (tel.provider is not None) is spans
        assert (tel.meter_provider is not None) is meters
    finally:
        if tel.meter_provider is not None:
            tel.meter_provider.shutdown(timeout_millis=100)
            tel.meter_provider = None
        tel.shutdown()
