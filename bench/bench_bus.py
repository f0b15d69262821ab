"""Requests through a host node to the wasm echo plugin vs a bare nats-py echo responder, side by side.

The responders run as separate processes against the same nats-server; the same client process
drives them at concurrency 1, 64 and 256 with 100-byte payloads. Two bare responders: one replies
with the body only, one also with the headers a node's successful reply carries (``Content-Type``,
``Sandbus-Node``): a nats-py client spends a few microseconds parsing a reply's headers, which the
first comparison counts against the node and the second does not. Then durable topic delivery
(publish -> JetStream -> plugin -> ack) vs bare JetStream publish+ack and vs the same pipeline with a
bare nats-py consumer, sandbus's ``Client.publish`` alone vs a bare nats-py JetStream publish, in
alternating rounds, and a node alone delivering a backlog (the rate it delivers at when it does not
share the cores with a publisher).

    python bench/bench_bus.py [--quick] [--rounds N] [--only requests|extism|tracing|durable]
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
from pathlib import Path
from typing import Any

import nats
import orjson
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbus.bus.server import NatsServer  # noqa: E402
from sandbus.sdk.client import Client  # noqa: E402
from sandbus.sdk.envelope import ENVELOPE, encode_message  # noqa: E402

BARE = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    headers = {"Content-Type": "application/json", "Sandbus-Node": "bare"}
    async def cb(msg):
        await nc.publish(msg.reply, msg.data)
    async def cb_headers(msg):
        await nc.publish(msg.reply, msg.data, headers=headers)
    await nc.subscribe("bench.echo", queue="bench", cb=cb)
    await nc.subscribe("bench.echo_headers", queue="bench", cb=cb_headers)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""

ECHO_TOPICS = """
[plugin]
name = "echo_topics"
version = "1.0.0"
description = "echo, subscribed to bench topics"
author = "bench"
license = "Apache-2.0"
min_runtime_version = "0.1.0"
[capabilities]
required = ["compute"]
[resources]
max_instances = 8
[subscriptions]
topics = ["bench.*"]
durable = true
"""

#: the plugin of the drain measurement: the same echo, on topics of its own
ECHO_DRAIN = ECHO_TOPICS.replace('name = "echo_topics"', 'name = "echo_drain"').replace(
    'topics = ["bench.*"]', 'topics = ["drain.*"]')

BARE_CONSUMER = """
import asyncio, sys, nats
from nats.js import api
async def main():
    # A lean nats-py JetStream consumer, no sandbus: one pull request of 128 kept open, each message acked
    # as it arrives (nats-py's fetch costs more per message than this).
    nc = await nats.connect(sys.argv[1])
    js = nc.jetstream()
    await js.add_stream(name="BENCH_CONSUMED", subjects=["barec.>"])
    await js.add_consumer("BENCH_CONSUMED", api.ConsumerConfig(
        durable_name="bare", ack_policy=api.AckPolicy.EXPLICIT, deliver_policy=api.DeliverPolicy.NEW,
        max_ack_pending=1000, ack_wait=7.0))
    inbox = nc.new_inbox()
    wake = asyncio.Event()
    left = 0
    async def cb(msg):
        nonlocal left
        status = msg.headers.get("Status") if msg.headers else None
        if status is not None and not msg.data:
            if status != "100":
                left = 0
                wake.set()
            return
        await msg.ack()
        left -= 1
        if left <= 0:
            wake.set()
    await nc.subscribe(inbox, cb=cb)
    print("ready", flush=True)
    while True:
        if left <= 0:
            left = 128
            await nc.publish("$JS.API.CONSUMER.MSG.NEXT.BENCH_CONSUMED.bare", b'{"batch":128,"expires":5000000000}',
                             reply=inbox)
        wake.clear()
        await wake.wait()
asyncio.run(main())
"""

#: the operator policy of the bench node: subscriptions need a ceiling (deny by default)
POLICY = """
[capabilities]
allowed = ["compute"]
[messaging]
subscribe_topics = ["bench.>", "drain.>"]
"""


OTLP_SINK = """
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a collector
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
print("sink", server.server_address[1], flush=True)
server.serve_forever()
"""


def start(args: list[str], ready: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    f = log.open("wb")
    proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    deadline = time.monotonic() + 60
    while ready not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{args[:4]} did not start: {log.read_text()}")
        time.sleep(0.02)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


#: requests each load run sends one at a time before it measures
WARMUP = 200


async def load(url: str, subject: str, concurrency: int, duration: float) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) of `concurrency` workers each sending requests back to back."""
    nc = await nats.connect(url)
    payload = orjson.dumps({"pad": "y" * 88})  # 100 bytes of JSON
    lat: list[float] = []
    stop_at = time.perf_counter() + duration

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            await nc.request(subject, payload, timeout=10)
            lat.append(time.perf_counter() - t)

    for _ in range(WARMUP):
        await nc.request(subject, payload, timeout=10)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await nc.close()
    lat.sort()
    return len(lat) / elapsed, lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3


Stats = tuple[float, float, float]


def alternate(url: str, subjects: list[str], concurrency: int, duration: float, rounds: int,
              cpu: dict[str, tuple[int, list[float]]] | None = None
              ) -> tuple[list[Stats], list[tuple[float, float, float]]]:
    """Median (req/s, p50, p99) of each subject, measured in alternating runs, and for each subject the
    (median, lowest, highest) of the throughput ratios last/it of the runs taken side by side.

    This machine's speed drifts by tens of percent over seconds (a shared 2-vCPU VM): alternating
    short runs exposes every side to the same drift, which one long run of each does not, and the
    ratio of neighbouring runs cancels most of what drift is left.

    ``cpu``: subject -> (pid of the process that answers it, a list): each run appends the CPU
    microseconds that process spent per request (its warm-up included, a fraction of a run).
    """
    runs: dict[str, list[Stats]] = {s: [] for s in subjects}
    for i in range(rounds):
        # forwards, then backwards: no side always runs first (warm caches, a drift within the round)
        for subject in (subjects if i % 2 == 0 else subjects[::-1]):
            watched = (cpu or {}).get(subject)
            before = cpu_seconds(watched[0]) if watched else 0.0
            stats = asyncio.run(load(url, subject, concurrency, duration))
            runs[subject].append(stats)
            if watched:
                watched[1].append((cpu_seconds(watched[0]) - before) / (stats[0] * duration + WARMUP) * 1e6)

    def median(samples: list[Stats]) -> Stats:
        return (statistics.median(x[0] for x in samples), statistics.median(x[1] for x in samples),
                statistics.median(x[2] for x in samples))

    last = runs[subjects[-1]]
    ratios = []
    for subject in subjects:
        rs = [y[0] / x[0] for x, y in zip(runs[subject], last, strict=True)]
        ratios.append((statistics.median(rs), min(rs), max(rs)))
    return [median(runs[s]) for s in subjects], ratios


async def spans_dropped(url: str, node_id: str) -> int:
    """Spans the traced node could not hand to its exporter (0: every request was traced)."""
    async with await Client.connect(url) as c:
        for view in await c.nodes(timeout=1.0):
            if view["node_id"] == node_id:
                return int(view["spans_dropped"])
    raise RuntimeError(f"node {node_id} did not answer")


#: the body of every bare publish (and the payload of the sandbus Client's): 100 bytes of JSON
BODY = {"pad": "y" * 88}


async def bare_jetstream(url: str, n: int) -> float:
    """Messages/s of a bare nats-py client publishing to a stream of its own, 64 in flight, each acked."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="BENCH_BARE", subjects=["barejs.>"])  # the same config again: a no-op
    data = orjson.dumps(BODY)
    sem = asyncio.Semaphore(64)

    async def one(i: int) -> None:
        async with sem:
            await js.publish("barejs.x", data)

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    rate = n / (time.perf_counter() - t)
    await nc.close()
    return rate


async def client_publish(url: str, n: int) -> float:
    """Messages/s of sandbus's ``Client.publish`` (envelope, ids, headers, stored and acked by the topic
    stream), 64 in flight, with the payload the bare publisher sends, onto a topic no plugin hears."""
    async with await Client.connect(url) as c:
        await c.publish("nobody.warmup", BODY)  # finds the stream once, as every client does first
        sem = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            async with sem:
                await c.publish("nobody.hears", BODY)

        t = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - t)


async def bare_consumed(url: str, n: int) -> float:
    """Messages/s from the first bare publish until the lean nats-py consumer (:data:`BARE_CONSUMER`) has
    acked all of them: what any Python consumer costs on this machine, the ceiling of a node's delivery."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    start_seq = (await js.consumer_info("BENCH_CONSUMED", "bare")).delivered.stream_seq
    data = orjson.dumps(BODY)
    sem = asyncio.Semaphore(64)

    async def one(i: int) -> None:
        async with sem:
            await js.publish("barec.x", data)

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    while True:
        info = await js.consumer_info("BENCH_CONSUMED", "bare")
        if info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.stream_seq >= start_seq + n:
            break
        await asyncio.sleep(0.005)
    rate = n / (time.perf_counter() - t)
    await nc.close()
    return rate


#: how the durable measurement publishes: as the bare publisher (same client, body, no headers), prebuilt
#: sandbus envelopes with their headers through the same raw ``js.publish``, or sandbus's own Client
PUBLISHERS = ("as_bare", "envelopes", "client")


async def durable_topics(url: str, n: int, publisher: str) -> float:
    """Messages/s from the first publish until the plugin's consumer has acked all of them.

    ``publisher`` (:data:`PUBLISHERS`): "as_bare" publishes exactly as :func:`bare_jetstream` does (a
    plain nats-py client, the same 100-byte body, no headers: the node wraps it in an envelope), so
    the two differ only by the node's delivery; "envelopes" sends prebuilt envelopes with the headers
    sandbus's Client sends through the same raw ``js.publish``; "client" publishes with sandbus's
    Client (envelope, ids, headers, trace hook).
    """
    async with await Client.connect(url) as c:
        js = c.nc.jetstream()
        start_seq = (await js.consumer_info("SANDBUS_TOPICS", "plugin-echo_topics")).delivered.stream_seq
        sem = asyncio.Semaphore(64)
        envelopes = [encode_message({"i": i}, topic="bench.created") for i in range(n)]
        bare = await nats.connect(url)
        bare_js = bare.jetstream()
        data = orjson.dumps(BODY)

        async def one(i: int) -> None:
            async with sem:
                if publisher == "client":
                    await c.publish("bench.created", BODY)
                elif publisher == "as_bare":
                    await bare_js.publish("sandbus.topic.bench.created", data)
                else:
                    message_id, envelope = envelopes[i]
                    await js.publish("sandbus.topic.bench.created", envelope,
                                     headers={**ENVELOPE, "Nats-Msg-Id": message_id})

        try:
            t = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(n)))
            while True:
                info = await js.consumer_info("SANDBUS_TOPICS", "plugin-echo_topics")
                if (info.num_pending == 0 and info.num_ack_pending == 0
                        and info.delivered.stream_seq >= start_seq + n):
                    break
                await asyncio.sleep(0.005)
            return n / (time.perf_counter() - t)
        finally:
            await bare.close()


async def _consumer_state(js: Any, durable: str) -> tuple[int, int, int, int]:
    info = await js.consumer_info("SANDBUS_TOPICS", durable)
    return info.delivered.stream_seq, info.ack_floor.stream_seq, info.num_pending, info.num_ack_pending


def drained(url: str, n: int, node_args: list[str], log: Path) -> tuple[float, float]:
    """A node alone delivering a backlog: ``n`` messages published (as :func:`bare_jetstream` publishes)
    while no node serves their plugin, then a node started; messages/s and the node's CPU microseconds
    per message from the first delivery until the last ack. Unlike the runs above, the node does not
    share the machine with a publisher: this is what one node can deliver, the rate a stream's backlog
    drains at."""
    async def publish() -> int:
        nc = await nats.connect(url)
        js = nc.jetstream()
        start_seq = (await _consumer_state(js, "plugin-echo_drain"))[0]
        data = orjson.dumps(BODY)
        sem = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            async with sem:
                await js.publish("sandbus.topic.drain.x", data)

        await asyncio.gather(*(one(i) for i in range(n)))
        await nc.close()
        return start_seq

    async def watch(start_seq: int, pid: int) -> tuple[float, float]:
        nc = await nats.connect(url)
        js = nc.jetstream()
        first: tuple[float, float, int] | None = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            delivered, acked, pending, ack_pending = await _consumer_state(js, "plugin-echo_drain")
            if first is None and delivered > start_seq:
                first = (time.perf_counter(), cpu_seconds(pid), acked)
            if first is not None and pending == 0 and ack_pending == 0 and delivered >= start_seq + n:
                elapsed, cpu = time.perf_counter() - first[0], cpu_seconds(pid) - first[1]
                done = start_seq + n - max(first[2], start_seq)
                await nc.close()
                return done / elapsed, cpu / done * 1e6
            await asyncio.sleep(0.005)
        await nc.close()
        raise RuntimeError("the drain node did not deliver the backlog within 120 s")

    start_seq = asyncio.run(publish())
    node = start(node_args, "ready", log)
    try:
        return asyncio.run(watch(start_seq, node.pid))
    finally:
        stop(node)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: the processes whose CPU time each durable run counts (besides this one, the publisher)
CPU_COLUMNS = ("publisher", "nats-server", "node", "bare consumer")


def durable_rounds(url: str, n: int, rounds: int, pids: dict[str, int]
                   ) -> tuple[dict[str, list[float]], dict[str, list[dict[str, float]]]]:
    """Each durable measurement and the publish-only ones, in alternating order, ``rounds`` times: the
    rates, and for each run the CPU microseconds per message each process spent (``pids``: the other
    processes of :data:`CPU_COLUMNS`, by column). CPU per message does not drift with what else the
    machine runs the way a rate does: it says where the time goes."""
    runs: dict[str, list[float]] = {k: [] for k in ("bare", "bare_consumed", *PUBLISHERS, "client_publish")}
    assert len(runs) == len(PUBLISHERS) + 3
    cpu: dict[str, list[dict[str, float]]] = {k: [] for k in runs}
    kinds = list(runs)
    for i in range(rounds):
        for kind in (kinds if i % 2 == 0 else kinds[::-1]):
            before = {"publisher": time.process_time(), **{k: cpu_seconds(p) for k, p in pids.items()}}
            if kind == "bare":
                rate = asyncio.run(bare_jetstream(url, n))
            elif kind == "client_publish":
                rate = asyncio.run(client_publish(url, n))
            elif kind == "bare_consumed":
                rate = asyncio.run(bare_consumed(url, n))
            else:
                rate = asyncio.run(durable_topics(url, n, kind))
            after = {"publisher": time.process_time(), **{k: cpu_seconds(p) for k, p in pids.items()}}
            runs[kind].append(rate)
            cpu[kind].append({k: (after[k] - before[k]) / n * 1e6 for k in before})
    return runs, cpu


def ratio_cells(runs: list[float], bare: list[float]) -> tuple[str, str]:
    """Median ratio and range of ``runs`` over the bare runs of the same rounds."""
    rs = [x / b for x, b in zip(runs, bare, strict=True)]
    return f"{statistics.median(rs):.2f}×", f"{min(rs):.2f}–{max(rs):.2f}"


XECHO = """
[plugin]
name = "xecho"
version = "1.0.0"
description = "an Extism echo"
author = "bench"
license = "Apache-2.0"
min_runtime_version = "0.1.0"
[capabilities]
required = ["compute"]
[resources]
memory_mb = 16
timeout_seconds = 5
max_fuel = 100000000
max_instances = 8
"""


def extism_echo(plugins: Path) -> str:
    """Put an Extism echo into ``plugins`` as ``xecho``: the AssemblyScript-PDK echo when its compiler is
    installed (tests/extism), else the WAT one; returns the function to request."""
    sys.path.insert(0, str(ROOT / "bench"))
    from extism_sdk_side import build_reflect

    try:
        build_reflect(plugins)
        (plugins / "reflect.wasm").rename(plugins / "xecho.wasm")
        function = "reflect"
    except Exception as e:  # no npm here: the WAT echo runs through the same kernel
        print(f"(AS-PDK echo not built: {type(e).__name__}; the WAT Extism echo instead)")
        from tests.host.extism.guests import plugin

        (plugins / "xecho.wasm").write_bytes(plugin())
        function = "echo"
    (plugins / "xecho.toml").write_text(XECHO)
    return function


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, help="alternating rounds per cell (default 8; durable: 3)")
    ap.add_argument("--only", choices=("requests", "extism", "tracing", "durable"), action="append",
                    help="measure only these parts (repeatable); default: all")
    args = ap.parse_args()
    parts = set(args.only or ("requests", "extism", "tracing", "durable"))
    duration = 1.5 if args.quick else 2.0
    rounds = args.rounds or (2 if args.quick else 8)
    work = Path(tempfile.mkdtemp(prefix="sandbus-bench-"))
    plugins = work / "plugins"
    plugins.mkdir()
    for ext in ("wasm", "toml"):
        shutil.copy(ROOT / "plugins" / "build" / f"echo.{ext}", plugins / f"echo.{ext}")
    shutil.copy(ROOT / "plugins" / "build" / "echo.wasm", plugins / "echo_topics.wasm")
    (plugins / "echo_topics.toml").write_text(ECHO_TOPICS)
    (work / "policy.toml").write_text(POLICY)
    extism_function = extism_echo(plugins) if "extism" in parts else None
    traced = work / "traced"
    traced.mkdir()
    shutil.copy(ROOT / "plugins" / "build" / "echo.wasm", traced / "echo_traced.wasm")
    (traced / "echo_traced.toml").write_text((ROOT / "plugins" / "build" / "echo.toml").read_text()
                                             .replace('name = "echo"', 'name = "echo_traced"'))
    console = Console(width=200)  # the durable table has 15 columns
    with NatsServer(store_dir=work / "nats") as server:
        bare = start([sys.executable, "-c", BARE, server.url], "ready", work / "bare.log")
        # The collector is a process of its own, as in production: it must not slow the client down.
        sink = start([sys.executable, "-c", OTLP_SINK], "sink", work / "sink.log")
        sink_port = int((work / "sink.log").read_text().split()[1])
        node = start([sys.executable, "-m", "sandbus", "node", "--plugins", str(plugins), "--nats", server.url,
                      "--node-id", "bench", "--no-watch", "--policy", str(work / "policy.toml")],
                     "node bench ready", work / "node.log")
        consumer = start([sys.executable, "-c", BARE_CONSUMER, server.url], "ready", work / "consumer.log")
        try:
            table = Table(title=f"request/reply, 100 B payloads, {rounds} alternating {duration:g} s runs per cell "
                                f"(medians; client: one Python process)")
            for col in ("c", "bare req/s", "bare+hdrs req/s", "node req/s", "node p50 ms", "node p99 ms",
                        "node÷bare", "range", "node÷bare+hdrs", "range", "p99÷bare p99", "CPU µs/req bare+hdrs",
                        "CPU µs/req node"):
                table.add_column(col, justify="right")
            for c in (1, 64, 256) if "requests" in parts else ():
                req_cpu: dict[str, tuple[int, list[float]]] = {"bench.echo_headers": (bare.pid, []),
                                                               "sandbus.req.echo.handle_request": (node.pid, [])}
                (b, bh, node_stats), (r, rh, _) = alternate(server.url, ["bench.echo", "bench.echo_headers",
                                                                "sandbus.req.echo.handle_request"], c, duration, rounds,
                                                            req_cpu)
                n = node_stats
                table.add_row(str(c), f"{b[0]:,.0f}", f"{bh[0]:,.0f}", f"{n[0]:,.0f}", f"{n[1]:.2f}", f"{n[2]:.2f}",
                              f"{r[0]:.2f}×", f"{r[1]:.2f}–{r[2]:.2f}", f"{rh[0]:.2f}×", f"{rh[1]:.2f}–{rh[2]:.2f}",
                              f"{n[2] / b[2]:.2f}×", f"{statistics.median(req_cpu['bench.echo_headers'][1]):.1f}",
                              f"{statistics.median(req_cpu['sandbus.req.echo.handle_request'][1]):.1f}")
            if "requests" in parts:
                console.print(table)
                console.print("targets: throughput ≥ 0.85× bare at c=64 and c=256; p99 ≤ 1.5× bare")
            if extism_function is not None:
                tx = Table(title=f"an Extism plugin on a node ({extism_function}), 100 B, {rounds} alternating "
                                 f"{duration:g} s runs per cell (medians)")
                for col in ("c", "bare+hdrs req/s", "node, our ABI echo req/s", "node, Extism echo req/s",
                            "Extism÷bare+hdrs", "range", "Extism÷our ABI", "range"):
                    tx.add_column(col, justify="right")
                for c in (1, 64):
                    subjects = ["bench.echo_headers", "sandbus.req.echo.handle_request",
                                f"sandbus.req.xecho.{extism_function}"]
                    (bh, own, xs), (rb, ro, _) = alternate(server.url, subjects, c, duration, rounds)
                    tx.add_row(str(c), f"{bh[0]:,.0f}", f"{own[0]:,.0f}", f"{xs[0]:,.0f}", f"{rb[0]:.2f}×",
                               f"{rb[1]:.2f}–{rb[2]:.2f}", f"{ro[0]:.2f}×", f"{ro[1]:.2f}–{ro[2]:.2f}")
                console.print(tx)
            if "tracing" in parts:
                traced_node = start([sys.executable, "-m", "sandbus", "node", "--plugins", str(traced), "--nats",
                                     server.url, "--node-id", "bench-traced", "--no-watch", "--no-durable"],
                                    "node bench-traced ready", work / "traced.log",
                                    env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}"})
                try:
                    t3 = Table(title="tracing: every request traced (OTLP/HTTP to a local sink) vs tracing off, c=64")
                    for col in ("tracing off req/s", "tracing on req/s", "ratio", "ratio range", "spans per request",
                            "spans dropped"):
                        t3.add_column(col, justify="right")
                    (off, on), (r, _) = alternate(server.url, ["sandbus.req.echo.handle_request",
                                                              "sandbus.req.echo_traced.handle_request"], 64, duration,
                                                  rounds)
                    dropped = asyncio.run(spans_dropped(server.url, "bench-traced"))
                    t3.add_row(f"{off[0]:,.0f}", f"{on[0]:,.0f}", f"{r[0]:.2f}×", f"{r[1]:.2f}–{r[2]:.2f}",
                               "2 (process + execute)", f"{dropped:,}")
                    console.print(t3)
                    console.print("target: ≥ 0.7× with every request traced")
                finally:
                    stop(traced_node)
            if "durable" in parts:
                count = 2000 if args.quick else 10000
                durable_n = args.rounds or (2 if args.quick else 3)
                assert server.pid is not None
                runs, cpu = durable_rounds(server.url, count, durable_n, {
                    "nats-server": server.pid, "node": node.pid, "bare consumer": consumer.pid})
                bare_runs = runs["bare"]
                t2 = Table(title=f"durable topics, {count:,} messages, 64 publishes in flight, {durable_n} alternating "
                                 "rounds (medians; ratios per round)")
                for col in ("bare JetStream publish+ack msg/s", "bare publish → bare nats-py consumer → ack msg/s",
                            "ratio", "range", "publish → plugin → ack msg/s (bare publisher)",
                            "ratio", "range", "÷ bare consumer", "range", "same, prebuilt envelopes + headers msg/s",
                            "ratio", "range", "same, published with sandbus Client msg/s", "ratio", "range"):
                    t2.add_column(col, justify="right")
                cells = [f"{statistics.median(bare_runs):,.0f}"]
                for kind in ("bare_consumed", *PUBLISHERS):
                    cells += [f"{statistics.median(runs[kind]):,.0f}", *ratio_cells(runs[kind], bare_runs)]
                    if kind == "as_bare":
                        cells += ratio_cells(runs[kind], runs["bare_consumed"])
                t2.add_row(*cells)
                console.print(t2)
                console.print("target: node delivery ≥ 0.85× bare publish+ack (the node alone: last table). Here "
                              "publisher, nats-server and consumer share the machine's cores; the bare consumer "
                              "column, a nats-py consumer that only acks, is what any Python consumer reaches so")
                t4 = Table(title=f"publish alone: {count:,} messages, 64 in flight, each acked by its stream, the same "
                                 f"100-byte payload, {durable_n} alternating rounds (medians; ratios per round)")
                for col in ("bare nats-py js.publish msg/s", "sandbus Client.publish msg/s", "ratio", "range"):
                    t4.add_column(col, justify="right")
                t4.add_row(f"{statistics.median(bare_runs):,.0f}", f"{statistics.median(runs['client_publish']):,.0f}",
                           *ratio_cells(runs["client_publish"], bare_runs))
                console.print(t4)
                console.print("target: Client.publish ≥ 0.9× a bare nats-py JetStream publish")
                t5 = Table(title="CPU per message, µs (medians of the runs above; the publisher includes its "
                                 "connect and, for durable runs, its polling for the last ack)")
                t5.add_column("run")
                for col in CPU_COLUMNS:
                    t5.add_column(col, justify="right")
                names = {"bare": "bare publish", "bare_consumed": "bare publish → bare consumer",
                         "as_bare": "bare publish → node", "envelopes": "envelopes + headers → node",
                         "client": "sandbus Client → node", "client_publish": "sandbus Client publish"}
                for kind, samples in cpu.items():
                    t5.add_row(names[kind], *(f"{statistics.median(one[col] for one in samples):.1f}"
                                              for col in CPU_COLUMNS))
                console.print(t5)
                # A node alone, delivering a backlog: published first, then the node started.
                drain_dir = work / "drain"
                drain_dir.mkdir(exist_ok=True)
                shutil.copy(ROOT / "plugins" / "build" / "echo.wasm", drain_dir / "echo_drain.wasm")
                (drain_dir / "echo_drain.toml").write_text(ECHO_DRAIN)
                drain_args = [sys.executable, "-m", "sandbus", "node", "--plugins", str(drain_dir), "--nats",
                              server.url, "--node-id", "drain", "--no-watch", "--policy", str(work / "policy.toml")]
                stop(start(drain_args, "node drain ready", work / "drain.log"))  # its consumer, once
                drain_bare, drain_runs, drain_cpu = [], [], []
                for _ in range(durable_n):
                    drain_bare.append(asyncio.run(bare_jetstream(server.url, count)))
                    rate, cpu_each = drained(server.url, count, drain_args, work / "drain.log")
                    drain_runs.append(rate)
                    drain_cpu.append(cpu_each)
                t6 = Table(title=f"a node alone delivering a backlog of {count:,} messages (published first, then the "
                                 f"node started), {durable_n} rounds (medians; ratios per round)")
                for col in ("bare JetStream publish+ack msg/s", "node delivers msg/s", "ratio", "range",
                            "node CPU µs/msg"):
                    t6.add_column(col, justify="right")
                t6.add_row(f"{statistics.median(drain_bare):,.0f}", f"{statistics.median(drain_runs):,.0f}",
                           *ratio_cells(drain_runs, drain_bare), f"{statistics.median(drain_cpu):.1f}")
                console.print(t6)
                console.print("target: node delivery ≥ 0.85× bare publish+ack: the rate one node delivers at when "
                              "it does not share the cores with the publisher, against what a publisher can send")
        finally:
            stop(node)
            stop(consumer)
            stop(bare)
            stop(sink)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
