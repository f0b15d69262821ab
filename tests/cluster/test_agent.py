"""The cluster agent on real in-process nodes sharing one JetStream server: placement carried out, rollback,
refusals, undeploy, and a node's share moving when it dies."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from sandbus.bus.server import NatsServer
from sandbus.host.cluster.deploys import DeployStore
from sandbus.host.cluster.keys import PublisherKey, keygen
from sandbus.host.cluster.placement import Candidate, place, score
from sandbus.host.cluster.reports import NodeReport, ReportStore
from sandbus.sdk.client import Client
from sandbus.sdk.errors import BusError
from tests.bus.conftest import until
from tests.cluster.agent_kit import Member, deploy, members, push, start_member, stop_member, turns_pass


@pytest.fixture
def nc(server_nc: NATS) -> NATS:
    """The connection to this test's own server (the registry tests' ``nc`` is to a shared one)."""
    return server_nc


def serving(ms: list[Member], plugin: str, version: str | None = None) -> set[str]:
    return {m.id for m in ms if m.version(plugin) is not None and (version is None or m.version(plugin) == version)}


async def ask(url: str, plugin: str) -> object:
    async with await Client.connect(url) as c:
        return await c.request(plugin, "handle_request", {}, timeout=2.0)


async def test_a_deploy_of_2_runs_on_exactly_the_2_placed_of_3_nodes(server: NatsServer, nc: NATS, tmp_path: Path,
                                                                     publisher: PublisherKey) -> None:
    await push(nc, publisher, "greeter", "1.0.0")
    async with members(server.url, tmp_path, [publisher.public_key], 3) as ms:
        started = time.monotonic()
        await deploy(nc, "greeter", "1.0.0", replicas=2)
        expected = set(place("greeter", "1.0.0", 2, {}, [Candidate(m.id) for m in ms]))
        await until(lambda: serving(ms, "greeter") == expected, 10, f"greeter on {expected}")
        elapsed = time.monotonic() - started
        assert await ask(server.url, "greeter") == {"version": "1.0.0"}
        await turns_pass(ms)  # nothing else loads it
        assert serving(ms, "greeter") == expected
        reports, _ = await (await ReportStore.open(nc.jetstream())).all()
        states = {n: r.plugins["greeter"].state for n, r in reports.items() if "greeter" in r.plugins}
        assert states == dict.fromkeys(expected, "serving")
        print(f"deploy -> 2 replicas serving: {elapsed * 1000:.0f} ms")


async def _request_loop(url: str, plugin: str, stop: asyncio.Event, outcomes: list[object]) -> None:
    """Requests one after another until ``stop``; each reply or error is appended to ``outcomes``."""
    async with await Client.connect(url) as c:
        while not stop.is_set():
            try:
                outcomes.append(await c.request(plugin, "handle_request", {}, timeout=2.0))
            except Exception as e:
                outcomes.append(e)


async def test_a_version_whose_health_fails_rolls_back_and_no_request_fails(
        server: NatsServer, nc: NATS, tmp_path: Path, publisher: PublisherKey) -> None:
    await push(nc, publisher, "greeter", "1.0.0")
    await push(nc, publisher, "greeter", "1.2.0", broken="health")
    async with members(server.url, tmp_path, [publisher.public_key], 3) as ms:
        await deploy(nc, "greeter", "1.0.0", replicas=None)
        await until(lambda: serving(ms, "greeter", "1.0.0") == {m.id for m in ms}, 10, "1.0.0 on every node")
        stop, outcomes = asyncio.Event(), list[object]()
        loop = asyncio.create_task(_request_loop(server.url, "greeter", stop, outcomes))
        revision = await deploy(nc, "greeter", "1.2.0", replicas=None, previous="1.0.0")
        store = await ReportStore.open(nc.jetstream())
        found_reports: dict[str, NodeReport] = {}

        async def settled() -> bool:
            found, _ = await store.all()
            found_reports.clear()
            found_reports.update(found)
            entries = [r.plugins.get("greeter") for r in found.values()]
            return (len(entries) == 3 and all(e is not None and e.deploy_revision == revision and e.state == "serving"
                                              and e.version == "1.0.0" for e in entries)
                    and any(e is not None and e.failed is not None and e.failed.version == "1.2.0" for e in entries))

        deadline = time.monotonic() + 10
        while not await settled():
            assert time.monotonic() < deadline, f"no rollback: {found_reports}"
            await asyncio.sleep(0.1)
        await turns_pass(ms)  # the rollback holds, nobody retries 1.2.0
        stop.set()
        await loop
        assert serving(ms, "greeter", "1.0.0") == {m.id for m in ms}
        failures = [o for o in outcomes if not isinstance(o, dict)]
        assert failures == []
        assert len(outcomes) > 10
        assert all(o == {"version": "1.0.0"} for o in outcomes)
        failed = next(f for r in found_reports.values() if (f := r.plugins["greeter"].failed) is not None)
        assert failed.state == "failed"
        assert "sandbus_health" in failed.reason
        assert any("lifecycle.reload_failed" in m.audit.kinds() for m in ms)


async def test_an_untrusted_publisher_is_refused_on_every_node_with_an_audit_event(
        server: NatsServer, nc: NATS, tmp_path: Path, publisher: PublisherKey) -> None:
    stranger = keygen(tmp_path / "stranger.nk")
    await push(nc, stranger, "greeter", "1.0.0")
    async with members(server.url, tmp_path, [publisher.public_key], 3) as ms:
        await deploy(nc, "greeter", "1.0.0", replicas=2)

        def refused_everywhere() -> bool:
            return all(any(e.kind == "cluster.refused" and e.details.get("code") == "security.untrusted_publisher"
                           for e in m.audit) for m in ms)

        # 2 placed nodes refuse, are passed over, and the third is placed and refuses too
        await until(refused_everywhere, 10, "a cluster.refused audit event on every node")
        assert serving(ms, "greeter") == set()
        for m in ms:
            report = m.agent.report().plugins["greeter"]
            assert report.state == "refused"
            assert report.failed is not None
            assert "security.untrusted_publisher" in (report.reason or "")
        event = next(e for e in ms[0].audit if e.kind == "cluster.refused")
        assert event.level == "warning"
        assert stranger.public_key in event.message


async def test_undeploy_unloads_everywhere(server: NatsServer, nc: NATS, tmp_path: Path,
                                           publisher: PublisherKey) -> None:
    await push(nc, publisher, "greeter", "1.0.0")
    async with members(server.url, tmp_path, [publisher.public_key], 2) as ms:
        await deploy(nc, "greeter", "1.0.0", replicas=None)
        await until(lambda: len(serving(ms, "greeter")) == 2, 10, "greeter on both nodes")
        assert await (await DeployStore.open(nc.jetstream())).delete("greeter")
        await until(lambda: serving(ms, "greeter") == set(), 5, "greeter unloaded everywhere")
        await until(lambda: all("greeter" not in m.agent.report().plugins for m in ms), 2, "reports cleared")
        assert all("lifecycle.unload" in m.audit.kinds() for m in ms)


async def test_a_dead_nodes_share_moves_to_another(server: NatsServer, nc: NATS, tmp_path: Path,
                                                   publisher: PublisherKey) -> None:
    await push(nc, publisher, "greeter", "1.0.0")
    async with members(server.url, tmp_path, [publisher.public_key], 3) as ms:
        await deploy(nc, "greeter", "1.0.0", replicas=1)
        await until(lambda: len(serving(ms, "greeter")) == 1, 10, "greeter on one node")
        (first,) = serving(ms, "greeter")
        dead = next(m for m in ms if m.id == first)
        started = time.monotonic()
        await stop_member(dead, withdraw=False)  # no goodbye: its last report stays in the bucket
        others = [m for m in ms if m is not dead]
        await until(lambda: len(serving(others, "greeter")) == 1, 10, "greeter on another node")
        failover = time.monotonic() - started
        assert await ask(server.url, "greeter") == {"version": "1.0.0"}
        live_s = others[0].agent.live_s
        assert failover < live_s + 2.0, f"failover took {failover:.2f} s (live_s {live_s})"
        print(f"failover after a node stopped reporting: {failover * 1000:.0f} ms (live_s {live_s * 1000:.0f} ms)")


async def test_a_selector_that_matches_no_node_places_nothing_and_keeps_going(
        server: NatsServer, nc: NATS, tmp_path: Path, publisher: PublisherKey) -> None:
    await push(nc, publisher, "greeter", "1.0.0")
    await push(nc, publisher, "other", "1.0.0")
    async with members(server.url, tmp_path, [publisher.public_key], 2,
                       labels=lambda i: {"region": "eu" if i == 0 else "us"}) as ms:
        await deploy(nc, "greeter", "1.0.0", replicas=None, labels={"region": "mars"})
        # a value that is no deploy at all, written straight into the bucket: refused, never acted on
        kv = (await DeployStore.open(nc.jetstream())).kv
        await kv.put("broken", b'{"format": 1, "plugin": "broken", "replicas": -3}')
        await deploy(nc, "other", "1.0.0", replicas=None, labels={"region": "eu"})
        await until(lambda: serving(ms, "other") == {"m1"}, 10, "other on the eu node only")
        assert serving(ms, "greeter") == set()
        await until(lambda: all(any(e.kind == "cluster.refused" and e.plugin == "broken" for e in m.audit) for m in ms),
                    5, "the invalid deploy refused on every node")
        turns = [m.agent.turns for m in ms]
        await asyncio.sleep(0.6)
        assert all(m.agent.turns - t <= 5 for m, t in zip(ms, turns, strict=True))  # ~1 turn a heartbeat, no spin
        assert sum(e.kind == "cluster.refused" for e in ms[0].audit) == 1  # said once, not every turn


async def test_a_node_leaving_hands_its_share_over_before_it_drains(server: NatsServer, nc: NATS, tmp_path: Path,
                                                                    publisher: PublisherKey) -> None:
    await push(nc, publisher, "greeter", "1.0.0")
    async with members(server.url, tmp_path, [publisher.public_key], 2) as ms:
        await deploy(nc, "greeter", "1.0.0", replicas=1)
        await until(lambda: len(serving(ms, "greeter")) == 1, 10, "greeter on one node")
        (first,) = serving(ms, "greeter")
        leaving = next(m for m in ms if m.id == first)
        other = next(m for m in ms if m is not leaving)
        stop, outcomes = asyncio.Event(), list[object]()
        loop = asyncio.create_task(_request_loop(server.url, "greeter", stop, outcomes))
        await until(lambda: len(outcomes) > 20, 5, "requests answered")
        await stop_member(leaving, handoff_s=5.0)  # returns once the other node serves it
        assert other.version("greeter") == "1.0.0"
        answered = len(outcomes)
        await until(lambda: len(outcomes) > answered + 20, 5, "requests answered after the handover")
        stop.set()
        await loop
        assert [o for o in outcomes if not isinstance(o, dict)] == []
        assert len(outcomes) > 40


async def test_a_node_joining_takes_its_share_without_a_failed_request(server: NatsServer, nc: NATS, tmp_path: Path,
                                                                       publisher: PublisherKey) -> None:
    """A node that joins and outscores the one serving a plugin takes it over: the old node keeps serving
    until the new one serves, stops taking requests, answers what was routed to it, and only then
    unloads. A request loop running across the move sees no failure."""
    await push(nc, publisher, "greeter", "1.0.0")
    first = start = await start_member(server.url, "m1", tmp_path, [publisher.public_key])
    joining_id = next(f"j{i}" for i in range(1000) if score("greeter", f"j{i}") > score("greeter", "m1"))
    joined = None
    try:
        await deploy(nc, "greeter", "1.0.0", replicas=1)
        await until(lambda: first.version("greeter") == "1.0.0", 10, "greeter on the first node")
        stop, outcomes = asyncio.Event(), list[object]()
        loops = [asyncio.create_task(_request_loop(server.url, "greeter", stop, outcomes)) for _ in range(8)]
        await until(lambda: len(outcomes) > 20, 5, "requests answered")
        joined = await start_member(server.url, joining_id, tmp_path, [publisher.public_key])
        await until(lambda: joined is not None and joined.version("greeter") == "1.0.0", 10, "the joining node serves")
        await until(lambda: first.version("greeter") is None, 10, "the first node let go")
        answered = len(outcomes)
        await until(lambda: len(outcomes) > answered + 20, 5, "requests answered by the joining node")
        stop.set()
        await asyncio.gather(*loops)
        assert [o for o in outcomes if not isinstance(o, dict)] == []
    finally:
        for m in (start, joined):
            if m is not None and m.agent.running:
                await stop_member(m)


async def test_the_agents_follow_deploys_across_a_nats_server_restart(tmp_path: Path,
                                                                      publisher: PublisherKey) -> None:
    store = tmp_path / "js"
    server = NatsServer(jetstream=True, store_dir=store).start()
    port = int(server.url.rsplit(":", 1)[1])
    client = NATS()
    try:
        await client.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=1)
        await push(client, publisher, "greeter", "1.0.0")
        await push(client, publisher, "greeter", "1.1.0")
        async with members(server.url, tmp_path, [publisher.public_key], 2) as ms:
            await deploy(client, "greeter", "1.0.0", replicas=None)
            await until(lambda: len(serving(ms, "greeter", "1.0.0")) == 2, 10, "1.0.0 on both nodes")
            server.stop()
            server = NatsServer(jetstream=True, store_dir=store, port=port).start()
            await until(lambda: client.is_connected, 10, "the test's client reconnected")
            deadline = time.monotonic() + 15
            while True:  # JetStream answers once it has recovered its streams from the store
                try:
                    await deploy(client, "greeter", "1.1.0", replicas=None, previous="1.0.0")
                    break
                except BusError:
                    assert time.monotonic() < deadline, "JetStream did not come back"
            await until(lambda: len(serving(ms, "greeter", "1.1.0")) == 2, 15, "1.1.0 on both nodes after the restart")
    finally:
        await client.close()
        server.stop()


async def test_a_version_that_fails_everywhere_is_listed_failed_until_undeployed(
        server: NatsServer, nc: NATS, tmp_path: Path, publisher: PublisherKey) -> None:
    await push(nc, publisher, "greeter", "1.0.0", broken="init")
    async with members(server.url, tmp_path, [publisher.public_key], 2) as ms:
        await deploy(nc, "greeter", "1.0.0", replicas=1)  # no previous version to go back to

        def failed_everywhere() -> bool:
            return all((p := m.agent.report().plugins.get("greeter")) is not None and p.state == "failed"
                       for m in ms)

        # the placed node fails, is passed over, the other is placed and fails too; then nothing retries
        await until(failed_everywhere, 10, "greeter failed on both nodes")
        for m in ms:
            (info,) = m.node.manager.list_plugins()
            assert info.status.value == "failed"
            assert "sandbus_init" in (info.last_error or "")
        loads = [m.audit.kinds().count("lifecycle.load_failed") for m in ms]
        await turns_pass(ms)
        assert [m.audit.kinds().count("lifecycle.load_failed") for m in ms] == loads == [1, 1]
        assert await (await DeployStore.open(nc.jetstream())).delete("greeter")
        await until(lambda: all(m.node.manager.list_plugins() == [] for m in ms), 5, "the failed slots cleared")


async def test_a_deploy_named_like_a_local_plugin_is_refused_there_and_runs_elsewhere(
        server: NatsServer, nc: NATS, tmp_path: Path, publisher: PublisherKey, plugins_dir: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    for ext in ("wasm", "toml"):
        shutil.copy(plugins_dir / f"echo.{ext}", local / f"echo.{ext}")
    await push(nc, publisher, "echo", "2.0.0")
    with_local = await start_member(server.url, "local", tmp_path, [publisher.public_key], plugins=local)
    try:
        async with members(server.url, tmp_path, [publisher.public_key], 1) as (other,):
            await deploy(nc, "echo", "2.0.0", replicas=None)
            await until(lambda: other.version("echo") == "2.0.0", 10, "echo@2.0.0 on the other node")
            await until(lambda: "cluster.refused" in with_local.audit.kinds(), 5, "the refusal on the local node")
            event = next(e for e in with_local.audit if e.kind == "cluster.refused")
            assert event.details["code"] == "deploy.invalid"
            assert "plugin directory" in event.message
            assert with_local.version("echo") == "1.0.0"  # its own file, untouched
            assert with_local.agent.report().plugins["echo"].state == "refused"
    finally:
        await stop_member(with_local)
