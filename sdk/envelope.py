"""The messages on the wire: headers, the PluginMessage envelope, and errors carried in reply headers.

Request/reply payloads are the plugin's own JSON, untouched, so a client in any language can call a
plugin with a plain NATS request. What sandbus adds travels in headers:

    Sandbus-Msg-Id        message id (dedupe; JetStream's Nats-Msg-Id is set to the same value)
    Sandbus-From          sender (a plugin name, or "client")
    Content-Type          application/json
    Sandbus-Error-Code    on a failed reply: a stable error code (sandbus.sdk.errors), e.g. "limit.timeout"
    Sandbus-Error         on a failed reply: the message; the body is then a JSON error object
    Sandbus-Hops          on a request or topic message a plugin sent (host functions ``request``,
                          ``publish``): how many plugin requests and messages led to it (1 for a plugin
                          serving a client); absent means 0
    traceparent/tracestate  W3C trace context
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from sandbus.sdk.errors import SandbusError, error_from_dict

__all__ = [
    "CONTENT_TYPE",
    "H_CONTENT_TYPE",
    "H_ERROR",
    "H_ERROR_CODE",
    "H_FROM",
    "H_HOPS",
    "H_MSG_ID",
    "JSON",
    "PluginMessage",
    "error_from_reply",
    "error_reply",
    "header_value",
    "hops_of",
    "new_message_id",
]

H_MSG_ID = "Sandbus-Msg-Id"
H_FROM = "Sandbus-From"
H_CONTENT_TYPE = "Content-Type"
H_ERROR_CODE = "Sandbus-Error-Code"
H_ERROR = "Sandbus-Error"
H_HOPS = "Sandbus-Hops"
CONTENT_TYPE = "application/json"
JSON = {H_CONTENT_TYPE: CONTENT_TYPE}


def new_message_id() -> str:
    return uuid.uuid4().hex


class PluginMessage(BaseModel):
    """A message between plugins (direct, ``to`` set) or onto a topic (broadcast, ``topic`` set).

    Parameters:
        id: unique id; receivers dedupe on it.
        from_: sender name (``from`` on the wire).
        to: target plugin of a direct message.
        topic: topic of a broadcast.
        payload: any JSON value.
        timestamp: unix seconds when created.
        headers: free-form string headers.
    """

    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)

    id: str = Field(default_factory=new_message_id)
    from_: str = Field(default="client", alias="from")
    to: str | None = None
    topic: str | None = None
    payload: Any = None
    timestamp: float = Field(default_factory=time.time)
    headers: dict[str, str] = Field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(by_alias=True))

    @staticmethod
    def encode(payload: Any, *, from_: str = "client", to: str | None = None, topic: str | None = None,
               id: str | None = None) -> tuple[str, bytes]:
        """(id, the JSON :meth:`to_json` would write) of a new message, without building the model.

        Senders publish on the hot path; the model's validation and dump cost more than the
        publish itself there. ``tests/test_envelope.py`` checks both write the same bytes.
        """
        message_id = id or new_message_id()
        return message_id, orjson.dumps({"id": message_id, "from": from_, "to": to, "topic": topic,
                                         "payload": payload, "timestamp": time.time(), "headers": {}})

    @classmethod
    def from_json(cls, data: bytes) -> PluginMessage:
        return cls.model_validate_json(data)


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
