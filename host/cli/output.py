"""What the CLI prints to a terminal, made safe: text from plugins and from the bus is data, never control.

A plugin's log lines and error texts, and whatever a node (or anything answering on the bus) puts in
a listing, reach an operator's terminal. Here they are shown as text: control characters escaped
(:mod:`sandbus.host.sandbox.guest_text`), rich markup never interpreted in data (``[x]`` stays ``[x]``), and a
message's own line breaks indented, so no line of it can pass for a line of sandbus's own.

rich is imported only by the functions that build rich objects: a command that prints plain text
(``request``, ``pub``, every error line) never loads it.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TYPE_CHECKING

from sandbus.host.sandbox.guest_text import INVISIBLE_CHARS, escape_controls

if TYPE_CHECKING:
    from rich.text import Text

__all__ = [
    "MAX_CELL_CHARS",
    "PLUGIN_LOGGER_PREFIX",
    "TerminalFormatter",
    "cell",
    "markup_safe",
    "setup_logging",
    "terminal_json",
    "terminal_text",
]

#: Loggers of plugins' own output are ``sandbus.plugin.<name>``.
PLUGIN_LOGGER_PREFIX = "sandbus.plugin."


def terminal_text(text: str) -> str:
    """``text`` with control characters escaped and every line after the first indented."""
    return escape_controls(text, keep_newlines=True).replace("\n", "\n  ")


# What valid JSON may still carry raw inside its strings that a terminal acts on or that reorders text:
# DEL, C1 controls and the invisible characters of guest_text (C0 controls must be escaped in JSON).
_JSON_UNSAFE = re.compile(f"[\x7f-\x9f{INVISIBLE_CHARS}]")


def terminal_json(raw: bytes) -> bytes:
    """Valid JSON ``raw`` with the characters of :data:`_JSON_UNSAFE` written as ``\\uXXXX`` escapes: the
    same JSON value, byte-identical when there is nothing to escape. ``raw`` must already be validated."""
    text = raw.decode("utf-8")
    if _JSON_UNSAFE.search(text) is None:
        return raw
    return _JSON_UNSAFE.sub(_json_escape, text).encode()


def _json_escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # JSON writes a character above U+FFFF as its UTF-16 surrogate pair
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


#: Longest table cell, in characters: a value sent by anything on the bus is shown, never a screenful.
MAX_CELL_CHARS = 1000


def cell(text: object, limit: int = MAX_CELL_CHARS, *, multiline: bool = False) -> Text:
    """A table cell holding ``text`` as plain text: no markup, no control characters, at most ``limit``
    characters of it (the rest is cut, marked ``…``); one line unless ``multiline`` keeps its line breaks."""
    from rich.text import Text

    shown = str(text)
    if len(shown) > limit:
        shown = shown[: limit - 1] + "…"
    return Text(escape_controls(shown, keep_newlines=multiline))


def markup_safe(text: object) -> str:
    """``text`` to embed inside a rich markup string: control characters and markup both escaped."""
    from rich.markup import escape as escape_markup

    return escape_markup(escape_controls(str(text)))


class TerminalFormatter(logging.Formatter):
    """Log lines for a terminal.

    A plugin's own lines say whose they are first, ``[plugin echo] WARNING [stderr] text``, and cannot
    look like the host's ``WARNING sandbus.bus: text``. Every message has its control characters
    escaped; a plugin's message is kept on one line, a host message's continuation lines (tracebacks)
    are indented.
    """

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            message = f"{message}\n{record.exc_text}"
        if record.stack_info:
            message = f"{message}\n{self.formatStack(record.stack_info)}"
        if record.name.startswith(PLUGIN_LOGGER_PREFIX):
            plugin = escape_controls(record.name.removeprefix(PLUGIN_LOGGER_PREFIX))
            return f"[plugin {plugin}] {record.levelname} {escape_controls(message)}"
        return f"{record.levelname} {escape_controls(record.name)}: {terminal_text(message)}"


def setup_logging(verbose: int, *, quiet_level: int = logging.WARNING) -> None:
    """Log to stderr through :class:`TerminalFormatter`: ``quiet_level`` without ``-v``, info with one,
    debug with two or more."""
    level = quiet_level if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TerminalFormatter())
    logging.basicConfig(level=level, handlers=[handler])
