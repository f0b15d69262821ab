"""In-process cluster members for the agent's tests: real Nodes on a real JetStream server, each with its
own NATS connection and a ClusterAgent with short timings; real plugins pushed, signed, to the registry."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client as NATS

from sandbus.bus.connection import ConnectOptions
from sandbus.host.cluster.agent import ArtifactSource, ClusterAgent
from sandbus.host.cluster.deploys import Deploy, DeployStore
from sandbus.host.cluster.entry import RegistryEntry
from sandbus.host.cluster.keys import PublisherKey
from sandbus.host.cluster.registry import Registry
from sandbus.host.lifecycle import PluginManager
from sandbus.host.lifecycle.policy import load_policy
from sandbus.host.node.hostfuncs import BusBridge
from sandbus.host.node.node import Node
from tests.bus.conftest import until
from tests.cluster.clusterkit import MANIFEST, versioned_wasm
from tests.conftest import AuditLog

#: Agent timings for tests: a heartbeat every 0.2 s, dead after 0.8 s without one, drains at most 3 s.
FAST = {"heartbeat_s": 0.2, "live_s": 0.8, "drain_s": 3.0}

POLICY = """
[capabilities]
allowed = ["compute"]
[registry]
trusted_publishers = [{keys}]
"""


@dataclass
class Member:
    """One in-process cluster node: its Node, its agent, and the audit events of its manager."""

    node: Node
    agent: ClusterAgent
    audit: AuditLog

    @property
    def id(self) -> str:
        return self.node.node_id

    def version(self, plugin: str) -> str | None:
        """The version of ``plugin`` this node serves (None: not serving)."""
        manager = self.node.manager
        return manager.info(plugin).version if plugin in manager else None


async def start_member(url: str, node_id: str, base: Path, trusted: list[str], *,
                       labels: dict[str, str] | None = None, plugins: Path | None = None,
                       registry: ArtifactSource | None = None, **timings: float) -> Member:
    """A started node (serving ``plugins`` too, when given), with its agent started (on this event loop);
    ``registry`` stands in for the registry on the node's connection (a test's wrapper of it)."""
    data = base / node_id
    data.mkdir(parents=True, exist_ok=True)
    (data / "policy.toml").write_text(POLICY.format(keys=", ".join(f'"{k}"' for k in trusted)))
    bridge = BusBridge()
    manager = PluginManager(plugins, policy=load_policy(data / "policy.toml"), data_root=data / "plugin-data",
                            host_functions=bridge.host_functions())
    if plugins is not None:
        manager.discover_and_load()
    audit = AuditLog()
    manager.auditor.add_sink(audit)
    node = Node(manager, ConnectOptions.from_urls(url), node_id=node_id, durable=False)
    bridge.attach(node.bus, manager.grant)
    await node.start()
    t = {**FAST, **timings}
    agent = ClusterAgent(node, registry, labels=labels, heartbeat_s=t["heartbeat_s"], live_s=t["live_s"],
                         drain_s=t["drain_s"])
    await agent.start()
    return Member(node, agent, audit)


async def stop_member(member: Member, *, withdraw: bool = True, handoff_s: float = 0.0) -> None:
    """Stop the agent (withdrawing the report, or not: as a node that died; handing its plugins over to the
    others first, or not), then the node."""
    await member.agent.stop(withdraw=withdraw, handoff_s=handoff_s)
    await member.node.stop(1.0)
    await asyncio.to_thread(member.node.manager.close)


@contextlib.asynccontextmanager
async def members(url: str, base: Path, trusted: list[str], count: int, *,
                  labels: Callable[[int], dict[str, str]] = lambda i: {}) -> AsyncIterator[list[Member]]:
    """``count`` members ``m1..``, all stopped at the end (those a test stopped already are skipped)."""
    started: list[Member] = []
    try:
        for i in range(count):
            started.append(await start_member(url, f"m{i + 1}", base, trusted, labels=labels(i)))
        yield started
    finally:
        for m in started:
            if m.agent.running:
                with contextlib.suppress(Exception):
                    await stop_member(m)


async def push(nc: NATS, key: PublisherKey, name: str, version: str, *, broken: str | None = None) -> RegistryEntry:
    """Push a versioned test plugin (it answers ``{"version": ...}``) signed by ``key``."""
    registry = await Registry.open(nc)
    manifest = MANIFEST.format(name=name, version=version, description="agent test plugin").encode()
    return await registry.push(versioned_wasm(version, broken=broken), manifest, key)


async def deploy(nc: NATS, plugin: str, version: str, *, replicas: int | None = 1, previous: str | None = None,
                 labels: dict[str, str] | None = None) -> int:
    """Put a deploy as the CLI would (the version already resolved); returns its revision."""
    store = await DeployStore.open(nc.jetstream(timeout=1.0))
    return await store.put(Deploy(plugin=plugin, range=version, version=version, previous=previous,
                                  replicas=replicas, labels=labels or {}))


async def turns_pass(members: list[Member], count: int = 3, timeout: float = 10.0) -> None:
    """Wait until every member's agent has run ``count`` more reconcile turns: the window in which whatever
    must not happen (a retry, a second load) would have happened."""
    start = [m.agent.turns for m in members]
    await until(lambda: all(m.agent.turns >= t + count for m, t in zip(members, start, strict=True)), timeout,
                f"{count} more reconcile turns")
