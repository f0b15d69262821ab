"""How long the ``sandbus`` client commands take, as a user runs them.

Starts a nats-server (JetStream) and a host node serving ``plugins/build``, warms both, then runs each
command N times as a subprocess of the installed console script and prints median, p90 and min of the
wall time, and the median CPU time (user + system: what the command itself costs, steadier than wall
time on a busy machine). ``python -c pass`` (the interpreter's own start) and a bare nats-py request
script (import nats-py, connect, one request, close: the least a Python client can do) are timed the
same way, for reference. The runs of the commands are interleaved, so a burst of load elsewhere on the
machine spreads over all of them rather than landing on one.

    python bench/bench_cli.py [-n 20] [--plugins DIR] [--source CHECKOUT]

``--source`` runs ``python -m sandbus`` from another checkout of sandbus instead (its node too), to
compare two versions on one machine: ``git worktree add /tmp/old <commit>`` (or ``git archive``), then
``python bench/bench_cli.py --source /tmp/old``.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbus.bus.server import NatsServer  # noqa: E402

BARE_REQUEST = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    await nc.request("sandbus.req.echo.handle_request", b"{}", timeout=5)
    await nc.close()
asyncio.run(main())
"""


def sandbus_argv(source: Path | None) -> list[str]:
    """How to run ``sandbus``: the console script beside this interpreter, or ``python -m sandbus``."""
    if source is None:
        return [str(Path(sys.executable).parent / "sandbus")]
    return [sys.executable, "-m", "sandbus"]


def child_env(source: Path | None, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}  # no span export
    env.update(SANDBUS_NATS=url, NATS_URL=url, COLUMNS="80", PYTHONUNBUFFERED="1")
    if source is not None:
        env["PYTHONPATH"] = str(source)
    return env


def start_node(sandbus: list[str], env: dict[str, str], cwd: Path, url: str, plugins: Path,
               log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen([*sandbus, "node", "--plugins", str(plugins), "--nats", url, "--no-watch",
                                 "--node-id", f"bench-cli-{os.getpid()}"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    deadline = time.monotonic() + 60
    while b" ready" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"the node did not start:\n{log.read_text(errors='replace')}")
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


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall, cpu) seconds of one run; a run that fails stops the benchmark (it measures success)."""
    cpu0 = children_cpu()
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, env=env, cwd=cwd, timeout=60)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{argv} exited {r.returncode}: {r.stderr.decode(errors='replace')}")
    return wall, children_cpu() - cpu0


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=20, help="runs per command (default 20)")
    parser.add_argument("--plugins", type=Path, default=ROOT / "plugins" / "build")
    parser.add_argument("--source", type=Path, default=None,
                        help="run `python -m sandbus` from this checkout instead of the installed command")
    args = parser.parse_args()
    source = args.source.resolve() if args.source else None
    cwd = source or Path(tempfile.gettempdir())
    sandbus = sandbus_argv(source)

    server = NatsServer().start()
    log = Path(tempfile.mkdtemp(prefix="sandbus-bench-cli-")) / "node.log"
    env = child_env(source, server.url)
    node = start_node(sandbus, env, cwd, server.url, args.plugins.resolve(), log)
    cases: list[tuple[str, list[str]]] = [
        ("python -c pass", [sys.executable, "-c", "pass"]),
        ("bare nats-py request", [sys.executable, "-c", BARE_REQUEST, server.url]),
        ("sandbus --help", [*sandbus, "--help"]),
        ("sandbus request echo handle_request '{}'", [*sandbus, "request", "echo", "handle_request", "{}"]),
        ("sandbus pub x.y 1", [*sandbus, "pub", "x.y", "1"]),
        ("sandbus ls", [*sandbus, "ls"]),
    ]
    walls: dict[str, list[float]] = {name: [] for name, _ in cases}
    cpus: dict[str, list[float]] = {name: [] for name, _ in cases}
    try:
        for _, argv in cases:  # warm: the page cache, the node's instances, the server's interest graph
            run_once(argv, env, cwd)
            run_once(argv, env, cwd)
        for _ in range(args.n):
            for name, argv in cases:
                wall, cpu = run_once(argv, env, cwd)
                walls[name].append(wall)
                cpus[name].append(cpu)
    finally:
        stop(node)
        server.stop()
    print(f"sandbus from {source or sandbus[0]}; n={args.n}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'command':42s} {'median s':>9s} {'p90 s':>7s} {'min s':>7s} {'cpu s':>7s}")
    for name, _ in cases:
        w, cpu = walls[name], statistics.median(cpus[name])
        print(f"{name:42s} {statistics.median(w):9.3f} {p90(w):7.3f} {min(w):7.3f} {cpu:7.3f}")


if __name__ == "__main__":
    main()
