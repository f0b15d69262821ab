"""One trace across client -> node B (plugin publishes) -> node A (subscribed plugin), exported by the
real OTLP/HTTP exporter to a receiver in the test that decodes opentelemetry-proto."""

from __future__ import annotations

import contextlib
import functools
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from sandbus.bus.server import NatsServer
from sandbus.sdk.client import Client
from sandbus.sdk.errors import ExecutionTimeoutError, SecurityViolationError
from tests.bus.conftest import POLICY, RECORDER_TOML, SPINNER_TOML, NodeProcess
from tests.telemetry.otlp_receiver import Receiver

WATCHER_TOML = """
[plugin]
name = "watcher"
version = "2.1.0"
description = "echo, subscribed to what recorders saw"
author = "tests"
license = "Apache-2.0"
min_runtime_version = "0.1.0"
[capabilities]
required = ["compute"]
[subscriptions]
topics = ["seen.*"]
"""


def _has_names(receiver: Receiver, trace_id: str, names: set[str]) -> bool:
    """Whether the receiver has spans of every name in ``names`` in the trace."""
    return names <= {s["name"] for s in receiver.trace(trace_id)}


@pytest.fixture(scope="session")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    # The test process is the client: its spans go through the real OTLP exporter too.
    provider = TracerProvider(resource=Resource.create({"service.name": "test-client"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{r.url}/v1/traces")))
    trace.set_tracer_provider(provider)
    yield r
    provider.shutdown()
    r.close()


def _plugin_dir(root: Path, files: dict[str, tuple[Path | bytes, str]]) -> Path:
    d = root / "plugins"
    d.mkdir(parents=True)
    for name, (wasm, manifest) in files.items():
        if isinstance(wasm, Path):
            shutil.copy(wasm, d / f"{name}.wasm")
        else:
            (d / f"{name}.wasm").write_bytes(wasm)
        (d / f"{name}.toml").write_text(manifest)
    (root / "policy.toml").write_text(POLICY)
    return d


@pytest.fixture
def two_nodes(tmp_path: Path, receiver: Receiver, plugins_dir: Path, c_guest_flags: Callable[..., Path],
              wat: Callable[[str], bytes]) -> Iterator[tuple[NatsServer, NodeProcess, NodeProcess]]:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50",
           "OTEL_TRACES_SAMPLER": "parentbased_always_on", "OTEL_METRIC_EXPORT_INTERVAL": "200"}
    a_dir = _plugin_dir(tmp_path / "a", {"watcher": (plugins_dir / "echo.wasm", WATCHER_TOML)})
    b_dir = _plugin_dir(tmp_path / "b", {
        "rec_a": (c_guest_flags("recorder", "rec_a", '-DPLUGIN_NAME="rec_a"'),
                  RECORDER_TOML.format(name="rec_a", durable="true")),
        "spinner": (wat("adversary"), SPINNER_TOML),
    })
    with NatsServer() as server:
        a = NodeProcess("node-a", a_dir, server.url, tmp_path / "a.log", env=env)
        b = NodeProcess("node-b", b_dir, server.url, tmp_path / "b.log", env=env)
        try:
            a.wait_ready()
            b.wait_ready()
            yield server, a, b
        finally:
            a.terminate()
            b.terminate()


async def test_one_trace_across_client_two_nodes_and_a_topic(two_nodes: tuple[NatsServer, Any, Any],
                                                             receiver: Receiver) -> None:
    server, _, _ = two_nodes
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("test request") as root:
        async with await Client.connect(server.url) as c:
            assert await c.request("rec_a", "handle_request", {"hello": "trace"}) == {"published": True}
    trace_id = format(root.get_span_context().trace_id, "032x")
    chain = [
        ("send sandbus.req.rec_a.handle_request", "test request", "test-client", None, 4),
        ("process sandbus.req.rec_a.handle_request", "send sandbus.req.rec_a.handle_request", "sandbus-node",
         "node-b", 5),
        ("execute rec_a.handle_request", "process sandbus.req.rec_a.handle_request", "sandbus-node", "node-b", 1),
        ("send sandbus.topic.seen.rec_a", "execute rec_a.handle_request", "sandbus-node", "node-b", 4),
        ("process sandbus.topic.seen.rec_a", "send sandbus.topic.seen.rec_a", "sandbus-node", "node-a", 5),
        ("execute watcher.handle_request", "process sandbus.topic.seen.rec_a", "sandbus-node", "node-a", 1),
    ]
    expected = {name for name, *_ in chain}
    receiver.wait_for(lambda: expected <= {s["name"] for s in receiver.trace(trace_id)}, 20,
                      "every span of the chain")
    spans = {s["name"]: s for s in receiver.trace(trace_id)}
    for name, parent, service, instance, kind in chain:
        span = spans[name]
        assert span["parent"] == spans[parent]["span_id"], f"{name} should be a child of {parent}"
        assert span["service"] == service
        if instance:
            assert span["instance"] == instance
        assert span["kind"] == kind  # 4 PRODUCER, 5 CONSUMER, 1 INTERNAL
    process = spans["process sandbus.topic.seen.rec_a"]["attributes"]
    assert process["messaging.system"] == "nats"
    assert process["messaging.operation.type"] == "process"
    assert process["messaging.destination.name"] == "sandbus.topic.seen.rec_a"
    assert process["messaging.consumer.group.name"] == "sandbus.watcher"
    assert process["messaging.nats.delivery_count"] == 1
    execute = spans["execute watcher.handle_request"]["attributes"]
    assert execute["sandbus.plugin.name"] == "watcher"
    assert execute["sandbus.plugin.version"] == "2.1.0"
    assert execute["sandbus.outcome"] == "ok"
    assert execute["sandbus.fuel_consumed"] > 0


CALLER_TOML = """
[plugin]
name = "caller"
version = "1.0.0"
description = "requests echo"
author = "tests"
license = "Apache-2.0"
min_runtime_version = "0.1.0"
[capabilities]
required = ["compute", "messaging"]
[permissions]
request_plugins = ["echo"]
"""


async def test_a_plugin_to_plugin_request_stays_in_the_callers_trace(
        tmp_path: Path, receiver: Receiver, plugins_dir: Path, c_guest_flags: Callable[..., Path]) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50",
           "OTEL_TRACES_SAMPLER": "parentbased_always_on"}
    a_dir = _plugin_dir(tmp_path / "a", {"echo": (plugins_dir / "echo.wasm", (plugins_dir / "echo.toml").read_text())})
    b_dir = _plugin_dir(tmp_path / "b", {"caller": (c_guest_flags("caller", "caller", '-DPLUGIN_NAME="caller"'),
                                                    CALLER_TOML)})
    tracer = trace.get_tracer("test")
    with NatsServer() as server:
        a = NodeProcess("req-a", a_dir, server.url, tmp_path / "a.log", env=env)
        b = NodeProcess("req-b", b_dir, server.url, tmp_path / "b.log", env=env)
        try:
            a.wait_ready()
            b.wait_ready()
            with tracer.start_as_current_span("test plugin request") as root:
                async with await Client.connect(server.url) as c:
                    reply = await c.request("caller", "handle_request", {"target": "echo", "payload": [1]})
        finally:
            a.terminate()
            b.terminate()
    assert reply == {"status": 0, "body": [1]}
    trace_id = format(root.get_span_context().trace_id, "032x")
    chain = [
        ("execute caller.handle_request", "process sandbus.req.caller.handle_request", "req-b", 1),
        ("send sandbus.req.echo.handle_request", "execute caller.handle_request", "req-b", 4),
        ("process sandbus.req.echo.handle_request", "send sandbus.req.echo.handle_request", "req-a", 5),
        ("execute echo.handle_request", "process sandbus.req.echo.handle_request", "req-a", 1),
    ]
    expected = {name for name, *_ in chain}
    receiver.wait_for(lambda: expected <= {s["name"] for s in receiver.trace(trace_id)}, 20,
                      "every span of the request chain")
    spans = {s["name"]: s for s in receiver.trace(trace_id)}
    for name, parent, instance, kind in chain:
        assert spans[name]["parent"] == spans[parent]["span_id"], f"{name} should be a child of {parent}"
        assert spans[name]["instance"] == instance
        assert spans[name]["kind"] == kind  # 4 PRODUCER, 5 CONSUMER, 1 INTERNAL
    assert spans["send sandbus.req.echo.handle_request"]["attributes"]["messaging.destination.name"] == \
        "sandbus.req.echo.handle_request"


async def test_metrics_are_exported_per_plugin(two_nodes: tuple[NatsServer, Any, Any], receiver: Receiver) -> None:
    server, _, _ = two_nodes
    async with await Client.connect(server.url) as c:
        for i in range(5):
            assert await c.request("rec_a", "handle_request", {"i": i}) == {"published": True}

    def calls() -> float:
        with receiver.lock:
            got = [m["value"] for m in receiver.metrics
                   if m["name"] == "sandbus.calls" and m["plugin"] == "rec_a" and m["instance"] == "node-b"]
        return max(got, default=0)

    receiver.wait_for(lambda: calls() >= 5, 20, "sandbus.calls for rec_a")
    documented = _documented_metrics()
    assert len(documented) == 7

    def names() -> set[str]:
        with receiver.lock:
            return {m["name"] for m in receiver.metrics if m["instance"] == "node-b"}

    receiver.wait_for(lambda: documented <= names(), 20, f"every documented metric: {documented}")
    assert {n for n in names() if n.startswith("sandbus.")} == documented, "a metric docs/telemetry.md does not list"
    with receiver.lock:
        seen = {m["name"]: m for m in receiver.metrics if m["instance"] == "node-b" and m["plugin"] == "rec_a"}
    assert seen["sandbus.call.duration"]["kind"] == "histogram"
    assert seen["sandbus.call.duration"]["unit"] == "s"
    assert seen["sandbus.calls"]["kind"] == "sum"
    assert seen["sandbus.calls"]["monotonic"] is True
    assert seen["sandbus.plugin.memory"]["kind"] == "gauge"
    assert seen["sandbus.plugin.memory"]["unit"] == "By"


def _documented_metrics() -> set[str]:
    """The metric names of docs/telemetry.md's table (its first column, under the Metrics heading)."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "telemetry.md").read_text(encoding="utf-8")
    section = text.split("\n## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(sandbus\.[a-z_.]+)` \|", section, re.MULTILINE))


async def test_inline_requests_are_traced_without_the_sdk(two_nodes: tuple[NatsServer, Any, Any],
                                                         receiver: Receiver) -> None:
    """spinner runs inline (no bus host functions): its request spans come from host/telemetry/fast_spans.py,
    and must look exactly like the SDK's, audit events and latency histogram included."""
    server, _, _ = two_nodes
    tracer = trace.get_tracer("test")
    async with await Client.connect(server.url) as c:
        (view,) = [n for n in await c.nodes() if n["node_id"] == "node-b"]
        assert view["request_spans"] == "fast"
        with tracer.start_as_current_span("inline ok") as ok:
            assert await c.request("spinner", "echo", {"v": 1}) == {"v": 1}
        with tracer.start_as_current_span("inline denied") as denied, pytest.raises(SecurityViolationError):
            await c.request("spinner", "open_file", {})
        (view,) = [n for n in await c.nodes() if n["node_id"] == "node-b"]
        assert view["spans_dropped"] == 0
    for root, function, outcome in ((ok, "echo", "ok"), (denied, "open_file", "error")):
        trace_id = format(root.get_span_context().trace_id, "032x")
        names = {f"send sandbus.req.spinner.{function}", f"process sandbus.req.spinner.{function}",
                 f"execute spinner.{function}"}
        receiver.wait_for(functools.partial(_has_names, receiver, trace_id, names), 20, str(names))
        spans = {s["name"]: s for s in receiver.trace(trace_id)}
        send, process, execute = (spans[f"send sandbus.req.spinner.{function}"],
                                  spans[f"process sandbus.req.spinner.{function}"],
                                  spans[f"execute spinner.{function}"])
        assert process["parent"] == send["span_id"]
        assert execute["parent"] == process["span_id"]
        assert (process["kind"], execute["kind"]) == (5, 1)
        assert process["instance"] == execute["instance"] == "node-b"
        assert process["attributes"]["messaging.consumer.group.name"] == "sandbus.spinner"
        assert process["attributes"]["messaging.message.body.size"] > 0
        assert execute["attributes"]["sandbus.outcome"] == outcome
        if outcome == "ok":
            assert execute["attributes"]["sandbus.fuel_consumed"] > 0
            assert execute["attributes"]["sandbus.memory_bytes"] > 0
        else:
            assert execute["attributes"]["error.type"] == "security.violation"
            events = {e["name"]: e["attributes"] for e in execute["events"]}
            assert events["audit.security.fs_denied"]["audit.level"] == "critical"

    def latencies() -> float:
        with receiver.lock:
            return max((m["value"] for m in receiver.metrics if m["name"] == "sandbus.call.duration"
                        and m["plugin"] == "spinner" and m["instance"] == "node-b"), default=0)

    receiver.wait_for(lambda: latencies() >= 1, 20, "the latency histogram of spinner's inline call")


async def test_audit_events_ride_on_the_execution_span(two_nodes: tuple[NatsServer, Any, Any],
                                                       receiver: Receiver) -> None:
    server, _, _ = two_nodes
    tracer = trace.get_tracer("test")
    ids = {}
    async with await Client.connect(server.url) as c:
        with tracer.start_as_current_span("denied") as denied, pytest.raises(SecurityViolationError):
            await c.request("rec_a", "handle_request", {"forbidden": 1})
        ids["denied"] = format(denied.get_span_context().trace_id, "032x")
        with tracer.start_as_current_span("timeout") as slow, pytest.raises(ExecutionTimeoutError):
            await c.request("spinner", "loop_forever", {}, timeout=10)
        ids["timeout"] = format(slow.get_span_context().trace_id, "032x")
    for case, span_name, event in (("denied", "execute rec_a.handle_request", "audit.security.publish_denied"),
                                   ("timeout", "execute spinner.loop_forever", "audit.limit.timeout")):
        receiver.wait_for(functools.partial(_has_names, receiver, ids[case], {span_name}), 20, span_name)
        span = next(s for s in receiver.trace(ids[case]) if s["name"] == span_name)
        events = {e["name"]: e["attributes"] for e in span["events"]}
        assert event in events, f"{span_name} events: {list(events)}"
        assert events[event]["audit.level"] in ("warning", "critical")
        assert span["attributes"]["sandbus.outcome"] == "error"
        assert span["attributes"]["error.type"] in ("security.violation", "limit.timeout")


async def test_sampling_off_exports_nothing(tmp_path: Path, receiver: Receiver, plugins_dir: Path) -> None:
    d = _plugin_dir(tmp_path, {"echo": (plugins_dir / "echo.wasm", (plugins_dir / "echo.toml").read_text())})
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_TRACES_SAMPLER": "always_off"}
    with NatsServer() as server:
        node = NodeProcess("node-off", d, server.url, tmp_path / "off.log", env=env)
        try:
            node.wait_ready()
            async with await Client.connect(server.url) as c:
                for i in range(20):
                    assert await c.request("echo", "handle_request", [i]) == [i]
        finally:
            assert node.terminate() == 0  # shutdown flushes the exporter: nothing is left in flight
    assert not [s for s in receiver.spans if s["instance"] == "node-off"]


def test_sandbus_trace_shows_node_spans_without_a_collector(tmp_path: Path, plugins_dir: Path) -> None:
    import os
    import subprocess
    import sys

    d = _plugin_dir(tmp_path, {"echo": (plugins_dir / "echo.wasm", (plugins_dir / "echo.toml").read_text())})
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    with NatsServer() as server:
        node = NodeProcess("node-t", d, server.url, tmp_path / "t.log")  # no OTEL_* set: tracing off
        try:
            node.wait_ready()
            r = subprocess.run([sys.executable, "-m", "sandbus", "trace", "echo", "handle_request", '{"x": 1}',
                                "--nats", server.url], capture_output=True, text=True, timeout=60, env=env)
        finally:
            node.terminate()
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == '{"x": 1}'
    assert r.stdout.startswith("trace id ")
    # No --jaeger: no link with a missing host, but how to get one.
    assert "(pass --jaeger URL for a link to it in Jaeger)" in r.stdout.splitlines()[0]
    for name in ("send sandbus.req.echo.handle_request", "process sandbus.req.echo.handle_request",
                 "execute echo.handle_request"):
        assert name in r.stderr
    assert "node-t" in r.stderr


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def test_the_span_exporter_process_ends_with_its_node(tmp_path: Path, receiver: Receiver, plugins_dir: Path) -> None:
    import os
    import signal

    d = _plugin_dir(tmp_path, {"echo": (plugins_dir / "echo.wasm", (plugins_dir / "echo.toml").read_text())})
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
    with NatsServer() as server:
        node = NodeProcess("node-k", d, server.url, tmp_path / "k.log", env=env)
        exporters: list[int] = []
        try:
            node.wait_ready()
            exporters = [p for p in _children(node.proc.pid)
                         if "sandbus.host.telemetry.export" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
            assert len(exporters) == 1, "a traced node runs one span exporter process"
            node.kill9()  # no shutdown: the exporter only sees its stdin close

            def alive(pid: int) -> bool:  # an exited process nobody reaped yet is a zombie: not alive
                try:
                    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
                except OSError:
                    return False

            deadline = time.monotonic() + 15
            while alive(exporters[0]) and time.monotonic() < deadline:
                time.sleep(0.05)  # polling /proc: the exporter is not our child, so no wait() for it
            assert not alive(exporters[0]), "the exporter process outlived its node"
        finally:
            node.terminate()  # already dead: closes its log
            for pid in exporters:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
