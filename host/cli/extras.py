"""The CLI's host commands on a client-only install: one line naming the extra to install, exit 2.

``sandbus request``, ``pub``, ``ls`` and ``trace`` only talk to NATS and run from ``pip install sandbus``;
the commands that load plugins (``run``, ``node``, ``plugins check``, ``new``, ``build``, ``inspect``) call
:func:`require_host` before they import anything of the host side, so a missing extra is a usage error
with the command to fix it, never a traceback from deep inside an import.
"""

from __future__ import annotations

import typer

from sandbus._extras import HOST_BINARIES, INSTALL_HOST, missing_host_modules
from sandbus.host.cli.output import terminal_text
from sandbus.sdk.errors import BusError

__all__ = ["EXIT_USAGE", "require_host", "require_nats_server"]

EXIT_USAGE = 2


def _needs_host(what: str, detail: str) -> typer.Exit:
    typer.echo(terminal_text(f"sandbus: {what} needs the host extra: {INSTALL_HOST} ({detail})"), err=True)
    return typer.Exit(EXIT_USAGE)


def require_host(command: str) -> None:
    """Return if the host extra's modules are importable; else say so and exit 2."""
    missing = missing_host_modules()
    if missing:
        raise _needs_host(f"`sandbus {command}`", f"not installed: {', '.join(missing)}")


def require_nats_server(command: str) -> None:
    """Return if a ``nats-server`` executable is found (beside this interpreter, else on PATH); else say so
    and exit 2. Only a node that embeds its NATS server needs one."""
    from sandbus.bus.server import nats_server_binary

    try:
        nats_server_binary()
    except BusError:
        names = ", ".join(f"{exe} (from {dist})" for exe, dist in HOST_BINARIES.items())
        raise _needs_host(f"`sandbus {command}` without --nats", f"not found: {names}") from None
