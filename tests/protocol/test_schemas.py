"""A real node's messages against docs/protocol.md and the JSON Schemas of docs/schemas/.

Every message checked here is captured from a real `sandbus node` process on a real nats-server
(tests/protocol/conftest.py), through a raw NATS client: replies, error replies, control replies, audit
events, dead letters, and envelopes as a plugin receives them (the ``echo`` plugin replies with what it
got). The last tests tie the page to the code: every error class has its row, every schema key its
documentation.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import datetime, timedelta
from typing import Any

import jsonschema
import pytest
from nats.aio.msg import Msg

from sandbus.sdk import errors
from tests.protocol.conftest import Bus
from tests.protocol.wire import (
    DOC,
    ENVELOPE_KEYS,
    ENVELOPE_TYPE,
    SCHEMAS,
    body_of,
    connected,
    headers_of,
    next_matching,
    request,
    schema,
    validate,
    validator,
)

ERROR_HEADERS = ("Sandbus-Error-Code", "Sandbus-Error")


def assert_error(msg: Msg, code: str, node_id: str) -> dict[str, Any]:
    """``msg`` is an error reply with ``code`` as the page describes it; its ``error`` object."""
    headers = headers_of(msg)
    assert headers.get("Sandbus-Error-Code") == code, (headers, msg.data[:500])
    assert headers.get("Sandbus-Error"), headers
    assert headers.get("Content-Type") == "application/json", headers
    assert headers.get("Sandbus-Node") == node_id, headers
    body = body_of(msg)
    validate("error-reply", body)
    assert body["error"]["code"] == code
    message = body["error"]["message"]
    for internal in ("pydantic", "errors.pydantic.dev", "Traceback", "ValidationError"):
        assert internal not in message, message
    error: dict[str, Any] = body["error"]
    return error


# -- requests and their replies ---------------------------------------------------------------------


async def test_success_reply_carries_the_documented_headers(protocol_bus: Bus) -> None:
    async with connected(protocol_bus.url) as nc:
        sent = {"hello": "protocol", "n": [1, 2, 3]}
        msg = await request(nc, "sandbus.req.echo.handle_request", sent, {"Sandbus-Msg-Id": "req-1.a:b_c-d"})
        headers = headers_of(msg)
        assert body_of(msg) == sent, "a success reply's body is the plugin's reply, byte for byte"
        assert headers.get("Content-Type") == "application/json", headers
        assert headers.get("Sandbus-Node") == protocol_bus.node_id, headers
        assert headers.get("Sandbus-Msg-Id") == "req-1.a:b_c-d", headers
        assert not set(ERROR_HEADERS) & set(headers), headers

        plain = headers_of(await request(nc, "sandbus.req.echo.handle_request", sent))
        assert "Sandbus-Msg-Id" not in plain, "no id sent: none echoed"
        invalid = headers_of(await request(nc, "sandbus.req.echo.handle_request", sent,
                                           {"Sandbus-Msg-Id": "has a space"}))
        assert "Sandbus-Msg-Id" not in invalid, "an invalid id is not echoed"


async def test_reply_gives_the_trace_id_back(protocol_bus: Bus) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with connected(protocol_bus.url) as nc:
        msg = await request(nc, "sandbus.req.echo.handle_request", {"x": 1},
                            {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "tracestate": "vendor=a"})
        parent = headers_of(msg).get("traceparent", "")
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", parent), headers_of(msg)
        assert parent.split("-")[1] == trace_id


@pytest.mark.parametrize(("subject", "body", "code"), [
    ("sandbus.req.echo.no_such_function", b'{"x": 1}', "request.unknown_function"),
    ("sandbus.req.echo.handle_request", b'{"x": ', "request.invalid_json"),
    ("sandbus.req.echo.handle_request", b"[" * 255 + b"]" * 255, "request.invalid_json"),
    ("sandbus.req.echo.bad$function", b"{}", "request.invalid"),
], ids=["unknown_function", "not_json", "too_deep", "bad_function_token"])
async def test_error_replies_match_the_schema(protocol_bus: Bus, subject: str, body: bytes, code: str) -> None:
    async with connected(protocol_bus.url) as nc:
        error = assert_error(await request(nc, subject, body, {"Sandbus-Msg-Id": "err-1"}), code,
                             protocol_bus.node_id)
        assert error["plugin"] == "echo"


async def test_json_254_levels_deep_is_accepted(protocol_bus: Bus) -> None:
    """The documented limit is exact: 254 levels pass, 255 are refused (above)."""
    async with connected(protocol_bus.url) as nc:
        msg = await request(nc, "sandbus.req.echo.handle_request", b"[" * 254 + b"]" * 254)
        assert "Sandbus-Error-Code" not in headers_of(msg), msg.data[:300]


# -- envelopes ------------------------------------------------------------------------------------------


async def test_plain_json_direct_message_is_wrapped(protocol_bus: Bus) -> None:
    """A body shaped like an envelope, sent without the envelope content type, is payload."""
    sent = {"id": "order-77", "payload": {"total": 12}}
    async with connected(protocol_bus.url) as nc:
        before = time.time()
        msg = await request(nc, "sandbus.msg.echo", sent,
                            {"Content-Type": "application/json", "Sandbus-Msg-Id": "m-1", "Sandbus-From": "tester"})
        envelope = body_of(msg)
        validate("envelope", envelope)
        assert set(envelope) == ENVELOPE_KEYS, "a plugin receives every key"
        assert envelope["payload"] == sent
        assert (envelope["id"], envelope["from"]) == ("m-1", "tester"), "the headers map into the envelope"
        assert (envelope["to"], envelope["topic"], envelope["headers"]) == ("echo", None, {})
        assert before - 1 <= envelope["timestamp"] <= time.time() + 1, "receipt time, unix seconds"
        assert headers_of(msg).get("Sandbus-Msg-Id") == "m-1"

        defaults = body_of(await request(nc, "sandbus.msg.echo", [1, 2],
                                         {"Sandbus-Msg-Id": "bad id", "Sandbus-From": "caf\u00e9"}))
        validate("envelope", defaults)
        assert defaults["payload"] == [1, 2]
        assert re.fullmatch(r"[0-9a-f]{32}", defaults["id"]), "invalid header: a new id"
        assert defaults["from"] == "client", "invalid header: the default sender"


async def test_explicit_envelope_is_kept_and_addressed_by_the_subject(protocol_bus: Bus) -> None:
    sent = {"id": "env-1", "from": "js client", "to": "someone-else", "topic": "not.this",
            "payload": {"k": [1, None]}, "timestamp": 12.5, "headers": {"trace": "x"}}
    async with connected(protocol_bus.url) as nc:
        # The media type is compared case-insensitively, parameters and whitespace aside.
        msg = await request(nc, "sandbus.msg.echo", sent,
                            {"Content-Type": " Application/VND.sandbus.message+json ; charset=utf-8"})
        envelope = body_of(msg)
        validate("envelope", envelope)
        assert envelope == {**sent, "to": "echo", "topic": None}

        minimal = body_of(await request(nc, "sandbus.msg.echo", {"payload": 3},
                                        {"Content-Type": ENVELOPE_TYPE, "Sandbus-From": "hdr-sender"}))
        validate("envelope", minimal)
        assert set(minimal) == ENVELOPE_KEYS
        assert (minimal["payload"], minimal["from"], minimal["headers"]) == (3, "hdr-sender", {})


async def test_message_nesting_limit_counts_the_envelope(protocol_bus: Bus) -> None:
    """254 levels in all, the envelope's own included: a wrapped payload may nest 253."""
    async with connected(protocol_bus.url) as nc:
        fits = await request(nc, "sandbus.msg.echo", b"[" * 253 + b"]" * 253)
        assert "Sandbus-Error-Code" not in headers_of(fits), fits.data[:300]
        assert set(body_of(fits)) == ENVELOPE_KEYS
        deeper = await request(nc, "sandbus.msg.echo", b"[" * 254 + b"]" * 254)
        assert_error(deeper, "request.invalid_json", protocol_bus.node_id)


INVALID_ENVELOPES: list[tuple[Any, str | None]] = [
    ({"id": 7, "payload": {}}, "id"),
    ({"id": "has space"}, "id"),
    ({"id": "x" * 129}, "id"),
    ({"id": ""}, "id"),
    ({"from": ""}, "from"),
    ({"from": "caf\u00e9"}, "from"),
    ({"from": "f" * 256}, "from"),
    ({"to": 5}, "to"),
    ({"topic": ["a"]}, "topic"),
    ({"timestamp": -1}, "timestamp"),
    ({"timestamp": "now"}, "timestamp"),
    ({"headers": {"k": 1}}, "headers"),
    ({"headers": {"": "v"}}, "headers"),
    ({"headers": {"k" * 257: "v"}}, "headers"),
    ({"headers": {"k": "v" * 4097}}, "headers"),
    ({"headers": {f"k{i}": "v" for i in range(65)}}, "headers"),
    ({"headers": ["k", "v"]}, "headers"),
    ({"payload": 1, "extra": True}, "extra"),
    ([1, 2], None),
]


@pytest.mark.parametrize(("envelope", "field"), INVALID_ENVELOPES, ids=[f"{i}-{f}" for i, (_, f) in
                                                                         enumerate(INVALID_ENVELOPES)])
async def test_invalid_envelope_is_refused_by_schema_and_node(protocol_bus: Bus, envelope: Any,
                                                               field: str | None) -> None:
    """The schema and the node agree: what the schema refuses, the node answers request.invalid_envelope,
    naming the field."""
    assert not validator("envelope").is_valid(envelope), "the schema must refuse it too"
    async with connected(protocol_bus.url) as nc:
        msg = await request(nc, "sandbus.msg.echo", envelope, {"Content-Type": ENVELOPE_TYPE})
        error = assert_error(msg, "request.invalid_envelope", protocol_bus.node_id)
        if field is not None:
            assert field in error["message"], error["message"]


# -- control --------------------------------------------------------------------------------------------


async def control(nc: Any, node_id: str, verb: str, body: bytes | Any = b"") -> Msg:
    return await request(nc, f"sandbus.node.{node_id}.{verb}", body)


def assert_control_headers(msg: Msg, node_id: str) -> None:
    headers = headers_of(msg)
    assert headers.get("Content-Type") == "application/json", headers
    assert headers.get("Sandbus-Node") == node_id, headers
    assert "Sandbus-Error-Code" not in headers, msg.data[:500]


async def test_control_list_and_stats_match_their_schemas(protocol_bus: Bus) -> None:
    node_id = protocol_bus.node_id
    async with connected(protocol_bus.url) as nc:
        await request(nc, "sandbus.req.echo.handle_request", {"warm": True})  # a call to count
        listed_msg = await control(nc, node_id, "list")
        stats_msg = await control(nc, node_id, "stats")
    for msg in (listed_msg, stats_msg):
        assert_control_headers(msg, node_id)
    listed, stats = body_of(listed_msg), body_of(stats_msg)
    validate("control-list", listed)
    validate("control-stats", stats)
    assert (listed["node_id"], stats["node_id"]) == (node_id, node_id)
    assert listed["durable_topics"] is True, "the test server runs JetStream"
    echo = next(p for p in listed["plugins"] if p["name"] == "echo")
    assert echo["status"] == "loaded"
    assert "handle_request" in echo["functions"]
    assert "executions" not in echo, "list is identity and state; counters are in stats"
    echo_stats = next(p for p in stats["plugins"] if p["name"] == "echo")
    assert set(echo) <= set(echo_stats), "stats has everything list has"
    assert echo_stats["executions"] >= 1
    loaded_at = datetime.fromisoformat(echo["last_loaded"])  # ISO 8601, UTC (the schemas' date-time)
    assert loaded_at.utcoffset() == timedelta(0), echo["last_loaded"]
    logger = next(p for p in listed["plugins"] if p["name"] == "order_logger")
    assert logger["topics"] == ["orders.*"]


async def test_control_load_reload_unload_match_their_schemas(protocol_bus: Bus) -> None:
    node_id = protocol_bus.node_id
    async with connected(protocol_bus.url) as nc:
        reloaded = await control(nc, node_id, "reload", {"plugin": "text_processor"})
        assert_control_headers(reloaded, node_id)
        validate("control-plugin", body_of(reloaded))
        assert body_of(reloaded)["name"] == "text_processor"

        unloaded = await control(nc, node_id, "unload", {"plugin": "text_processor", "force": False})
        assert_control_headers(unloaded, node_id)
        validate("control-unload", body_of(unloaded))
        assert body_of(unloaded) == {"unloaded": "text_processor"}

        loaded = await control(nc, node_id, "load", {"plugin": "text_processor"})
        assert_control_headers(loaded, node_id)
        validate("control-plugin", body_of(loaded))
        assert body_of(loaded)["status"] == "loaded"
        assert datetime.fromisoformat(body_of(loaded)["last_loaded"]).utcoffset() == timedelta(0)
        # Answered once it serves: a request sent now reaches it.
        reply = await request(nc, "sandbus.req.text_processor.handle_request", {"action": "get_status"})
        assert "Sandbus-Error-Code" not in headers_of(reply), reply.data[:300]

        missing = await control(nc, node_id, "load", {"plugin": "no_such_plugin"})
        assert headers_of(missing).get("Sandbus-Error-Code"), "a load that fails is an error reply"
        validate("error-reply", body_of(missing))


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"plugin": 5}', b'{"plugin": "echo", "x": 1}',
                                  b'{"plugin": "' + b"a" * 4100 + b'"}'],
                         ids=["not_json", "not_object", "mistyped", "unknown_key", "above_4k"])
async def test_malformed_control_body_is_refused_and_audited(protocol_bus: Bus, body: bytes) -> None:
    node_id = protocol_bus.node_id
    async with connected(protocol_bus.url) as nc:
        events: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_event(msg: Msg) -> None:
            await events.put(msg)

        sub = await nc.subscribe(f"sandbus.audit.{node_id}", cb=on_event)
        await nc.flush()
        msg = await control(nc, node_id, "reload", body)
        assert_error(msg, "request.invalid_control", node_id)
        event_msg = await next_matching(events, lambda m: body_of(m).get("kind") == "control.refused")
        await sub.unsubscribe()
        assert headers_of(event_msg).get("Content-Type") == "application/json"
        event = body_of(event_msg)
        validate("audit-event", event)
        assert event["level"] == "warning"

        # The SANDBUS_AUDIT stream keeps the node's events, in the same shape.
        stored = await nc.jetstream().get_last_msg("SANDBUS_AUDIT", f"sandbus.audit.{node_id}")
        validate("audit-event", json.loads(stored.data or b"null"))


async def test_client_mistake_is_audited_as_request_refused(protocol_bus: Bus) -> None:
    node_id = protocol_bus.node_id
    async with connected(protocol_bus.url) as nc:
        events: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_event(msg: Msg) -> None:
            await events.put(msg)

        sub = await nc.subscribe(f"sandbus.audit.{node_id}", cb=on_event)
        await nc.flush()
        # A function name of its own, so an earlier test's folded repeat cannot be what arrives.
        await request(nc, "sandbus.req.echo.audited_unknown_fn", {})
        event = body_of(await next_matching(events, lambda m: body_of(m).get("kind") == "request.refused"))
        await sub.unsubscribe()
    validate("audit-event", event)
    assert (event["plugin"], event["level"]) == ("echo", "warning")
    assert event["count"] >= 1


# -- dead letters ---------------------------------------------------------------------------------------


async def test_dead_letter_carries_the_documented_headers(protocol_bus: Bus) -> None:
    """A durable topic message that can never succeed is dead-lettered at its first delivery, with every
    header of the page's table and the original body."""
    body = json.dumps({"id": 7, "payload": {"order": 1}}).encode()
    async with connected(protocol_bus.url) as nc:
        letters: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_letter(msg: Msg) -> None:
            await letters.put(msg)

        sub = await nc.subscribe("sandbus.dlq.order_logger", cb=on_letter)
        await nc.flush()
        ack = await nc.jetstream().publish("sandbus.topic.orders.created", body,
                                           headers={"Content-Type": ENVELOPE_TYPE, "Nats-Msg-Id": "dlq-test-1",
                                                    "Sandbus-Msg-Id": "dlq-test-1"})
        assert ack.stream == "SANDBUS_TOPICS"
        letter = await next_matching(letters, lambda m: True, timeout=10.0)
        await sub.unsubscribe()
    headers = headers_of(letter)
    assert headers.get("Sandbus-Error-Code") == "request.invalid_envelope", headers
    assert "id" in headers.get("Sandbus-Error", ""), headers
    assert headers.get("Sandbus-Deliveries") == "1", "not retried: dead-lettered at the first delivery"
    assert headers.get("Sandbus-Original-Subject") == "sandbus.topic.orders.created"
    assert headers.get("Sandbus-Original-Size") == str(len(body))
    assert headers.get("Sandbus-Original-Sequence") == str(ack.seq)
    assert headers.get("Sandbus-Msg-Id") == "dlq-test-1"
    assert headers.get("Content-Type") == ENVELOPE_TYPE, "the original's media type: the body is the original's"
    assert letter.data == body, "the original body, as it was published"


# -- the page against the code --------------------------------------------------------------------------


def _section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def _error_rows() -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in _section("Error codes").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    return rows


def _error_classes() -> list[type[errors.SandbusError]]:
    out: list[type[errors.SandbusError]] = []
    todo: list[type[errors.SandbusError]] = [errors.SandbusError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in out if c.__module__ == errors.__name__]


def test_every_error_code_has_its_row_in_the_page() -> None:
    """Fails when a code is added to sandbus.sdk.errors without documenting it (or documented wrongly)."""
    rows = _error_rows()
    classes = _error_classes()
    assert len(classes) >= 20
    for cls in classes:
        assert cls.code in rows, f"{cls.code} ({cls.__name__}) is missing from the error table of docs/protocol.md"
        _, name, when, retried, fault = rows[cls.code]
        assert name == f"`{cls.__name__}`", (cls.code, name)
        assert when, rows[cls.code]
        assert fault in ("client", "plugin", "host", "bus", "client (input) / plugin"), rows[cls.code]
        expected = "yes" if getattr(cls, "retryable", True) else "no"
        # "yes (no for ...)": the class's rule first, then what some of its errors say for themselves
        assert retried.split(" ")[0] == expected, f"{cls.code}: the page says {retried}, the class says {expected}"
    documented = set(rows) - {c.code for c in classes}
    assert not documented, f"codes in the page that no class has: {sorted(documented)}"


def _schema_keys(node: Any) -> set[str]:
    keys: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                keys |= set(value)
            keys |= _schema_keys(value)
    elif isinstance(node, list):
        for item in node:
            keys |= _schema_keys(item)
    return keys


#: where in docs/protocol.md each schema's keys are explained, in the first column of a table
SCHEMA_SECTIONS = {"envelope": "PluginMessage envelope", "error-reply": "Request / reply",
                   "control-list": "Node control", "control-stats": "Node control", "control-plugin": "Node control",
                   "control-unload": "Node control", "audit-event": "Audit events",
                   "control-debug": "Node control", "log-line": "Plugin logs"}


def _first_cells(section: str) -> str:
    """The first cells of every table row in a section of the page, joined."""
    return " ".join(line.strip().strip("|").split("|")[0] for line in _section(section).splitlines()
                    if line.lstrip().startswith("|"))


def test_every_schema_key_is_documented_in_the_page() -> None:
    text = DOC.read_text()
    for path in sorted(SCHEMAS.glob("*.schema.json")):
        name = path.name.removesuffix(".schema.json")
        cells = _first_cells(SCHEMA_SECTIONS[name])
        for key in sorted(_schema_keys(json.loads(path.read_text()))):
            documented = f"`{key}`" in cells or f"`error.{key}`" in cells
            assert documented, f"{path.name}: key {key!r} has no row in the {SCHEMA_SECTIONS[name]!r} tables"
        assert f"schemas/{path.name}" in text, f"{path.name} is not linked from docs/protocol.md"


def test_schemas_are_valid_draft_2020_12() -> None:
    names = sorted(p.name.removesuffix(".schema.json") for p in SCHEMAS.glob("*.schema.json"))
    assert names == ["audit-event", "control-debug", "control-list", "control-plugin", "control-stats",
                     "control-unload", "envelope", "error-reply", "log-line"]
    for name in names:
        jsonschema.Draft202012Validator.check_schema(schema(name))
        assert schema(name)["$schema"] == "https://json-schema.org/draft/2020-12/schema"
