"""The PluginBus end to end: real nats-server, real host node processes, real wasm."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from sandbus.bus.server import NatsServer
from sandbus.sdk.client import Client
from sandbus.sdk.errors import (
    BusError,
    InvalidJsonError,
    PluginNotFoundError,
    SecurityViolationError,
    UnknownFunctionError,
)
from tests.bus.conftest import NodeProcess, until

StartNode = Callable[[str, str], NodeProcess]


async def collect(client: Client, subject: str) -> tuple[list[dict[str, Any]], Any]:
    seen: list[dict[str, Any]] = []

    async def cb(msg: Any) -> None:
        seen.append(orjson.loads(msg.data))

    sub = await client.nc.subscribe(subject, cb=cb)
    return seen, sub




async def test_request_reply_through_a_node(nats_server: NatsServer, start_node: StartNode) -> None:
    start_node("n1", nats_server.url)
    async with await Client.connect(nats_server.url) as c:
        reply = await c.request("text_processor", "handle_request", {"action": "process_data", "data": {"input": "hi"}})
        assert reply == {"success": True, "result": {"processed": {"input": "hi"}}, "error": None}


async def test_requests_are_load_balanced_across_nodes(nats_server: NatsServer, start_node: StartNode) -> None:
    start_node("n1", nats_server.url)
    start_node("n2", nats_server.url)
    async with await Client.connect(nats_server.url) as c:
        replies = await asyncio.gather(*(c.request("echo", "handle_request", {"i": i}) for i in range(200)))
        assert replies == [{"i": i} for i in range(200)]
        nodes = await c.nodes(timeout=1.0)
    counts = {v["node_id"]: next(p["executions"] for p in v["plugins"] if p["name"] == "echo") for v in nodes}
    assert set(counts) == {"n1", "n2"}
    assert sum(counts.values()) == 200
    assert min(counts.values()) > 0, counts


async def test_broadcast_reaches_each_subscribing_plugin_exactly_once(nats_server: NatsServer,
                                                                      start_node: StartNode) -> None:
    start_node("n1", nats_server.url)
    start_node("n2", nats_server.url)
    async with await Client.connect(nats_server.url) as c:
        seen, _ = await collect(c, "sandbus.topic.seen.*")
        ids = [await c.publish("orders.created", {"n": i}) for i in range(30)]
        await until(lambda: len(seen) >= 60, 20, "60 deliveries")
        js = c.nc.jetstream()
        for plugin in ("rec_a", "rec_b"):
            # Every delivery acked: nothing more can arrive, so the counts below are final.
            async def settled(p: str = plugin) -> bool:
                info = await js.consumer_info("SANDBUS_TOPICS", f"plugin-{p}")
                return info.num_pending == 0 and info.num_ack_pending == 0

            for _ in range(500):
                if await settled():
                    break
                await asyncio.sleep(0.01)
            assert await settled()
    by_plugin: dict[str, list[str]] = {"seen.rec_a": [], "seen.rec_b": []}
    for m in seen:
        by_plugin[m["topic"]].append(m["payload"]["id"])
    for topic, got in by_plugin.items():
        assert sorted(got) == sorted(ids), f"{topic}: {len(got)} deliveries for {len(ids)} messages"


async def test_direct_message_is_delivered_and_answered(nats_server: NatsServer, start_node: StartNode) -> None:
    start_node("n1", nats_server.url)
    async with await Client.connect(nats_server.url) as c:
        seen, _ = await collect(c, "sandbus.topic.seen.rec_a")
        assert await c.send("rec_a", {"direct": True}, timeout=5) == {"ok": True}
        await until(lambda: len(seen) == 1, 5, "the recorder's publication")
        assert seen[0]["payload"]["to"] == "rec_a"
        assert seen[0]["payload"]["payload"] == {"direct": True}
        assert seen[0]["from"] == "rec_a"


async def test_publish_outside_the_granted_topics_is_a_security_violation(nats_server: NatsServer,
                                                                          start_node: StartNode) -> None:
    start_node("n1", nats_server.url)
    async with await Client.connect(nats_server.url) as c:
        with pytest.raises(SecurityViolationError, match=r"forbidden\.topic"):
            await c.request("rec_a", "handle_request", {"forbidden": 1})
        assert await c.request("rec_a", "handle_request", {"fine": 1}) == {"published": True}
        # The denial is in the durable audit trail, replayable from the start of the stream.
        sub = await c.nc.jetstream().subscribe("sandbus.audit.n1", ordered_consumer=True)
        kinds = []
        for _ in range(200):
            event = orjson.loads((await sub.next_msg(timeout=5)).data)
            kinds.append(event["kind"])
            if event["kind"] == "security.publish_denied":
                assert event["plugin"] == "rec_a"
                assert event["level"] == "critical"
                break
        assert "security.publish_denied" in kinds
        await sub.unsubscribe()


async def test_bad_requests_get_error_replies_not_silence(nats_server: NatsServer, start_node: StartNode) -> None:
    start_node("n1", nats_server.url)
    async with await Client.connect(nats_server.url) as c:
        with pytest.raises(PluginNotFoundError, match="no node serves plugin 'ghost'"):
            await c.request("ghost", "handle_request", {})
        with pytest.raises(UnknownFunctionError, match='no function "nope"'):
            await c.request("echo", "nope", {})
        with pytest.raises(InvalidJsonError, match="not valid JSON"):
            await c.request_bytes("echo", "handle_request", b"{broken")
        msg = await c.nc.request("sandbus.msg.rec_a", b"{not json", timeout=5)
        assert msg.headers is not None
        assert msg.headers["Sandbus-Error-Code"] == "request.invalid_json"
        assert b"not valid JSON" in msg.data


async def test_a_plugin_burning_its_timeout_does_not_stall_others(nats_server: NatsServer,
                                                                  start_node: StartNode) -> None:
    start_node("n1", nats_server.url)
    async with await Client.connect(nats_server.url) as c:
        slow = asyncio.ensure_future(c.request_bytes("spinner", "loop_forever", b"{}", timeout=10))
        await asyncio.sleep(0)  # let the slow request go out first
        replies = await asyncio.gather(*(c.request("echo", "handle_request", {"i": i}, timeout=1.5) for i in range(50)))
        assert len(replies) == 50
        assert not slow.done(), "the echo replies all arrived while the spinner was still running"
        with pytest.raises(Exception, match="timeout"):
            await slow


async def test_killed_node_loses_no_durable_message(nats_server: NatsServer, start_node: StartNode) -> None:
    n1 = start_node("n1", nats_server.url)
    start_node("n2", nats_server.url)
    async with await Client.connect(nats_server.url) as c:
        seen, _ = await collect(c, "sandbus.topic.seen.rec_a")
        ids = []
        for i in range(100):
            ids.append(await c.publish("orders.created", {"n": i}))
            if i == 30:
                n1.kill9()
        await until(lambda: {m["payload"]["id"] for m in seen} >= set(ids), 30, "every message at least once")


async def test_failing_delivery_is_dead_lettered(nats_server: NatsServer, start_node: StartNode) -> None:
    start_node("n1", nats_server.url)
    async with await Client.connect(nats_server.url) as c:
        dlq, _ = await collect(c, "sandbus.dlq.rec_a")
        msg_id = await c.publish("orders.failed", {"fail": True})
        await until(lambda: len(dlq) >= 1, 30, "the dead letter")
        assert dlq[0]["id"] == msg_id


async def test_node_reconnects_after_nats_restart(nats_server: NatsServer, start_node: StartNode) -> None:
    start_node("n1", nats_server.url)
    async with await Client.connect(nats_server.url) as c:
        assert await c.request("echo", "handle_request", [1]) == [1]
    nats_server.restart()
    async with await Client.connect(nats_server.url) as c:
        for _ in range(500):
            try:
                assert await c.request("echo", "handle_request", [2], timeout=0.5) == [2]
                break
            except (PluginNotFoundError, TimeoutError):
                await asyncio.sleep(0.02)  # the node is reconnecting
        else:
            raise AssertionError("the node did not come back after the server restart")


async def test_sigterm_finishes_in_flight_work(nats_server: NatsServer, start_node: StartNode) -> None:
    n1 = start_node("n1", nats_server.url)
    async with await Client.connect(nats_server.url) as c:
        slow = asyncio.ensure_future(c.request_bytes("spinner", "loop_forever", b"{}", timeout=10))
        await asyncio.sleep(0.2)  # the request is in flight on the node
        await asyncio.get_running_loop().run_in_executor(None, n1.terminate)
        with pytest.raises(Exception, match="timeout"):
            await slow  # answered (with its timeout error) before the node exited, not dropped
    assert n1.proc.returncode == 0


async def test_workers_run_as_separate_nodes_in_the_same_queue_groups(nats_server: NatsServer,
                                                                       start_node: StartNode) -> None:
    start_node("n1", nats_server.url, "--workers", "2")
    async with await Client.connect(nats_server.url) as c:
        for _ in range(500):  # the worker process starts after the parent printed "ready"
            if len(await c.nodes(timeout=0.3)) == 2:
                break
        replies = await asyncio.gather(*(c.request("echo", "handle_request", [i]) for i in range(100)))
        assert replies == [[i] for i in range(100)]
        views = await c.nodes(timeout=1.0)
    assert sorted(v["node_id"] for v in views) == ["n1", "n1-w1"]


async def test_user_password_authentication(tmp_path: Any, start_node: StartNode) -> None:
    with NatsServer(extra_args=["--user", "node", "--pass", "s3cret"]) as server:
        start_node("n1", server.url, "--user", "node", env={"SANDBUS_NATS_PASSWORD": "s3cret"})
        with pytest.raises(BusError, match="Authorization Violation"):
            await Client.connect(server.url, allow_reconnect=False)
        async with await Client.connect(server.url, user="node", password="s3cret") as c:
            assert await c.request("echo", "handle_request", {"auth": True}) == {"auth": True}


async def test_nkey_authentication(tmp_path: Any, start_node: StartNode) -> None:
    import os

    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    (tmp_path / "node.nk").write_bytes(seed + b"\n")
    (tmp_path / "server.conf").write_text(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    with NatsServer(extra_args=["-c", str(tmp_path / "server.conf")]) as server:
        start_node("n1", server.url, "--nkey-seed", str(tmp_path / "node.nk"))
        with pytest.raises(BusError, match="Authorization Violation"):
            await Client.connect(server.url, allow_reconnect=False)
        async with await Client.connect(server.url, nkeys_seed=str(tmp_path / "node.nk")) as c:
            assert await c.request("echo", "handle_request", {"nkey": True}) == {"nkey": True}


def _operator_mode(tmp_path: Any) -> tuple[Any, Any]:
    """A nats-server config in operator (JWT) mode and a user's .creds file, signed here with nkeys
    as ``nsc`` would: operator -> account (preloaded in the server) -> user."""
    import base64
    import hashlib
    import json
    import os
    import time

    import nkeys

    def keypair(prefix: int) -> tuple[bytes, Any]:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        return seed, nkeys.from_seed(bytearray(seed))

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def jwt(claims: dict[str, Any], signer: Any) -> str:
        claims = {**claims, "iat": int(time.time())}
        claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
                                         ).decode().rstrip("=")
        head = f'{b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())}.{b64(json.dumps(claims).encode())}'
        return f"{head}.{b64(signer.sign(head.encode()))}"

    _, operator = keypair(nkeys.PREFIX_BYTE_OPERATOR)
    _, account = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    user_seed, user = keypair(nkeys.PREFIX_BYTE_USER)
    op, acc, usr = (k.public_key.decode() for k in (operator, account, user))
    unlimited = {k: -1 for k in ("subs", "data", "payload", "imports", "exports", "conn", "leaf")}
    op_jwt = jwt({"iss": op, "sub": op, "name": "op", "nats": {"type": "operator", "version": 2}}, operator)
    acc_jwt = jwt({"iss": op, "sub": acc, "name": "acc",
                   "nats": {"type": "account", "version": 2, "limits": {**unlimited, "wildcards": True}}}, operator)
    user_jwt = jwt({"iss": acc, "sub": usr, "name": "node",
                    "nats": {"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1,
                             "payload": -1}}, account)
    conf, creds = tmp_path / "operator.conf", tmp_path / "node.creds"
    conf.write_text(f"operator: {op_jwt}\nresolver: MEMORY\nresolver_preload: {{\n  {acc}: {acc_jwt}\n}}\n")
    creds.write_text(f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
                     f"-----BEGIN USER NKEY SEED-----\n{user_seed.decode()}\n------END USER NKEY SEED------\n")
    return conf, creds


async def test_creds_file_authentication(tmp_path: Any, start_node: StartNode) -> None:
    conf, creds = _operator_mode(tmp_path)
    with NatsServer(jetstream=False, extra_args=["-c", str(conf)]) as server:
        start_node("n1", server.url, "--creds", str(creds), "--no-durable")
        with pytest.raises(BusError, match="Authorization Violation"):
            await Client.connect(server.url, allow_reconnect=False)
        async with await Client.connect(server.url, user_credentials=str(creds)) as c:
            assert await c.request("echo", "handle_request", {"creds": True}) == {"creds": True}


async def test_tls_connection(tmp_path: Any, start_node: StartNode) -> None:
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate (apt-get install openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    with NatsServer(extra_args=["--tls", "--tlscert", str(cert), "--tlskey", str(key)]) as server:
        url = server.url.replace("nats://", "tls://")
        start_node("n1", url, "--tls-ca", str(cert))
        ctx = ssl.create_default_context(cafile=str(cert))
        async with await Client.connect(url, tls=ctx) as c:
            assert await c.request("echo", "handle_request", {"tls": True}) == {"tls": True}


async def test_the_topic_example_counts_each_order_once(nats_server: NatsServer, start_node: StartNode) -> None:
    start_node("n1", nats_server.url)
    start_node("n2", nats_server.url)
    async with await Client.connect(nats_server.url) as c:
        for i in range(10):
            await c.publish("orders.created", {"id": i})

        async def executions() -> int:
            views = await c.nodes(timeout=0.5)
            return sum(p["executions"] for v in views for p in v["plugins"] if p["name"] == "order_logger")

        total = 0
        for _ in range(100):
            total = await executions()
            if total >= 10:
                break
        assert total == 10
