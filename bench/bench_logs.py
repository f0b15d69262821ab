"""What plugin logs on the bus cost: requests/s of plugins that log, on a node with bus logs on vs off.

Two `sandbus node` processes on one nats-server: one publishes every log line on the bus (``--log-rate``
high enough that nothing is dropped: the worst case, every line published), one runs with
``--no-bus-logs`` (lines only go to the node's log and its ring). Each serves the C plugin of
tests/debugstate/guests/logger.c under its own name; the same client drives, at concurrency 1 and 64,
a silent call (``handle_request``, logs nothing), a call that logs one line (``one``) and one that logs
ten (``ten``), in alternating runs. The node's stderr goes to a file, as in production.

The cost per call is the difference of the inverse throughputs (what each call costs the node more),
per line that divided by the lines of the call. Then the cost of capturing one line in the calling
thread (the logging handler alone, in this process).

    python bench/bench_logs.py [--quick]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_bus import alternate, start, stop  # noqa: E402 - the same alternating runs

from sandbus.bus.server import NatsServer  # noqa: E402
from sandbus.host.node import logbus  # noqa: E402
from sandbus.host.node.logbus import PluginLogs  # noqa: E402

MANIFEST = """
[plugin]
name = "{name}"
version = "1.0.0"
description = "logs per call"
author = "bench"
license = "Apache-2.0"
min_runtime_version = "0.1.0"
[capabilities]
required = ["compute"]
[resources]
max_instances = 4
"""
POLICY = '[capabilities]\nallowed = ["compute"]\n'


def build(work: Path) -> Path:
    out = work / "logger.wasm"
    subprocess.run(["clang", "--target=wasm32-wasi", "--sysroot=/usr", "-O2", "-mexec-model=reactor",
                    "-Wl,--strip-all", "-I", str(ROOT / "sdk" / "guest" / "c"), "-o", str(out),
                    str(ROOT / "tests" / "debugstate" / "guests" / "logger.c")], check=True)
    return out


def plugin_dir(work: Path, wasm: Path, name: str) -> Path:
    d = work / name
    d.mkdir()
    shutil.copy(wasm, d / f"{name}.wasm")
    (d / f"{name}.toml").write_text(MANIFEST.format(name=name))
    (work / "policy.toml").write_text(POLICY)
    return d


def capture_cost(n: int = 200_000) -> tuple[float, float]:
    """µs per line logged to ``sandbus.plugin.<name>`` in this thread: with the node's handler (ring and
    publish queue, no loop to wake) and with no handler at all (the record is still made and dropped)."""
    logger = logging.getLogger("sandbus.plugin.benchline")
    logging.getLogger().handlers.clear()
    logging.getLogger("sandbus.plugin").propagate = False

    def run() -> float:
        t = time.perf_counter()
        for _ in range(n):
            logger.log(logging.INFO, "%s%s", "", "handled one request")
        return (time.perf_counter() - t) / n * 1e6

    logging.getLogger("sandbus.plugin").setLevel(logging.INFO)
    bare = min(run() for _ in range(3))
    hub = PluginLogs("bench", version_of=lambda _: "1.0.0", trace_id=lambda: None, owns=lambda _: True,
                     publish=False)
    logbus.attach(hub)
    captured = min(run() for _ in range(3))
    logbus.detach(hub)
    return captured, bare


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    duration = 1.5 if args.quick else 2.0
    rounds = 2 if args.quick else 6
    work = Path(tempfile.mkdtemp(prefix="sandbus-bench-logs-"))
    wasm = build(work)
    on_dir, off_dir = plugin_dir(work, wasm, "logs_on"), plugin_dir(work, wasm, "logs_off")
    console = Console(width=160)
    with NatsServer(jetstream=False, store_dir=work / "nats") as server:
        common = ["--nats", server.url, "--no-watch", "--no-durable", "--policy", str(work / "policy.toml")]
        node_on = start([sys.executable, "-m", "sandbus", "node", "--plugins", str(on_dir), "--node-id", "on",
                         "--log-rate", "1000000", *common], "node on ready", work / "on.log")
        node_off = start([sys.executable, "-m", "sandbus", "node", "--plugins", str(off_dir), "--node-id", "off",
                          "--no-bus-logs", *common], "node off ready", work / "off.log")
        try:
            table = Table(title=f"plugin logs on the bus: 100 B requests, {rounds} alternating {duration:g} s runs "
                                "per cell (medians); on: every line published, off: --no-bus-logs")
            for col in ("call", "lines/call", "c", "off req/s", "on req/s", "on÷off", "range",
                        "µs per call", "µs per line"):
                table.add_column(col, justify="right")
            for function, lines in (("handle_request", 0), ("one", 1), ("ten", 10)):
                for c in (1, 64):
                    (off, on), (ratio, _) = alternate(server.url, [f"sandbus.req.logs_off.{function}",
                                                                   f"sandbus.req.logs_on.{function}"],
                                                      c, duration, rounds)
                    per_call = (1 / on[0] - 1 / off[0]) * 1e6
                    per_line = f"{per_call / lines:.1f}" if lines else "-"
                    table.add_row(function, str(lines), str(c), f"{off[0]:,.0f}", f"{on[0]:,.0f}",
                                  f"{ratio[0]:.2f}×", f"{ratio[1]:.2f}–{ratio[2]:.2f}", f"{per_call:.1f}", per_line)
            console.print(table)
            stats = orjson.loads(subprocess.run(
                [sys.executable, "-m", "sandbus", "debug", "logs_on", "--json", "--nats", server.url],
                capture_output=True, check=True, cwd=ROOT).stdout)
            console.print(f"node 'on': {stats[0]['counters']['executions']:,} calls; its last line's seq "
                          f"{stats[0]['recent_logs'][-1]['seq']:,}")
        finally:
            stop(node_on)
            stop(node_off)
    captured, bare = capture_cost()
    t2 = Table(title="capturing one line in the calling thread (this process, 200,000 lines, best of 3)")
    for col in ("no handler µs/line", "node's handler µs/line", "handler alone µs/line"):
        t2.add_column(col, justify="right")
    t2.add_row(f"{bare:.2f}", f"{captured:.2f}", f"{captured - bare:.2f}")
    console.print(t2)
    console.print("µs per call at c=64: the node's CPU per call more (1/on − 1/off); at c=1: the latency added.")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
