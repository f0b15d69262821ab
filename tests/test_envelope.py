"""The PluginMessage envelope: recognised by content type only, each rule of an explicit envelope refused
with a message naming the field (never a library's text), plain JSON wrapped; the fast encoder writes what
the model writes; the client side never imports pydantic."""

from __future__ import annotations

import base64
import subprocess
import sys
from typing import Any

import orjson
import pytest

from sandbus.sdk.envelope import ENVELOPE, envelope_for, is_envelope
from sandbus.sdk.errors import InvalidEnvelopeError, InvalidJsonError
from sandbus.sdk.message import PluginMessage

#: text that must never reach a client: a library's internals
LIBRARY_TEXT = ("pydantic", "errors.pydantic.dev", "Traceback", "ValidationError", "<class ", "object at 0x")


@pytest.mark.parametrize("payload", [None, 0, "é", [1, 2.5, True], {"nested": {"a": [None]}}])
@pytest.mark.parametrize(("to", "topic"), [(None, "orders.created"), ("billing", None)])
def test_encode_writes_the_models_json(payload: Any, to: str | None, topic: str | None) -> None:
    message_id, data = PluginMessage.encode(payload, from_="shop", to=to, topic=topic, id="m-1")
    assert message_id == "m-1"
    decoded = PluginMessage.from_json(data)
    model = PluginMessage(id="m-1", from_="shop", to=to, topic=topic, payload=payload, timestamp=decoded.timestamp)
    assert data == model.to_json()
    assert list(orjson.loads(data)) == ["id", "from", "to", "topic", "payload", "timestamp", "headers"]


def test_encode_gives_each_message_its_own_id() -> None:
    ids = {PluginMessage.encode(1, topic="t")[0] for _ in range(100)}
    assert len(ids) == 100


def test_encode_refuses_what_json_cannot_carry() -> None:
    with pytest.raises(TypeError):
        PluginMessage.encode({1, 2}, topic="t")


def test_error_reply_headers_cannot_be_forged_by_the_message() -> None:
    """An error message quotes untrusted text; in a header it must not end the line or the header block."""
    from sandbus.sdk.envelope import H_ERROR, error_from_reply, error_reply
    from sandbus.sdk.errors import TrapError

    err = TrapError("bad\r\nSandbus-Error-Code: ok\r\n\r\n{}\x1b[2J é" + "x" * 5000, plugin="p")
    body, headers = error_reply(err)
    for name, value in headers.items():
        assert all(0x20 <= ord(c) <= 0x7E for c in name + value), (name, value)
        assert len(value) <= 1024
    assert headers[H_ERROR].startswith("plugin 'p': bad\\r\\nSandbus-Error-Code")
    # The body keeps the exact message: JSON escapes it.
    back = error_from_reply(body, headers)
    assert back is not None
    assert "\r\n" in back.message


@pytest.mark.parametrize(("body", "field"), [
    ({"id": 7, "payload": {}}, "'id'"),
    ({"id": "", "payload": {}}, "'id'"),
    ({"id": "a b"}, "'id'"),
    ({"id": "x" * 129}, "'id'"),
    ({"from": 3}, "'from'"),
    ({"from": ""}, "'from'"),
    ({"from": "caf\u00e9"}, "'from'"),
    ({"from": "x" * 256}, "'from'"),
    ({"to": 1}, "'to'"),
    ({"topic": ["t"]}, "'topic'"),
    ({"timestamp": "now"}, "'timestamp'"),
    ({"timestamp": -1}, "'timestamp'"),
    ({"timestamp": True}, "'timestamp'"),
    ({"headers": []}, "'headers'"),
    ({"headers": {"k": 1}}, "'headers'"),
    ({"headers": {"": "v"}}, "'headers'"),
    ({"headers": {"k" * 257: "v"}}, "'headers'"),
    ({"headers": {str(i): "v" for i in range(65)}}, "'headers'"),
    ({"headers": {"k": "v" * 4097}}, "'headers'"),
    ({"payload": 1, "extra": True}, '"extra"'),
    ({"<script>" * 20: 1}, '"<script>'),
    ([1, 2], "object"),
    ("envelope", "object"),
])
def test_each_envelope_rule_is_refused_naming_the_field(body: Any, field: str) -> None:
    with pytest.raises(InvalidEnvelopeError) as caught:
        envelope_for(orjson.dumps(body), ENVELOPE, to="p", topic=None)
    message = caught.value.message
    assert field in message
    assert len(message) < 300  # what the sender wrote is quoted bounded
    for bad in LIBRARY_TEXT:
        assert bad not in message


def test_an_explicit_envelope_keeps_its_fields_but_the_subject_sets_to_and_topic() -> None:
    sent = {"id": "a.B_9:-", "from": "shop ~!", "to": "x", "topic": "y", "payload": {"n": [1]}, "timestamp": 0,
            "headers": {"k": "v" * 4096}}
    got = orjson.loads(envelope_for(orjson.dumps(sent), ENVELOPE, to=None, topic="orders.created"))
    assert got == {**sent, "to": None, "topic": "orders.created"}
    assert list(got) == ["id", "from", "to", "topic", "payload", "timestamp", "headers"]
    # Missing fields: from the headers when valid, else the defaults.
    minimal = orjson.loads(envelope_for(b"{}", {**ENVELOPE, "Sandbus-Msg-Id": "h-1", "Sandbus-From": "shop"},
                                        to="p", topic=None, now=5.0))
    assert minimal == {"id": "h-1", "from": "shop", "to": "p", "topic": None, "payload": None, "timestamp": 5.0,
                       "headers": {}}
    fallback = orjson.loads(envelope_for(b"{}", {**ENVELOPE, "Sandbus-Msg-Id": "no good", "Sandbus-From": ""},
                                         to="p", topic=None))
    assert len(fallback["id"]) == 32
    assert fallback["from"] == "client"


@pytest.mark.parametrize("content_type", [None, "application/json", "text/plain\r\nX: y", "application/problem+json",
                                          "Application/JSON; charset=utf-8"])
def test_anything_not_said_to_be_an_envelope_is_wrapped_whatever_its_keys(content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    body = {"id": "order-77", "payload": {}, "from": 3}  # not a valid envelope: but it is not one at all
    got = orjson.loads(envelope_for(orjson.dumps(body), headers, to="echo", topic=None, now=1.5))
    assert got["payload"] == body
    assert (got["to"], got["topic"], got["from"], got["timestamp"], got["headers"]) == ("echo", None, "client", 1.5,
                                                                                         {})
    assert got["id"] != "order-77"
    assert orjson.loads(envelope_for(b"", headers, to="echo", topic=None))["payload"] is None


@pytest.mark.parametrize("content_type", ["application/octet-stream", "text/plain; charset=utf-8", "image/png",
                                          "application/vnd.sandbus.message",
                                          "application/vnd.sandbus.message+json-ish"])
def test_a_body_of_another_media_type_is_raw_bytes_wrapped_as_base64(content_type: str) -> None:
    body = bytes(range(256)) + b"\x00{not json"
    got = orjson.loads(envelope_for(body, {"Content-Type": content_type}, to="echo", topic=None, now=1.5))
    assert base64.b64decode(got["payload"]) == body
    assert got["headers"] == {"Content-Type": content_type, "Content-Transfer-Encoding": "base64"}
    assert (got["to"], got["from"], got["timestamp"]) == ("echo", "client", 1.5)


def test_the_envelope_media_type_is_compared_as_http_says() -> None:
    for value in ("application/vnd.sandbus.message+json", " APPLICATION/VND.SANDBUS.MESSAGE+JSON ",
                  "application/vnd.sandbus.message+json; charset=utf-8"):
        assert is_envelope({"Content-Type": value})
    for value in ("", "application/json", "application/vnd.sandbus.message+json" + " " * 300, "x;application/vnd"):
        assert not is_envelope({"Content-Type": value})
    assert not is_envelope(None)


@pytest.mark.parametrize("headers", [{}, ENVELOPE])
def test_bodies_that_are_not_json_or_too_deep_are_invalid_json(headers: dict[str, str]) -> None:
    for body in (b"{broken", b"\xff\xfe", b"[" * 255 + b"]" * 255):
        with pytest.raises(InvalidJsonError) as caught:
            envelope_for(body, headers, to="p", topic=None)
        assert caught.value.code == "request.invalid_json"
    deepest = b"[" * 253 + b"]" * 253  # inside an envelope's payload: 254 levels in all
    envelope_for(deepest, {}, to="p", topic=None)


def test_the_client_modules_do_not_import_pydantic() -> None:
    """Client start-up time: ``sandbus.sdk.client`` and ``sandbus.sdk.envelope`` leave pydantic unloaded, and
    ``PluginMessage`` is still importable from the envelope module."""
    code = ("import sys, sandbus.sdk.client, sandbus.sdk.envelope; assert 'pydantic' not in sys.modules; "
            "from sandbus.sdk.envelope import PluginMessage; import sandbus; "
            "assert sandbus.PluginMessage is PluginMessage; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr
