"""``sandbus dev``: build a plugin project, serve it on an embedded bus, rebuild and hot-reload on every change.

One process holds the whole loop: an embedded ``nats-server`` (JetStream, loopback, a free port), a node
serving the project's ``build/`` directory, and a watcher of the project's sources whose every settled
change runs :class:`~sandbus.host.authoring.devloop.DevLoop` (``sandbus build``'s code path, then the
node's hot reload). Stopping (Ctrl-C, SIGTERM) stops the watcher, drains the node and stops the server
by its PID, each wait bounded, so nothing outlives the command; the one exception is a compiler that a
SIGTERM finds more than a second into a build: it finishes on its own (a Ctrl-C in the terminal reaches
it too, and stops it).

Exit codes follow :mod:`sandbus.host.cli.main`: 0 after Ctrl-C or SIGTERM; 2 not a project, an invalid
``--policy``, a ``--port`` in use or a missing toolchain (the build's own message); 5 the embedded server
could not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from sandbus.host.cli.extras import require_host, require_nats_server
from sandbus.host.cli.main import EXIT_USAGE, exit_code_for, fail
from sandbus.host.cli.output import PLUGIN_LOGGER_PREFIX, TerminalFormatter, terminal_text
from sandbus.sdk.errors import PolicyError, SandbusError

if TYPE_CHECKING:
    from sandbus.bus.server import NatsServer
    from sandbus.host.authoring import Project
    from sandbus.host.authoring.devloop import DevLoop, Rebuild
    from sandbus.host.lifecycle import PluginManager
    from sandbus.host.lifecycle.policy import Policy
    from sandbus.host.node.node import Node
    from sandbus.host.sandbox import AuditEvent

__all__ = ["call_hint", "dev", "register"]

#: How a client command names the server (as the ``nats`` tools do; NATS_URL works too).
SERVER_FLAG = "-s"
#: The project file used as the policy when there is one and ``--policy`` is not given.
PROJECT_POLICY = "policy.toml"
#: Bounds of each stopping step, seconds, ~2 s in all. A build in progress gets the first: a C build is done
#: by then, and a compiler is not left running behind us (a Ctrl-C in the terminal stops it anyway).
_STOP_WATCHER_S, _STOP_NODE_S, _STOP_MANAGER_S, _STOP_SERVER_S = 1.0, 0.5, 0.2, 0.5
#: How often the plugin's counters are read for calls that failed.
_POLL_S = 0.2
#: Most error lines (audit events and failed calls) and plugin log lines a second; beyond, they are counted.
_MAX_EVENT_LINES = 20
_MAX_LOG_LINES = 200
#: Audit events about loading, which the rebuild line reports itself.
_LOAD_KINDS = ("lifecycle.", "policy.refused", "module.refused")


class _Out:
    """Lines to stdout, whole, from the watcher's thread and the event loop alike."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_failure: str | None = None

    def say(self, text: str, *, err: bool = False) -> None:
        with self._lock:
            typer.echo(text, err=err)

    def stamp(self) -> str:
        return time.strftime("%H:%M:%S")

    def failure(self, line: str, detail: str) -> None:
        """A failed rebuild: its line, then why, indented; the same why as the last failure is not repeated."""
        detail = terminal_text(detail.strip())
        with self._lock:
            repeated, self._last_failure = detail == self._last_failure, detail
        if repeated:
            self.say(f"{self.stamp()} {line.rstrip(':')} (the same error as above)")
        else:
            self.say(f"{self.stamp()} {line}\n  {detail}")

    def success(self, line: str) -> None:
        with self._lock:
            self._last_failure = None
        self.say(f"{self.stamp()} {line}")


def dev(
    directory: Annotated[Path, typer.Argument(help="The plugin project (default: here).", metavar="DIR")]
    = Path("."),
    policy: Annotated[Path | None, typer.Option(
        help="Operator policy TOML to serve the plugin under. Default: the project's policy.toml if it has one, "
             "else a development policy granting exactly what the manifest asks for (its capabilities, "
             "directories under build/data, variables, hosts, topics, resources), nothing more: "
             "non-public addresses stay refused; environment variables only with --pass-env. That suits your "
             "own plugin: for one whose manifest you did not write, pass a policy.")] = None,
    pass_env: Annotated[list[str] | None, typer.Option(
        "--pass-env", metavar="NAME",
        help="Under the development policy, give the plugin this host environment variable if its manifest "
             "asks for it (repeatable). Nothing of your environment is passed without it.")] = None,
    port: Annotated[int | None, typer.Option(
        help="Port of the embedded nats-server on 127.0.0.1 (default: a free one).", min=1, max=65535)] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="Show the build's steps and the node's log (-vv: debug).")] = 0,
) -> None:
    """Build DIR, serve it on an embedded bus, rebuild and hot-reload on every change; show its log.

    Each save of a source or of the manifest rebuilds it and prints one line: the build's result and
    time, and whether the node reloaded it. A build that fails, or a module the node refuses, leaves the
    previous version serving. Ctrl-C stops everything.
    """
    require_host("dev")
    require_nats_server("dev")
    from sandbus.host.authoring import AuthoringError, ToolchainMissingError, build_project, detect_project
    from sandbus.host.lifecycle.policy import load_policy

    try:
        project = detect_project(directory)
    except AuthoringError as e:
        fail(e.message, EXIT_USAGE)
    fixed: Policy | None = None
    policy_file = policy if policy is not None else project.root / PROJECT_POLICY
    if policy is not None or policy_file.is_file():
        try:
            fixed = load_policy(policy_file)
        except PolicyError as e:
            fail(str(e), EXIT_USAGE)
    if port is not None and not _port_free(port):
        fail(f"port {port} of 127.0.0.1 is in use: choose another --port, or leave it out for a free one", EXIT_USAGE)
    _setup_logging(verbose)
    out = _Out()
    out.say(f"sandbus dev: {project.name} ({project.language.value}) in {terminal_text(str(project.root))}")

    def progress(line: str) -> None:
        if verbose:
            out.say(f"  • {terminal_text(line)}")

    # Until the event loop takes the signals over, SIGTERM stops like Ctrl-C (through KeyboardInterrupt), so
    # whatever was started is stopped by the finally below.
    previous_term = signal.signal(signal.SIGTERM, _interrupt)
    server: NatsServer | None = None
    node: Node | None = None
    try:
        # First build before anything starts: a missing toolchain ends the command, with nothing to stop.
        started = time.perf_counter()
        try:
            first = build_project(project.root, progress=progress)
            first_error = None
        except ToolchainMissingError as e:
            fail(f"{e.message}\n  install it with: {e.install}", EXIT_USAGE)
        except SandbusError as e:  # compiler errors, an invalid manifest: shown, then fixed while we watch
            first, first_error = None, e.message if isinstance(e, AuthoringError) else str(e)
        build_s = time.perf_counter() - started

        from sandbus.bus.connection import ConnectOptions
        from sandbus.bus.server import NatsServer
        from sandbus.host.authoring.devloop import DevLoop
        from sandbus.host.node.node import Node

        with _signals_deferred():
            server = NatsServer(port=-1 if port is None else port).start(timeout=10.0)
        out.say(f"nats-server (JetStream) on {server.url}, pid {server.pid}; it stops with this command")
        project.build_dir.mkdir(exist_ok=True)
        node = Node.create(project.build_dir, ConnectOptions.from_urls(server.url, name=f"sandbus-dev-{project.name}"),
                           policy=fixed)
        loop = DevLoop(project, node.manager, policy=fixed, progress=progress, pass_env=frozenset(pass_env or ()))
        if fixed is not None:
            out.say(f"policy: {terminal_text(str(policy_file))}")
        else:
            out.say(f"policy: development, granting what {project.manifest.name} asks for"
                    f"{_grants(project, frozenset(pass_env or ()))}")
        if first is not None:
            _report(out, project, loop.sync(build_s, first), first=True)
        else:
            serving = loop.serve_previous()
            kept = f"serving the previous build ({project.name} {serving})" if serving else "nothing serving yet"
            out.failure(f"build failed in {build_s:.2f} s; {kept}:", first_error or "")
        asyncio.run(_serve(node, loop, project, server.url, out))
    except KeyboardInterrupt:
        pass  # stopped before the loop ran: the finally stops what was started
    except SandbusError as e:
        fail(str(e), exit_code_for(e))
    finally:
        # Nothing interrupts the stopping itself; every step is bounded.
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if node is not None:
                node.manager.close(timeout=_STOP_MANAGER_S)
            if server is not None:
                server.stop(timeout=_STOP_SERVER_S)
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous_term)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """While a child process is started and recorded, Ctrl-C and SIGTERM wait (then raise KeyboardInterrupt).

    Raised in the middle, between the fork and the moment its owner holds it, the KeyboardInterrupt would
    leave the child running with nobody to stop it (seen with nats-server, which has a session of its own).
    The handlers are Python's, so the child starts with the default ones.
    """
    received: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt


def _grants(project: Project, pass_env: frozenset[str]) -> str:
    from sandbus.host.authoring.devloop import describe_grants
    from sandbus.host.lifecycle.manifest import load_manifest

    try:
        manifest = load_manifest(project.manifest)
    except SandbusError:
        return ""  # the build's error says what is wrong with it
    return f": {terminal_text(describe_grants(manifest, pass_env))}"


def _setup_logging(verbose: int) -> None:
    """The plugin's own log lines always (all levels: it is the author's), the host's warnings, and with
    ``-v`` the node's log. Audit events are shown by the loop itself (see :func:`_serve`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TerminalFormatter())
    handler.addFilter(_PluginLogBudget(_LOG_BUDGET))
    logging.basicConfig(level=logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG,
                        handlers=[handler], force=True)
    logging.getLogger("sandbus.plugin").setLevel(logging.DEBUG)
    if verbose == 0:
        logging.getLogger("sandbus.audit").setLevel(logging.CRITICAL + 1)
        logging.getLogger("nats").setLevel(logging.CRITICAL + 1)  # reconnect chatter while the server stops


def call_hint(name: str, functions: tuple[str, ...], url: str) -> str:
    """The command that calls the served plugin: its ``handle_request`` when it has one (or nothing is
    known yet), else its first function -- an Extism plugin's functions have any names, and a hint naming
    one it lacks sends the newcomer straight into ``request.unknown_function``."""
    function = "handle_request" if not functions or "handle_request" in functions else functions[0]
    return terminal_text(f"sandbus request {name} {function} '{{}}' {SERVER_FLAG} {url}")


def _served_functions(node: Node, name: str) -> tuple[str, ...]:
    """The functions the node serves for ``name`` (none when it is not serving)."""
    try:
        return node.manager.info(name).functions
    except SandbusError:
        return ()


def _report(out: _Out, project: Project, r: Rebuild, *, first: bool = False) -> None:
    """One line per rebuild: the build's result and time, then what the node did with it."""
    what = ("built" if r.result is None or r.result.built else "up to date") if first else "rebuilt"
    keeps = f"{project.name} {r.serving} keeps serving" if r.serving else "nothing serving"
    if r.result is None:
        out.failure(f"build failed in {r.build_s:.2f} s; {keeps}:", r.error or "")
        return
    if r.result.output:  # compiler warnings: quoted source, shown as text
        out.say("  " + terminal_text(r.result.output))
    if r.reload == "refused":
        out.failure(f"{what} in {r.build_s:.2f} s; the node refused it, {keeps}:", r.message)
        return
    detail = f" {r.message}" if r.message and r.reload != "unchanged" else ""
    version = f" {project.name} {r.serving}" if r.reload != "unchanged" else f" ({r.message})"
    out.success(f"{what} in {r.build_s:.2f} s; {r.reload}{version}{detail}")


async def _serve(node: Node, loop: DevLoop, project: Project, url: str, out: _Out) -> None:
    from sandbus.host.authoring import ToolchainMissingError
    from sandbus.host.authoring.devloop import SourceWatcher

    stop = asyncio.Event()
    aloop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        aloop.add_signal_handler(sig, stop.set)
    errors = _Errors(out)
    node.manager.auditor.add_sink(errors.on_audit)
    try:
        starting = asyncio.ensure_future(node.start())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, SandbusError):
                await starting
            return
        stopping.cancel()
        starting.result()

        def rebuild() -> None:
            try:
                result = loop.rebuild()
                if not loop.closed:
                    _report(out, project, result)
            except ToolchainMissingError as e:  # uninstalled while we watch: said, and the loop goes on
                out.failure("build failed:", f"{e.message}\n  install it with: {e.install}")

        def on_error(e: BaseException) -> None:  # a bug of ours: one line, and watching goes on
            out.say(f"{out.stamp()} rebuild failed: {terminal_text(f'{type(e).__name__}: {e}')}", err=True)

        watcher = SourceWatcher(project, rebuild, on_error=on_error)
        watcher.start()
        serving = loop.serving_version()
        state = f"{project.name} {serving} serving" if serving else f"{project.name} not serving yet"
        out.say(f"ready: {state} on {url}; call it with:\n"
                f"  {call_hint(project.name, _served_functions(node, project.name), url)}\n"
                f"watching {terminal_text(_watched(project))} (Ctrl-C stops)")
        poller = asyncio.ensure_future(errors.poll(node.manager))
        try:
            await stop.wait()
        finally:
            out.say("stopping")
            loop.close()
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            await asyncio.to_thread(watcher.stop, _STOP_WATCHER_S)
            await node.stop(timeout=_STOP_NODE_S)
    finally:
        # Closing the loop would put SIGTERM back to its default (die at once, leaving the server running):
        # until the caller has stopped everything, a signal is a KeyboardInterrupt it handles.
        for sig in (signal.SIGINT, signal.SIGTERM):
            aloop.remove_signal_handler(sig)
        signal.signal(signal.SIGTERM, _interrupt)


class _Budget:
    """At most ``per_second`` lines a second (a fixed one-second window); the lines refused are counted."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self._lock = threading.Lock()
        self._window = 0.0
        self._lines = 0
        self._dropped = 0

    def admit(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if now - self._window >= 1.0:
                self._window, self._lines = now, 0
            self._lines += 1
            if self._lines > self.per_second:
                self._dropped += 1
                return False
            return True

    def take_dropped(self) -> int:
        with self._lock:
            dropped, self._dropped = self._dropped, 0
            return dropped


class _PluginLogBudget(logging.Filter):
    """Lets through at most :data:`_MAX_LOG_LINES` plugin log lines a second: a plugin that logs on every
    call of a load test would otherwise hold the node's event loop writing to the terminal."""

    def __init__(self, budget: _Budget) -> None:
        super().__init__()
        self.budget = budget

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(PLUGIN_LOGGER_PREFIX) or self.budget.admit()


#: The plugin log lines' budget (see _setup_logging), reported with the errors'.
_LOG_BUDGET = _Budget(_MAX_LOG_LINES)


class _Errors:
    """What goes wrong while the plugin serves, shown as it happens, on stderr.

    Audit events (limits, denials, refused requests) come through :meth:`on_audit`; calls that failed
    through the plugin's fault, which are not all audit events (a trap is not), from its counters
    (:meth:`poll`). An error an audit event already showed is not shown again, and a flood is cut to
    :data:`_MAX_EVENT_LINES` lines a second, the rest counted (so are the plugin's log lines beyond theirs).
    """

    def __init__(self, out: _Out) -> None:
        self.out = out
        self._lock = threading.Lock()
        self._shown: dict[str, str] = {}  # per plugin, the last message an audit event showed
        self._budget = _Budget(_MAX_EVENT_LINES)

    def _admit(self) -> bool:
        return self._budget.admit()

    def on_audit(self, event: AuditEvent) -> None:
        if event.level.value == "info" or event.kind.startswith(_LOAD_KINDS):
            return  # loads and reloads: the rebuild line says what happened
        with self._lock:
            self._shown[event.plugin] = event.message
        if self._admit():
            self.out.say(f"{self.out.stamp()} {terminal_text(event.plugin)}: {terminal_text(event.kind)}: "
                         f"{terminal_text(event.message)}", err=True)

    async def poll(self, manager: PluginManager) -> None:
        seen: dict[str, int] = {}
        while True:
            try:
                infos = manager.list_plugins()
            except SandbusError:  # the manager is closing: nothing to report any more
                infos = []
            for info in infos:
                before = seen.get(info.name)
                seen[info.name] = info.errors
                if before is None or info.errors <= before or not info.last_error:
                    continue
                with self._lock:
                    audited = self._shown.pop(info.name, None)
                if audited is not None and audited in info.last_error:
                    continue
                count = info.errors - before
                many = f"; {count} calls failed, the latest" if count > 1 else ""
                message = info.last_error.removeprefix(f"plugin {info.name!r}: ")
                code = terminal_text(info.last_error_code or "-")
                if self._admit():
                    self.out.say(f"{self.out.stamp()} {terminal_text(info.name)}: call failed ({code}{many}): "
                                 f"{terminal_text(message)}", err=True)
            if dropped := self._budget.take_dropped():
                self.out.say(f"{self.out.stamp()} ({dropped} more errors not shown)", err=True)
            if dropped := _LOG_BUDGET.take_dropped():
                self.out.say(f"{self.out.stamp()} ({dropped} more plugin log lines not shown)", err=True)
            await asyncio.sleep(_POLL_S)


def _watched(project: Project) -> str:
    from sandbus.host.authoring import Language

    sources = {Language.C: "*.c, *.h", Language.WAT: f"{project.name}.wat",
               Language.ASSEMBLYSCRIPT: "assembly/**/*.ts, *.ts, package.json, asconfig.json",
               Language.EXTISM_AS: "assembly/**/*.ts, *.ts, package.json, asconfig.json",
               Language.PYTHON: "**/*.py (not tests)"}[project.language]
    return f"{sources} and {project.manifest.name}"


def register(app: typer.Typer) -> None:
    """Register ``sandbus dev``."""
    app.command()(dev)
