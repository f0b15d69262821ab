"""The ``sandbus`` command line.

Exit codes are part of the interface (scripts branch on them):
0 success; 1 the plugin trapped or reported an error; 2 bad usage or bad input
(unreadable file, invalid JSON, invalid module, a function the module does not export, an input
above its cap); 3 a resource limit was hit;
4 a security violation; 5 NATS could not be reached (or the bus failed).

Commands import the host side (wasmtime, the lifecycle) inside their functions, after
:func:`~sandbus.host.cli.extras.require_host`: registering every command, and running the ones that only
talk to NATS, needs nothing beyond ``pip install sandbus``; a command that runs plugins, on an install
without the ``host`` extra, exits 2 with one line naming it.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer

from sandbus.host.cli.extras import require_host
from sandbus.host.cli.output import TerminalFormatter, setup_logging, terminal_json, terminal_text
from sandbus.host.cli.plugins import plugins_app
from sandbus.sdk.errors import (
    AbiViolationError,
    BusError,
    InvalidModuleError,
    ManifestError,
    PluginNotFoundError,
    PolicyError,
    ResourceLimitError,
    SandbusError,
    SecurityViolationError,
)

__all__ = [
    "EXIT_BUS",
    "EXIT_LIMIT",
    "EXIT_OK",
    "EXIT_PLUGIN",
    "EXIT_SECURITY",
    "EXIT_USAGE",
    "MAX_JSON_ARG_BYTES",
    "TerminalFormatter",
    "app",
    "exit_code_for",
    "finite_positive",
    "main",
    "read_json_arg",
    "setup_logging",
    "terminal_text",
]

EXIT_OK, EXIT_PLUGIN, EXIT_USAGE, EXIT_LIMIT, EXIT_SECURITY, EXIT_BUS = 0, 1, 2, 3, 4, 5

app = typer.Typer(
    name="sandbus",
    help="Run untrusted WebAssembly plugins in wasmtime sandboxes, on host nodes that talk over NATS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(plugins_app, name="plugins")


def exit_code_for(err: SandbusError) -> int:
    if isinstance(err, BusError):
        return EXIT_BUS
    if isinstance(err, SecurityViolationError):
        return EXIT_SECURITY
    if isinstance(err, ResourceLimitError):
        return EXIT_LIMIT
    if isinstance(err, InvalidModuleError | PluginNotFoundError | ManifestError | PolicyError):
        return EXIT_USAGE
    return EXIT_PLUGIN


def fail(message: str, code: int) -> NoReturn:
    typer.echo(f"sandbus: {terminal_text(message)}", err=True)
    raise typer.Exit(code)


def finite_positive(value: float | None) -> float | None:
    """Option callback: a number of seconds or MiB must be a finite number above zero (``nan`` and
    ``inf`` parse as floats, and only fail deep inside, as a traceback); anything else is a usage error."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"expected a finite number above 0, found {value}")
    return value


#: Largest JSON argument (``--input``, ``--config``, payloads) read from the command line or stdin.
MAX_JSON_ARG_BYTES = 64 * 1024 * 1024


def read_json_arg(text: str, what: str, cap: int = MAX_JSON_ARG_BYTES, *, stdin: bool = True) -> bytes:
    """A JSON argument (``-`` reads stdin unless ``stdin`` is False), checked; bad JSON is a usage error
    naming ``what``.

    At most ``cap + 1`` bytes are ever read: an input over the cap is refused as bad input (exit 2)
    before it fills memory, however much stdin holds.
    """
    raw = sys.stdin.buffer.read(cap + 1) if stdin and text == "-" else text.encode()
    if len(raw) > cap:
        fail(f"{what} is larger than the {cap}-byte input cap", EXIT_USAGE)
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        fail(f"{what} is not valid JSON: {e}", EXIT_USAGE)
    return raw


@app.command()
def run(
    plugin: Annotated[Path, typer.Argument(help="The plugin's .wasm file.")],
    function: Annotated[str, typer.Option("--function", "-f", help="Exported function to call.")] = "handle_request",
    input_: Annotated[str, typer.Option("--input", "-i", help="Request JSON, or - to read stdin.")] = "{}",
    memory_mb: Annotated[float | None, typer.Option(help="Linear memory limit, MiB.", callback=finite_positive)]
    = None,
    fuel: Annotated[int | None, typer.Option(help="Fuel per call (~1 unit per instruction); 0 = unmetered.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Wall-clock limit per call, seconds.",
                                                  callback=finite_positive)] = None,
    allow_read: Annotated[list[Path] | None, typer.Option(help="Grant read access to DIR.")] = None,
    allow_write: Annotated[list[Path] | None, typer.Option(help="Grant read/write access to DIR.")] = None,
    allow_env: Annotated[list[str] | None, typer.Option(help="Pass host variable NAME to the plugin.")] = None,
    allow_clock: Annotated[bool, typer.Option(help="Grant the clock.")] = False,
    allow_random: Annotated[bool, typer.Option(help="Grant random bytes.")] = False,
    config: Annotated[str, typer.Option(help="JSON object handed to the plugin's init.")] = "{}",
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="Show plugin logs (-vv: debug).")] = 0,
) -> None:
    """Load PLUGIN, call FUNCTION with the input JSON, print the reply JSON."""
    require_host("run")
    from sandbus.host.lifecycle.manifest import check_env_name
    from sandbus.host.sandbox import MIB, Capabilities, DirGrant, Limits, Sandbox

    setup_logging(verbose)
    settings: Any = orjson.loads(read_json_arg(config, "--config", stdin=False))
    if not isinstance(settings, dict):
        fail("--config must be a JSON object", EXIT_USAGE)
    for name in allow_env or []:
        try:
            check_env_name(name)
        except ValueError as e:
            fail(f"invalid option --allow-env: {e}", EXIT_USAGE)
    overrides: dict[str, Any] = {}
    if memory_mb is not None:
        overrides["memory_bytes"] = int(memory_mb * MIB)
    if fuel is not None:
        overrides["fuel"] = fuel or None
    if timeout is not None:
        overrides["timeout_s"] = timeout
    for d in [*(allow_read or []), *(allow_write or [])]:
        if not d.is_dir():
            fail(f"cannot grant {d}: not a directory", EXIT_USAGE)
    try:
        limits = Limits(**overrides)
        caps = Capabilities(
            dirs=tuple(DirGrant(host=d) for d in allow_read or [])
            + tuple(DirGrant(host=d, writable=True) for d in allow_write or []),
            env=Capabilities.env_from_host(allow_env or []),
            env_unset=frozenset(n for n in allow_env or [] if n not in os.environ),
            clock=allow_clock,
            random=allow_random,
        )
    except ValueError as e:
        fail(f"invalid option: {e}", EXIT_USAGE)
    # Read before loading (a refused input costs no compile), and never more than the plugin would take.
    payload = read_json_arg(input_, "--input", cap=limits.max_input_bytes)
    try:
        sandbox = Sandbox(plugin, limits=limits, capabilities=caps, config=settings)
    except AbiViolationError as e:
        fail(str(e), EXIT_USAGE)  # at load, a module without our ABI is an invalid module
    except SandbusError as e:
        fail(str(e), exit_code_for(e))
    try:
        with sandbox:
            # A function the module does not export is a mistake on the command line, not the plugin's.
            # (A component takes every name through its one entry point and answers an unknown one itself.)
            if sandbox.kind == "module" and function not in sandbox.functions:
                fail(f"plugin {sandbox.name!r} has no function {function!r}; exported functions: "
                     f"{', '.join(sandbox.functions) or 'none'}", EXIT_USAGE)
            reply = sandbox.call_bytes(function, payload)
    except SandbusError as e:
        fail(str(e), exit_code_for(e))
    decoded = orjson.loads(reply)  # the sandbox validated it
    sys.stdout.buffer.write(terminal_json(reply) + b"\n")
    sys.stdout.flush()
    if isinstance(decoded, dict) and decoded.get("success") is False:
        raise typer.Exit(EXIT_PLUGIN)


@app.callback()
def _root() -> None:
    """sandbus: WebAssembly plugins over NATS."""


def main() -> None:
    from sandbus.host.cli import author, bus, dev, node_cmd, trace_cmd

    for module in (node_cmd, bus, trace_cmd, author, dev):
        module.register(app)
    app()


if __name__ == "__main__":
    main()
