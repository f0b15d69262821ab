"""The cluster end to end: a real nats-server with JetStream, three `sandbus node --cluster` processes, the
`sandbus` command as a user runs it, real plugins pushed, deployed, upgraded, rolled back, attacked.

The nodes and the server are shared by the tests of this module (each test deploys plugins of its own
names, so they do not see each other's); a test that kills a node starts it again before it returns.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.errors import TimeoutError as NatsTimeoutError

from sandbus.bus.server import NatsServer
from sandbus.sdk.client import Client
from sandbus.sdk.errors import SandbusError
from tests.bus.conftest import jetstream_ready, nats_cluster
from tests.cluster.clusterkit import (
    ARTIFACTS_BUCKET,
    DEPLOYS_BUCKET,
    FAILOVER_BOUND_S,
    LOAD_ALLOWANCE_S,
    REGISTRY_BUCKET,
    ROOT,
    AuditWatch,
    ClusterNode,
    RequestLoop,
    acli,
    answering_nodes,
    cli,
    connect,
    kv_entries,
    ok,
    plugin_dir,
    plugin_states,
    polled,
    reports,
    serving,
    start_nodes,
    stop_all,
    until,
    versioned_wasm,
    wait_serving,
    with_custom_section,
)

pytestmark = pytest.mark.slow

NODE_IDS = {"n1", "n2", "n3"}


@dataclass
class Cluster:
    """One nats-server, three cluster nodes, a trusted and an untrusted publisher key."""

    base: Path
    server: NatsServer
    nodes: dict[str, ClusterNode]
    policy: Path
    key: Path
    untrusted_key: Path
    pushed: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        return self.server.url

    def sandbus(self, *args: str) -> list[str]:
        """``args`` with this cluster's server."""
        return [*args, "--nats", self.url]

    def push(self, directory: Path, *, key: Path | None = None) -> None:
        ok(cli(*self.sandbus("push", str(directory), "--key", str(key or self.key))))

    def restart_node(self, node_id: str) -> ClusterNode:
        self.nodes[node_id].terminate()
        node = ClusterNode(node_id, self.url, self.policy, self.base / f"{node_id}-again.log")
        self.nodes[node_id] = node
        node.wait_ready()
        return node


def _keygen(path: Path) -> str:
    ok(cli("keygen", "-o", str(path)))
    return Path(f"{path}.pub").read_text().strip()


@pytest.fixture(scope="module")
def three_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NatsServer]]:
    """A 3-server NATS cluster, started with the module: electing its JetStream leader takes seconds,
    which pass while the other tests run."""
    with nats_cluster(tmp_path_factory.mktemp("nats3")) as servers:
        yield servers


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, three_servers: list[NatsServer]) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("cluster")
    key, untrusted = base / "publisher.nk", base / "stranger.nk"
    public = _keygen(key)
    _keygen(untrusted)
    policy = base / "policy.toml"
    policy.write_text(f'[capabilities]\nallowed = ["compute"]\n[registry]\ntrusted_publishers = ["{public}"]\n')
    server = NatsServer(jetstream=True, store_dir=base / "nats").start()
    nodes: list[ClusterNode] = []
    try:
        nodes = start_nodes(3, server.url, policy, base)
        c = Cluster(base, server, {n.node_id: n for n in nodes}, policy, key, untrusted)
        yield c
        nodes = list(c.nodes.values())
    finally:
        stop_all(nodes)
        server.stop()


@pytest.fixture
async def client(cluster: Cluster) -> Any:
    c = await Client.connect(cluster.url)
    try:
        yield c
    finally:
        await c.close()


async def _deploy(cluster: Cluster, *args: str) -> None:
    ok(await acli(*cluster.sandbus("deploy", *args)))


# --- placement ---------------------------------------------------------------------------------------------------

async def test_deploy_two_replicas_on_three_nodes_exactly_two_serve(cluster: Cluster, plugins_dir: Path,
                                                                    client: Client) -> None:
    echo = cluster.base / "echo-src"
    echo.mkdir()
    for ext in ("wasm", "toml"):
        shutil.copy(plugins_dir / f"echo.{ext}", echo / f"echo.{ext}")
    cluster.push(echo)
    nc = await connect(cluster.url)
    try:
        started = time.monotonic()
        await _deploy(cluster, "echo", "--replicas", "2")
        placed = await wait_serving(nc, "echo", 2, version="1.0.0", nodes=NODE_IDS)
        elapsed = time.monotonic() - started
        answered, replies = await answering_nodes(client, "echo", {"hello": "cluster"})
        assert replies == [{"hello": "cluster"}] * len(replies)
        assert answered == placed, f"answered by {answered}, placed on {placed}"
        (idle,) = NODE_IDS - placed
        assert plugin_states(await reports(nc), "echo", {idle}).get(idle, {}).get("state") != "serving"
        assert elapsed < 15, f"deploy -> serving on 2 replicas took {elapsed:.1f} s"
    finally:
        await nc.close()


# --- rollout and rollback ------------------------------------------------------------------------------------------

async def test_rolling_upgrade_under_load_fails_no_request(cluster: Cluster, client: Client) -> None:
    for version in ("1.0.0", "1.1.0"):
        cluster.push(plugin_dir(cluster.base, "upgrader", version, versioned_wasm(version)))
    nc = await connect(cluster.url)
    try:
        await _deploy(cluster, "upgrader@1.0.0", "--replicas", "2")
        placed = await wait_serving(nc, "upgrader", 2, version="1.0.0", nodes=NODE_IDS)
        async with RequestLoop(client, "upgrader") as loop:
            await loop.wait_successes(20)
            await _deploy(cluster, "upgrader@^1.0", "--replicas", "2")
            assert await wait_serving(nc, "upgrader", 2, version="1.1.0", nodes=NODE_IDS) == placed
            await until(lambda: loop.details()[-1:] == ["1.1.0"], 10, "replies from 1.1.0")
            await loop.wait_successes(20)
        assert loop.failures == [], loop.summary()
        assert set(loop.details()) == {"1.0.0", "1.1.0"}, loop.summary()
        assert loop.details()[-1] == "1.1.0"
        deploy = (await kv_entries(nc, DEPLOYS_BUCKET))["upgrader"]
        assert (deploy["version"], deploy["previous"], deploy["range"]) == ("1.1.0", "1.0.0", "^1.0")
    finally:
        await nc.close()


async def test_a_broken_version_rolls_back_with_no_failed_request_and_status_says_why(
        cluster: Cluster, client: Client) -> None:
    for version in ("1.0.0", "1.1.0"):
        cluster.push(plugin_dir(cluster.base, "rollback", version, versioned_wasm(version)))
    cluster.push(plugin_dir(cluster.base, "rollback", "1.2.0", versioned_wasm("1.2.0", broken="init")))
    nc = await connect(cluster.url)
    try:
        await _deploy(cluster, "rollback@1.1.0", "--replicas", "2")
        placed = await wait_serving(nc, "rollback", 2, version="1.1.0", nodes=NODE_IDS)
        async with RequestLoop(client, "rollback") as loop:
            await loop.wait_successes(20)
            await _deploy(cluster, "rollback@1.2.0", "--replicas", "2")

            async def failed_reported() -> list[str]:
                return [s["failed"]["reason"] for s in plugin_states(await reports(nc), "rollback").values()
                        if (s.get("failed") or {}).get("version") == "1.2.0"]

            reasons = await until(failed_reported, 20, "a node reporting 1.2.0 failed")
            assert any("sandbus_init" in r or "trap" in r or "unreachable" in r for r in reasons), reasons
            # rolled back: the placed nodes serve 1.1.0 again (they never stopped)
            assert await wait_serving(nc, "rollback", 2, version="1.1.0", nodes=NODE_IDS) == placed
            await loop.wait_successes(20)
        assert loop.failures == [], loop.summary()
        assert set(loop.details()) == {"1.1.0"}, loop.summary()
        (deploy,) = ok(await acli(*cluster.sandbus("status", "rollback", "--json"))).json()["deploys"]
        assert (deploy["version"], deploy["previous"], deploy["target"]) == ("1.2.0", "1.1.0", "1.1.0"), deploy
        assert deploy["rollback"].startswith("1.2.0 failed on n"), deploy["rollback"]
        assert "sandbus_init trapped" in deploy["rollback"], deploy["rollback"]
        assert deploy["actual"] == 2
        text = ok(await acli(*cluster.sandbus("status", "rollback"))).out
        assert "ROLLED BACK to 1.1.0: 1.2.0 failed on" in text, text

        # a version whose sandbus_health fails right after init: the same, back to what serves (1.1.0)
        cluster.push(plugin_dir(cluster.base, "rollback", "1.3.0", versioned_wasm("1.3.0", broken="health")))
        async with RequestLoop(client, "rollback") as loop:
            await loop.wait_successes(10)
            await _deploy(cluster, "rollback@1.3.0", "--replicas", "2")

            async def rolled_back_again() -> dict[str, Any] | None:
                view = ok(await acli(*cluster.sandbus("status", "rollback", "--json"))).json()
                (d,) = view["deploys"]
                return d if d["version"] == "1.3.0" and d["rollback"] and d["actual"] == 2 else None

            deploy = await until(rolled_back_again, 20, "1.3.0 rolled back")
            await loop.wait_successes(10)
        assert (deploy["previous"], deploy["target"]) == ("1.1.0", "1.1.0"), deploy
        assert "sandbus_health" in deploy["rollback"], deploy["rollback"]
        assert loop.failures == [], loop.summary()
        assert set(loop.details()) == {"1.1.0"}, loop.summary()
    finally:
        await nc.close()


# --- what every node refuses ---------------------------------------------------------------------------------------

async def test_tampered_wrongly_signed_and_untrusted_artifacts_are_refused_on_every_node(cluster: Cluster) -> None:
    wasm = versioned_wasm("1.0.0")
    cluster.push(plugin_dir(cluster.base, "tampered", "1.0.0", wasm))
    cluster.push(plugin_dir(cluster.base, "forged", "1.0.0", wasm))
    cluster.push(plugin_dir(cluster.base, "stranger", "1.0.0", wasm), key=cluster.untrusted_key)
    nc = await connect(cluster.url)
    audit = await AuditWatch().start(nc)
    try:
        js = nc.jetstream()
        # an account member replaces the object (same size, one byte changed) ...
        store = await js.object_store(ARTIFACTS_BUCKET)
        bad = bytearray(wasm)
        bad[-3] ^= 0xFF
        await store.put("tampered/1.0.0.wasm", bytes(bad))
        # ... or rewrites the index entry's signature
        kv = await js.key_value(REGISTRY_BUCKET)
        entry = orjson.loads((await kv.get("forged.1.0.0")).value or b"{}")
        signature = base64.urlsafe_b64decode(entry["signature"] + "==")
        entry["signature"] = base64.urlsafe_b64encode(bytes([signature[0] ^ 1]) + signature[1:]).rstrip(b"=").decode()
        await kv.put("forged.1.0.0", orjson.dumps(entry))

        # the command resolves versions through signed entries only: the forged one is refused at once
        refused = await acli(*cluster.sandbus("deploy", "forged", "--every-node"))
        assert refused.code == 4, refused.text
        assert "signature" in refused.err
        # a deploy written by any other client of the bucket (the documented JSON) is checked by every node
        deploys = await js.key_value(DEPLOYS_BUCKET)
        for plugin in ("tampered", "forged", "stranger"):
            await deploys.put(plugin, orjson.dumps({
                "format": 1, "plugin": plugin, "range": "1.0.0", "version": "1.0.0", "previous": None,
                "replicas": None, "labels": {}, "deployed_at": "2026-12-02T16:00:00.000Z"}))
        # each node refuses each one itself, with a critical audit event naming the error code
        for plugin, code in (("tampered", "security.signature"), ("forged", "security.signature"),
                             ("stranger", "security.untrusted_publisher")):
            events = await audit.wait("cluster.refused", NODE_IDS, plugin=plugin, text=code)
            assert {e["level"] for e in events.values()} <= {"critical", "warning"}, events
        all_reports = await reports(nc)
        for plugin in ("tampered", "forged", "stranger"):
            assert serving(all_reports, plugin) == set(), plugin
        async with await Client.connect(cluster.url) as c:
            for plugin in ("tampered", "forged", "stranger"):
                with pytest.raises(Exception):  # noqa: B017, PT011 -- no node serves it: no responder
                    await c.request(plugin, "handle_request", {}, timeout=0.5)

        async def all_refused() -> dict[str, set[str]] | None:
            view = ok(await acli(*cluster.sandbus("status", "--json"))).json()
            found = {d["plugin"]: {f"{n['state']} {n['reason']}" for n in d["nodes"]} for d in view["deploys"]
                     if d["plugin"] in ("tampered", "forged", "stranger")}
            done = len(found) == 3 and all(len(v) >= 1 and all(x.startswith("refused") for x in v)
                                           for v in found.values())
            return found if done else None

        states = await until(all_refused, 10, "status showing every node refusing the three")
        assert all("security.signature" in x for x in states["tampered"] | states["forged"]), states
        assert all("security.untrusted_publisher" in x for x in states["stranger"]), states
        for plugin in ("tampered", "forged", "stranger"):
            ok(await acli(*cluster.sandbus("undeploy", plugin)))
    finally:
        await audit.stop()
        await nc.close()


# --- bad input -----------------------------------------------------------------------------------------------------

async def test_deploys_of_what_the_registry_lacks_and_bad_replicas_are_refused(cluster: Cluster) -> None:
    cluster.push(plugin_dir(cluster.base, "present", "1.0.0", versioned_wasm("1.0.0")))
    results = await asyncio.gather(
        acli(*cluster.sandbus("deploy", "absent")),
        acli(*cluster.sandbus("deploy", "present@2.0.0")),
        acli(*cluster.sandbus("deploy", "present@^3")),
        acli(*cluster.sandbus("deploy", "present", "--replicas", "-1")),
        acli(*cluster.sandbus("deploy", "present", "--label", "no-equals-sign")),
    )
    unknown, version, matching_nothing, negative, label = results
    for r in (unknown, version, matching_nothing):
        assert r.code == 2, r.text
        assert "Traceback" not in r.text
    assert "absent" in unknown.err
    assert "1.0.0" in version.err  # the message lists the versions there are
    assert "1.0.0" in matching_nothing.err
    for r in (negative, label):
        assert r.code == 2, r.text
        assert "Traceback" not in r.text
    nc = await connect(cluster.url)
    try:
        assert {"absent", "present"}.isdisjoint(await kv_entries(nc, DEPLOYS_BUCKET))
    finally:
        await nc.close()


async def test_a_label_selector_matching_no_node_is_reported_not_retried_in_a_loop(cluster: Cluster) -> None:
    cluster.push(plugin_dir(cluster.base, "martian", "1.0.0", versioned_wasm("1.0.0")))
    logs_before = {n: len(node.output()) for n, node in cluster.nodes.items()}
    nc = await connect(cluster.url)
    audit = await AuditWatch().start(nc)
    deployed_at = time.monotonic()
    deploy = ok(await acli(*cluster.sandbus("deploy", "martian", "--label", "region=mars")))
    assert "no live node has the labels region=mars" in deploy.out, deploy.out

    async def reported() -> list[str] | None:
        status = ok(await acli(*cluster.sandbus("status", "martian", "--json"))).json()
        (deploy,) = status["deploys"]
        return deploy["problems"] or None

    problems = await until(reported, 10, "status reporting that no node matches")
    assert any("region=mars" in p and "no live node" in p for p in problems), problems
    text = ok(await acli(*cluster.sandbus("status"))).out
    assert "! no live node has the labels region=mars" in text
    try:
        # an observation window of several reconcile turns (one a second): nothing is tried, so nothing
        # is logged, audited or reported about it, however long it stays unplaceable
        await asyncio.sleep(max(0.0, deployed_at + 3.0 - time.monotonic()))
        assert serving(await reports(nc), "martian") == set()
        assert plugin_states(await reports(nc), "martian") == {}
        assert audit.matching("", plugin="martian") == {}
    finally:
        await audit.stop()
        await nc.close()
    for node_id, node in cluster.nodes.items():
        grown = node.output()[logs_before[node_id]:]
        assert "martian" not in grown, grown[-2000:]
    ok(await acli(*cluster.sandbus("undeploy", "martian")))


# --- failures of nodes and servers --------------------------------------------------------------------------------

async def test_kill9_of_a_serving_node_moves_its_share_within_the_bound(cluster: Cluster, client: Client) -> None:
    cluster.push(plugin_dir(cluster.base, "survivor", "1.0.0", versioned_wasm("1.0.0")))
    nc = await connect(cluster.url)
    victim: str | None = None
    try:
        await _deploy(cluster, "survivor", "--replicas", "2")
        placed = await wait_serving(nc, "survivor", 2, nodes=NODE_IDS)
        victim = sorted(placed)[0]
        (spare,) = NODE_IDS - placed
        async with RequestLoop(client, "survivor", timeout=1.0) as loop:
            await loop.wait_successes(20)
            killed_at = time.monotonic()
            cluster.nodes[victim].kill9()
            now = await wait_serving(nc, "survivor", 2, nodes=NODE_IDS - {victim}, timeout=FAILOVER_BOUND_S + 10)
            assert now == placed - {victim} | {spare}
            await until(lambda: any(o.ok and o.node == spare for o in loop.outcomes), 5, f"{spare} answering")
            await loop.wait_successes(20)
        # from the kill to the first reply from the node that took over
        took_over = min(o.done for o in loop.outcomes if o.ok and o.node == spare) - killed_at
        assert took_over < FAILOVER_BOUND_S + LOAD_ALLOWANCE_S, f"took over after {took_over:.1f} s"
        # only the requests in flight on the killed node may fail, and only around the kill
        assert len(loop.failures) <= 3, loop.summary()
        assert loop.longest_gap < 2.0, loop.summary()
        print(f"\nfailover: {spare} serving {took_over:.2f} s after kill -9 of {victim}; "
              f"{len(loop.failures)} failed requests in {loop.failure_window:.2f} s; {loop.summary()}")

        # the node comes back: it outscores the spare, takes its share back, and the spare serves until
        # then (a rebalance fails no request)
        async with RequestLoop(client, "survivor", timeout=1.0) as loop:
            await loop.wait_successes(10)
            await asyncio.get_running_loop().run_in_executor(None, cluster.restart_node, victim)
            restarted, victim = victim, None

            async def back_as_placed() -> bool:
                return serving(await reports(nc), "survivor", nodes=NODE_IDS) == placed

            await until(back_as_placed, 15, f"{sorted(placed)} serving survivor again")
            await until(lambda: any(o.ok and o.node == restarted for o in loop.outcomes), 5,
                        f"{restarted} answering again")
            await loop.wait_successes(20)
        assert loop.failures == [], loop.summary()
        assert serving(await reports(nc), "survivor", nodes={spare}) == set()
    finally:
        await nc.close()
        if victim is not None:
            cluster.restart_node(victim)


async def test_a_nats_restart_in_the_middle_of_a_deploy_ends_in_the_desired_state(cluster: Cluster) -> None:
    """The server restarts the moment the deploy is written (the nodes are reading it, resolving, fetching):
    once it is back, the nodes carry the deploy out."""
    cluster.push(plugin_dir(cluster.base, "restarted", "1.0.0", versioned_wasm("1.0.0")))
    nc = await connect(cluster.url)
    try:
        deploys = await nc.jetstream().key_value(DEPLOYS_BUCKET)
        await deploys.put("restarted", orjson.dumps({
            "format": 1, "plugin": "restarted", "range": "1.0.0", "version": "1.0.0", "previous": None,
            "replicas": 2, "labels": {}, "deployed_at": "2026-12-02T16:00:00.000Z"}))
        cluster.server.restart()
    finally:
        await nc.close()
    await jetstream_ready(cluster.url)
    nc = await connect(cluster.url)
    try:
        placed = await wait_serving(nc, "restarted", 2, nodes=NODE_IDS, timeout=30)

        async def only_placed_hold_it() -> bool:
            # While the server was away a node may have seen fewer live nodes and placed the deploy on itself
            # too; once it sees them all it drains (still serving, reported "draining") and unloads.
            current = await polled(reports(nc))
            return current is not None and set(plugin_states(current, "restarted", NODE_IDS)) == placed

        await until(only_placed_hold_it, 30, "the nodes not placed to let go of the plugin")
        async with await Client.connect(cluster.url) as c:
            answered, replies = await answering_nodes(c, "restarted")
        assert answered == placed
        assert replies == [{"version": "1.0.0"}] * len(replies)
    finally:
        await nc.close()


async def test_a_three_server_nats_cluster_keeps_the_deploys_when_a_server_dies(
        tmp_path: Path, cluster: Cluster, three_servers: list[NatsServer]) -> None:
    """Buckets replicated on three servers: with one killed, the nodes keep serving, and a node that
    starts afterwards still finds the deploy, the registry entry and the artifact."""
    urls = [s.url for s in three_servers]
    await jetstream_ready(urls[0])
    everywhere = ",".join(urls)
    # --no-durable: durable topics are not what this test is about, and a node probing their stream while
    # the cluster re-elects its leaders waits for the probe to time out
    nodes = start_nodes(2, everywhere, cluster.policy, tmp_path, prefix="c", extra=("--no-durable",))
    try:
        ok(cli("push", str(plugin_dir(tmp_path, "replicated", "1.0.0", versioned_wasm("1.0.0"))),
               "--key", str(cluster.key), "--nats", everywhere))
        ok(await acli("deploy", "replicated", "--every-node", "--nats", everywhere))
        nc = await connect(urls[2])
        try:
            js = nc.jetstream()
            for stream in (f"KV_{DEPLOYS_BUCKET}", f"KV_{REGISTRY_BUCKET}", f"OBJ_{ARTIFACTS_BUCKET}"):
                assert (await js.stream_info(stream)).config.num_replicas == 3, stream
            await wait_serving(nc, "replicated", 2, nodes={"c1", "c2"})
            three_servers[0].kill()
            async with await Client.connect(urls[2]) as c:
                _, replies = await answering_nodes(c, "replicated")
                assert replies == [{"version": "1.0.0"}] * len(replies)
            # the streams whose leader was on the killed server elect another (a few seconds); a node
            # started meanwhile gives up on JetStream (see docs/cluster.md, troubleshooting)
            async def streams_answer() -> bool:
                try:  # asked with a short timeout: a stream without a leader does not answer at all
                    for stream in (f"KV_{DEPLOYS_BUCKET}", f"KV_{REGISTRY_BUCKET}", f"OBJ_{ARTIFACTS_BUCKET}"):
                        await nc.jetstream(timeout=0.5).stream_info(stream)
                except Exception:  # not yet: no leader, a timeout
                    return False
                return True

            await until(streams_answer, 30, "the buckets' streams to answer after the server was killed")
            late = ClusterNode("c3", ",".join(urls[1:]), cluster.policy, tmp_path / "c3.log", extra=("--no-durable",))
            nodes.append(late)
            await asyncio.get_running_loop().run_in_executor(None, late.wait_ready)
            await wait_serving(nc, "replicated", 3, nodes={"c1", "c2", "c3"}, timeout=30)

            async def deploy_readable() -> Any:
                return ((await polled(kv_entries(nc, DEPLOYS_BUCKET))) or {}).get("replicated")

            assert (await until(deploy_readable, 10, "the deploy read back"))["version"] == "1.0.0"
        finally:
            await nc.close()
    finally:
        stop_all(nodes)


# --- the shipped NATS permissions ---------------------------------------------------------------------------------

PASSWORDS = {"sandbus-node": "node-secret", "operator": "operator-secret", "publisher": "publisher-secret",
             "client": "client-secret", "viewer": "viewer-secret"}


def _violations(server: NatsServer, user: str) -> list[str]:
    text = server.log_path.read_text(errors="replace")
    return [line for line in text.splitlines() if "Violation" in line and f"/user:{user}\"" in line]


async def test_the_shipped_permissions_let_each_cluster_role_do_its_part_and_no_more(
        tmp_path: Path, cluster: Cluster) -> None:
    """deploy/nats/permissions.conf: a publisher pushes, an operator deploys, a node (``sandbus-node``)
    follows the deploy and a client calls the plugin, without one violation; a publisher cannot deploy,
    an operator cannot push, a node cannot write the registry or the deploys, a client reads neither."""
    store = tmp_path / "nats"
    env = {"NATS_HOST": "127.0.0.1", "NATS_PORT": "-1", "NATS_STORE": str(store),
           **{f"SANDBUS_{u.split('-')[-1].upper()}_PASSWORD": p for u, p in PASSWORDS.items()}}
    server = NatsServer(config=ROOT / "deploy" / "nats" / "permissions.conf", jetstream=False, store_dir=store,
                        env=env).start()
    node: ClusterNode | None = None
    try:
        url = server.url

        def as_user(user: str, *args: str) -> list[str]:
            return [*args, "--nats", url, "--user", user, "--password", PASSWORDS[user]]

        # 3 MB: large enough that reading it back takes JetStream flow control (its own grants)
        echo = plugin_dir(tmp_path, "echo", "1.0.0", with_custom_section(versioned_wasm("1.0.0"), 3_000_000))
        node = ClusterNode("p1", url, cluster.policy, tmp_path / "p1.log", extra=("--user", "sandbus-node"),
                           env={"SANDBUS_NATS_PASSWORD": PASSWORDS["sandbus-node"]})
        ok(await acli(*as_user("publisher", "push", str(echo), "--key", str(cluster.key))))
        for result in await asyncio.gather(
                acli(*as_user("publisher", "search", "echo")),
                acli(*as_user("publisher", "pull", "echo", "-o", str(tmp_path / "by-publisher"))),
                acli(*as_user("operator", "pull", "echo", "-o", str(tmp_path / "by-operator"))),
                acli(*as_user("operator", "deploy", "echo", "--every-node"))):
            ok(result)
        wasm = (echo / "echo.wasm").read_bytes()
        assert (tmp_path / "by-publisher" / "echo.wasm").read_bytes() == wasm
        assert (tmp_path / "by-operator" / "echo.wasm").read_bytes() == wasm
        await asyncio.get_running_loop().run_in_executor(None, node.wait_ready)
        async with await Client.connect(url, user="client", password=PASSWORDS["client"]) as client:
            reply = await until(lambda: _call(client), 15, "the node to serve echo for the client")
            assert reply == {"version": "1.0.0"}

        async def reported_serving() -> bool:
            status = ok(await acli(*as_user("operator", "status", "--json"))).json()
            return [d["actual"] for d in status["deploys"]] == [1]

        await until(reported_serving, 10, "the operator's status showing echo served")
        for user in PASSWORDS:
            assert _violations(server, user) == [], user

        # what each role may not do: the server drops the write (no ack) and logs a violation
        async def refused_write(user: str, bucket: str, key: str) -> None:
            nc = await connect(url, user=user, password=PASSWORDS[user])
            try:
                js = nc.jetstream(timeout=1.0)
                kv = await js.key_value(bucket)  # reading is allowed for the roles that may read ...
                await kv.put(key, b'{"format": 1}')  # ... writing is not
            except NatsTimeoutError:
                return
            finally:
                await nc.close()
            raise AssertionError(f"{user} wrote {key} into {bucket}")

        await asyncio.gather(refused_write("publisher", DEPLOYS_BUCKET, "echo"),
                             refused_write("operator", REGISTRY_BUCKET, "echo.9.9.9"),
                             refused_write("sandbus-node", DEPLOYS_BUCKET, "echo"),
                             refused_write("sandbus-node", REGISTRY_BUCKET, "echo.9.9.9"),
                             refused_write("client", REGISTRY_BUCKET, "echo.9.9.9"))
        for user, subject in (("publisher", "$JS.API.STREAM.INFO.KV_sandbus-deploys"),
                              ("operator", "$KV.sandbus-registry.echo.9.9.9"),
                              ("sandbus-node", "$KV.sandbus-deploys.echo"),
                              ("sandbus-node", "$KV.sandbus-registry.echo.9.9.9"),
                              ("client", "$JS.API.STREAM.INFO.KV_sandbus-registry")):
            assert any(f'"{subject}"' in v for v in _violations(server, user)), (user, subject)
        deploy = ok(await acli(*as_user("operator", "status", "echo", "--json"))).json()["deploys"][0]
        assert (deploy["version"], deploy["replicas"]) == ("1.0.0", None)  # the publisher's deploy never landed
    finally:
        if node is not None:
            node.terminate()
        server.stop()


async def _call(client: Client) -> Any:
    try:
        return await client.request("echo", "handle_request", {"from": "client"}, timeout=1.0)
    except SandbusError:
        return None
