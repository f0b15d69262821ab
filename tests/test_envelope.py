"""The PluginMessage envelope: the fast encoder writes what the model writes, and the model reads it."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from sandbus.sdk.envelope import PluginMessage


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
