"""``sandbus dashboard``: a live web view of the nodes, their plugins, the audit trail and the logs."""

from __future__ import annotations

import typer


def register(app: typer.Typer, only: str | None = None) -> None:
    """Add ``dashboard`` to ``app``."""
