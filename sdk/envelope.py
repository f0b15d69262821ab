"""The messages on the wire: headers, the PluginMessage envelope, and errors carried in reply headers.

Request/reply payloads are the plugin's own JSON, untouched, so a client in any language can call a
plugin with a plain NATS request. What sandbus adds travels in headers:

    Sandbus-Msg-Id        message id (dedupe; JetStream's Nats-Msg-Id is set to the same value)
    Sandbus-From          sender (a plugin name, or "client")
    Content-Type          application/json; on a direct or topic message,
                          application/vnd.sandbus.message+json says the body is a whole envelope,
                          and a media type that is not JSON says the body is raw bytes (wrapped
                          base64 in the envelope a plugin receives); on a successful reply from a
                          bytes plugin (Extism), the plugin's declared output type, by default
                          application/octet-stream
    Sandbus-Node          on every reply: the node that answered
    Sandbus-Error-Code    on a failed reply: a stable error code (sandbus.sdk.errors), e.g. "limit.timeout"
    Sandbus-Error         on a failed reply: the message; the body is then a JSON error object
    Sandbus-Hops          on a request or topic message a plugin sent (host functions ``request``,
                          ``publish``): how many plugin requests and messages led to it (1 for a plugin
                          serving a client); absent means 0
    traceparent/tracestate  W3C trace context

A direct message (``sandbus.msg.<plugin>``) or topic message is a PluginMessage envelope only when
its ``Content-Type`` says so (:data:`ENVELOPE_CONTENT_TYPE`); a body whose ``Content-Type`` is a media
type other than JSON is raw bytes, wrapped as a base64 string payload (the envelope's ``headers`` say
so: :data:`BINARY_ENCODING`); any other body is JSON payload, and the node wraps it in a new envelope,
whatever keys it has (:func:`envelope_for`). An explicit envelope is
validated here, by hand: the rules are few, the messages must name the field and the rule (never a
library's text), and this runs for every message a node receives. The pydantic model
:class:`~sandbus.sdk.message.PluginMessage` is the Python API type; importing this module does not
import pydantic (client start-up time), and ``PluginMessage`` is loaded from here on first use.
"""

from __future__ import annotations

import base64
import math
import os
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from sandbus.sdk.errors import InvalidEnvelopeError, InvalidJsonError, SandbusError, error_from_dict
from sandbus.sdk.jsonbound import MAX_JSON_DEPTH, too_deep

if TYPE_CHECKING:
    from sandbus.sdk.message import PluginMessage

__all__ = [
    "BINARY_ENCODING",
    "CONTENT_TYPE",
    "ENVELOPE",
    "ENVELOPE_CONTENT_TYPE",
    "ENVELOPE_FIELDS",
    "H_CONTENT_TYPE",
    "H_ERROR",
    "H_ERROR_CODE",
    "H_FROM",
    "H_HOPS",
    "H_MSG_ID",
    "H_NODE",
    "JSON",
    "MAX_ENVELOPE_HEADERS",
    "MAX_HEADER_KEY",
    "MAX_HEADER_VALUE",
    "MAX_MEDIA_TYPE",
    "MAX_MESSAGE_ID",
    "MAX_SENDER",
    "OCTET_STREAM",
    "PluginMessage",
    "encode_message",
    "envelope_for",
    "error_from_reply",
    "error_reply",
    "header_value",
    "hops_of",
    "is_envelope",
    "is_json_type",
    "nats_size",
    "new_message_id",
    "valid_media_type",
    "valid_message_id",
    "valid_sender",
    "valid_traceparent",
]

H_MSG_ID = "Sandbus-Msg-Id"
H_FROM = "Sandbus-From"
H_CONTENT_TYPE = "Content-Type"
H_NODE = "Sandbus-Node"
H_ERROR_CODE = "Sandbus-Error-Code"
H_ERROR = "Sandbus-Error"
H_HOPS = "Sandbus-Hops"
CONTENT_TYPE = "application/json"
#: the Content-Type of a direct or topic message whose body is a whole PluginMessage envelope
ENVELOPE_CONTENT_TYPE = "application/vnd.sandbus.message+json"
#: the Content-Type of raw bytes: a bytes plugin's reply when its manifest declares no other type
OCTET_STREAM = "application/octet-stream"
#: the envelope ``headers`` entry that marks a payload as the base64 text of a raw-bytes message body
BINARY_ENCODING = ("Content-Transfer-Encoding", "base64")
#: longest media type accepted in a manifest or taken from a message's Content-Type
MAX_MEDIA_TYPE = 255
JSON = {H_CONTENT_TYPE: CONTENT_TYPE}
ENVELOPE = {H_CONTENT_TYPE: ENVELOPE_CONTENT_TYPE}

#: the keys of an envelope, in the order a node writes them
ENVELOPE_FIELDS = ("id", "from", "to", "topic", "payload", "timestamp", "headers")
MAX_MESSAGE_ID = 128
MAX_SENDER = 255
MAX_ENVELOPE_HEADERS = 64
MAX_HEADER_KEY = 256
MAX_HEADER_VALUE = 4096

_MESSAGE_ID = re.compile(rf"[A-Za-z0-9._:\-]{{1,{MAX_MESSAGE_ID}}}")
_SENDER = re.compile(rf"[\x20-\x7e]{{1,{MAX_SENDER}}}")
_FIELDS = frozenset(ENVELOPE_FIELDS)
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(?:-[\x21-\x7e]*)?")
_MAX_TRACEPARENT = 512
#: RFC 6838 restricted names, then RFC 9110 parameters (token = token / quoted-string), printable ASCII only
_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
_MEDIA_TYPE = re.compile(
    rf"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{{0,126}}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{{0,126}}"
    rf"""(?: *; *{_TOKEN}=(?:{_TOKEN}|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"))*""")


#: message ids made ahead from one read of the OS's random source (see :func:`new_message_id`)
_ID_BATCH = 64
_ids: list[str] = []
# A forked child must not hand out the ids its parent will: it starts with none.
os.register_at_fork(after_in_child=_ids.clear)


def new_message_id() -> str:
    """A new message id: 32 lowercase hex characters, a random (version 4) UUID's hex form.

    From ``os.urandom``, read for :data:`_ID_BATCH` ids at a time: ``uuid.uuid4().hex`` (the same bits,
    through a ``UUID`` object) costs three times as much as one read per id, and one read per id twice
    as much as a batch, on every publish and on every plain message a node wraps. Unpredictable on
    purpose: whoever could guess the next id could publish it first, and the stream would drop the real
    message as a duplicate. Thread-safe: each id is taken from the batch by one ``list.pop``.
    """
    try:
        return _ids.pop()
    except IndexError:
        return _more_ids()


def _more_ids() -> str:
    """Make a batch of ids: returns one, keeps the rest for :func:`new_message_id`."""
    raw = bytearray(os.urandom(16 * _ID_BATCH))
    for i in range(0, len(raw), 16):
        raw[i + 6] = (raw[i + 6] & 0x0F) | 0x40  # version 4
        raw[i + 8] = (raw[i + 8] & 0x3F) | 0x80  # the RFC 4122 variant
    text = raw.hex()
    ids = [text[i:i + 32] for i in range(0, len(text), 32)]
    first = ids.pop()
    _ids.extend(ids)
    return first


def valid_message_id(value: object) -> str | None:
    """``value`` when it is a valid message id (1-128 of ``A-Z a-z 0-9 . _ : -``), else None."""
    return value if isinstance(value, str) and _MESSAGE_ID.fullmatch(value) is not None else None


def valid_sender(value: object) -> str | None:
    """``value`` when it is a valid ``from`` (1-255 printable ASCII characters), else None."""
    return value if isinstance(value, str) and _SENDER.fullmatch(value) is not None else None


def valid_traceparent(value: str | None) -> str | None:
    """``value`` when it is a well-formed W3C ``traceparent`` (not version ff, no all-zero id), else None."""
    if not value or len(value) > _MAX_TRACEPARENT or _TRACEPARENT.fullmatch(value) is None:
        return None
    if value.startswith("ff") or (value.startswith("00-") and len(value) != 55):
        return None
    if value[3:35] == "0" * 32 or value[36:52] == "0" * 16:
        return None
    return value


def valid_media_type(value: object) -> str | None:
    """``value`` when it is a media type fit for a ``Content-Type`` header (``type/subtype`` with optional
    ``; key=value`` parameters, printable ASCII, at most :data:`MAX_MEDIA_TYPE` characters), else None.

    What a manifest declares is copied into every reply's headers: a CR or LF in it would let the
    plugin's author forge headers (or a body) on the wire, so only this strict shape passes.
    """
    if not isinstance(value, str) or not 3 <= len(value) <= MAX_MEDIA_TYPE or _MEDIA_TYPE.fullmatch(value) is None:
        return None
    return value


def is_json_type(value: str) -> bool:
    """Whether a media type says JSON: ``application/json`` or a ``+json`` suffix (parameters ignored)."""
    essence = value.split(";", 1)[0].strip().lower()
    return essence == CONTENT_TYPE or essence.endswith("+json")


def _binary_type(headers: Mapping[str, str]) -> str | None:
    """The Content-Type of a message whose body is raw bytes (a valid media type that is not JSON), or None.
    An invalid Content-Type is ignored, as it always was: the body is then JSON."""
    value = valid_media_type(headers.get(H_CONTENT_TYPE))
    return value if value is not None and not is_json_type(value) else None


def is_envelope(headers: Mapping[str, str] | None) -> bool:
    """Whether a message's ``Content-Type`` media type is :data:`ENVELOPE_CONTENT_TYPE` (parameters after
    ``;`` ignored, case-insensitive, surrounding whitespace trimmed)."""
    if not headers:
        return False
    value = headers.get(H_CONTENT_TYPE)
    if not value or len(value) > 256:
        return False
    return value.split(";", 1)[0].strip().lower() == ENVELOPE_CONTENT_TYPE


def encode_message(payload: Any, *, from_: str = "client", to: str | None = None, topic: str | None = None,
                   id: str | None = None, headers: Mapping[str, str] | None = None) -> tuple[str, bytes]:
    """(id, JSON) of a new envelope, for senders: no model, no validation of the sender's own fields.

    Raises:
        TypeError: ``payload`` is not JSON-serialisable (or nests deeper than 254 levels).
    """
    message_id = id or new_message_id()
    return message_id, orjson.dumps({"id": message_id, "from": from_, "to": to, "topic": topic,
                                     "payload": payload, "timestamp": time.time(), "headers": dict(headers or {})})


def _decode(data: bytes, what: str) -> Any:
    try:
        decoded = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise InvalidJsonError(f"{what} is not valid JSON: {e}") from None
    if too_deep(data, decoded):
        raise InvalidJsonError(f"{what} is nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    return decoded


def _quoted(key: str) -> str:
    """A key someone sent, fit to quote in a message: JSON-quoted, at most 64 characters of it."""
    return orjson.dumps(key[:64]).decode() + ("..." if len(key) > 64 else "")


def _kind(value: object) -> str:
    """The JSON type of a decoded value, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _invalid(field: str, rule: str, value: object) -> InvalidEnvelopeError:
    return InvalidEnvelopeError(f"envelope field {field!r} {rule}, found {_kind(value)}", field=field)


def _check_headers(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _invalid("headers", "must be an object of string values", value)
    if len(value) > MAX_ENVELOPE_HEADERS:
        raise InvalidEnvelopeError(f"envelope field 'headers' has {len(value)} entries (at most "
                                   f"{MAX_ENVELOPE_HEADERS})", field="headers")
    for key, item in value.items():
        if not 1 <= len(key) <= MAX_HEADER_KEY:
            raise InvalidEnvelopeError(f"envelope field 'headers': a key must have 1-{MAX_HEADER_KEY} characters, "
                                       f"found {len(key)}", field="headers")
        if not isinstance(item, str):
            raise InvalidEnvelopeError(f"envelope field 'headers': the value of {_quoted(key)} must be a string, "
                                       f"found {_kind(item)}", field="headers")
        if len(item) > MAX_HEADER_VALUE:
            raise InvalidEnvelopeError(f"envelope field 'headers': the value of {_quoted(key)} has {len(item)} "
                                       f"characters (at most {MAX_HEADER_VALUE})", field="headers")
    return value


def _explicit(decoded: Any, headers: Mapping[str, str], now: float, to: str | None,
              topic: str | None) -> dict[str, Any]:
    """The envelope a plugin receives for an explicit one: each field checked against its rule, ``to`` and
    ``topic`` from the subject (the sender's are checked for their type only, then replaced).

    Raises:
        InvalidEnvelopeError: naming the field and the rule.
    """
    if not isinstance(decoded, dict):
        raise InvalidEnvelopeError(f"an envelope must be a JSON object, found {_kind(decoded)}")
    if not decoded.keys() <= _FIELDS:
        first = min(decoded.keys() - _FIELDS)
        raise InvalidEnvelopeError(f"envelope has an unknown field {_quoted(first)} (fields: "
                                   f"{', '.join(ENVELOPE_FIELDS)})", field=first[:64])
    if "id" in decoded:
        message_id = valid_message_id(decoded["id"])
        if message_id is None:
            value = decoded["id"]
            what = f"{len(value)} characters" if isinstance(value, str) else _kind(value)
            raise InvalidEnvelopeError(f"envelope field 'id' must be a string of 1-{MAX_MESSAGE_ID} characters "
                                       f"from A-Z a-z 0-9 . _ : -, found {what}", field="id")
    else:
        message_id = valid_message_id(headers.get(H_MSG_ID)) or new_message_id()
    if "from" in decoded:
        sender = valid_sender(decoded["from"])
        if sender is None:
            raise _invalid("from", f"must be a string of 1-{MAX_SENDER} printable ASCII characters", decoded["from"])
    else:
        sender = valid_sender(headers.get(H_FROM)) or "client"
    value = decoded.get("to")
    if value is not None and not isinstance(value, str):
        raise _invalid("to", "must be a string or null", value)
    value = decoded.get("topic")
    if value is not None and not isinstance(value, str):
        raise _invalid("topic", "must be a string or null", value)
    timestamp = decoded.get("timestamp", now)
    # A float (what senders write) needs only the last two checks; an int or anything else takes all of them.
    if type(timestamp) is not float and (isinstance(timestamp, bool) or not isinstance(timestamp, int | float)):
        raise _invalid("timestamp", "must be a finite number >= 0 (unix seconds)", timestamp)
    if not math.isfinite(timestamp) or timestamp < 0:
        raise _invalid("timestamp", "must be a finite number >= 0 (unix seconds)", timestamp)
    envelope_headers = _check_headers(decoded["headers"]) if "headers" in decoded else {}
    return {"id": message_id, "from": sender, "to": to, "topic": topic, "payload": decoded.get("payload"),
            "timestamp": timestamp, "headers": envelope_headers}


def _content_type(headers: Mapping[str, str]) -> tuple[bool, str | None]:
    """(whether the body is an explicit envelope, the media type of a raw-bytes body or None) by a message's
    ``Content-Type``: :func:`is_envelope`, then :func:`_binary_type`, with the two values senders write most
    (the envelope type, JSON's) answered without parsing."""
    value = headers.get(H_CONTENT_TYPE)
    if value is None or value == CONTENT_TYPE:
        return False, None
    if value == ENVELOPE_CONTENT_TYPE:
        return True, None
    if is_envelope(headers):
        return True, None
    return False, _binary_type(headers)


def envelope_for(data: bytes, headers: Mapping[str, str] | None, *, to: str | None, topic: str | None,
                 now: float | None = None) -> bytes:
    """The PluginMessage JSON a plugin receives for a direct (``to``) or topic (``topic``) message.

    With the envelope content type (:func:`is_envelope`) the body is the sender's envelope, checked
    field by field; with another media type that is not JSON the body is raw bytes, wrapped as the
    base64 text of a string payload, the envelope's ``headers`` then carrying the sender's
    ``Content-Type`` and :data:`BINARY_ENCODING`; any other body is JSON payload, wrapped (an empty
    body is a null payload). ``to``
    and ``topic`` always come from the subject. Defaults: ``id`` from a valid ``Sandbus-Msg-Id`` header
    else new, ``from`` from a valid ``Sandbus-From`` header else "client", ``timestamp`` ``now`` (the
    receipt time), ``headers`` ``{}``; an invalid header value is ignored.

    Raises:
        InvalidJsonError: the body is not JSON, or nests deeper than can be re-encoded (254 levels).
        InvalidEnvelopeError: an explicit envelope breaks a rule (the message names the field).
    """
    received = time.time() if now is None else now
    envelope: dict[str, Any]
    if not headers:  # a plain publish: JSON payload, and no header to take a default from
        envelope = {"id": new_message_id(), "from": "client", "to": to, "topic": topic,
                    "payload": _decode(data, "message body") if data else None, "timestamp": received,
                    "headers": {}}
    else:
        explicit, binary = _content_type(headers)
        if explicit:
            envelope = _explicit(_decode(data, "message body"), headers, received, to, topic)
        elif binary is not None:
            envelope = {"id": valid_message_id(headers.get(H_MSG_ID)) or new_message_id(),
                        "from": valid_sender(headers.get(H_FROM)) or "client", "to": to, "topic": topic,
                        "payload": base64.b64encode(data).decode("ascii"), "timestamp": received,
                        "headers": {H_CONTENT_TYPE: binary, BINARY_ENCODING[0]: BINARY_ENCODING[1]}}
        else:
            envelope = {"id": valid_message_id(headers.get(H_MSG_ID)) or new_message_id(),
                        "from": valid_sender(headers.get(H_FROM)) or "client", "to": to, "topic": topic,
                        "payload": _decode(data, "message body") if data else None, "timestamp": received,
                        "headers": {}}
    try:
        return orjson.dumps(envelope)
    except TypeError:  # the depth check makes this unreachable but for a payload right at the limit
        raise InvalidJsonError(f"message body is nested too deeply: inside its envelope it would be more than "
                               f"{MAX_JSON_DEPTH} levels (a message's payload may be {MAX_JSON_DEPTH - 1})") from None


def hops_of(headers: Mapping[str, str] | None) -> int:
    """The ``Sandbus-Hops`` count of a message (0 when absent or not a non-negative integer).

    A malformed value counts as 0 rather than failing the message: anyone may publish a request, and a
    sender that lies about its hops gains nothing it could not get by leaving the header out.
    """
    value = (headers or {}).get(H_HOPS)
    if value is None:
        return 0
    try:
        hops = int(value)
    except ValueError:
        return 0
    return max(hops, 0)


_UNSAFE_IN_HEADER = re.compile(r"[^\x20-\x7e]")


def header_value(text: str, limit: int) -> str:
    """``text`` made safe for a NATS header value: printable ASCII only, at most ``limit`` characters.

    Error messages quote what plugins and clients sent; a CR/LF in a header value would end the header
    block early and let that text forge headers (or a body) on the wire, and a non-ASCII byte trips
    strict decoders on the receiving side. Anything else is written as a visible escape.
    """
    safe = _UNSAFE_IN_HEADER.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), text)
    return safe[:limit]


def error_reply(err: SandbusError) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a reply that carries ``err``."""
    headers = {**JSON, H_ERROR_CODE: header_value(err.code, 64), H_ERROR: header_value(str(err), 1024)}
    return orjson.dumps({"error": err.to_dict()}, default=str), headers


def error_from_reply(data: bytes, headers: dict[str, str] | None) -> SandbusError | None:
    """The error a reply carries, or None for a successful reply."""
    if not headers or H_ERROR_CODE not in headers:
        return None
    try:
        body = orjson.loads(data)["error"]
        if not isinstance(body, dict):
            raise TypeError
    except (orjson.JSONDecodeError, KeyError, TypeError):
        body = {"message": headers.get(H_ERROR, "")}
    return error_from_dict({**body, "code": headers[H_ERROR_CODE]})


def __getattr__(name: str) -> Any:
    # PluginMessage is a pydantic model: loaded when first asked for, so that a client that never
    # builds one does not pay for importing pydantic.
    if name == "PluginMessage":
        from sandbus.sdk.message import PluginMessage

        globals()["PluginMessage"] = PluginMessage
        return PluginMessage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def nats_size(data: bytes, headers: dict[str, str] | None) -> int:
    """What the server counts against its max payload: the body plus the encoded header block
    (nats-py checks the body alone; a larger message makes the server close the connection)."""
    if not headers:
        return len(data)
    # "NATS/1.0\r\n", then "key: value\r\n" per header, then "\r\n"
    return len(data) + 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())
