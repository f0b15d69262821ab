"""docs/dashboard.md stays true to the command: its option table names exactly the command's own options, with
their defaults; and the screenshot it shows exists."""

from __future__ import annotations

import inspect
import re

import typer.main

from sandbus.host.cli import dashboard_cmd
from tests.dashboard.stack import ROOT

DOC = ROOT / "docs" / "dashboard.md"


def test_the_option_table_matches_the_command() -> None:
    app = typer.Typer()
    dashboard_cmd.register(app)
    command = typer.main.get_command(app)
    documented = dict(re.findall(r"^\| `(--[a-z-]+)[^`]*` \| `?([^`|]*?)`? \|", DOC.read_text(), re.MULTILINE))
    # the command's own options (the connection options every command shares are documented once, elsewhere)
    names = set(inspect.signature(dashboard_cmd.dashboard.__wrapped__).parameters) - {"conn"}  # type: ignore[attr-defined]
    own = {p.opts[0]: p.default for p in command.params if p.name in names}
    assert set(documented) == set(own)
    for option, default in own.items():
        shown = documented[option]
        if default in (None, False):
            assert shown in ("none", "off"), option
        else:
            assert shown == f"{default:g}" if isinstance(default, float) else shown == str(default), option


def test_the_screenshot_is_there() -> None:
    assert "](img/dashboard.png)" in DOC.read_text()
    assert (DOC.parent / "img" / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
