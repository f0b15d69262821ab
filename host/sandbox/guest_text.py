"""Text a guest produced, made safe to show: one log record per line, no control characters.

A plugin's stdout, stderr and ``log()`` end up on an operator's terminal and in log files. Raw, they
could move the cursor, clear the screen, recolour or retitle the terminal (ANSI escapes), or start a
new line that looks like one of sandbus's own (``\\nsandbus: plugin 'other': ...``). So guest text
is cut into lines here, once, where it becomes log records, and every character a terminal would act
on is written as a visible escape instead:

* C0 controls (tab included), DEL and C1 controls -> ``\\xNN`` (ESC becomes the four characters
  ``\\x1b``, so an escape sequence is shown, never run);
* Unicode line and paragraph separators, bidirectional and other invisible format characters (which
  reorder or hide what a reader sees) and lone surrogates -> ``\\uNNNN`` (``\\UNNNNNNNN`` above U+FFFF).

Lines break at ``\\n``, ``\\r\\n`` and a lone ``\\r`` (which would return the cursor over the record's
prefix); empty lines are dropped. The logger name (``sandbus.plugin.<name>``) says whose line it is;
the CLI prints it first, so a guest line can never pass for a host line.
"""

from __future__ import annotations

import re

__all__ = ["INVISIBLE_CHARS", "escape_controls", "guest_lines"]

#: Characters a reader cannot see but a terminal or a text layout acts on, beyond C0/DEL/C1: every
#: format character (Unicode category Cf: bidirectional controls, zero-width spaces and joiners, the
#: soft hyphen, the BOM, invisible operators, tags...), the line and paragraph separators (Zl, Zp)
#: and lone surrogates (Cs: what a file name that is not UTF-8 decodes to; printing one raises).
#: A regex character class body, shared with :func:`sandbus.host.cli.output.terminal_json`.
INVISIBLE_CHARS = (
    "\xad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u2028-\u202e"
    "\u2060-\u2064\u2066-\u206f\ud800-\udfff\ufeff\ufff9-\ufffb\U000110bd\U000110cd"
    "\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f"
)
_UNSAFE = re.compile(f"[\x00-\x09\x0b-\x1f\x7f-\x9f{INVISIBLE_CHARS}]")
_UNSAFE_OR_NEWLINE = re.compile(f"[\x00-\x1f\x7f-\x9f{INVISIBLE_CHARS}]")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every terminal control character written as a visible escape.

    ``keep_newlines`` leaves ``\\n`` alone (for host messages that are multi-line on purpose; the
    caller indents what follows each one).
    """
    return (_UNSAFE if keep_newlines else _UNSAFE_OR_NEWLINE).sub(_visible, text)


def guest_lines(text: str) -> list[str]:
    """The non-empty lines of ``text``, each escaped with :func:`escape_controls`."""
    return [escape_controls(line) for line in _LINE_BREAK.split(text) if line]
