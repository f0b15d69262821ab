"""``sandbus logs`` and ``sandbus debug``: plugin log lines and debug state across the nodes."""

from __future__ import annotations

import typer


def register(app: typer.Typer, only: str | None = None) -> None:
    """Add ``logs`` and ``debug`` to ``app``, or only the one named ``only``."""
