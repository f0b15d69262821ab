"""What the dashboard accepts from the bus: every message bounded, parsed and reduced to known, typed fields.

Anyone allowed to publish on ``sandbus.log.>`` or ``sandbus.audit.>``, and any node answering ``stats``,
decides what arrives here; log lines and audit messages quote guest and author text. Nothing is passed to
the page as received: each function below takes the raw bytes (or a decoded reply), refuses what is too
large or of the wrong shape (``None``), and returns a fresh dict of bounded strings and numbers. The page
then renders those only as text (static/app.js never uses ``innerHTML`` on data).
"""

from __future__ import annotations

import math
import re
from typing import Any

import orjson

from sandbus.sdk.subjects import check_token

__all__ = [
    "MAX_AUDIT_BYTES",
    "MAX_LOG_BYTES",
    "MAX_PLUGINS_PER_NODE",
    "audit_event",
    "debug_state",
    "log_line",
    "node_view",
    "trace_id",
]

#: Largest log-line message accepted (bytes on the wire); a node's lines are far smaller.
MAX_LOG_BYTES = 32 * 1024
#: Largest audit message accepted (a node publishes at most 16 KiB per event).
MAX_AUDIT_BYTES = 32 * 1024
#: Plugins kept from one node's ``stats`` reply.
MAX_PLUGINS_PER_NODE = 1024
#: Characters kept of free text (messages, descriptions, errors).
TEXT_CHARS = 4096
#: Characters kept of a name-like string (ids, versions, kinds, levels).
NAME_CHARS = 128

_TRACE = re.compile(r"[0-9a-f]{32}")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _text(value: object, limit: int = TEXT_CHARS) -> str | None:
    if not isinstance(value, str):
        return None
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _name(value: object) -> str | None:
    return _text(value, NAME_CHARS)


def _int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return max(-(2**62), min(2**62, value))


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def trace_id(value: object) -> str | None:
    """A W3C trace id (32 lowercase hex digits, not all zero), or ``None``: the page builds a link from it."""
    if isinstance(value, str) and _TRACE.fullmatch(value) and value != "0" * 32:
        return value
    return None


def _object(data: bytes, limit: int) -> dict[str, Any] | None:
    if len(data) > limit:
        return None
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def log_line(subject: str, data: bytes) -> dict[str, Any] | None:
    """A plugin log line from ``sandbus.log.<node>.<plugin>`` (docs/operate.md), or ``None`` when it is not one.

    The node and plugin are taken from the subject (the NATS permissions decide who may publish where),
    and the body must name the same ones.
    """
    parts = subject.split(".")
    if len(parts) != 4:
        return None
    node, plugin = parts[2], parts[3]
    body = _object(data, MAX_LOG_BYTES)
    if body is None or body.get("node") != node or body.get("plugin") != plugin:
        return None
    level = body.get("level")
    message = _text(body.get("message"))
    if level not in LOG_LEVELS or message is None:
        return None
    stream = body.get("stream")
    return {
        "ts": _name(body.get("ts")) or "",
        "node": node,
        "plugin": plugin,
        "version": _name(body.get("version")),
        "level": level,
        "stream": stream if stream in ("stdout", "stderr") else None,
        "message": message,
        "trace_id": trace_id(body.get("trace_id")),
        "seq": _int(body.get("seq")),
        "dropped": max(0, _int(body.get("dropped")) or 0),
    }


def audit_event(subject: str, data: bytes) -> dict[str, Any] | None:
    """An audit event from ``sandbus.audit.<node>``, or ``None`` when it is not one."""
    parts = subject.split(".")
    if len(parts) != 3:
        return None
    body = _object(data, MAX_AUDIT_BYTES)
    if body is None:
        return None
    kind, level, message = _name(body.get("kind")), _name(body.get("level")), _text(body.get("message"))
    timestamp = _num(body.get("timestamp"))
    if kind is None or level is None or message is None or timestamp is None:
        return None
    details = body.get("details")
    details = details if isinstance(details, dict) else {}
    try:
        shown = orjson.dumps(details, default=str).decode()
    except TypeError:  # nested beyond what orjson writes back
        shown = "{…}"
    return {
        "node": parts[2],
        "timestamp": timestamp,
        "level": level,
        "kind": kind,
        "plugin": _name(body.get("plugin")) or "",
        "message": message,
        "count": max(1, _int(body.get("count")) or 1),
        "trace_id": trace_id(details.get("trace_id")),
        "details": _text(shown, 1024),
    }


_PLUGIN_TEXT = ("description", "last_error")
_PLUGIN_NAMES = ("name", "version", "status", "sha256", "last_loaded", "last_error_code", "last_error_at")
_PLUGIN_INTS = ("reloads", "executions", "errors", "host_errors", "rejected", "fuel_used", "last_fuel_used",
                "memory_bytes", "instances", "in_flight", "queue_depth")
_PLUGIN_NUMS = ("p50_ms", "p99_ms")


def _plugin(value: object) -> dict[str, Any] | None:
    if not isinstance(value, dict) or _token(value.get("name")) is None:
        return None
    out: dict[str, Any] = {k: _name(value.get(k)) for k in _PLUGIN_NAMES}
    out.update({k: _text(value.get(k)) for k in _PLUGIN_TEXT})
    out.update({k: _int(value.get(k)) for k in _PLUGIN_INTS})
    out.update({k: _num(value.get(k)) for k in _PLUGIN_NUMS})
    for key in ("functions", "topics"):
        items = value.get(key)
        out[key] = [s for s in (_name(i) for i in items[:64]) if s] if isinstance(items, list) else []
    return out


def _token(value: object) -> str | None:
    """A subject token (a node id, a plugin name: the dashboard builds subjects from them), or ``None``."""
    if not isinstance(value, str) or len(value) > NAME_CHARS:
        return None
    try:
        return check_token(value, "name")
    except ValueError:
        return None


def node_view(reply: object) -> dict[str, Any] | None:
    """A node's ``stats`` reply reduced to what the page shows, or ``None`` when it is not one (its id, and
    each plugin's name, must be subject tokens: the page asks about them by name)."""
    if not isinstance(reply, dict) or _token(reply.get("node_id")) is None:
        return None
    plugins_in = reply.get("plugins")
    plugins = [p for p in (_plugin(v) for v in plugins_in[:MAX_PLUGINS_PER_NODE]) if p is not None] \
        if isinstance(plugins_in, list) else []
    return {
        "node_id": _name(reply.get("node_id")),
        "version": _name(reply.get("version")),
        "durable_topics": reply.get("durable_topics") is True,
        "spans_dropped": _int(reply.get("spans_dropped")),
        "plugins": plugins,
    }


def _bounded_json(value: object, depth: int = 0) -> Any:
    """``value`` with every string cut, every list and object capped, depth limited: a debug reply is a
    node's, but its recent errors, logs and audit quote guests."""
    if depth > 6:
        return None
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return _int(value)
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, list):
        return [_bounded_json(v, depth + 1) for v in value[:256]]
    if isinstance(value, dict):
        return {str(k)[:NAME_CHARS]: _bounded_json(v, depth + 1) for k, v in list(value.items())[:128]}
    return None


def debug_state(reply: object) -> dict[str, Any] | None:
    """A node's ``debug`` reply, bounded (strings cut, arrays capped), or ``None`` when it is not an object."""
    if not isinstance(reply, dict):
        return None
    bounded = _bounded_json(reply)
    return bounded if isinstance(bounded, dict) else None
