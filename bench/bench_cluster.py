"""The cluster: deploy until every replica answers, failover after kill -9, registry throughput for a 20 MB
component, and what the reconcile loop costs a node when nothing changes.

One nats-server (JetStream, monitoring on), three `sandbus node --cluster` processes, the `sandbus` command
for deploys as a user runs it, the registry's Python API for push and pull (a command would add its own
start-up to the transfer).

* deploy -> all replicas answer: from starting `sandbus deploy p --every-node` until each of the three nodes
  has answered a request for p (requests go out in batches of 16 every 10 ms; the answering node is in
  the reply's Sandbus-Node header). The same without the command's own start-up: from the moment the
  deploy is in the bucket (a deploy written with the API).
* failover: a plugin on 2 of 3 nodes; kill -9 one of them; until the third node answers a request, and
  the longest time no request succeeded in a loop of requests 10 ms apart (1 s timeout).
* push / pull: a valid 20 MB module (a small one plus a 20 MB custom section) with its manifest:
  `Registry.push` (sign, index, upload) and `Registry.fetch` (download, digest and signature check).
* idle: with the deploys above in place, over a window: each node's CPU seconds (/proc/<pid>/stat) and
  the messages its connection sent and received (the server's /connz), per minute.

    python bench/bench_cluster.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import nats
import orjson
from nats.aio.client import Client as NatsClient
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbus.bus.server import NatsServer  # noqa: E402
from sandbus.host.cluster.deploys import Deploy, DeployStore  # noqa: E402
from sandbus.host.cluster.keys import keygen, load_seed  # noqa: E402
from sandbus.host.cluster.registry import Registry  # noqa: E402
from sandbus.sdk.client import Client  # noqa: E402
from tests.bus.conftest import free_port  # noqa: E402
from tests.cluster.clusterkit import (  # noqa: E402
    MANIFEST,
    ClusterNode,
    RequestLoop,
    cli,
    ok,
    plugin_dir,
    reports,
    serving,
    stop_all,
    versioned_wasm,
    with_custom_section,
)

MB = 1_000_000
NODES = ("b1", "b2", "b3")


async def first_answers(client: Client, plugin: str, nodes: set[str], t0: float, timeout: float = 60.0) -> float:
    """Seconds from ``t0`` until every one of ``nodes`` has answered a request for ``plugin``."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while not nodes <= seen:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {seen} answered {plugin} within {timeout} s")
        replies = await asyncio.gather(*(client.request_detailed(plugin, "handle_request", {}, timeout=1.0)
                                         for _ in range(16)), return_exceptions=True)
        seen |= {r.node for r in replies if not isinstance(r, BaseException) and r.node}
        if not nodes <= seen:
            await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def wait_serving(nc: NatsClient, plugin: str, count: int, nodes: set[str], timeout: float = 60.0) -> set[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = serving(await reports(nc), plugin, nodes=nodes)
        if len(found) == count:
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"{plugin}: {found} serving after {timeout} s, wanted {count}")
        await asyncio.sleep(0.05)


async def deploy_times(url: str, base: Path, key: Path, rounds: int) -> tuple[list[float], list[float]]:
    """(through the command, through the API) seconds from deploy to answers from all three nodes."""
    via_cli: list[float] = []
    via_api: list[float] = []
    nc = await nats.connect(url)
    client = await Client.connect(url)
    store = await DeployStore.open(nc.jetstream())
    registry = await Registry.open(nc)
    try:
        for i in range(rounds):
            for how in ("cli", "api"):
                name = f"deployed_{how}_{i}"
                d = plugin_dir(base, name, "1.0.0", versioned_wasm("1.0.0"))
                await registry.push((d / f"{name}.wasm").read_bytes(), (d / f"{name}.toml").read_bytes(),
                                    load_seed(key))
                t0 = time.monotonic()
                if how == "cli":
                    ok(await asyncio.to_thread(cli, "deploy", name, "--every-node", "--nats", url))
                    via_cli.append(await first_answers(client, name, set(NODES), t0))
                else:
                    await store.put(Deploy(plugin=name, range="1.0.0", version="1.0.0", replicas=None))
                    via_api.append(await first_answers(client, name, set(NODES), t0))
    finally:
        await client.close()
        await nc.close()
    return via_cli, via_api


async def failover(url: str, base: Path, key: Path, nodes: dict[str, ClusterNode], policy: Path,
                   rounds: int) -> list[tuple[float, float, int]]:
    """Per round: (seconds until the spare node answers, longest gap without a successful request, failed
    requests) after kill -9 of a serving node; the killed node is started again afterwards."""
    out = []
    nc = await nats.connect(url)
    client = await Client.connect(url)
    registry = await Registry.open(nc)
    try:
        for i in range(rounds):
            name = f"failover_{i}"
            d = plugin_dir(base, name, "1.0.0", versioned_wasm("1.0.0"))
            await registry.push((d / f"{name}.wasm").read_bytes(), (d / f"{name}.toml").read_bytes(),
                                load_seed(key))
            ok(await asyncio.to_thread(cli, "deploy", name, "--replicas", "2", "--nats", url))
            placed = await wait_serving(nc, name, 2, set(NODES))
            (spare,) = set(NODES) - placed
            victim = sorted(placed)[0]
            async with RequestLoop(client, name, timeout=1.0) as requests:
                await requests.wait_successes(20)
                t0 = time.monotonic()
                nodes[victim].kill9()
                took = await first_answers(client, name, {spare}, t0)
                await requests.wait_successes(20)
            gap, failed = requests.longest_gap, len(requests.failures)
            out.append((took, gap, failed))
            nodes[victim] = ClusterNode(victim, url, policy, base / f"{victim}-{i}.log")
            await asyncio.to_thread(nodes[victim].wait_ready)
            ok(await asyncio.to_thread(cli, "undeploy", name, "--nats", url))
    finally:
        await client.close()
        await nc.close()
    return out


async def throughput(url: str, key: Path, size: int, rounds: int) -> tuple[list[float], list[float]]:
    """MB/s of ``Registry.push`` and ``Registry.fetch`` for a valid module of ``size`` bytes."""
    nc = await nats.connect(url)
    registry = await Registry.open(nc)
    seed = load_seed(key)
    pushes, pulls = [], []
    try:
        for i in range(rounds):
            version = f"1.0.{i}"
            wasm = with_custom_section(versioned_wasm(version), size)
            manifest = MANIFEST.format(name="big", version=version, description="20 MB").encode()
            t = time.perf_counter()
            entry = await registry.push(wasm, manifest, seed)
            pushes.append(len(wasm) / MB / (time.perf_counter() - t))
            t = time.perf_counter()
            data = await registry.fetch(entry, [seed.public_key])
            pulls.append(len(data) / MB / (time.perf_counter() - t))
            assert data == wasm
    finally:
        await nc.close()
    return pushes, pulls


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def connz(monitor: int) -> dict[str, dict[str, Any]]:
    """The server's connections by name (``sandbus-node-<id>`` for nodes)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/connz?limit=1024", timeout=5) as r:
        data = orjson.loads(r.read())
    return {c.get("name", ""): c for c in data.get("connections", [])}


def idle_cost(nodes: dict[str, ClusterNode], monitor: int, window: float) -> dict[str, tuple[float, float]]:
    """Per node: (CPU seconds per minute, NATS messages in+out per minute) over ``window`` seconds."""
    def sample() -> dict[str, tuple[float, int]]:
        conns = connz(monitor)
        out = {}
        for node_id, node in nodes.items():
            c = conns.get(f"sandbus-node-{node_id}", {})
            out[node_id] = (cpu_seconds(node.pid), int(c.get("in_msgs", 0)) + int(c.get("out_msgs", 0)))
        return out

    before = sample()
    time.sleep(window)  # the measurement window: the nodes are left alone meanwhile
    after = sample()
    return {n: ((after[n][0] - before[n][0]) * 60 / window, (after[n][1] - before[n][1]) * 60 / window)
            for n in nodes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds = 2 if args.quick else 5
    window = 20.0 if args.quick else 60.0
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    key = work / "publisher.nk"
    public = keygen(key).public_key
    policy = work / "policy.toml"
    policy.write_text(f'[capabilities]\nallowed = ["compute"]\n[registry]\ntrusted_publishers = ["{public}"]\n')
    monitor = free_port()
    console = Console(width=140)
    with NatsServer(store_dir=work / "nats", extra_args=["-m", str(monitor)]) as server:
        nodes = {n: ClusterNode(n, server.url, policy, work / f"{n}.log") for n in NODES}
        try:
            for node in nodes.values():
                node.wait_ready()
            via_cli, via_api = asyncio.run(deploy_times(server.url, work, key, rounds))
            fails = asyncio.run(failover(server.url, work, key, nodes, policy, max(1, rounds - 2)))
            pushes, pulls = asyncio.run(throughput(server.url, key, 20 * MB, rounds))
            idle = idle_cost(nodes, monitor, window)
        finally:
            stop_all(list(nodes.values()))

    table = Table(title=f"cluster: 1 nats-server, 3 nodes, medians of {rounds} rounds (range)")
    for col in ("measure", "median", "range"):
        table.add_column(col, justify="right")

    def row(what: str, values: list[float], unit: str, fmt: str = ".2f") -> None:
        table.add_row(what, f"{statistics.median(values):{fmt}} {unit}",
                      f"{min(values):{fmt}}-{max(values):{fmt}}")

    row("deploy (command) -> answering on all 3 replicas", via_cli, "s")
    row("deploy (in the bucket) -> answering on all 3 replicas", via_api, "s")
    row("failover after kill -9: the spare answers", [f[0] for f in fails], "s")
    row("failover: longest time without a successful request", [f[1] for f in fails], "s")
    row("failover: failed requests (1 s timeout, 10 ms apart)", [float(f[2]) for f in fails], "", ".0f")
    row("push 20 MB (sign, index, upload)", pushes, "MB/s", ".1f")
    row("pull 20 MB (download, verify)", pulls, "MB/s", ".1f")
    deploys = 2 * rounds
    row(f"idle CPU per node ({deploys} deploys, {window:.0f} s window)", [v[0] for v in idle.values()], "s/min",
        ".3f")
    row("idle NATS messages per node (in + out)", [v[1] for v in idle.values()], "msg/min", ".0f")
    console.print(table)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
