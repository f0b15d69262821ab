"""Every request traced vs tracing off, for each way a node's request spans reach the collector, in one run.

Nodes serve the wasm echo plugin from the same nats-server: one untraced, and one per variant tracing
every request (sampler always on) to a local OTLP/HTTP receiver: the exporter process with the
hand-written encoder (``SANDBUS_SPAN_ENCODER=wire``, the default), the exporter process with the
official ``opentelemetry-exporter-otlp-proto-common`` encoder (``SANDBUS_SPAN_ENCODER=sdk``), and the
SDK doing everything in the node's process (``SANDBUS_FAST_SPANS=0``). One client process drives each
traced node against the untraced one in alternating runs (c=64, 100-byte payloads), then waits for the
receiver to have decoded two spans per request sent: a ratio only counts if no span was lost on the way.

    python bench/bench_tracing.py [--quick] [--only wire|sdk|node ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nats
import orjson
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbus.bus.server import NatsServer  # noqa: E402
from sandbus.sdk.client import Client  # noqa: E402

#: An OTLP/HTTP receiver in a process of its own (as a collector would be): decodes every trace
#: export with the official protobuf classes and counts spans per service.instance.id; GET answers
#: the counts as JSON.
RECEIVER = """
import json, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
counts, lock = {}, threading.Lock()
class Receiver(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a collector
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/v1/traces":
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            for rs in req.resource_spans:
                node = next((a.value.string_value for a in rs.resource.attributes
                             if a.key == "service.instance.id"), "")
                with lock:
                    counts[node] = counts.get(node, 0) + sum(len(ss.spans) for ss in rs.scope_spans)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def do_GET(self):
        with lock:
            data = json.dumps(counts).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
print("receiver", server.server_address[1], flush=True)
server.serve_forever()
"""

#: node id -> (label, environment of its node): the exporter process's two encoders, and the SDK doing
#: everything in the node's process (what the exporter process replaced)
VARIANTS = {
    "wire": ("exporter process, hand-written", {"SANDBUS_SPAN_ENCODER": "wire"}),
    "sdk": ("exporter process, official", {"SANDBUS_SPAN_ENCODER": "sdk"}),
    "node": ("SDK in the node", {"SANDBUS_FAST_SPANS": "0"}),
}


def start(args: list[str], ready: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    deadline = time.monotonic() + 60
    while ready not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"{args[:4]} did not start: {log.read_text()}")
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def load(url: str, subject: str, concurrency: int, duration: float) -> tuple[float, int]:
    """(requests/s, requests sent including warm-up) of ``concurrency`` workers sending back to back."""
    nc = await nats.connect(url)
    payload = orjson.dumps({"pad": "y" * 88})  # 100 bytes of JSON
    done = 0
    stop_at = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await nc.request(subject, payload, timeout=10)
            done += 1

    warm = 200
    for _ in range(warm):
        await nc.request(subject, payload, timeout=10)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await nc.close()
    return done / elapsed, done + warm


def alternate(url: str, off: str, on: str, concurrency: int, duration: float,
              rounds: int) -> tuple[float, float, list[float], int]:
    """Median req/s untraced and traced, the ratios of neighbouring runs, and the traced requests sent.

    ABBA order on a shared 2-core machine whose speed drifts: both sides see the same drift.
    """
    rates: dict[str, list[float]] = {off: [], on: []}
    sent = 0
    for i in range(rounds):
        for subject in ((off, on) if i % 2 == 0 else (on, off)):
            rate, n = asyncio.run(load(url, subject, concurrency, duration))
            rates[subject].append(rate)
            if subject == on:
                sent += n
    ratios = [b / a for a, b in zip(rates[off], rates[on], strict=True)]
    return statistics.median(rates[off]), statistics.median(rates[on]), ratios, sent


def received(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        counts: dict[str, int] = orjson.loads(r.read())
    return counts


def wait_for_spans(port: int, node_id: str, expected: int, timeout_s: float) -> tuple[int, float]:
    """(spans the receiver has for ``node_id``, seconds it took) once ``expected`` arrived, nothing more
    arrived for 10 s, or ``timeout_s`` passed."""
    t0 = last_change = time.monotonic()
    last = -1
    while True:
        got = received(port).get(node_id, 0)
        now = time.monotonic()
        if got != last:
            last, last_change = got, now
        if got >= expected or now - last_change > 10 or now - t0 > timeout_s:
            return got, last_change - t0
        time.sleep(0.1)


async def spans_dropped(url: str, node_id: str) -> int:
    """Spans the node could not hand to its exporter process so far (its queue was full)."""
    async with await Client.connect(url) as c:
        for view in await c.nodes(timeout=1.0):
            if view["node_id"] == node_id:
                return int(view["spans_dropped"])
    raise RuntimeError(f"node {node_id} did not answer")


def exporter_pid(node_pid: int) -> int:
    """The node's span exporter process (``python -m sandbus.host.telemetry.export``)."""
    for task in Path(f"/proc/{node_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if "sandbus.host.telemetry.export" in Path(f"/proc/{child}/cmdline").read_text(errors="replace"):
                return int(child)
    raise RuntimeError(f"node {node_pid} has no span exporter process")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def plugin_dir(work: Path, name: str) -> Path:
    d = work / name
    d.mkdir()
    shutil.copy(ROOT / "plugins" / "build" / "echo.wasm", d / f"{name}.wasm")
    (d / f"{name}.toml").write_text((ROOT / "plugins" / "build" / "echo.toml").read_text()
                                    .replace('name = "echo"', f'name = "{name}"'))
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=sorted(VARIANTS), action="append",
                    help="measure only this variant (repeatable); default: all")
    args = ap.parse_args()
    duration, rounds = (1.5, 2) if args.quick else (2.0, 6)
    concurrency = 64
    work = Path(tempfile.mkdtemp(prefix="sandbus-bench-tracing-"))
    console = Console(width=140)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with NatsServer(jetstream=False) as server:
            procs.append(start([sys.executable, "-c", RECEIVER], "receiver", work / "receiver.log"))
            port = int((work / "receiver.log").read_text().split()[1])
            node_cmd = [sys.executable, "-m", "sandbus", "node", "--nats", server.url, "--no-watch", "--no-durable"]
            procs.append(start([*node_cmd, "--plugins", str(plugin_dir(work, "echo_off")), "--node-id", "off"],
                               "node off ready", work / "off.log", env={"OTEL_SDK_DISABLED": "true"}))
            nodes = {}
            for kind, (_, env) in VARIANTS.items():
                if args.only and kind not in args.only:
                    continue
                nodes[kind] = start([*node_cmd, "--plugins", str(plugin_dir(work, f"echo_{kind}")), "--node-id", kind],
                                    f"node {kind} ready", work / f"{kind}.log", env={
                                        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                                        "OTEL_TRACES_SAMPLER": "always_on", "OTEL_METRICS_EXPORTER": "none", **env})
                procs.append(nodes[kind])
            table = Table(title=f"every request traced vs tracing off: c={concurrency}, 100 B, {rounds} alternating "
                                f"{duration:g} s runs per row (medians)")
            for col in ("spans encoded by", "off req/s", "traced req/s", "ratio", "ratio range", "spans sent",
                        "dropped by node", "received (lost)", "exporter CPU per request", "last span after"):
                table.add_column(col, justify="right")
            off_subject = "sandbus.req.echo_off.handle_request"
            for kind, node in nodes.items():
                exporter = exporter_pid(node.pid) if kind != "node" else None
                dropped0, cpu0, got0 = asyncio.run(spans_dropped(server.url, kind)), \
                    cpu_s(exporter) if exporter else 0.0, received(port).get(kind, 0)
                off, on, ratios, sent = alternate(server.url, off_subject, f"sandbus.req.echo_{kind}.handle_request",
                                                  concurrency, duration, rounds)
                dropped = asyncio.run(spans_dropped(server.url, kind)) - dropped0
                # The node ships every 5 s (OTEL_BSP_SCHEDULE_DELAY) or per 512 requests, and a slow exporter
                # process is still encoding its backlog: wait for what was not dropped, boundedly.
                got, after = wait_for_spans(port, kind, got0 + 2 * sent - dropped, timeout_s=180)
                got -= got0
                cpu = f"{(cpu_s(exporter) - cpu0) / max(got / 2, 1) * 1e6:.0f} µs" if exporter else "-"
                table.add_row(VARIANTS[kind][0], f"{off:,.0f}", f"{on:,.0f}", f"{statistics.median(ratios):.2f}×",
                              f"{min(ratios):.2f}–{max(ratios):.2f}", f"{2 * sent:,}",
                              f"{dropped:,}" if kind != "node" else "-",
                              f"{got:,} ({1 - got / (2 * sent):.1%})",
                              cpu, f"{after:.1f} s")
            console.print(table)
            console.print("target: ≥ 0.7× with every request traced (nothing dropped) and every span received")
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
