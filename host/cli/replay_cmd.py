"""``sandbus replay FILE``: run a recorded call again, offline (host/sandbox/record.py, host/sandbox/replay.py).

The record file is bounded and validated before anything runs; the module must be the recorded one
(sha256). What the replayed call prints is what ``sandbus run`` prints (its reply, or its error), then one
line on stderr saying whether it ended as the recorded call did. Exit codes: those of ``sandbus run`` for
the call's outcome when it is the recorded one; 1 when the replay diverged or ended otherwise; 2 when the
record file cannot be read or is not a valid record.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from sandbus.host.cli.main import EXIT_PLUGIN, EXIT_USAGE, exit_code_for, fail, finite_positive, setup_logging
from sandbus.host.cli.output import terminal_json, terminal_text

__all__ = ["register", "replay"]


def replay(
    record_file: Annotated[Path, typer.Argument(metavar="FILE", help="A record (sandbus run --record, or a node's).")],
    module: Annotated[Path | None, typer.Option(
        "--module", "-m", help="The plugin's .wasm file (default: where the record says it was loaded from).")]
    = None,
    debug: Annotated[bool, typer.Option(
        "--debug", help="Compile with debug info for gdb/lldb (run this command under the debugger).")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="Show plugin logs (-vv: debug).")] = 0,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", metavar="SECONDS", callback=finite_positive,
        help="The call's timeout (default: the recorded one, at most 60 s); give room to step in gdb.")] = None,
) -> None:
    """Run a recorded call again, offline: the same input, limits and host results, the same outcome."""
    from sandbus.host.cli.extras import require_host

    require_host("replay")
    from sandbus.host.sandbox.record import ReplayDivergenceError, load_record
    from sandbus.host.sandbox.replay import replay as run_replay
    from sandbus.sdk.errors import PluginNotFoundError, SandbusError

    setup_logging(verbose)
    try:
        record = load_record(record_file)
    except SandbusError as e:  # an unreadable or invalid file is the caller's mistake: a usage error
        fail(str(e), EXIT_USAGE)
    try:
        outcome = run_replay(record, module, debug=debug, timeout_s=timeout)
    except PluginNotFoundError as e:
        fail(str(e), EXIT_USAGE)
    except SandbusError as e:
        fail(str(e), exit_code_for(e))
    if outcome.error is not None:
        typer.echo(f"sandbus: {terminal_text(str(outcome.error))}", err=True)
    elif outcome.reply is not None:
        sys.stdout.buffer.write(terminal_json(outcome.reply) + b"\n")
        sys.stdout.flush()
    if record.earlier_calls:
        # Said whatever the outcome: a reproduced ending may still rest on state the replay lacks.
        typer.echo(f"replay: note: the recorded instance had served {record.earlier_calls} call(s) before this one; "
                   "what they left in its memory is not in the record (the replay starts from a fresh instance)",
                   err=True)
    dirs = record.capabilities.get("dirs") or []
    if dirs:
        shown = ", ".join(terminal_text(str(d)) for d in dirs[:5])
        typer.echo(f"replay: note: the recorded call was granted directories ({shown}); a replay grants none, "
                   "and what the plugin read from them is not in the record", err=True)
    recorded = record.recorded_error()
    # The recorded error is the record's text (a file from elsewhere): printed inert.
    was = terminal_text(f"{recorded.code}: {recorded.message}") if recorded is not None else "a reply"
    if isinstance(outcome.error, ReplayDivergenceError):
        typer.echo(f"replay: diverged from the record (which ended with {was})", err=True)
        raise typer.Exit(EXIT_PLUGIN)
    if not outcome.reproduced:
        typer.echo(f"replay: ended otherwise than the record, which ended with {was}", err=True)
        raise typer.Exit(EXIT_PLUGIN)
    typer.echo(f"replay: reproduced the recorded outcome ({was})", err=True)
    if outcome.error is not None:
        raise typer.Exit(exit_code_for(outcome.error))


def register(app: typer.Typer, only: str | None = None) -> None:
    """Add ``replay`` to ``app``."""
    app.command()(replay)
