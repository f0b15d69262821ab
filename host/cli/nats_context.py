"""The ``nats`` CLI's contexts, read as it reads them (ADR-21): ``$XDG_CONFIG_HOME/nats/context.txt`` names the
selected context, ``nats/context/<name>.json`` holds its URL, credentials and TLS files.

Every file here is someone else's input: bounded, opened without blocking (a FIFO or a device is refused,
not waited on), and checked key by key; a bad one is a :class:`SettingError`, which a command reports in
one line.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["MAX_CONTEXT_BYTES", "MAX_SECRET_FILE_BYTES", "SettingError", "context_path", "load_context",
           "read_bounded", "str_or_none"]

#: Largest context file, context.txt, and credential / certificate file accepted.
MAX_CONTEXT_BYTES = 64 * 1024
MAX_SECRET_FILE_BYTES = 1024 * 1024


class SettingError(Exception):
    """A bad connection option or context: one line, exit 2."""


_CONTEXT_STRINGS = ("url", "user", "password", "token", "creds", "nkey", "cert", "key", "ca", "nsc", "user_jwt")


def _config_home() -> Path | None:
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    if xdg:
        return Path(xdg)
    try:
        return Path.home() / ".config"
    except RuntimeError:  # no home directory: no context
        return None


def read_bounded(path: Path, what: str, cap: int) -> bytes:
    """A regular file's bytes, at most ``cap`` (a FIFO or device would block or never end).

    Opened without blocking and checked on the open file (not stat, then open: the path could be
    swapped for a FIFO in between, and the open would then wait for a writer forever).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise SettingError(f"{what} {path}: not a regular file")
            data = f.read(cap + 1)
    except OSError as e:
        raise SettingError(f"{what} {path}: {e.strerror or e}") from None
    if len(data) > cap:
        raise SettingError(f"{what} {path}: larger than {cap} bytes")
    return data


def _valid_context_name(name: str) -> bool:
    # The nats CLI's rule (no "..", no path separator), and no control characters.
    return (bool(name) and ".." not in name and "/" not in name and "\\" not in name and len(name) <= 255
            and not any(ord(ch) < 0x20 or ch == "\x7f" for ch in name))


def load_context(name: str | None) -> tuple[str, dict[str, Any]] | None:
    """The named context, else the selected one, else None; a bad one raises :class:`SettingError`."""
    home = _config_home()
    if home is None:
        if name:
            raise SettingError(f"nats context {name!r}: no configuration directory (set XDG_CONFIG_HOME)")
        return None
    nats_dir = home / "nats"
    if not name:
        selected = nats_dir / "context.txt"
        if not selected.exists():
            return None
        raw = read_bounded(selected, "nats context selection", 4096)
        name = raw.decode("utf-8", errors="replace").strip()
        if not name:
            return None
    if not _valid_context_name(name):
        raise SettingError(f"invalid nats context name {name[:80]!r}")
    path = nats_dir / "context" / f"{name}.json"
    if not path.exists():
        raise SettingError(f"unknown nats context {name!r} (no {path})")
    raw = read_bounded(path, f"nats context {name!r}:", MAX_CONTEXT_BYTES)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise SettingError(f"nats context {name!r} ({path}) is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SettingError(f"nats context {name!r} ({path}) is not a JSON object")
    for key in _CONTEXT_STRINGS:
        if data.get(key) is not None and not isinstance(data[key], str):
            raise SettingError(f"nats context {name!r} ({path}): {key!r} must be a string")
    if data.get("tls_first") is not None and not isinstance(data["tls_first"], bool):
        raise SettingError(f"nats context {name!r} ({path}): 'tls_first' must be true or false")
    return name, data


def context_path(value: str, what: str) -> Path:
    """A context's file reference: a path or ``file://`` URI (the other credential schemes of the nats CLI
    run programs or read other stores: refused, by name)."""
    if value.startswith("file://"):
        value = value.removeprefix("file://")
    elif "://" in value or value.startswith("data:"):
        scheme = value.split(":", 1)[0]
        raise SettingError(f"{what}: {scheme}: references are not supported by sandbus; give a file path")
    return Path(value).expanduser()


def str_or_none(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) and value else None
