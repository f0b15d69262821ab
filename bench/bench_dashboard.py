"""The dashboard's load on the nodes, and its own CPU: 3 real nodes serving 50 plugins in all, one dashboard.

A subscriber on ``sandbus.node.*.>`` (every control verb of every node) and on ``$SRV.>`` (discovery) counts
the requests the dashboard sends while 1, then 10 event streams are open; meanwhile a client sends requests to
the plugins (each one logs a line, so logs flow to every page), and the dashboard's CPU time is read from
/proc. A last case has 10 pages each asking for a plugin's debug state once a second: the dashboard asks the
node at most once per interval.

    python bench/bench_dashboard.py [--quick] [--interval S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbus.bus.server import NatsServer  # noqa: E402
from sandbus.sdk.client import Client  # noqa: E402
from tests.bus.conftest import NodeProcess  # noqa: E402
from tests.dashboard.stack import MANIFEST, POLICY, DashboardProcess, shouter_wasm  # noqa: E402

NODES = ("d1", "d2", "d3")
PLUGINS = 50
TICKS = os.sysconf("SC_CLK_TCK")


def plugin_dirs(base: Path) -> list[Path]:
    """50 copies of a small WAT plugin (it logs its request and echoes it), spread over the three nodes."""
    wasm = shouter_wasm()
    dirs = []
    for n, node in enumerate(NODES):
        d = base / node / "plugins"
        d.mkdir(parents=True)
        for i in range(n, PLUGINS, len(NODES)):
            (d / f"p{i:02d}.wasm").write_bytes(wasm)
            (d / f"p{i:02d}.toml").write_text(MANIFEST.format(name=f"p{i:02d}", description='"bench plugin"'))
        (base / node / "policy.toml").write_text(POLICY)
        dirs.append(d)
    return dirs


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


async def sse_client(url: str, counts: Counter[str], stop: asyncio.Event) -> None:
    """One page's event stream, read to the end; counts the events it gets."""
    parts = urlsplit(url)
    # a snapshot (the log and audit history) is one line of several hundred KB
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port, limit=64 * 1024 * 1024)
    writer.write(f"GET /api/events HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    try:
        while not stop.is_set():
            try:
                line = await asyncio.wait_for(reader.readline(), 0.5)
            except TimeoutError:
                continue
            if not line:
                break
            if line.startswith(b"event: "):
                counts[line[7:].strip().decode()] += 1
    finally:
        writer.close()


async def debug_poller(url: str, plugin: str, node: str, counts: Counter[str], stop: asyncio.Event) -> None:
    """A page with a plugin's debug view open, asking once a second (the page asks once per interval)."""
    parts = urlsplit(url)
    while not stop.is_set():
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(f"GET /api/debug?node={node}&plugin={plugin} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                     "X-Sandbus-Dashboard: 1\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status = await reader.readline()
        await reader.read()
        writer.close()
        counts["debug 200" if b" 200 " in status else "debug other"] += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def traffic(client: Client, stop: asyncio.Event, counts: Counter[str], rate: float) -> None:
    """Requests to the plugins in turn at about ``rate`` per second (each one logs a line)."""
    i = 0
    while not stop.is_set():
        started = time.monotonic()
        await client.request(f"p{i % PLUGINS:02d}", "handle_request", {"n": i})
        counts["requests"] += 1
        i += 1
        await asyncio.sleep(max(0.0, 1 / rate - (time.monotonic() - started)))


async def measure(nats_url: str, dashboard: DashboardProcess, pages: int, window: float, rate: float,
                  debug_pages: int = 0) -> dict[str, float]:
    seen: Counter[str] = Counter()
    async with await Client.connect(nats_url) as watcher, await Client.connect(nats_url) as sender:
        async def on_control(msg: object) -> None:
            subject = msg.subject  # type: ignore[attr-defined]
            seen[subject.rsplit(".", 1)[1]] += 1

        async def on_srv(msg: object) -> None:
            seen["$SRV " + msg.subject.split(".")[1]] += 1  # type: ignore[attr-defined]

        await watcher.nc.subscribe("sandbus.node.*.>", cb=on_control)
        await watcher.nc.subscribe("$SRV.>", cb=on_srv)
        await watcher.nc.flush()
        stop = asyncio.Event()
        page_counts: Counter[str] = Counter()
        tasks = [asyncio.create_task(sse_client(dashboard.url, page_counts, stop)) for _ in range(pages)]
        tasks += [asyncio.create_task(debug_poller(dashboard.url, "p00", NODES[0], page_counts, stop))
                  for _ in range(debug_pages)]
        sent: Counter[str] = Counter()
        tasks.append(asyncio.create_task(traffic(sender, stop, sent, rate)))
        await asyncio.sleep(1.0)  # the streams open and get their snapshots before the window starts
        seen.clear()
        page_counts.clear()
        cpu0, t0 = cpu_seconds(dashboard.proc.pid), time.monotonic()
        await asyncio.sleep(window)
        cpu1, t1 = cpu_seconds(dashboard.proc.pid), time.monotonic()
        counted = Counter(seen)
        events = Counter(page_counts)
        stop.set()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, BaseException):
                raise RuntimeError(f"a page of the benchmark failed: {result!r}") from result
    elapsed = t1 - t0
    return {
        "stats": counted["stats"] / elapsed,
        "debug": counted["debug"] / elapsed,
        "other": sum(v for k, v in counted.items() if k not in ("stats", "debug") and not k.startswith("$SRV"))
        / elapsed,
        "srv": sum(v for k, v in counted.items() if k.startswith("$SRV")) / elapsed,
        "cpu": 100 * (cpu1 - cpu0) / elapsed,
        "events": sum(v for k, v in events.items() if not k.startswith("debug")) / elapsed / max(1, pages),
        "debug_asks": (events["debug 200"] + events["debug other"]) / elapsed,
        "requests": sent["requests"] / elapsed,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10 s windows instead of 30 s")
    ap.add_argument("--interval", type=float, default=2.0, help="the dashboard's --interval")
    ap.add_argument("--rate", type=float, default=50.0, help="plugin requests per second during the windows")
    args = ap.parse_args()
    window = 10.0 if args.quick else 30.0
    console = Console(width=150)
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        base = Path(tmp)
        server = NatsServer(jetstream=True).start()
        nodes: list[NodeProcess] = []
        dashboard: DashboardProcess | None = None
        try:
            for node_id, plugins in zip(NODES, plugin_dirs(base), strict=True):
                nodes.append(NodeProcess(node_id, plugins, server.url, base / f"{node_id}.log"))
            for node in nodes:
                node.wait_ready(60)
            dashboard = DashboardProcess(server.url, base / "dashboard.log", "--interval", str(args.interval))
            dashboard.wait_ready()
            rows = []
            for label, pages, debug_pages in (("1 page", 1, 0), ("10 pages", 10, 0),
                                              ("10 pages, 10 debug", 10, 10)):
                rows.append((label, pages, asyncio.run(measure(server.url, dashboard, pages, window, args.rate,
                                                                debug_pages))))
        finally:
            if dashboard is not None:
                dashboard.stop()
            for node in nodes:
                node.terminate()
            server.stop()
    table = Table(title=f"dashboard load: 3 nodes, {PLUGINS} plugins, --interval {args.interval:g} s, "
                        f"{window:g} s windows, ~{args.rate:g} plugin requests/s (each logs a line)")
    for column in ("case", "stats req/s (all nodes)", "debug req/s", "other control req/s", "$SRV req/s",
                   "dashboard CPU %", "events/s per page", "debug asks/s (pages)", "plugin req/s sent"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for label, _, r in rows:
        table.add_row(label, f"{r['stats']:.2f}", f"{r['debug']:.2f}", f"{r['other']:.2f}", f"{r['srv']:.2f}",
                      f"{r['cpu']:.1f}", f"{r['events']:.1f}", f"{r['debug_asks']:.1f}", f"{r['requests']:.0f}")
    console.print(table)
    console.print("10 debug: ten pages with the debug view of p00 open, each asking the dashboard once a second")
    console.print(f"expected stats req/s: {len(NODES)} nodes / {args.interval:g} s = "
                  f"{len(NODES) / args.interval:.2f}, whatever the number of pages")


if __name__ == "__main__":
    main()
