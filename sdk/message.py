"""The PluginMessage model: the Python API type of the envelope (sdk/envelope.py has the wire rules).

A module of its own because it needs pydantic, and a client that only sends and receives bytes
should not import it (``sandbus.sdk.client`` does not).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from sandbus.sdk.envelope import encode_message, new_message_id

__all__ = ["PluginMessage"]


class PluginMessage(BaseModel):
    """A message between plugins (direct, ``to`` set) or onto a topic (broadcast, ``topic`` set).

    On the wire it travels with ``Content-Type: application/vnd.sandbus.message+json``
    (:data:`sandbus.sdk.envelope.ENVELOPE_CONTENT_TYPE`); a node checks every field of what it
    receives against the rules of :func:`sandbus.sdk.envelope.envelope_for`.

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
        return encode_message(payload, from_=from_, to=to, topic=topic, id=id)

    @classmethod
    def from_json(cls, data: bytes) -> PluginMessage:
        return cls.model_validate_json(data)
