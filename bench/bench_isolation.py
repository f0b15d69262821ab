"""isolation = "per-call" (a fresh instance for every call) vs "pooled", side by side.

1. In one process, the echo plugin through ``Sandbox.call_bytes``: pooled, per-call on the compiled path
   (store + instantiate + init + call + discard in one native call), and per-call on the general path
   (a whole PluginInstance per call, as for WASI plugins), in alternating rounds; the ratios are taken
   round by round.
2. A host node serving the echo plugin per call vs the bare nats-py echo responder (and the same node's
   pooled echo), at concurrency 64, with bench/bench_bus.py's responder, load driver and alternation.

    python bench/bench_isolation.py [--quick] [--rounds N] [--only sandbox|node]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_bus import BARE, alternate, start, stop  # noqa: E402

from sandbus.bus.server import NatsServer  # noqa: E402
from sandbus.host.sandbox import Limits, Sandbox  # noqa: E402

PLUGINS = ROOT / "plugins" / "build"


def mean_us(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """Mean µs per call: wall clock, and CPU time of this thread (what other processes on a shared
    machine cannot inflate, short of cache effects)."""
    t, c = time.perf_counter(), time.thread_time()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6, (time.thread_time() - c) / n * 1e6


def sandbox_rounds(n: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """Mean µs per call of each way (wall, CPU), measured in alternating rounds of ``n`` calls."""
    wasm = (PLUGINS / "echo.wasm").read_bytes()
    body = orjson.dumps({"pad": "y" * 88})  # 100 bytes, as the node bench
    ways = {
        "pooled": Sandbox(wasm, name="echo", limits=Limits(max_instances=1)),
        "per-call": Sandbox(wasm, name="echo", limits=Limits(max_instances=1, isolation="per-call")),
        "per-call (general path)": Sandbox(wasm, name="echo", native=False,
                                           limits=Limits(max_instances=1, isolation="per-call")),
    }
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in ways}
    for sb in ways.values():
        for _ in range(min(n, 2000)):
            sb.call_bytes("handle_request", body)
    for i in range(rounds):
        order = list(ways.items()) if i % 2 == 0 else list(ways.items())[::-1]
        for name, sb in order:
            calls = n // 10 if "general" in name else n
            out[name].append(mean_us(lambda sb=sb: sb.call_bytes("handle_request", body), calls))  # type: ignore[misc]
    for sb in ways.values():
        sb.close()
    return out


def per_call_manifest() -> str:
    text = (PLUGINS / "echo.toml").read_text().replace('name = "echo"', 'name = "echo_percall"')
    return text.replace("[resources]\n", '[resources]\nisolation = "per-call"\n', 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=("sandbox", "node"), action="append")
    ap.add_argument("--rounds", type=int, help="alternating rounds (default: sandbox 9, node 6)")
    args = ap.parse_args()
    parts = set(args.only or ("sandbox", "node"))
    console = Console(width=160)
    if "sandbox" in parts:
        rounds = args.rounds or (4 if args.quick else 9)
        n = 5000 if args.quick else 20000
        runs = sandbox_rounds(n, rounds)
        pooled = runs["pooled"]
        table = Table(title=f"echo, 100 B, Sandbox.call_bytes, one process: {rounds} alternating rounds "
                            f"(medians; ratios per round)")
        for col in ("way", "µs per call", "fastest round", "÷ pooled", "range", "CPU µs per call", "CPU ÷ pooled",
                    "range"):
            table.add_column(col, justify="right")
        for name, us in runs.items():
            cells = []
            for k in (0, 1):
                ratios = [a[k] / b[k] for a, b in zip(us, pooled, strict=True)]
                cells.append((statistics.median(x[k] for x in us), min(x[k] for x in us), statistics.median(ratios),
                              min(ratios), max(ratios)))
            (wall, fastest, r, lo, hi), (cpu, _, cr, clo, chi) = cells
            table.add_row(name, f"{wall:.2f}", f"{fastest:.2f}", f"{r:.2f}×", f"{lo:.2f}–{hi:.2f}", f"{cpu:.2f}",
                          f"{cr:.2f}×", f"{clo:.2f}–{chi:.2f}")
        console.print(table)
        console.print("target: per-call ≤ 2× pooled")
    if "node" in parts:
        duration = 1.5 if args.quick else 2.0
        rounds = args.rounds or (2 if args.quick else 6)
        work = Path(tempfile.mkdtemp(prefix="sandbus-bench-isolation-"))
        plugins = work / "plugins"
        plugins.mkdir()
        for ext in ("wasm", "toml"):
            shutil.copy(PLUGINS / f"echo.{ext}", plugins / f"echo.{ext}")
        shutil.copy(PLUGINS / "echo.wasm", plugins / "echo_percall.wasm")
        (plugins / "echo_percall.toml").write_text(per_call_manifest())
        with NatsServer(store_dir=work / "nats") as server:
            bare = start([sys.executable, "-c", BARE, server.url], "ready", work / "bare.log")
            node = start([sys.executable, "-m", "sandbus", "node", "--plugins", str(plugins), "--nats", server.url,
                          "--node-id", "bench", "--no-watch", "--no-durable"], "node bench ready", work / "node.log")
            try:
                subjects = ["bench.echo", "bench.echo_headers", "sandbus.req.echo.handle_request",
                            "sandbus.req.echo_percall.handle_request"]
                node_cpu: dict[str, tuple[int, list[float]]] = {
                    s: (bare.pid if s.startswith("bench.") else node.pid, []) for s in subjects}
                stats, node_ratios = alternate(server.url, subjects, 64, duration, rounds, node_cpu)
            finally:
                stop(node)
                stop(bare)
        shutil.rmtree(work, ignore_errors=True)
        t2 = Table(title=f"request/reply through a node, 100 B, c=64, {rounds} alternating {duration:g} s runs "
                         "(medians; ratios of neighbouring runs)")
        for col in ("bare req/s", "bare+hdrs req/s", "node pooled req/s", "node per-call req/s", "per-call p50 ms",
                    "per-call p99 ms", "per-call÷bare", "range", "per-call÷bare+hdrs", "range", "per-call÷pooled",
                    "range"):
            t2.add_column(col, justify="right")
        b, bh, p, pc = stats
        r_bare, r_hdrs, r_pooled = node_ratios[0], node_ratios[1], node_ratios[2]
        t2.add_row(f"{b[0]:,.0f}", f"{bh[0]:,.0f}", f"{p[0]:,.0f}", f"{pc[0]:,.0f}", f"{pc[1]:.2f}", f"{pc[2]:.2f}",
                   f"{r_bare[0]:.2f}×", f"{r_bare[1]:.2f}–{r_bare[2]:.2f}", f"{r_hdrs[0]:.2f}×",
                   f"{r_hdrs[1]:.2f}–{r_hdrs[2]:.2f}", f"{r_pooled[0]:.2f}×", f"{r_pooled[1]:.2f}–{r_pooled[2]:.2f}")
        console.print(t2)
        console.print("target: a node serving per-call ≥ 0.75× bare at c=64. bare+hdrs replies with the two headers "
                      "every node reply carries: the load driver's parsing of them is part of what the node pays")
        t3 = Table(title="CPU per request, µs (medians of the runs above)")
        for col in ("bare", "bare+hdrs", "node pooled", "node per-call"):
            t3.add_column(col, justify="right")
        t3.add_row(*(f"{statistics.median(node_cpu[s][1]):.1f}" for s in subjects))
        console.print(t3)


if __name__ == "__main__":
    main()
