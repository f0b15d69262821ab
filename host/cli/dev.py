"""``sandbus dev``: build a plugin project, serve it on an embedded bus, rebuild and hot-reload on every change."""

from __future__ import annotations

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Register ``sandbus dev``."""
