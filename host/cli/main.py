"""The ``sandbus`` command line.

Exit codes are part of the interface (scripts branch on them): :data:`EXIT_CODES` is the table, printed
at the end of ``sandbus --help`` and in the README. Every command maps its failures onto it, and
:func:`main` makes sure nothing else reaches the user: a usage error is one line and exit 2, an error of
sandbus itself (a bug) is one line and exit 70, never a traceback (``SANDBUS_DEBUG=1`` shows it).

Starting fast matters for the client commands (``request``, ``pub``, ``ls``: one round trip to NATS):
:func:`main` imports only the module of the command being run (:data:`COMMAND_MODULES`), the modules
import what a command needs inside it, and typer converts plain option values without pydantic
(:func:`_use_plain_coercion`). Commands import the host side (wasmtime, the lifecycle) inside
their functions, after :func:`~sandbus.host.cli.extras.require_host`: registering every command, and
running the ones that only talk to NATS, needs nothing beyond ``pip install sandbus``; a command that runs
plugins, on an install without the ``host`` extra, exits 2 with one line naming it.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from sandbus.host.cli.output import TerminalFormatter, setup_logging, terminal_json, terminal_text
from sandbus.sdk.errors import (
    AbiViolationError,
    BusError,
    HostError,
    InvalidModuleError,
    ManifestError,
    PluginNotFoundError,
    PolicyError,
    RequestTimeoutError,
    ResourceLimitError,
    SandbusError,
    SecurityViolationError,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "COMMAND_MODULES",
    "EXIT_BUS",
    "EXIT_CODES",
    "EXIT_INTERNAL",
    "EXIT_LIMIT",
    "EXIT_NO_NODE",
    "EXIT_OK",
    "EXIT_PLUGIN",
    "EXIT_SECURITY",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "MAX_JSON_ARG_BYTES",
    "MODULES",
    "PLAIN_COERCION",
    "TerminalFormatter",
    "app",
    "exit_code_for",
    "fail",
    "finite_positive",
    "main",
    "read_json_arg",
    "register_commands",
    "setup_logging",
    "terminal_text",
]

EXIT_OK, EXIT_PLUGIN, EXIT_USAGE, EXIT_LIMIT, EXIT_SECURITY, EXIT_BUS, EXIT_NO_NODE, EXIT_TIMEOUT = range(8)
EXIT_INTERNAL = 70  # sysexits.h's EX_SOFTWARE

#: The exit codes, one line each: what a script can rely on.
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success"),
    (EXIT_PLUGIN, "the plugin failed (trapped, answered an error), or would be refused"),
    (EXIT_USAGE, "usage: a bad argument or input, or a request the node refused as wrong"),
    (EXIT_LIMIT, "a resource limit stopped the call (time, fuel, memory, size, rate...)"),
    (EXIT_SECURITY, "security: a capability not granted, or an artifact's signature refused"),
    (EXIT_BUS, "NATS unreachable (or the credentials refused), or the bus or node failed"),
    (EXIT_NO_NODE, "no node serves the plugin, or none answered `ls` (nothing ran)"),
    (EXIT_TIMEOUT, "no reply in time (the call may have run)"),
    (EXIT_INTERNAL, "an error of sandbus itself (a bug: SANDBUS_DEBUG=1 shows it)"),
)


def _exit_codes_help() -> str:
    # "\b" keeps click from rewrapping the table into one paragraph.
    return "\b\nExit codes:\n" + "\n".join(f"  {code:<3d} {text}" for code, text in EXIT_CODES)


#: Truth words of a boolean option given as text (an environment variable), as click reads them.
_TRUE_WORDS = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE_WORDS = frozenset({"0", "false", "f", "no", "n", "off", ""})
_PLAIN_TYPES: dict[type, str] = {str: "text", int: "integer", float: "number", bool: "boolean", Path: "path"}


def _use_plain_coercion() -> bool:
    """Convert the plain parameter types of the commands without pydantic; whether the hook is in place.

    typer 0.29 converts every parameter's value through a pydantic ``TypeAdapter`` built on first use: for
    a client command that is importing pydantic and building some twenty adapters, a third of its start.
    Values of type str, int, float and bool with no other constraint are converted here as click does,
    and paths by typer's own path checks (given a ``Path``, they need no pydantic); any other parameter (a
    choice, a list, a bounded number, a parser) keeps typer's conversion. This reaches into typer's
    internals: when they are not as expected, nothing is changed and typer converts everything itself,
    slower but the same (tests/host/test_cli_output.py checks that the hook is in place).
    """
    try:
        from typer._coercion import RuntimeParam
        from typer._param_types import coerce_cli_path
        from typer.core import _TyperParameter
    except ImportError:
        return False
    typers_own = getattr(_TyperParameter, "get_runtime_param", None)
    if typers_own is None or getattr(typers_own, "_sandbus_plain", False):
        return typers_own is not None

    class PlainParam(RuntimeParam):
        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            kind = self.annotation
            if kind is Path:
                return coerce_cli_path(value if isinstance(value, Path) else Path(value), self.parameter_info,
                                       path_type=Path, param=param, ctx=ctx)
            if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
                return value
            if kind is bool:
                word = value.strip().lower() if isinstance(value, str) else None
                if word in _TRUE_WORDS or word in _FALSE_WORDS:
                    return word in _TRUE_WORDS
            elif isinstance(value, str | int | float) and not isinstance(value, bool):
                try:
                    return kind(value)
                except (ValueError, OverflowError):
                    pass
            raise typer.BadParameter(f"{str(value)[:100]!r} is not a valid {_PLAIN_TYPES[kind]}",
                                     ctx=ctx, param=param)

    def get_runtime_param(self: Any) -> Any:
        if self._runtime_param is None and _is_plain(self):
            self._runtime_param = PlainParam(parameter_info=self.type_descriptor.parameter_info,
                                             annotation=self.type_descriptor.annotation)
        return typers_own(self)

    get_runtime_param._sandbus_plain = True  # type: ignore[attr-defined]
    _TyperParameter.get_runtime_param = get_runtime_param  # type: ignore[method-assign]
    return True


def _is_plain(param: Any) -> bool:
    """Whether typer's parameter ``param`` has one of :data:`_PLAIN_TYPES` and no constraint but a path's."""
    descriptor = getattr(param, "type_descriptor", None)
    info = getattr(descriptor, "parameter_info", None)
    return (descriptor is not None and info is not None and descriptor.annotation in _PLAIN_TYPES
            and descriptor.file_annotation is None and not param.multiple and param.nargs == 1
            and getattr(info, "parser", None) is None and getattr(info, "click_type", None) is None
            and getattr(info, "min", None) is None and getattr(info, "max", None) is None
            and not getattr(info, "clamp", False) and getattr(info, "path_type", None) is None)


PLAIN_COERCION = _use_plain_coercion()

app = typer.Typer(
    name="sandbus",
    help="Run untrusted WebAssembly plugins in wasmtime sandboxes, on host nodes that talk over NATS.",
    epilog=_exit_codes_help(),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Help texts are plain text: "[env NATS_URL]" is shown, not read as markup, and help needs no rich.
    rich_markup_mode=None,
    add_completion=True,
)


def exit_code_for(err: SandbusError, *, over_bus: bool = False) -> int:
    """The exit code of ``err``. ``over_bus``: it answers a request sent over NATS, where "not found" means
    that no node serves the plugin (:data:`EXIT_NO_NODE`), not a missing file or directory (usage)."""
    if isinstance(err, RequestTimeoutError):
        return EXIT_TIMEOUT
    if isinstance(err, BusError | HostError):  # the node's own failure is not the plugin's
        return EXIT_BUS
    if isinstance(err, SecurityViolationError):
        return EXIT_SECURITY
    if isinstance(err, ResourceLimitError):
        return EXIT_LIMIT
    if isinstance(err, PluginNotFoundError):
        return EXIT_NO_NODE if over_bus else EXIT_USAGE
    if err.code.startswith(("request.", "registry.", "deploy.")) or isinstance(
            err, InvalidModuleError | ManifestError | PolicyError):
        return EXIT_USAGE
    return EXIT_PLUGIN


def fail(message: str, code: int) -> NoReturn:
    """Print ``sandbus: message`` on stderr (escaped, continuation lines indented) and exit with ``code``."""
    typer.echo(f"sandbus: {terminal_text(message)}", err=True)
    raise typer.Exit(code)


def finite_positive(value: float | None) -> float | None:
    """Option callback: a number of seconds or MiB must be a finite number above zero (``nan`` and
    ``inf`` parse as floats, and only fail deep inside, as a traceback); anything else is a usage error."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"expected a finite number above 0, found {value}")
    return value


#: Most fuel a call can be given (wasmtime counts it in a signed 64-bit integer).
MAX_FUEL = 2**63 - 1


def _fuel_range(value: int | None) -> int | None:
    if value is not None and not 0 <= value <= MAX_FUEL:
        raise typer.BadParameter(f"expected 0 (unmetered) to {MAX_FUEL}, found {str(value)[:40]}")
    return value


#: Largest JSON argument (``--input``, ``--config``, payloads) read from the command line or stdin.
MAX_JSON_ARG_BYTES = 64 * 1024 * 1024


def read_json_arg(text: str, what: str, cap: int = MAX_JSON_ARG_BYTES, *, stdin: bool = True,
                  hint: str = "") -> bytes:
    """A JSON argument (``-`` reads stdin unless ``stdin`` is False), checked; bad JSON is a usage error
    naming ``what``, followed by ``hint`` (how to send the text as it is, where the command can: someone
    calling an Extism plugin typed bytes, and the message should say which option sends them).

    At most ``cap + 1`` bytes are ever read: an input over the cap is refused as bad input (exit 2)
    before it fills memory, however much stdin holds.
    """
    import orjson

    raw = sys.stdin.buffer.read(cap + 1) if stdin and text == "-" else text.encode(errors="surrogateescape")
    if len(raw) > cap:
        fail(f"{what} is larger than the {cap}-byte input cap", EXIT_USAGE)
    raw = raw.strip()  # the newline `echo` ends a file with is not part of the value
    from sandbus.sdk.jsonbound import MAX_JSON_DEPTH, too_deep

    try:
        decoded = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        fail(f"{what} is not valid JSON: {e}{hint}", EXIT_USAGE)
    if too_deep(raw, decoded):
        fail(f"{what} nests deeper than {MAX_JSON_DEPTH} levels", EXIT_USAGE)
    return raw


def run(
    plugin: Annotated[Path, typer.Argument(help="The plugin's .wasm file.")],
    function: Annotated[str, typer.Option("--function", "-f", help="Exported function to call.")] = "handle_request",
    input_: Annotated[str, typer.Option("--input", "-i", help="Request JSON, or - to read stdin.")] = "{}",
    data_file: Annotated[str | None, typer.Option(
        "--data-file", "-d", metavar="FILE", show_default=False,
        help="Input: FILE's bytes as they are (- for stdin), for a plugin whose input is bytes (Extism).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Input: --input's bytes as they are, not checked as JSON.")]
    = False,
    memory_mb: Annotated[float | None, typer.Option(help="Linear memory limit, MiB.", callback=finite_positive)]
    = None,
    fuel: Annotated[int | None, typer.Option(help="Fuel per call (~1 unit per instruction); 0 = unmetered.",
                                             callback=_fuel_range)] = None,
    timeout: Annotated[float | None, typer.Option(help="Wall-clock limit per call, seconds.",
                                                  callback=finite_positive)] = None,
    allow_read: Annotated[list[Path] | None, typer.Option(help="Grant read access to DIR.")] = None,
    allow_write: Annotated[list[Path] | None, typer.Option(help="Grant read/write access to DIR.")] = None,
    allow_env: Annotated[list[str] | None, typer.Option(help="Pass host variable NAME to the plugin.")] = None,
    allow_clock: Annotated[bool, typer.Option(help="Grant the clock.")] = False,
    allow_random: Annotated[bool, typer.Option(help="Grant random bytes.")] = False,
    config: Annotated[str, typer.Option(
        help="JSON object handed to the plugin's init (an Extism plugin: what config_get reads).")] = "{}",
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="Show plugin logs (-vv: debug).")] = 0,
    debug: Annotated[bool, typer.Option(
        "--debug", help="Compile with debug info for gdb/lldb (unoptimised; run this command under the debugger).")]
    = False,
    record: Annotated[Path | None, typer.Option(
        "--record", metavar="FILE", help="Write the call's record to FILE, to run it again with sandbus replay.")]
    = None,
) -> None:
    """Load PLUGIN, call FUNCTION with the input JSON, print the reply JSON.

    With --debug the plugin's code is registered with a native debugger: run the command under gdb
    (``gdb --args python -m sandbus run --debug ...``) and break on a function of the plugin's source.
    With --record FILE the call is recorded (its input, limits, grants and every host result it received),
    however it ends: ``sandbus replay FILE`` runs it again, the same way, offline.

    An Extism plugin takes bytes (--data-file, --raw, or --input's JSON text) and its output is written as
    it is to a pipe or file, with control bytes escaped on a terminal.
    """
    from sandbus.host.cli.extras import require_host

    require_host("run")
    import orjson

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
    if debug:
        overrides["debug_info"] = True
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
        fail(f"invalid option: {_plain_error(e)}", EXIT_USAGE)
    # Read before loading (a refused input costs no compile), and never more than the plugin would take.
    if data_file is not None or raw:
        from sandbus.host.cli.bus import read_bytes_arg

        if data_file is not None and raw:
            fail("--data-file and --raw are two ways to give the input: use one", EXIT_USAGE)
        source = data_file if data_file is not None else input_
        if source == "-" or data_file is not None:
            payload = read_bytes_arg(source, "--data-file" if data_file is not None else "--input",
                                     cap=limits.max_input_bytes)
        else:
            payload = input_.encode(errors="surrogateescape")
    else:
        payload = read_json_arg(input_, "--input", cap=limits.max_input_bytes,
                                hint=" (--raw passes it as bytes, to a plugin whose input is bytes: Extism)")
    try:
        sandbox = Sandbox(plugin, limits=limits, capabilities=caps, config=settings, record_calls=record is not None)
    except (AbiViolationError, PluginNotFoundError) as e:
        fail(str(e), EXIT_USAGE)  # at load, a module without our ABI is an invalid module; no file, a bad path
    except SandbusError as e:
        fail(str(e), exit_code_for(e))
    if debug:
        _note_without_dwarf(plugin)
    try:
        with sandbox:
            # A function the module does not export is a mistake on the command line, not the plugin's.
            # (A component takes every name through its one entry point and answers an unknown one itself.)
            if sandbox.kind != "component" and function not in sandbox.functions:
                fail(f"plugin {sandbox.name!r} has no function {function!r}; exported functions: "
                     f"{', '.join(sandbox.functions) or 'none'}", EXIT_USAGE)
            try:
                reply = sandbox.call_bytes(function, payload)
            finally:
                if record is not None:
                    _write_record(sandbox, record, plugin)
            body = getattr(sandbox, "body", "json")
    except SandbusError as e:
        fail(str(e), exit_code_for(e))
    if body == "bytes":  # an Extism plugin's output: bytes, not checked as JSON by anyone
        from sandbus.host.cli.bus import write_reply
        from sandbus.sdk.envelope import OCTET_STREAM

        write_reply(reply, OCTET_STREAM, False)
        return
    decoded = orjson.loads(reply)  # the sandbox validated it
    sys.stdout.buffer.write(terminal_json(reply) + b"\n")
    sys.stdout.flush()
    if isinstance(decoded, dict) and decoded.get("success") is False:
        raise typer.Exit(EXIT_PLUGIN)


#: Bytes of a module read to look for its debug info (the sandbox has loaded it: it is no larger).
MAX_DWARF_SCAN_BYTES = 512 * 1024 * 1024


def _note_without_dwarf(plugin: Path) -> None:
    """Say once on stderr when ``plugin`` has no DWARF (no ``.debug_info`` custom section): compiled
    with debug info or not, its code then maps to no source line, and a breakpoint set on it never hits."""
    try:
        with plugin.open("rb") as f:
            wasm = f.read(MAX_DWARF_SCAN_BYTES)
    except OSError:
        return
    from sandbus.host.sandbox.wasmscan import MalformedWasm, scan_wasm

    try:
        debug_info = scan_wasm(wasm).debug_info
    except MalformedWasm:
        return  # nothing is said about a module that cannot be read: loading it says what is wrong
    if not debug_info:
        typer.echo(f"sandbus: note: {terminal_text(str(plugin))} has no debug info (DWARF), so breakpoints on its "
                   "source never hit: build it with -g, e.g. `[build] optimize = false` in its manifest "
                   "(sandbus build compiles it with -O0 -g)", err=True)


def _write_record(sandbox: Any, path: Path, plugin: Path) -> None:
    """Write the record of ``sandbox``'s last call to ``path`` (a new file of mode 0600: it holds the input)."""
    made = sandbox.last_record
    if made is None:
        return  # refused before the guest ran: nothing to replay
    made.module = str(plugin.resolve())
    from sandbus.host.sandbox.record import save_record

    try:
        save_record(made, path)
    except OSError as e:
        fail(f"cannot write the record {path}: {e.strerror}", EXIT_USAGE)
    typer.echo(f"recorded the call in {path}", err=True)


def _plain_error(e: ValueError) -> str:
    """A validation error in one line, without a library's own wording around it (pydantic's URL...)."""
    errors = getattr(e, "errors", None)
    if not callable(errors):
        return str(e)
    return "; ".join(f"{'.'.join(map(str, d.get('loc', ())))}: {d.get('msg', '')}" for d in errors())


def _version(value: bool) -> None:
    if value:
        from sandbus import __version__

        typer.echo(f"sandbus {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version of sandbus and exit.",
                                          callback=_version, is_eager=True, expose_value=False)] = False,
) -> None:
    """sandbus: WebAssembly plugins over NATS."""


#: command -> the module of this package that defines it. To run a command, :func:`main` imports its
#: module only (a client command then never loads what ``node`` or ``build`` need); for anything else
#: (help, completion, an unknown name) it imports them all. A command missing here still works, slower.
COMMAND_MODULES: dict[str, str] = {
    "node": "node_cmd",
    "request": "bus",
    "pub": "bus",
    "ls": "bus",
    "trace": "trace_cmd",
    "new": "author",
    "build": "author",
    "inspect": "author",
    "dev": "dev",
    "keygen": "registry_cmd",
    "push": "registry_cmd",
    "search": "registry_cmd",
    "pull": "registry_cmd",
    "install": "registry_cmd",
    "deploy": "cluster_cmd",
    "status": "cluster_cmd",
    "undeploy": "cluster_cmd",
    "logs": "debug_cmd",
    "debug": "debug_cmd",
    "dashboard": "dashboard_cmd",
    "replay": "replay_cmd",
}
#: Every module with commands, in the order ``sandbus --help`` lists them.
MODULES = ("node_cmd", "bus", "registry_cmd", "cluster_cmd", "trace_cmd", "debug_cmd", "dashboard_cmd", "author", "dev",
           "replay_cmd")
_registered: set[str] = set()


def register_commands(args: Sequence[str]) -> None:
    """Add to :data:`app` the commands ``args`` may run: the named command (with the others of its module),
    or every command. typer builds every registered command's options before it runs one: registering
    only what runs keeps that to the command's own."""
    name = next((a for a in args if not a.startswith("-")), None)
    only: str | None = None
    if name in ("run", "plugins"):
        units = [name]
    elif name is not None and name in COMMAND_MODULES:
        units, only = [COMMAND_MODULES[name]], name
    else:
        units = ["run", *MODULES, "plugins"]
    for unit in units:
        if unit in _registered:
            continue
        _registered.add(unit)
        if unit == "run":
            app.command()(run)
        elif unit == "plugins":
            from sandbus.host.cli.plugins import plugins_app

            app.add_typer(plugins_app, name="plugins")
        else:
            register = importlib.import_module(f"sandbus.host.cli.{unit}").register
            # A module's register() may take ``only``: the one command to add.
            if only is not None and "only" in inspect.signature(register).parameters:
                register(app, only=only)
            else:
                register(app)


#: click's exception base class, found through the click exception typer exports (typer vendors click).
_CLICK_EXCEPTION: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _usage_line(e: Any) -> str:
    """A click usage error as one line, with where to read more."""
    ctx = getattr(e, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    message = str(e.format_message()).strip().rstrip(".")
    return f"sandbus: {terminal_text(message)}{hint}"


def _cut(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def main(args: Sequence[str] | None = None) -> NoReturn:
    """The ``sandbus`` console script: run the command, exit with its code; no traceback reaches the user."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        register_commands(argv)
        code = app(args=argv, prog_name="sandbus", standalone_mode=False)
    except KeyboardInterrupt:
        code = 130
    except _CLICK_EXCEPTION as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `sandbus` alone, `sandbus plugins`: the help
            e.show()  # type: ignore[attr-defined]
        else:
            typer.echo(_usage_line(e), err=True)
        code = EXIT_USAGE
    except typer.Abort:
        typer.echo("sandbus: aborted", err=True)
        code = 130
    except SandbusError as e:  # a command let one through: still one line and its code
        typer.echo(f"sandbus: {terminal_text(str(e))}", err=True)
        code = exit_code_for(e)
    except OSError as e:
        if e.filename is None or os.environ.get("SANDBUS_DEBUG"):
            raise
        # A file named on the command line that cannot be used (name too long, no permission...): bad input.
        typer.echo(f"sandbus: {terminal_text(_cut(str(e.filename)))}: {e.strerror or e}", err=True)
        code = EXIT_USAGE
    except Exception as e:
        if os.environ.get("SANDBUS_DEBUG"):
            raise
        typer.echo(f"sandbus: internal error: {terminal_text(_cut(f'{type(e).__name__}: {e}'))} "
                   "(SANDBUS_DEBUG=1 shows the traceback; please report it)", err=True)
        code = EXIT_INTERNAL
    sys.exit(code if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":
    main()
