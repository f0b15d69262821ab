"""Attacks on the cluster's deploys and node agent: a hostile member of the NATS account who can write the
deploys and nodes buckets, a flaky registry, and a careless operator. Real nats-server with JetStream, real
in-process nodes and agents, real signed plugins; the registry is wrapped where a test needs it slow or
failing."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from pathlib import Path

import nats
import orjson
import pytest
from nats.aio.client import Client as NATS

from sandbus.bus.server import NatsServer
from sandbus.host.cluster.buckets import MAX_STATE_VALUE_BYTES
from sandbus.host.cluster.deploys import Deploy, DeployStore, parse_deploy
from sandbus.host.cluster.entry import RegistryEntry
from sandbus.host.cluster.keys import PublisherKey
from sandbus.host.cluster.names import DEPLOYS_BUCKET, NODES_BUCKET
from sandbus.host.cluster.registry import Registry
from sandbus.host.cluster.reports import Membership, NodeReport, ReportStore, parse_report
from sandbus.sdk.errors import ArtifactNotFoundError, DeployError
from tests.bus.conftest import until
from tests.cluster.agent_kit import Member, deploy, push, start_member, stop_member, turns_pass
from tests.cluster.clusterkit import MANIFEST, versioned_wasm
from tests.cluster.conftest import Run


@pytest.fixture
def nc(server_nc: NATS) -> NATS:
    """The connection to this test's own server (the registry tests' ``nc`` is to a shared one)."""
    return server_nc


class Wrapped:
    """The real registry, with some plugins' fetch hanging (a stuck object store) and some names unknown
    with a long reason (a load error of the longest kind a report carries)."""

    def __init__(self, inner: Registry, *, hang: Collection[str] = (), unknown_prefix: str | None = None,
                 slow_s: float = 0.0) -> None:
        self.inner = inner
        self.hang = set(hang)
        self.slow_s = slow_s  # every fetch takes this long (a large module on a slow link)
        self.unknown_prefix = unknown_prefix
        self.fetches: list[str] = []

    async def resolve(self, name: str, version_range: str | None = None) -> RegistryEntry:
        if self.unknown_prefix is not None and name.startswith(self.unknown_prefix):
            raise ArtifactNotFoundError(f"no plugin {name!r} in the registry; " + "the registry has: " + "x" * 600)
        return await self.inner.resolve(name, version_range)

    async def fetch(self, entry: RegistryEntry, trusted: Collection[str] | None = None) -> bytes:
        self.fetches.append(entry.name)
        if entry.name in self.hang:
            await asyncio.Event().wait()  # never set: the agent's own bound ends it
        wasm = await self.inner.fetch(entry, trusted)
        if self.slow_s:
            await asyncio.sleep(self.slow_s)  # the slow link itself, not a stand-in for a condition
        return wasm


def kinds(member: Member, kind: str, plugin: str | None = None) -> int:
    return sum(1 for e in member.audit if e.kind == kind and (plugin is None or e.plugin == plugin))


# -- deploy values ------------------------------------------------------------------------------------------------

async def test_a_revision_storm_of_an_invalid_deploy_is_audited_a_bounded_number_of_times(
        server: NatsServer, nc: NATS, tmp_path: Path, publisher: PublisherKey) -> None:
    member = await start_member(server.url, "m1", tmp_path, [publisher.public_key])
    try:
        kv = (await DeployStore.open(nc.jetstream())).kv
        for i in range(150):  # each write is a new revision of a value that is no deploy
            await kv.put("broken", orjson.dumps({"format": 1, "plugin": "broken", "replicas": -i}))
        await deploy(nc, "marker", "1.0.0", replicas=0)  # after the storm: seen means the storm was seen
        await until(lambda: "marker" in member.agent.deploys, 10, "the node read every revision")
        assert "broken" not in member.agent.deploys
        refused = kinds(member, "cluster.refused", "broken")
        assert 1 <= refused <= 2, f"{refused} audit events for one invalid key"
    finally:
        await stop_member(member)


async def test_a_revision_storm_of_a_failing_version_loads_it_a_bounded_number_of_times(
        server: NatsServer, nc: NATS, tmp_path: Path, publisher: PublisherKey) -> None:
    await push(nc, publisher, "greeter", "1.0.0", broken="init")
    member = await start_member(server.url, "m1", tmp_path, [publisher.public_key])
    try:
        await until(member.agent.ready, 5, "the agent ready")
        last = 0
        for _ in range(40):  # 40 revisions in about a second: each one would give the version a new chance
            last = await deploy(nc, "greeter", "1.0.0", replicas=1)
            await asyncio.sleep(0.025)

        def failed_last() -> bool:
            p = member.agent.report().plugins.get("greeter")
            return p is not None and p.deploy_revision == last and p.state == "failed"

        await until(failed_last, 10, "the last revision tried and reported failed")
        attempts = kinds(member, "lifecycle.load_failed", "greeter")
        assert attempts <= 3, f"{attempts} loads of a failing version in a revision storm"
    finally:
        await stop_member(member)


async def test_a_rollback_to_a_forged_previous_version_keeps_the_serving_one_and_does_not_loop(
        server: NatsServer, nc: NATS, tmp_path: Path, publisher: PublisherKey) -> None:
    """A deploy of a failing version whose ``previous`` names a version the registry never had: the node keeps
    serving what it served, reports both attempts failed, and tries neither again."""
    await push(nc, publisher, "greeter", "1.0.0")
    await push(nc, publisher, "greeter", "1.1.0", broken="init")
    member = await start_member(server.url, "m1", tmp_path, [publisher.public_key])
    try:
        await deploy(nc, "greeter", "1.0.0", replicas=1)
        await until(lambda: member.version("greeter") == "1.0.0", 5, "1.0.0 served")
        revision = await deploy(nc, "greeter", "1.1.0", replicas=1, previous="9.9.9")

        def both_failed() -> bool:
            local = member.agent._local.get("greeter")
            return local is not None and set(local.failures) == {"1.1.0", "9.9.9"}

        await until(both_failed, 10, "1.1.0 and 9.9.9 both failed")
        attempts = kinds(member, "lifecycle.reload_failed", "greeter")
        await turns_pass([member])  # nothing is tried again
        assert kinds(member, "lifecycle.reload_failed", "greeter") == attempts == 1
        assert member.version("greeter") == "1.0.0"
        report = member.agent.report().plugins["greeter"]
        assert (report.state, report.version, report.deploy_revision) == ("serving", "1.0.0", revision)
        assert report.failed is not None
        assert report.failed.version == "1.1.0"  # the deploy's own version: what the others roll back on
    finally:
        await stop_member(member)


async def test_a_node_with_hundreds_of_failing_deploys_keeps_reporting_and_serving(
        server: NatsServer, nc: NATS, tmp_path: Path, publisher: PublisherKey) -> None:
    """Hundreds of deploys that fail with long reasons make a report larger than the bucket takes: the node
    must still report (trimmed), or it goes silent and every node, itself included, takes it for dead."""
    await push(nc, publisher, "greeter", "1.0.0")
    wrapped = Wrapped(await Registry.open(nc), unknown_prefix="ghost")
    member = await start_member(server.url, "m1", tmp_path, [publisher.public_key], registry=wrapped)
    try:
        store = await DeployStore.open(nc.jetstream())
        await deploy(nc, "greeter", "1.0.0", replicas=1)
        await asyncio.gather(*(store.put(Deploy(plugin=f"ghost{i:04d}", range="1.0.0", version="1.0.0",
                                                replicas=None)) for i in range(300)))

        def all_failed() -> bool:
            report = member.agent.report()
            return sum(1 for n, p in member.agent._local.items() if n.startswith("ghost") and p.report.state ==
                       "failed") == 300 and getattr(report.plugins.get("greeter"), "state", None) == "serving"

        await until(all_failed, 20, "every ghost deploy failed")
        kv = (await ReportStore.open(nc.jetstream())).kv
        before = (await kv.get("m1")).revision
        await until(lambda: member.agent.membership.seen_at("m1") is not None, 1, "own report seen")

        async def stored_again() -> bool:
            entry = await kv.get("m1")
            return bool(entry.revision > before)

        deadline = asyncio.get_running_loop().time() + 3
        while not await stored_again():
            assert asyncio.get_running_loop().time() < deadline, "the node's report is no longer stored"
            await asyncio.sleep(0.05)
        entry = await kv.get("m1")
        assert entry.value is not None
        assert len(entry.value) <= MAX_STATE_VALUE_BYTES
        report = parse_report(entry.value, key="m1")
        assert report.plugins["greeter"].state == "serving"
        assert member.agent.ready()
    finally:
        await stop_member(member)


# -- the agent under churn ----------------------------------------------------------------------------------------

async def test_a_hanging_fetch_does_not_hold_up_the_other_deploys(
        server: NatsServer, nc: NATS, tmp_path: Path, publisher: PublisherKey) -> None:
    await push(nc, publisher, "astuck", "1.0.0")
    await push(nc, publisher, "greeter", "1.0.0")
    wrapped = Wrapped(await Registry.open(nc), hang={"astuck"})
    member = await start_member(server.url, "m1", tmp_path, [publisher.public_key], registry=wrapped)
    try:
        await deploy(nc, "astuck", "1.0.0", replicas=1)  # sorted first: a turn meets it before greeter
        await until(lambda: "astuck" in wrapped.fetches, 5, "the stuck fetch started")
        await deploy(nc, "greeter", "1.0.0", replicas=1)
        await until(lambda: member.version("greeter") == "1.0.0", 3, "greeter served beside a stuck fetch")
        store = await DeployStore.open(nc.jetstream())
        assert await store.delete("greeter")
        await until(lambda: member.version("greeter") is None, 3, "greeter undeployed beside a stuck fetch")
        assert member.agent.report().plugins["astuck"].state == "loading"
    finally:
        await stop_member(member)


async def test_a_deploy_that_changes_during_a_slow_load_ends_as_last_asked(
        server: NatsServer, nc: NATS, tmp_path: Path, publisher: PublisherKey) -> None:
    await push(nc, publisher, "greeter", "1.0.0")
    await push(nc, publisher, "greeter", "1.1.0")
    wrapped = Wrapped(await Registry.open(nc), slow_s=0.8)
    member = await start_member(server.url, "m1", tmp_path, [publisher.public_key], registry=wrapped)
    try:
        store = await DeployStore.open(nc.jetstream())
        await deploy(nc, "greeter", "1.0.0", replicas=1)
        await until(lambda: wrapped.fetches == ["greeter"], 5, "the slow fetch started")
        last = await deploy(nc, "greeter", "1.1.0", replicas=1, previous="1.0.0")  # while 1.0.0 is fetched
        # The agent reports a load once it has returned, a moment after the manager serves it: wait for both.
        await until(lambda: member.version("greeter") == "1.1.0"
                    and getattr(member.agent.report().plugins.get("greeter"), "state", None) == "serving", 10,
                    "1.1.0 served and reported after the slow 1.0.0")
        report = member.agent.report().plugins["greeter"]
        assert (report.state, report.version, report.deploy_revision) == ("serving", "1.1.0", last)
        # undeployed while a load is on its way: nothing is left loaded, nor reported
        await deploy(nc, "greeter", "1.0.0", replicas=1, previous="1.1.0")
        await until(lambda: len(wrapped.fetches) == 3, 5, "the third slow fetch started")
        assert await store.delete("greeter")
        await until(lambda: member.version("greeter") is None and "greeter" not in member.agent.report().plugins,
                    10, "greeter gone after its slow load ended")
        await turns_pass([member])  # it does not come back
        assert member.node.manager.list_plugins() == []
        assert "greeter" not in member.agent.report().plugins
    finally:
        await stop_member(member)


async def test_deploy_undeploy_churn_ends_in_the_last_desired_state(
        server: NatsServer, nc: NATS, tmp_path: Path, publisher: PublisherKey) -> None:
    await push(nc, publisher, "greeter", "1.0.0")
    ms = [await start_member(server.url, f"m{i}", tmp_path, [publisher.public_key]) for i in (1, 2)]
    try:
        store = await DeployStore.open(nc.jetstream())
        await until(lambda: all(m.agent.ready() for m in ms), 5, "the agents ready")
        for _ in range(15):
            await deploy(nc, "greeter", "1.0.0", replicas=1)
            await asyncio.sleep(0.02)
            await store.delete("greeter")
            await asyncio.sleep(0.02)
        await turns_pass(ms)  # several turns after the churn
        await until(lambda: all(m.version("greeter") is None for m in ms), 5, "greeter unloaded everywhere")
        await deploy(nc, "greeter", "1.0.0", replicas=1)
        await until(lambda: sum(m.version("greeter") is not None for m in ms) == 1, 5, "greeter on one node")
        await turns_pass(ms)
        assert sum(m.version("greeter") is not None for m in ms) == 1
        assert all(len(m.node.manager.list_plugins()) <= 1 for m in ms)
    finally:
        for m in ms:
            await stop_member(m)


async def push_with(nc: NATS, key: PublisherKey, name: str, version: str, extra: str,
                    capabilities: str = '["compute"]') -> RegistryEntry:
    """Push the versioned test plugin with ``extra`` TOML after its manifest and its own capabilities."""
    manifest = MANIFEST.format(name=name, version=version, description="attack test plugin")
    manifest = manifest.replace('required = ["compute"]', f"required = {capabilities}") + extra
    return await (await Registry.open(nc)).push(versioned_wasm(version), manifest.encode(), key)


async def test_a_plugin_deployed_before_its_dependency_is_reported_serving_once_it_loads(
        server: NatsServer, nc: NATS, tmp_path: Path, publisher: PublisherKey) -> None:
    """``app`` needs ``lib``: a turn meets ``app`` first, and its load waits for the dependency; once ``lib``
    loads the manager loads ``app`` by itself. The node must then say it serves ``app``, not that it failed
    (a failure there makes every node roll ``app`` back, or pass this node over)."""
    await push_with(nc, publisher, "lib", "1.0.0", "")
    await push_with(nc, publisher, "app", "1.0.0", '\n[dependencies]\nlib = "^1.0"\n')
    member = await start_member(server.url, "m1", tmp_path, [publisher.public_key])
    try:
        await until(member.agent.ready, 5, "the agent ready")
        await deploy(nc, "app", "1.0.0", replicas=None)
        await until(lambda: (p := member.agent.report().plugins.get("app")) is not None and p.state == "failed", 5,
                    "app failed for want of lib")
        await deploy(nc, "lib", "1.0.0", replicas=None)
        await until(lambda: member.version("lib") == "1.0.0", 5, "lib served")
        await until(lambda: member.version("app") == "1.0.0", 5, "app loaded by the manager once lib is there")

        def app_serving() -> bool:
            p = member.agent.report().plugins.get("app")
            return p is not None and p.state == "serving" and p.failed is None

        await until(app_serving, 5, "app reported serving")
    finally:
        await stop_member(member)


async def test_a_manifest_asking_what_the_policy_refuses_is_refused_on_each_node_once(
        server: NatsServer, nc: NATS, tmp_path: Path, publisher: PublisherKey) -> None:
    await push_with(nc, publisher, "greedy", "1.0.0", "", capabilities='["compute", "network"]')
    ms = [await start_member(server.url, f"m{i}", tmp_path, [publisher.public_key]) for i in (1, 2)]
    try:
        await deploy(nc, "greedy", "1.0.0", replicas=1)  # one placed node refuses, placement moves to the other

        def refused_everywhere() -> bool:
            return all((p := m.agent.report().plugins.get("greedy")) is not None and p.state == "refused"
                       for m in ms)

        await until(refused_everywhere, 10, "greedy refused on both nodes")
        await turns_pass(ms)  # no retry, no second audit event
        for m in ms:
            assert m.version("greedy") is None
            assert kinds(m, "cluster.refused", "greedy") == 1
            assert "network" in (m.agent.report().plugins["greedy"].reason or "")
    finally:
        for m in ms:
            await stop_member(m)


@pytest.mark.parametrize("raw", [
    b"[" * 8000 + b"]" * 8000,
    b'{"a":' * 3000 + b"1" + b"}" * 3000,
    b'{"format": 1, "plugin": "x", "labels": {' + b",".join(b'"k%d": "v"' % i for i in range(1500)) + b"}}",
    b'"' + b"a" * 300_000 + b'"',
    b"\xff\xfe not utf-8",
], ids=["deep-array", "deep-object", "many-labels", "huge-string", "not-utf8"])
def test_hostile_values_are_refused_as_deploys_and_as_reports(raw: bytes) -> None:
    with pytest.raises(DeployError):
        parse_deploy(raw, key="x")
    with pytest.raises(DeployError):
        parse_report(raw, key="x")


# -- node reports ---------------------------------------------------------------------------------------------

def test_a_report_with_a_version_that_is_no_version_is_refused() -> None:
    base = {"format": 1, "node": "evil", "labels": {}, "at": "x"}
    for plugins in ({"greeter": {"version": "\x1b[2J1.0.0", "state": "serving"}},
                    {"greeter": {"version": "1.0.0", "state": "failed",
                                 "failed": {"version": "\x1b]0;pwned\x07", "state": "failed", "reason": "r"}}},
                    {"Not A Plugin\x1b": {"version": "1.0.0", "state": "serving"}}):
        with pytest.raises(DeployError):
            parse_report(orjson.dumps({**base, "plugins": plugins}), key="evil")


def test_membership_stays_bounded_under_a_flood_of_phantom_nodes() -> None:
    membership = Membership(live_s=3.0)
    membership.observe(NodeReport("real"), arriving=True, now=0.0)
    for i in range(20_000):
        membership.observe(NodeReport(f"phantom{i}"), arriving=True, now=1.0)
    live = membership.live(now=1.5)
    assert len(live) <= Membership.max_nodes
    assert "real" in live  # a node known before the flood is not pushed out by it
    membership = Membership(live_s=3.0, own="me")
    for i in range(Membership.max_nodes + 10):
        membership.observe(NodeReport(f"phantom{i}"), arriving=True, now=1.0)
    membership.observe(NodeReport("me"), arriving=True, now=1.2)
    assert membership.seen_at("me") == 1.2  # the reader's own report counts, however many were invented first


# -- the command line with hostile bucket contents -------------------------------------------------------------



def test_status_shows_hostile_bucket_contents_escaped(sandbus: Run, server: NatsServer) -> None:
    async def write(client: NATS) -> None:
        js = client.jetstream()
        store = await DeployStore.open(js)
        await store.put(Deploy(plugin="greeter", range="1.0.0", version="1.0.0", replicas=1))
        reports = await ReportStore.open(js)
        await reports.kv.put("evil", orjson.dumps({
            "format": 1, "node": "evil", "labels": {}, "at": "\x1b[2J",
            "plugins": {"greeter": {"version": "1.0.0", "state": "failed", "reason": None, "deploy_revision": 1,
                                    "failed": {"version": "\x1b]0;pwned\x07", "state": "failed", "reason": ""}}}}))
        await reports.kv.put("liar", orjson.dumps({
            "format": 1, "node": "liar", "labels": {}, "at": "now",
            "plugins": {"greeter": {"version": "1.0.0", "state": "failed", "reason": "\x1b[31mred\x9b\u202e",
                                    "deploy_revision": 1}}}))
        # keys no client library would write, straight onto the buckets' subjects
        await js.publish(f"$KV.{DEPLOYS_BUCKET}.x\x1b[2Jy", b'{"format": 1, "plugin": "\\u001b[31m"}')
        await js.publish(f"$KV.{NODES_BUCKET}.n\x1b[2Jn", b'{"format": 1}')

    async def go() -> None:
        client = await nats.connect(server.url)
        try:
            await write(client)
        finally:
            await client.close()

    asyncio.run(go())
    for args in (("status",), ("status", "--json"), ("status", "greeter")):
        code, out, err = sandbus(*args, "--nats", server.url, "--no-context")
        assert code == 0, err
        for raw in ("\x1b", "\x07", "\x9b", "\u202e"):
            assert raw not in out, (args, out)
            assert raw not in err, (args, err)
        if args == ("status",):
            assert "liar" in out
            assert "INVALID" in out
