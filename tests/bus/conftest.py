"""Real nats-server processes, real host node processes, real plugins built from source."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from sandbus.bus.connection import ConnectOptions
from sandbus.bus.server import NatsServer, stop_process
from sandbus.host.lifecycle.policy import load_policy
from sandbus.host.node.node import Node
from sandbus.host.sandbox.audit import AuditSink
from sandbus.sdk.client import Client

ROOT = Path(__file__).resolve().parents[2]

RECORDER_TOML = """
[plugin]
name = "{name}"
version = "1.0.0"
description = "records what it handles"
author = "tests"
license = "Apache-2.0"
min_runtime_version = "0.1.0"
[capabilities]
required = ["compute", "messaging"]
[permissions]
publish_topics = ["seen.*"]
[resources]
timeout_seconds = 1
max_instances = 2
[subscriptions]
topics = ["orders.*"]
durable = {durable}
"""

SPINNER_TOML = """
[plugin]
name = "spinner"
version = "1.0.0"
description = "burns its timeout"
author = "tests"
license = "Apache-2.0"
min_runtime_version = "0.1.0"
[capabilities]
required = ["compute"]
[resources]
timeout_seconds = 2
max_fuel = 1000000000000
max_instances = 2
"""

POLICY = """
[capabilities]
allowed = ["compute", "messaging"]
[messaging]     # test plugins publish and request freely; the ceilings are tested in tests/host
publish_topics = [">"]
request_plugins = ["*"]
subscribe_topics = [">"]
[limits]
max_fuel = 10000000000000
"""


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    server = NatsServer(jetstream=True).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bus_plugins(tmp_path: Path, plugins_dir: Path, c_guest_flags: Callable[..., Path],
                wat: Callable[[str], bytes]) -> Path:
    """A plugin directory: echo, text_processor, rec_a/rec_b (subscribed to orders.*), rec_core, spinner."""
    d = tmp_path / "plugins"
    d.mkdir()
    for name in ("echo", "text_processor", "order_logger"):
        for ext in ("wasm", "toml"):
            shutil.copy(plugins_dir / f"{name}.{ext}", d / f"{name}.{ext}")
    for name, durable in (("rec_a", "true"), ("rec_b", "true")):
        shutil.copy(c_guest_flags("recorder", name, f'-DPLUGIN_NAME="{name}"'), d / f"{name}.wasm")
        (d / f"{name}.toml").write_text(RECORDER_TOML.format(name=name, durable=durable))
    (d / "spinner.wasm").write_bytes(wat("adversary"))
    (d / "spinner.toml").write_text(SPINNER_TOML)
    (tmp_path / "policy.toml").write_text(POLICY)
    return d


class NodeProcess:
    """A `sandbus node` child process, stopped by PID."""

    def __init__(self, node_id: str, plugins: Path, url: str, log: Path, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self._spawn(node_id, log, [sys.executable, "-m", "sandbus", "node", "--plugins", str(plugins), "--nats", url,
                                   "--node-id", node_id, "--policy", str(plugins.parent / "policy.toml"),
                                   "--no-watch", *extra],
                    {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def _spawn(self, node_id: str, log: Path, args: list[str], env: dict[str, str]) -> None:
        self.node_id = node_id
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(args, stdout=self._log_file, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"node {self.node_id} exited {self.proc.returncode}: {self.output()[-4000:]}")
            if f"node {self.node_id} ready" in self.output():
                return
            time.sleep(0.02)  # polling the node's log for its ready line, bounded
        raise AssertionError(f"node {self.node_id} not ready in {timeout} s: {self.output()[-4000:]}")

    def terminate(self, timeout: float = 20.0) -> int:
        code = stop_process(self.proc, timeout)
        self._log_file.close()
        return code

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self._log_file.close()



def example_plugins(base: Path, plugins_dir: Path, names: tuple[str, ...] = ("echo",),
                    policy: str = '[capabilities]\nallowed = ["compute"]\n') -> Path:
    """``base/plugins`` holding copies of the built example plugins ``names``, and ``base/policy.toml``
    (where :class:`NodeProcess` looks for it)."""
    plugins = base / "plugins"
    plugins.mkdir()
    for name in names:
        for ext in ("wasm", "toml"):
            shutil.copy(plugins_dir / f"{name}.{ext}", plugins / f"{name}.{ext}")
    (base / "policy.toml").write_text(policy)
    return plugins


@contextlib.contextmanager
def served(node_id: str, plugins: Path, log: Path, *, jetstream: bool = True,
           env: dict[str, str] | None = None) -> Iterator[tuple[str, NodeProcess]]:
    """A nats-server and a ready node serving ``plugins``: (the server's URL, the node); both stopped by PID."""
    server = NatsServer(jetstream=jetstream).start()
    node: NodeProcess | None = None
    try:
        node = NodeProcess(node_id, plugins, server.url, log, env=env)
        node.wait_ready()
        yield server.url, node
    finally:
        if node is not None:
            node.terminate()
        server.stop()


async def collect(nc: NatsClient, subject: str) -> list[Msg]:
    """Every message on ``subject`` from now on, in a list that fills as they arrive (the
    subscription is on the server when this returns)."""
    got: list[Msg] = []

    async def on(msg: Msg) -> None:
        got.append(msg)

    await nc.subscribe(subject, cb=on)
    await nc.flush()
    return got


async def until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Wait until ``condition()`` holds, at most ``timeout`` seconds (then fail naming ``what``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)  # yields to the NATS callbacks that change the condition

@pytest.fixture
def start_node(bus_plugins: Path, tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    nodes: list[NodeProcess] = []

    def start(node_id: str, url: str, *extra: str, env: dict[str, str] | None = None) -> NodeProcess:
        node = NodeProcess(node_id, bus_plugins, url, tmp_path / f"{node_id}.log", *extra, env=env)
        nodes.append(node)
        node.wait_ready()
        return node

    yield start
    for node in nodes:
        node.terminate()


def run(coro_fn: Callable[[Client], object], url: str) -> object:
    async def go() -> object:
        client = await Client.connect(url)
        try:
            return await coro_fn(client)  # type: ignore[misc]
        finally:
            await client.close()

    return asyncio.run(go())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def nats_cluster(base: Path, size: int = 3) -> Iterator[list[NatsServer]]:
    """``size`` nats-servers from deploy/nats/cluster.conf on loopback, routed to each other; stopped by PID."""
    ports = [(free_port(), free_port()) for _ in range(size)]
    routes = {f"NATS_ROUTE_{i + 1}": f"nats-route://127.0.0.1:{c}" for i, (_, c) in enumerate(ports)}
    servers: list[NatsServer] = []
    try:
        for i, (port, cport) in enumerate(ports):
            env = {"NATS_NAME": f"s{i}", "NATS_HOST": "127.0.0.1", "NATS_PORT": str(port),
                   "NATS_CLUSTER_PORT": str(cport), "NATS_STORE": str(base / f"s{i}"), **routes}
            servers.append(NatsServer(config=ROOT / "deploy" / "nats" / "cluster.conf", jetstream=False,
                                      store_dir=base / f"s{i}", env=env).start())
        yield servers
    finally:
        for s in servers:
            s.stop()


async def jetstream_ready(url: str, timeout: float = 30.0) -> None:
    """Wait until JetStream answers on ``url`` (a cluster elects its meta leader first)."""
    async with await Client.connect(url) as c:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await c.nc.jetstream().account_info()
                return
            except Exception:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)  # waiting for the cluster to elect a meta leader


@contextlib.asynccontextmanager
async def a_node(plugins: Path, url: str, direct: bool, node_id: str, *, audit: AuditSink | None = None,
                 **options: Any) -> AsyncIterator[Node]:
    """A node in this process serving ``plugins`` (with ``plugins/../policy.toml``), its read-loop dispatch
    on or off (``PluginBus.direct_dispatch``), ``audit`` receiving its audit events from the first load,
    ``options`` for ``Node.create``; stopped and closed on exit."""
    node = Node.create(plugins, ConnectOptions.from_urls(url), policy=load_policy(plugins.parent / "policy.toml"),
                       node_id=node_id, **options)
    if audit is not None:
        node.manager.auditor.add_sink(audit)
    node.manager.discover_and_load()
    node.bus.direct_dispatch = direct
    await node.start()
    try:
        yield node
    finally:
        await node.stop()
        node.manager.close()
