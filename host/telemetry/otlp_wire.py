"""OTLP trace protobuf, written directly: the Python half of the exporter process's span encoder.

The node's request spans have a fixed shape (``process`` + ``execute``, docs/protocol.md), so their
constant parts (names, static attributes, resource, scope) are encoded once and cached by
:class:`~sandbus.host.telemetry.export.SpanEncoder`, and each span only adds its ids, times and a few
numbers. host/sandbox/_native.c writes the common shape (a reply, no error, no audit event, no
tracestate) in the same field order, byte for byte; this module writes every other shape. Why not the
official encoder: it costs over ten times the CPU a request, measured in host/telemetry/export.py's
docstring. The tests decode what this module writes with the official ``opentelemetry-proto`` classes
and compare it with what the official encoder writes for the same records
(tests/telemetry/test_fast_spans.py, tests/telemetry/test_export.py).

Field numbers: opentelemetry/proto/trace/v1/trace.proto, common/v1/common.proto,
resource/v1/resource.proto, collector/trace/v1/trace_service.proto.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "FLAG_HAS_IS_REMOTE",
    "FLAG_IS_REMOTE",
    "SPAN_KIND_CONSUMER",
    "SPAN_KIND_INTERNAL",
    "SPAN_KIND_PRODUCER",
    "STATUS_ERROR",
    "STATUS_UNSET",
    "any_value",
    "attributes",
    "encode_span",
    "export_request",
    "frame",
    "key_value",
    "resource",
    "scope",
    "span_constant",
    "varint",
]

AttrValue = str | bool | int | float

SPAN_KIND_INTERNAL = 1
SPAN_KIND_PRODUCER = 4
SPAN_KIND_CONSUMER = 5
STATUS_UNSET = 0
STATUS_ERROR = 2
#: Span.flags: the SDK always sets "has is_remote", and "is_remote" when the parent came from headers.
FLAG_HAS_IS_REMOTE = 0x100
FLAG_IS_REMOTE = 0x200

_pack_q = struct.Struct("<Q").pack
_pack_d = struct.Struct("<d").pack
_pack_i = struct.Struct("<I").pack
_U64 = (1 << 64) - 1


_SMALL = [bytes((i,)) for i in range(0x80)]


def varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return _SMALL[n]
    if 0 < n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    n &= _U64  # int64 fields: a negative value is its two's complement, 10 bytes
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len(field: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _TAGS[field] + varint(len(payload)) + payload if field < 16 else \
        varint(field << 3 | 2) + varint(len(payload)) + payload


_TAGS = [bytes((f << 3 | 2,)) for f in range(16)]


def any_value(value: AttrValue | Sequence[AttrValue]) -> bytes:
    if isinstance(value, bool):  # before int: bool is an int
        return b"\x10" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return b"\x18" + varint(value)
    if isinstance(value, float):
        return b"\x21" + _pack_d(value)
    if isinstance(value, str):
        return _len(1, value.encode())
    if isinstance(value, Sequence):  # ArrayValue (field 5) of AnyValue (field 1)
        return _len(5, b"".join(_len(1, any_value(v)) for v in value))
    return _len(1, str(value).encode())


def key_value(key: str, value: AttrValue | Sequence[AttrValue]) -> bytes:
    """One KeyValue message."""
    return _len(1, key.encode()) + _len(2, any_value(value))


def attributes(field: int, attrs: Mapping[str, Any]) -> bytes:
    """``attrs`` as the repeated KeyValue field number ``field`` of the enclosing message."""
    return b"".join(_len(field, key_value(k, v)) for k, v in attrs.items() if v is not None)


def resource(attrs: Mapping[str, Any]) -> bytes:
    """A Resource message."""
    return attributes(1, attrs)


def scope(name: str, version: str | None = None) -> bytes:
    """An InstrumentationScope message."""
    return _len(1, name.encode()) + (_len(2, version.encode()) if version else b"")


def span_constant(name: str, kind: int, attrs: Mapping[str, Any]) -> bytes:
    """A span's name, kind and constant attributes, encoded once and cached by the caller."""
    return _len(5, name.encode()) + bytes((0x30, kind)) + attributes(9, attrs)


def encode_span(trace_id: bytes, span_id: bytes, parent_id: bytes | None, trace_state: str | None,
                constant: bytes, start_ns: int, end_ns: int, attrs: Mapping[str, Any] | None = None,
                events: Iterable[tuple[int, str, Mapping[str, Any]]] = (), status: int = STATUS_UNSET,
                status_message: str = "", remote_parent: bool = False) -> bytes:
    """One Span message; ``constant`` from :func:`span_constant`.

    host/sandbox/_native.c (``encode_request``) writes the common request spans in this same field
    order, byte for byte (tests/telemetry/test_fast_spans.py compares the two).
    """
    parts = [b"\x0a\x10", trace_id, b"\x12\x08", span_id]
    if trace_state:
        parts.append(_len(3, trace_state.encode()))
    if parent_id:
        parts += (b"\x22\x08", parent_id)
    parts += (b"\x39", _pack_q(start_ns), b"\x41", _pack_q(end_ns), constant)
    if attrs:
        parts.append(attributes(9, attrs))
    for time_ns, event_name, event_attrs in events:
        parts.append(_len(11, b"\x09" + _pack_q(time_ns) + _len(2, event_name.encode()) + attributes(3, event_attrs)))
    if status:
        parts.append(_len(15, (_len(2, status_message.encode()) if status_message else b"") + b"\x18"
                          + varint(status)))
    parts += (b"\x85\x01", _pack_i(FLAG_HAS_IS_REMOTE | (FLAG_IS_REMOTE if remote_parent else 0)))
    return b"".join(parts)


def frame(field: int, payload: bytes) -> bytes:
    """``payload`` as the length-delimited field number ``field``."""
    return _len(field, payload)


def export_request(resource_msg: bytes, scope_msg: bytes, framed_spans: Iterable[bytes]) -> bytes:
    """An ExportTraceServiceRequest with one resource and one scope; the spans already framed as
    ScopeSpans.spans fields (``frame(2, span)``)."""
    scope_spans = _len(1, scope_msg) + b"".join(framed_spans)
    resource_spans = _len(1, resource_msg) + _len(2, scope_spans)
    return _len(1, resource_spans)
