"""The ``sandbus`` command line.

Exit codes are part of the interface (scripts branch on them):
0 success; 1 the plugin trapped or reported an error; 2 bad usage or bad input
(unreadable file, invalid JSON, invalid module); 3 a resource limit was hit;
4 a security violation.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer

from sdk.errors import (
    AbiViolationError,
    InvalidModuleError,
    ManifestError,
    PluginNotFoundError,
    PolicyError,
    ResourceLimitError,
    SandbusError,
    SecurityViolationError,
)

from .cli_plugins import plugins_app
from .sandbox import MIB, Capabilities, DirGrant, Limits, Sandbox

__all__ = [
    "EXIT_LIMIT",
    "EXIT_OK",
    "EXIT_PLUGIN",
    "EXIT_SECURITY",
    "EXIT_USAGE",
    "app",
    "exit_code_for",
    "main",
    "read_json_arg",
    "setup_logging",
]

EXIT_OK, EXIT_PLUGIN, EXIT_USAGE, EXIT_LIMIT, EXIT_SECURITY = 0, 1, 2, 3, 4

app = typer.Typer(
    name="sandbus",
    help="Run untrusted WebAssembly plugins in wasmtime sandboxes, on host nodes that talk over NATS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(plugins_app, name="plugins")


def exit_code_for(err: SandbusError) -> int:
    if isinstance(err, SecurityViolationError):
        return EXIT_SECURITY
    if isinstance(err, ResourceLimitError):
        return EXIT_LIMIT
    if isinstance(err, InvalidModuleError | PluginNotFoundError | ManifestError | PolicyError):
        return EXIT_USAGE
    return EXIT_PLUGIN


def fail(message: str, code: int) -> NoReturn:
    typer.echo(f"sandbus: {message}", err=True)
    raise typer.Exit(code)


def read_json_arg(text: str, what: str) -> bytes:
    """A JSON argument (``-`` reads stdin), checked; bad JSON is a usage error naming ``what``."""
    raw = sys.stdin.buffer.read() if text == "-" else text.encode()
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        fail(f"{what} is not valid JSON: {e}", EXIT_USAGE)
    return raw


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def run(
    plugin: Annotated[Path, typer.Argument(help="The plugin's .wasm file.")],
    function: Annotated[str, typer.Option("--function", "-f", help="Exported function to call.")] = "handle_request",
    input_: Annotated[str, typer.Option("--input", "-i", help="Request JSON, or - to read stdin.")] = "{}",
    memory_mb: Annotated[float | None, typer.Option(help="Linear memory limit, MiB.")] = None,
    fuel: Annotated[int | None, typer.Option(help="Fuel per call (~1 unit per instruction); 0 = unmetered.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Wall-clock limit per call, seconds.")] = None,
    allow_read: Annotated[list[Path] | None, typer.Option(help="Grant read access to DIR.")] = None,
    allow_write: Annotated[list[Path] | None, typer.Option(help="Grant read/write access to DIR.")] = None,
    allow_env: Annotated[list[str] | None, typer.Option(help="Pass host variable NAME to the plugin.")] = None,
    allow_clock: Annotated[bool, typer.Option(help="Grant the clock.")] = False,
    allow_random: Annotated[bool, typer.Option(help="Grant random bytes.")] = False,
    config: Annotated[str, typer.Option(help="JSON object handed to the plugin's init.")] = "{}",
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="Show plugin logs (-vv: debug).")] = 0,
) -> None:
    """Load PLUGIN, call FUNCTION with the input JSON, print the reply JSON."""
    setup_logging(verbose)
    payload = read_json_arg(input_, "--input")
    try:
        settings: Any = orjson.loads(config)
    except orjson.JSONDecodeError as e:
        fail(f"--config is not valid JSON: {e}", EXIT_USAGE)
    if not isinstance(settings, dict):
        fail("--config must be a JSON object", EXIT_USAGE)
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
    try:
        sandbox = Sandbox(plugin, limits=limits, capabilities=caps, config=settings)
    except AbiViolationError as e:
        fail(str(e), EXIT_USAGE)  # at load, a module without our ABI is an invalid module
    except SandbusError as e:
        fail(str(e), exit_code_for(e))
    try:
        with sandbox:
            reply = sandbox.call_bytes(function, payload)
    except SandbusError as e:
        fail(str(e), exit_code_for(e))
    sys.stdout.buffer.write(reply + b"\n")
    sys.stdout.flush()
    decoded = orjson.loads(reply)
    if isinstance(decoded, dict) and decoded.get("success") is False:
        raise typer.Exit(EXIT_PLUGIN)


@app.callback()
def _root() -> None:
    """sandbus: WebAssembly plugins over NATS."""


def main() -> None:
    from .cli_author import register as register_author
    from .cli_bus import register

    register(app)
    register_author(app)
    app()


if __name__ == "__main__":
    main()
