"""The wrapping of messages into envelopes, made cheaper, decides exactly as the plain rules do.

``envelope_for`` runs for every direct and topic message a node receives, so it answers the common
cases (no headers, the envelope or JSON media type) without the general checks. Here each of a few
thousand hostile and ordinary inputs goes through it and through :func:`reference_envelope_for`, the
rules written out one check after another, and both must give the same envelope or the same error
(type, field and message). Then the message ids, which are now made in batches: each unique, a
version 4 UUID's hex form, and a forked child never hands out its parent's.
"""

from __future__ import annotations

import base64
import itertools
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import orjson
import pytest

from sandbus.sdk import envelope as env
from sandbus.sdk.envelope import (
    BINARY_ENCODING,
    ENVELOPE_CONTENT_TYPE,
    ENVELOPE_FIELDS,
    H_CONTENT_TYPE,
    H_FROM,
    H_MSG_ID,
    MAX_MESSAGE_ID,
    MAX_SENDER,
    _invalid,
    _kind,
    _quoted,
    envelope_for,
    is_envelope,
    is_json_type,
    new_message_id,
    valid_media_type,
    valid_message_id,
    valid_sender,
)

# The envelope's ``headers`` field is checked, and errors are worded, by the same functions on every path: the
# reference uses them as they are.
from sandbus.sdk.envelope import _check_headers as check_headers
from sandbus.sdk.errors import InvalidEnvelopeError, InvalidJsonError, SandbusError
from sandbus.sdk.jsonbound import MAX_JSON_DEPTH, too_deep

NOW = 1733223344.5


def _decode(data: bytes) -> Any:
    try:
        decoded = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise InvalidJsonError(f"message body is not valid JSON: {e}") from None
    if too_deep(data, decoded):
        raise InvalidJsonError(f"message body is nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    return decoded


def reference_envelope_for(data: bytes, headers: Mapping[str, str] | None, *, to: str | None, topic: str | None,
                           now: float) -> dict[str, Any]:
    """The envelope rules, one check after another (what ``envelope_for`` must decide), as a dict."""
    headers = headers or {}
    default_id = valid_message_id(headers.get(H_MSG_ID)) or "<new>"
    default_from = valid_sender(headers.get(H_FROM)) or "client"
    if is_envelope(headers):
        decoded = _decode(data)
        if not isinstance(decoded, dict):
            raise InvalidEnvelopeError(f"an envelope must be a JSON object, found {_kind(decoded)}")
        unknown = set(decoded) - set(ENVELOPE_FIELDS)
        if unknown:
            first = min(unknown)
            raise InvalidEnvelopeError(f"envelope has an unknown field {_quoted(first)} (fields: "
                                       f"{', '.join(ENVELOPE_FIELDS)})", field=first[:64])
        message_id = default_id
        if "id" in decoded:
            value = decoded["id"]
            if valid_message_id(value) is None:
                what = f"{len(value)} characters" if isinstance(value, str) else _kind(value)
                raise InvalidEnvelopeError(f"envelope field 'id' must be a string of 1-{MAX_MESSAGE_ID} "
                                           f"characters from A-Z a-z 0-9 . _ : -, found {what}", field="id")
            message_id = value
        sender = default_from
        if "from" in decoded:
            if valid_sender(decoded["from"]) is None:
                raise _invalid("from", f"must be a string of 1-{MAX_SENDER} printable ASCII characters",
                               decoded["from"])
            sender = decoded["from"]
        for field in ("to", "topic"):
            if field in decoded and decoded[field] is not None and not isinstance(decoded[field], str):
                raise _invalid(field, "must be a string or null", decoded[field])
        timestamp = decoded.get("timestamp", now)
        if (isinstance(timestamp, bool) or not isinstance(timestamp, int | float) or not math.isfinite(timestamp)
                or timestamp < 0):
            raise _invalid("timestamp", "must be a finite number >= 0 (unix seconds)", timestamp)
        fields = {"id": message_id, "from": sender, "payload": decoded.get("payload"), "timestamp": timestamp,
                  "headers": check_headers(decoded["headers"]) if "headers" in decoded else {}}
    else:
        media_type = valid_media_type(headers.get(H_CONTENT_TYPE))
        if media_type is not None and not is_json_type(media_type):
            fields = {"id": default_id, "from": default_from, "payload": base64.b64encode(data).decode("ascii"),
                      "timestamp": now, "headers": {H_CONTENT_TYPE: media_type,
                                                    BINARY_ENCODING[0]: BINARY_ENCODING[1]}}
        else:
            fields = {"id": default_id, "from": default_from, "payload": _decode(data) if data else None,
                      "timestamp": now, "headers": {}}
    out = {"id": fields["id"], "from": fields["from"], "to": to, "topic": topic, "payload": fields["payload"],
           "timestamp": fields["timestamp"], "headers": fields["headers"]}
    try:
        orjson.dumps(out)
    except TypeError:
        raise InvalidJsonError("message body is nested too deeply: inside its envelope") from None
    return out


GOOD = {"id": "m-1", "from": "shop", "to": "x", "topic": "y", "payload": {"n": [1, 2.5]}, "timestamp": 12.5,
        "headers": {"k": "v"}}

#: values each field is set to in turn (valid, edge and hostile)
FIELD_VALUES: dict[str, list[Any]] = {
    "id": ["a.B_9:-", "", "a b", "x" * 128, "x" * 129, 7, None, "caf\u00e9", "new\nline", ["m"], True],
    "from": ["shop ~!", "", "x" * 255, "x" * 256, 3, None, "caf\u00e9", "tab\t", "\x7f", {"a": 1}],
    "to": ["p", None, 1, ["t"], True, ""],
    "topic": ["orders.created", None, 1.5, {"t": 1}, False],
    "payload": [None, 0, "é", [1, [2, [3]]], {"deep": {"er": None}}, True, 1e308],
    "timestamp": [0, 0.0, 12, 12.5, -1, -0.5, -0.0, True, False, "now", None, 1e308, 2**63 - 1, 2**64 - 1,
                  -(2**63), [1], {}],
    "headers": [{}, [], None, "h", {"k": 1}, {"": "v"}, {"k" * 256: "v"}, {"k" * 257: "v"},
                {str(i): "v" for i in range(64)}, {str(i): "v" for i in range(65)}, {"k": "v" * 4096},
                {"k": "v" * 4097}, {"k": None}],
}

HEADERS: list[dict[str, str] | None] = [
    None, {}, {H_CONTENT_TYPE: ENVELOPE_CONTENT_TYPE},
    {H_CONTENT_TYPE: ENVELOPE_CONTENT_TYPE, H_MSG_ID: "h-1", H_FROM: "app", "Nats-Msg-Id": "h-1"},
    {H_CONTENT_TYPE: ENVELOPE_CONTENT_TYPE, H_MSG_ID: "no good", H_FROM: ""},
    {H_CONTENT_TYPE: " APPLICATION/VND.SANDBUS.MESSAGE+JSON ; charset=utf-8"},
    {H_CONTENT_TYPE: ENVELOPE_CONTENT_TYPE + " " * 300},
    {H_CONTENT_TYPE: "application/json"}, {H_CONTENT_TYPE: "application/json", H_MSG_ID: "j-1", H_FROM: "x"},
    {H_CONTENT_TYPE: "Application/JSON; charset=utf-8"}, {H_CONTENT_TYPE: "application/problem+json"},
    {H_CONTENT_TYPE: "application/octet-stream", H_MSG_ID: "b-1"}, {H_CONTENT_TYPE: "text/plain\r\nX: y"},
    {H_CONTENT_TYPE: "image/png"}, {H_CONTENT_TYPE: ""}, {H_CONTENT_TYPE: "application/jsonl"},
    {H_CONTENT_TYPE: "application/json-seq"}, {H_CONTENT_TYPE: ENVELOPE_CONTENT_TYPE + "-ish"},
    {H_CONTENT_TYPE: "application/vnd.sandbus.message"}, {H_CONTENT_TYPE: "application/json "},
    {H_MSG_ID: "only-id"}, {H_FROM: "only\x00from"},
    {"Status": "100"},
]


def bodies() -> list[bytes]:
    out = [b"", b"{}", b"[]", b"null", b"{broken", b"\xff\xfe", b"[" * 255 + b"]" * 255, b"[" * 253 + b"]" * 253,
           b'"just a string"', b"12", orjson.dumps(GOOD), orjson.dumps({**GOOD, "extra": 1}),
           orjson.dumps({"<script>" * 20: 1}), orjson.dumps({"payload": [[[[1]]]]})]
    for field, values in FIELD_VALUES.items():
        for value in values:
            out.append(orjson.dumps({**GOOD, field: value}))
        out.append(orjson.dumps({k: v for k, v in GOOD.items() if k != field}))
    return out


def outcome(build: Any, body: bytes, headers: dict[str, str] | None, to: str | None,
            topic: str | None) -> tuple[str, Any]:
    """What ``build`` makes of a message: ("ok", the envelope with a new id shown as "<new>") or
    ("error", (type, field, message))."""
    try:
        got = build(body, headers, to=to, topic=topic, now=NOW)
    except SandbusError as e:
        message = e.message
        if isinstance(e, InvalidJsonError) and "inside its envelope" in message:
            message = "message body is nested too deeply: inside its envelope"
        return "error", (type(e).__name__, e.details.get("field"), message)
    decoded = orjson.loads(got) if isinstance(got, bytes) else got
    if re.fullmatch(r"[0-9a-f]{32}", decoded["id"]):  # made here: no id of the corpus looks like one
        decoded["id"] = "<new>"
    return "ok", decoded


@pytest.mark.parametrize("headers", HEADERS, ids=lambda h: repr(h)[:60])
def test_envelope_for_decides_as_the_rules_do(headers: dict[str, str] | None) -> None:
    for body, (to, topic) in itertools.product(bodies(), [(None, "orders.created"), ("billing", None)]):
        fast = outcome(envelope_for, body, headers, to, topic)
        plain = outcome(reference_envelope_for, body, headers, to, topic)
        assert fast == plain, (body[:80], headers)


def test_the_receipt_time_is_the_timestamp_of_a_wrapped_message() -> None:
    before = time.time()
    got = orjson.loads(envelope_for(b"[1]", None, to="p", topic=None))
    assert before <= got["timestamp"] <= time.time()
    assert list(got) == list(ENVELOPE_FIELDS)


def test_message_ids_are_unique_version_4_uuids() -> None:
    ids = [new_message_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    for one in ids:
        parsed = uuid.UUID(one)
        assert (parsed.hex, parsed.version, parsed.variant) == (one, 4, uuid.RFC_4122)


def test_threads_never_get_the_same_message_id() -> None:
    got: list[list[str]] = [[] for _ in range(4)]

    def take(into: list[str]) -> None:
        for _ in range(3000):
            into.append(new_message_id())

    threads = [threading.Thread(target=take, args=(into,)) for into in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    every = [one for into in got for one in into]
    assert len(every) == 12000
    assert len(set(every)) == len(every)


def test_a_forked_child_does_not_hand_out_its_parents_ids() -> None:
    env._ids.clear()  # what earlier ids left of a batch: one more call could use it up
    new_message_id()  # a fresh batch: the parent holds the rest of it, made ahead
    assert len(env._ids) == env._ID_BATCH - 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write, ",".join(new_message_id() for _ in range(10)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        child = f.read().decode().split(",")
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 0
    parent = [new_message_id() for _ in range(10)]
    assert len(child) == 10
    assert not set(child) & set(parent)
