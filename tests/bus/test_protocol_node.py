"""The wire protocol as a node speaks it: envelopes recognised by content type, client errors as
``request.*`` (out of the plugin's stats), permanent errors dead-lettered at once, reply headers,
``list`` vs ``stats``, one node per node id. Real nats-server, real node processes, real plugins.

Most tests share one server and one node (``shared``): starting a node is most of a test's time.
They read counters as differences, so their order does not matter."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.aio.msg import Msg

from sandbus.bus.connection import ConnectOptions
from sandbus.bus.handler import Reply, Served
from sandbus.bus.plugin_bus import PluginBus
from sandbus.bus.server import NatsServer
from sandbus.sdk.audit import AuditLevel
from sandbus.sdk.client import Client
from sandbus.sdk.envelope import ENVELOPE_CONTENT_TYPE
from sandbus.sdk.errors import NodeIdInUseError, RequestError, UnknownFunctionError
from tests.bus.conftest import POLICY, RECORDER_TOML, NodeProcess, served, until
from tests.telemetry.otlp_receiver import Receiver

StartNode = Callable[..., NodeProcess]
ENVELOPE = {"Content-Type": ENVELOPE_CONTENT_TYPE}
#: text that must never reach a client: a library's internals
LIBRARY_TEXT = ("pydantic", "errors.pydantic.dev", "Traceback", "ValidationError", "<class ", "object at 0x")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, plugins_dir: Path,
           c_guest_flags: Callable[..., Path]) -> Iterator[str]:
    """One nats-server and one node "n1" serving echo and the recorders rec_a, rec_b (durable, orders.*);
    yields the server's URL."""
    root = tmp_path_factory.mktemp("protocol")
    plugins = root / "plugins"
    plugins.mkdir()
    for ext in ("wasm", "toml"):
        shutil.copy(plugins_dir / f"echo.{ext}", plugins / f"echo.{ext}")
    for name in ("rec_a", "rec_b"):
        shutil.copy(c_guest_flags("recorder", name, f'-DPLUGIN_NAME="{name}"'), plugins / f"{name}.wasm")
        (plugins / f"{name}.toml").write_text(RECORDER_TOML.format(name=name, durable="true"))
    (root / "policy.toml").write_text(POLICY)
    with served("n1", plugins, root / "n1.log") as (url, _):
        yield url


async def collect(client: Client, subject: str) -> list[Msg]:
    got: list[Msg] = []

    async def on(msg: Msg) -> None:
        got.append(msg)

    await client.nc.subscribe(subject, cb=on)
    await client.nc.flush()
    return got


async def plugin_stats(client: Client, node: str, plugin: str) -> dict[str, Any]:
    view = await client.control(node, "stats")
    return next(p for p in view["plugins"] if p["name"] == plugin)


def clean(text: str) -> None:
    for bad in LIBRARY_TEXT:
        assert bad not in text, text


async def test_plain_json_is_wrapped_whatever_its_keys_and_an_explicit_envelope_is_taken(shared: str) -> None:
    async with await Client.connect(shared) as c:
        seen = await collect(c, "sandbus.topic.seen.rec_a")  # rec_a publishes every envelope it gets
        # Looks like an envelope, but nothing says it is one: it is the payload of a new envelope.
        reply = await c.nc.request("sandbus.msg.rec_a", b'{"id":"order-77","payload":{}}', timeout=5,
                                   headers={"Sandbus-Msg-Id": "m-1", "Sandbus-From": "shop"})
        assert orjson.loads(reply.data) == {"ok": True}
        # Said to be an envelope (media type compared case-insensitively, parameters ignored).
        explicit = {"id": "e-1", "from": "billing", "to": "someone-else", "payload": {"a": 1}, "timestamp": 12.5,
                    "headers": {"k": "v"}}
        await c.nc.request("sandbus.msg.rec_a", orjson.dumps(explicit), timeout=5,
                           headers={"Content-Type": " Application/Vnd.Sandbus.Message+JSON ; charset=utf-8"})
        # A header value that is not a valid id or sender is ignored, not an error.
        await c.nc.request("sandbus.msg.rec_a", b"[1]", timeout=5, headers={"Sandbus-Msg-Id": "bad id!"})
        await until(lambda: len(seen) == 3, 5, "three envelopes")
        got = [orjson.loads(m.data)["payload"] for m in seen]
        by_payload = {orjson.dumps(g["payload"]): g for g in got}
        wrapped = by_payload[b'{"id":"order-77","payload":{}}']
        assert list(wrapped) == ["id", "from", "to", "topic", "payload", "timestamp", "headers"]
        assert (wrapped["id"], wrapped["from"], wrapped["to"], wrapped["topic"], wrapped["headers"]) == (
            "m-1", "shop", "rec_a", None, {})
        taken = by_payload[b'{"a":1}']
        # The subject is the truth for "to"; everything else is the sender's.
        assert taken == {**explicit, "to": "rec_a", "topic": None}
        defaulted = by_payload[b"[1]"]
        assert len(defaulted["id"]) == 32
        assert defaulted["id"] != "bad id!"
        assert defaulted["from"] == "client"


async def test_refused_envelopes_are_the_callers_mistake_not_the_plugins(shared: str) -> None:
    async with await Client.connect(shared) as c:
        audit = await collect(c, "sandbus.audit.n1")
        before = await plugin_stats(c, "n1", "rec_b")
        cases = [(b'{"id":7,"payload":{}}', "request.invalid_envelope", "'id'"),
                 (b'{"payload":1,"nope":2}', "request.invalid_envelope", '"nope"'),
                 (b'{"timestamp":"x"}', "request.invalid_envelope", "'timestamp'"),
                 (b"{broken", "request.invalid_json", "not valid JSON")]
        for body, code, named in cases:
            msg = await c.nc.request("sandbus.msg.rec_b", body, timeout=5, headers=ENVELOPE)
            assert msg.headers is not None
            assert msg.headers["Sandbus-Error-Code"] == code
            assert msg.headers["Sandbus-Node"] == "n1"
            error = orjson.loads(msg.data)["error"]
            assert error["code"] == code
            assert named in error["message"]
            clean(msg.data.decode())
            clean(msg.headers["Sandbus-Error"])
        after = await plugin_stats(c, "n1", "rec_b")
        assert after["rejected"] == before["rejected"] + 4
        assert (after["errors"], after["executions"], after["last_error"]) == (
            before["errors"], before["executions"], None)
        await until(lambda: any(orjson.loads(m.data)["kind"] == "request.refused"
                                and orjson.loads(m.data)["plugin"] == "rec_b" for m in audit), 5,
                    "a request.refused audit event")


async def test_a_permanent_durable_error_is_dead_lettered_at_its_first_delivery(shared: str) -> None:
    async with await Client.connect(shared) as c:
        before = await plugin_stats(c, "n1", "rec_a")
        dlq = await collect(c, "sandbus.dlq.rec_a")
        js = c.nc.jetstream()
        await js.publish("sandbus.topic.orders.created", b'{"id":7,"payload":{}}', headers=ENVELOPE)
        await until(lambda: len(dlq) == 1, 10, "the dead letter")
        headers = dlq[0].headers or {}
        assert headers["Sandbus-Deliveries"] == "1"
        assert headers["Sandbus-Error-Code"] == "request.invalid_envelope"
        assert "'id'" in headers["Sandbus-Error"]
        clean(headers["Sandbus-Error"])
        assert dlq[0].data == b'{"id":7,"payload":{}}'
        # Terminated: nothing pending, nothing redelivered.
        info = await js.consumer_info("SANDBUS_TOPICS", "plugin-rec_a")
        for _ in range(200):
            if not info.num_ack_pending:
                break
            await asyncio.sleep(0.02)  # the term follows the dead letter's publish
            info = await js.consumer_info("SANDBUS_TOPICS", "plugin-rec_a")
        assert (info.num_ack_pending, info.num_redelivered) == (0, 0)
        after = await plugin_stats(c, "n1", "rec_a")
        assert after["rejected"] == before["rejected"] + 1
        assert (after["errors"], after["last_error"]) == (before["errors"], None)
        # A transient failure is still retried: the recorder traps on {"fail": true} (tested in test_bus.py),
        # and a valid envelope goes through.
        seen = await collect(c, "sandbus.topic.seen.rec_a")
        await c.publish("orders.created", {"fine": 1})
        await until(lambda: any(orjson.loads(m.data)["payload"]["payload"] == {"fine": 1} for m in seen), 10,
                    "the valid message")


async def test_an_unknown_function_is_refused_without_touching_the_plugins_errors(shared: str) -> None:
    async with await Client.connect(shared) as c:
        audit = await collect(c, "sandbus.audit.n1")
        before = await plugin_stats(c, "n1", "echo")
        with pytest.raises(UnknownFunctionError, match='no function "nope"') as caught:
            await c.request("echo", "nope", {})
        assert isinstance(caught.value, RequestError)
        assert not caught.value.retryable
        after = await plugin_stats(c, "n1", "echo")
        assert after["rejected"] == before["rejected"] + 1
        assert (after["errors"], after["last_error"], after["executions"]) == (
            before["errors"], before["last_error"], before["executions"])
        await until(lambda: any(orjson.loads(m.data)["kind"] == "request.refused"
                                and orjson.loads(m.data)["plugin"] == "echo" for m in audit), 5, "request.refused")


async def test_replies_carry_their_headers(shared: str) -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with await Client.connect(shared) as c:
        # Success, inline fast path: the request's id and trace context come back.
        ok = await c.nc.request("sandbus.req.echo.handle_request", b'{"x":1}', timeout=5,
                                headers={"Sandbus-Msg-Id": "req-1", "traceparent": parent, "tracestate": "k=v"})
        assert ok.headers == {"Content-Type": "application/json", "Sandbus-Node": "n1", "Sandbus-Msg-Id": "req-1",
                              "traceparent": parent, "tracestate": "k=v"}
        # Nothing to echo: only the node's own headers; an invalid id or traceparent is not echoed.
        bare = await c.nc.request("sandbus.req.echo.handle_request", b"{}", timeout=5,
                                  headers={"Sandbus-Msg-Id": "no spaces allowed", "traceparent": "00-zz"})
        assert bare.headers == {"Content-Type": "application/json", "Sandbus-Node": "n1"}
        # Error: the same, plus the error headers.
        err = await c.nc.request("sandbus.req.echo.nope", b"{}", timeout=5, headers={"Sandbus-Msg-Id": "req-2",
                                                                                 "traceparent": parent})
        assert err.headers is not None
        assert {k: err.headers[k] for k in ("Content-Type", "Sandbus-Node", "Sandbus-Msg-Id", "traceparent",
                                            "Sandbus-Error-Code")} == {
            "Content-Type": "application/json", "Sandbus-Node": "n1", "Sandbus-Msg-Id": "req-2",
            "traceparent": parent, "Sandbus-Error-Code": "request.unknown_function"}
        assert set(orjson.loads(err.data)["error"]) == {"code", "message", "plugin", "details"}
        # A direct message's reply (threaded path).
        direct = await c.nc.request("sandbus.msg.rec_a", b"{}", timeout=5, headers={"traceparent": parent})
        assert direct.headers is not None
        assert (direct.headers["Sandbus-Node"], direct.headers["traceparent"]) == ("n1", parent)
        # Control replies, success and error.
        listed = await c.nc.request("sandbus.node.n1.list", b"", timeout=5)
        assert listed.headers == {"Content-Type": "application/json", "Sandbus-Node": "n1"}
        refused = await c.nc.request("sandbus.node.n1.load", b'{"plugin": 3}', timeout=5)
        assert refused.headers is not None
        assert (refused.headers["Sandbus-Node"], refused.headers["Sandbus-Error-Code"]) == (
            "n1", "request.invalid_control")
        # The Python client exposes them.
        detailed = await c.request_detailed("echo", "handle_request", {"y": 2}, headers={"traceparent": parent})
        assert (detailed.json(), detailed.node, detailed.trace_id) == ({"y": 2}, "n1", parent[3:35])


async def test_a_tracing_node_answers_with_its_own_process_span_in_the_callers_trace(
        nats_server: NatsServer, start_node: StartNode) -> None:
    """The reply's traceparent is the span the node exported as ``process <subject>``: the inline fast path
    (a request), a call refused there (an unknown function) and the SDK path (a direct message)."""
    receiver = Receiver()
    try:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_TRACES_SAMPLER": "always_on",
               "OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_METRICS_EXPORTER": "none"}
        start_node("n1", nats_server.url, env=env)
        parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        async with await Client.connect(nats_server.url) as c:
            returned = {}
            for subject in ("sandbus.req.echo.handle_request", "sandbus.req.echo.nope", "sandbus.msg.rec_a"):
                reply = await c.nc.request(subject, b"{}", timeout=5, headers={"traceparent": parent})
                assert reply.headers is not None
                traceparent = reply.headers["traceparent"]
                assert traceparent[:36] == parent[:36], subject  # the caller's trace
                returned[subject] = traceparent[36:52]
            # No trace context sent: the node's own root trace comes back.
            detailed = await c.request_detailed("echo", "handle_request", {})
        assert detailed.trace_id is not None
        trace_id = parent[3:35]
        for subject, span_id in returned.items():
            def exported(span_id: str = span_id) -> list[dict[str, Any]]:
                return receiver.find(lambda x: x["span_id"] == span_id)

            receiver.wait_for(lambda: bool(exported()), 10, f"the span of {subject}")
            (span,) = exported()
            assert (span["trace_id"], span["name"], span["parent"]) == (trace_id, f"process {subject}", parent[36:52])
        receiver.wait_for(lambda: bool(receiver.trace(detailed.trace_id or "")), 10, "the root trace's spans")
    finally:
        receiver.close()


async def test_list_is_identity_and_stats_adds_the_counters(shared: str) -> None:
    async with await Client.connect(shared) as c:
        listed = await c.control("n1", "list")
        stats = await c.control("n1", "stats")
        plugin_keys = {"name", "version", "status", "description", "sha256", "functions", "topics", "durable",
                       "isolation", "kind", "content_type", "last_loaded", "reloads", "last_error", "last_error_code",
                       "last_error_at"}
        counters = {"executions", "errors", "host_errors", "rejected", "p50_ms", "p99_ms", "fuel_used",
                    "last_fuel_used", "memory_bytes", "instances", "in_flight", "queue_depth", "max_open_files"}
        assert set(listed) == {"node_id", "version", "durable_topics", "plugins"}
        assert set(stats) == set(listed) | {"inline_budget_ms", "request_spans", "spans_dropped"}
        assert all(set(p) == plugin_keys for p in listed["plugins"])
        assert all(set(p) == plugin_keys | counters for p in stats["plugins"])
        rec_a = next(p for p in listed["plugins"] if p["name"] == "rec_a")
        assert (rec_a["topics"], rec_a["durable"], rec_a["status"]) == (["orders.*"], True, "loaded")
        (view,) = await c.nodes()
        assert view["node_id"] == "n1"
        assert all(set(p) == plugin_keys | counters for p in view["plugins"])  # Client.nodes() reads stats


class _Idle:
    """A handler serving nothing: enough for a bus to start, or to be refused."""

    def serving(self) -> list[Served]:
        return []

    def request_now(self, plugin: str, function: str, msg: Msg, reply_headers: dict[str, str]) -> bytes | None:
        return None

    async def serve(self, plugin: str, function: str, payload: bytes, msg: Msg, *, arrival: float | None,
                    delivery: int | None = None, reply_headers: dict[str, str] | None = None) -> Reply:
        raise AssertionError("nothing is served")

    def refused(self, plugin: str, err: RequestError, subject: str) -> None:
        pass

    def runs_inline(self, plugin: str) -> bool:
        return False

    def control(self, verb: str, plugin: str, force: bool) -> Any:
        return {}

    def describe(self, stats: bool) -> dict[str, Any]:
        return {"plugins": []}

    def audit(self, level: AuditLevel, kind: str, plugin: str, message: str, **details: Any) -> None:
        pass


async def test_a_second_node_with_the_same_id_is_refused(shared: str) -> None:
    twin = PluginBus(_Idle(), ConnectOptions.from_urls(shared), node_id="n1", durable=False)
    with pytest.raises(NodeIdInUseError, match="n1"):
        await twin.start()
    assert twin.nc is None  # disconnected, nothing subscribed
    await twin.stop(timeout=1)
    other = PluginBus(_Idle(), ConnectOptions.from_urls(shared), node_id="n2", durable=False)
    await other.start()
    try:
        async with await Client.connect(shared) as c:
            assert {v["node_id"] for v in await c.nodes()} == {"n1", "n2"}
            assert (await c.control("n1", "list"))["plugins"]  # the first node still answers, not the twin
    finally:
        await other.stop(timeout=2)


async def test_nodes_is_empty_when_no_node_answers(nats_server: NatsServer) -> None:
    async with await Client.connect(nats_server.url) as c:
        assert await c.nodes(timeout=0.2) == []
