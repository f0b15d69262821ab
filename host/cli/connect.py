"""How a CLI command reaches NATS: the same options, environment and ``nats`` CLI context on every command.

A command that connects declares the options with one line and receives the resolved :class:`Connection`::

    @with_connection
    def ls(..., conn: Connection) -> None:
        nodes = client_run(lambda c: c.nodes(), conn)

:func:`with_connection` appends the options to the command's signature (typer reads it) and passes
``conn``. The options are named as the ``nats`` CLI names them, each with its environment variable:
``-s/--server`` (``NATS_URL``; ``--nats`` and ``SANDBUS_NATS`` are aliases), ``--user``/``--password``
(``NATS_USER``/``NATS_PASSWORD``), ``--token`` (``NATS_TOKEN``), ``--creds`` (``NATS_CREDS``), ``--nkey``
(a seed file, ``NATS_NKEY``), ``--tlscert``/``--tlskey``/``--tlsca`` (``NATS_CERT``/``NATS_KEY``/``NATS_CA``),
``--context`` (``NATS_CONTEXT``) and ``--no-context``.

Precedence: an option, else its environment variable, else the ``nats`` CLI's context (the one named by
``--context``, else the one selected in ``$XDG_CONFIG_HOME/nats/context.txt``), else the default
``nats://127.0.0.1:4222``. Authentication is taken as a whole: when an option or variable gives any of
user/password, token, creds or nkey, the context's authentication is not used. A context file is
untrusted input like any other: bounded, a JSON object of strings, its paths checked; a bad one, or a
bad option, is one line and exit 2.

:func:`client_run` ``(coro_factory, conn)`` runs a client command: connect once (no reconnect attempts, a
short timeout), run ``coro_factory(client)``, close. NATS unreachable, refused credentials, a TLS
failure: one line naming the servers and the cause, exit 5.

``SANDBUS_DEFAULT_NATS_PORT`` (not documented to users) moves the default port, so tests never need the
real 4222.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from sandbus.host.cli.client_otel import client_tracing
from sandbus.host.cli.main import EXIT_USAGE, exit_code_for, fail
from sandbus.host.cli.nats_context import (
    MAX_SECRET_FILE_BYTES,
    SettingError,
    context_path,
    load_context,
    read_bounded,
    str_or_none,
)
from sandbus.sdk.errors import BusError, SandbusError, SecurityViolationError
from sandbus.sdk.nats_auth import auth_kwargs, tls_context

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

    from sandbus.bus.connection import ConnectOptions
    from sandbus.sdk.client import Client

__all__ = [
    "CHILD_ENV_NAMES",
    "DEFAULT_NATS",
    "Connection",
    "client_run",
    "run_on_nats",
    "default_port",
    "resolve_connection",
    "with_connection",
]

DEFAULT_PORT = 4222
DEFAULT_NATS = f"nats://127.0.0.1:{DEFAULT_PORT}"
#: Seconds a client command waits for a server to accept it (TCP, TLS, INFO/CONNECT).
CLIENT_CONNECT_TIMEOUT_S = 2.0

#: Every environment variable that carries connection settings: a worker child gets the parent's resolved
#: values and none of the others (an inherited one could contradict them).
CHILD_ENV_NAMES = ("NATS_URL", "SANDBUS_NATS", "NATS_USER", "NATS_PASSWORD", "SANDBUS_NATS_PASSWORD", "NATS_TOKEN",
                   "SANDBUS_NATS_TOKEN", "NATS_CREDS", "NATS_NKEY", "NATS_CERT", "NATS_KEY", "NATS_CA",
                   "NATS_CONTEXT")



def default_port() -> int:
    """The port a command connects to when nothing names a server (4222; tests move it)."""
    raw = os.environ.get("SANDBUS_DEFAULT_NATS_PORT", "")
    if raw.isdigit() and 0 < int(raw) < 65536:
        return int(raw)
    return DEFAULT_PORT


@dataclass(frozen=True)
class Connection:
    """Where and how to connect, resolved from options, environment, context and default.

    ``url_from`` says where the servers came from: ``"option"``, ``"environment"``, ``"context NAME"`` or
    ``"default"`` (``sandbus node`` joins or starts a server only in the last case).
    """

    servers: tuple[str, ...]
    url_from: str = "default"
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    creds: Path | None = None
    nkey: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_first: bool = False
    context: str | None = None

    @property
    def url(self) -> str:
        return ",".join(self.servers)

    @property
    def shown_url(self) -> str:
        """:attr:`url` for messages: credentials written into a URL (``nats://user:pass@host``) hidden."""
        return re.sub(r"//[^/@,]*@", "//***@", self.url)

    @property
    def is_default(self) -> bool:
        return self.url_from == "default"

    def with_servers(self, url: str, url_from: str) -> Connection:
        return replace(self, servers=_split_servers(url, url_from), url_from=url_from)

    def tls_context(self) -> ssl.SSLContext | None:
        return tls_context(self.tls_ca, self.tls_cert, self.tls_key)

    def nats_kwargs(self) -> dict[str, Any]:
        """Authentication and TLS as ``nats.connect`` keyword arguments (servers not included)."""
        return auth_kwargs(user=self.user, password=self.password, token=self.token, creds=self.creds,
                           nkey_seed=self.nkey, tls=self.tls_context(), tls_first=self.tls_first)

    def connect_options(self, **kwargs: Any) -> ConnectOptions:
        """The node's :class:`~sandbus.bus.connection.ConnectOptions` (imported here: client commands never
        need it)."""
        from sandbus.bus.connection import ConnectOptions

        return ConnectOptions(servers=self.servers, user=self.user, password=self.password, token=self.token,
                              creds=self.creds, nkey_seed=self.nkey, tls_ca=self.tls_ca, tls_cert=self.tls_cert,
                              tls_key=self.tls_key, tls_first=self.tls_first, **kwargs)

    def child_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` with these settings as environment variables, for a child ``sandbus`` started with
        ``--no-context``: secrets travel in the environment, never in argv (which every user sees in ps)."""
        env = {k: v for k, v in base.items() if k not in CHILD_ENV_NAMES}
        env["NATS_URL"] = self.url
        for name, value in (("NATS_USER", self.user), ("NATS_PASSWORD", self.password),
                            ("NATS_TOKEN", self.token), ("NATS_CREDS", self.creds), ("NATS_NKEY", self.nkey),
                            ("NATS_CERT", self.tls_cert), ("NATS_KEY", self.tls_key), ("NATS_CA", self.tls_ca)):
            if value is not None:
                env[name] = str(value)
        return env


def _split_servers(url: str, what: str) -> tuple[str, ...]:
    if len(url) > 4096:
        raise SettingError(f"{what}: the server list is longer than 4096 characters")
    servers = tuple(u.strip() for u in url.split(",") if u.strip())
    if not servers:
        raise SettingError(f"{what}: no NATS server URL given (an empty -s/--nats is not the default; leave it out)")
    for s in servers:
        if any(ord(ch) < 0x21 or ch == "\x7f" for ch in s):
            raise SettingError(f"{what}: a server URL holds a space or control character")
    return servers


# -- resolution ---------------------------------------------------------------------------------------


def _check_file(path: Path | None, what: str) -> Path | None:
    if path is not None:
        read_bounded(path, what, MAX_SECRET_FILE_BYTES)
    return path


def resolve_connection(*, server: str | None = None, user: str | None = None, password: str | None = None,
                       token: str | None = None, creds: Path | None = None, nkey: Path | None = None,
                       tlscert: Path | None = None, tlskey: Path | None = None, tlsca: Path | None = None,
                       context: str | None = None, no_context: bool = False,
                       server_from: str = "option") -> Connection:
    """Options and environment (already merged by typer) over the context over the default.

    ``server_from`` names where ``server`` came from, for messages. A bad value exits 2 with one line.
    """
    try:
        return _resolve(server=server, user=user, password=password, token=token, creds=creds, nkey=nkey,
                        tlscert=tlscert, tlskey=tlskey, tlsca=tlsca, context=context, no_context=no_context,
                        server_from=server_from)
    except SettingError as e:
        fail(str(e), EXIT_USAGE)


def _resolve(*, server: str | None, user: str | None, password: str | None, token: str | None,
             creds: Path | None, nkey: Path | None, tlscert: Path | None, tlskey: Path | None,
             tlsca: Path | None, context: str | None, no_context: bool, server_from: str) -> Connection:
    ctx = None if no_context else load_context(context)
    cname, cdata = ctx if ctx is not None else (None, {})
    cwhat = f"nats context {cname!r}"

    if server is not None:
        servers, url_from = _split_servers(server, "-s/--server"), server_from
    elif (cu := str_or_none(cdata, "url")) is not None:
        servers, url_from = _split_servers(cu, cwhat), f"context {cname}"
    else:
        servers, url_from = (f"nats://127.0.0.1:{default_port()}",), "default"

    if password is not None and user is None:
        raise SettingError("--password needs --user (or NATS_USER)")
    methods = [m for m, v in (("--user", user), ("--token", token), ("--creds", creds), ("--nkey", nkey))
               if v is not None]
    if len(methods) > 1:
        raise SettingError(f"choose one way to authenticate: {' and '.join(methods)} are both given "
                     "(options or NATS_* variables)")
    if not methods and cdata:
        # The nats CLI's order when a context holds several: user, creds, nkey, token.
        if (cuser := str_or_none(cdata, "user")) is not None:
            user, password = cuser, str_or_none(cdata, "password")
        elif (ccreds := str_or_none(cdata, "creds")) is not None:
            creds = context_path(ccreds, f"{cwhat}: creds")
        elif (cnkey := str_or_none(cdata, "nkey")) is not None:
            nkey = context_path(cnkey, f"{cwhat}: nkey")
        elif (ctoken := str_or_none(cdata, "token")) is not None:
            token = ctoken
        elif str_or_none(cdata, "nsc") is not None:
            raise SettingError(f"{cwhat}: nsc lookups are not supported by sandbus; give creds as a file path")
    if user is not None and password is None:
        # The nats CLI takes a user without a password as a token.
        user, token = None, user

    cert = tlscert or (context_path(c, f"{cwhat}: cert") if (c := str_or_none(cdata, "cert")) else None)
    key = tlskey or (context_path(k, f"{cwhat}: key") if (k := str_or_none(cdata, "key")) else None)
    ca = tlsca or (context_path(a, f"{cwhat}: ca") if (a := str_or_none(cdata, "ca")) else None)
    if (cert is None) != (key is None):
        raise SettingError("a TLS client certificate needs both --tlscert and --tlskey")
    conn = Connection(servers=servers, url_from=url_from, user=user, password=password, token=token,
                      creds=_check_file(creds, "--creds"), nkey=_check_file(nkey, "--nkey"),
                      tls_cert=_check_file(cert, "--tlscert"), tls_key=_check_file(key, "--tlskey"),
                      tls_ca=_check_file(ca, "--tlsca"), tls_first=cdata.get("tls_first") is True, context=cname)
    try:
        conn.tls_context()
    except (ssl.SSLError, OSError, ValueError) as e:
        raise SettingError(f"TLS files refused: {e}") from None
    return conn


# -- the options, declared once ------------------------------------------------------------------------

def _opt(*decls: str, help: str, envvar: list[str] | None = None, hidden: bool = False) -> Any:
    return typer.Option(*decls, help=help, envvar=envvar, hidden=hidden, show_envvar=not hidden,
                        rich_help_panel=None if hidden else "Connection")


_PATH = Path | None
_STR = str | None
_CONNECTION_PARAMS: tuple[tuple[str, Any], ...] = (
    ("server", Annotated[_STR, _opt("--server", "-s", "--nats", envvar=["NATS_URL", "SANDBUS_NATS"],
                                    help="NATS server URL(s), comma-separated (default nats://127.0.0.1:4222).")]),
    ("user", Annotated[_STR, _opt("--user", envvar=["NATS_USER"], help="Username (alone: a token).")]),
    ("password", Annotated[_STR, _opt("--password", envvar=["NATS_PASSWORD", "SANDBUS_NATS_PASSWORD"],
                                      help="Password.")]),
    ("token", Annotated[_STR, _opt("--token", envvar=["NATS_TOKEN", "SANDBUS_NATS_TOKEN"],
                                   help="Authentication token.")]),
    ("creds", Annotated[_PATH, _opt("--creds", envvar=["NATS_CREDS"], help="User credentials file (JWT + nkey).")]),
    ("nkey", Annotated[_PATH, _opt("--nkey", envvar=["NATS_NKEY"], help="User nkey seed file.")]),
    ("tlscert", Annotated[_PATH, _opt("--tlscert", envvar=["NATS_CERT"], help="TLS client certificate.")]),
    ("tlskey", Annotated[_PATH, _opt("--tlskey", envvar=["NATS_KEY"], help="TLS client private key.")]),
    ("tlsca", Annotated[_PATH, _opt("--tlsca", envvar=["NATS_CA"], help="TLS certificate authority chain.")]),
    ("context", Annotated[_STR, _opt("--context", envvar=["NATS_CONTEXT"],
                                     help="nats CLI context (default: the selected one).")]),
    ("no_context", Annotated[bool, typer.Option("--no-context", help="Ignore the nats CLI's contexts.",
                                                rich_help_panel="Connection")]),
    # The node's former spellings, still accepted.
    ("nkey_seed", Annotated[_PATH, _opt("--nkey-seed", help="Alias of --nkey.", hidden=True)]),
    ("tls_ca", Annotated[_PATH, _opt("--tls-ca", help="Alias of --tlsca.", hidden=True)]),
    ("tls_cert", Annotated[_PATH, _opt("--tls-cert", help="Alias of --tlscert.", hidden=True)]),
    ("tls_key", Annotated[_PATH, _opt("--tls-key", help="Alias of --tlskey.", hidden=True)]),
)
_ALIASES = {"nkey_seed": "nkey", "tls_ca": "tlsca", "tls_cert": "tlscert", "tls_key": "tlskey"}

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def _server_from(server: str | None) -> str:
    """Where typer found ``server``: the same value in its environment variable is taken to come from it."""
    from_env = server is not None and server in (os.environ.get("NATS_URL"), os.environ.get("SANDBUS_NATS"))
    return "environment" if from_env else "option"


def with_connection(fn: F) -> F:
    """Give a typer command the connection options; it receives the resolved settings as ``conn``.

    The command declares a ``conn: Connection`` parameter; typer sees the options instead (the wrapper's
    ``__signature__``), and the wrapper resolves them before calling the command.
    """
    sig = inspect.signature(fn, eval_str=True)
    if "conn" not in sig.parameters:
        raise TypeError(f"{fn.__name__} needs a 'conn: Connection' parameter for with_connection")
    own = [p for p in sig.parameters.values() if p.name != "conn"]
    taken = {p.name for p in own} & {name for name, _ in _CONNECTION_PARAMS}
    if taken:
        raise TypeError(f"{fn.__name__}: parameters {sorted(taken)} clash with the connection options")
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann,
                               default=False if name == "no_context" else None)
             for name, ann in _CONNECTION_PARAMS]

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name, None) for name, _ in _CONNECTION_PARAMS}
        for alias, name in _ALIASES.items():
            alias_value = values.pop(alias)
            if values[name] is None:
                values[name] = alias_value
        values["no_context"] = bool(values["no_context"])
        return fn(*args, conn=resolve_connection(**values, server_from=_server_from(values["server"])), **kwargs)

    command.__signature__ = sig.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
    # typer also reads the annotations: the wrapped function's minus ``conn``, plus the options'.
    command.__annotations__ = {**{k: v for k, v in fn.__annotations__.items() if k != "conn"},
                               **dict(_CONNECTION_PARAMS)}
    return command  # type: ignore[return-value]


# -- running a client command ---------------------------------------------------------------------------

def _cause(e: BaseException) -> str:
    """What went wrong connecting, in a few words."""
    text = str(e)
    if "authorization violation" in text.lower() or type(e).__name__ == "AuthorizationError":
        return "authorization violation"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS: {e.verify_message or 'certificate verify failed'}"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or text}"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, socket.gaierror):
        return "unknown host"
    if isinstance(e, TimeoutError):
        return f"no answer within {CLIENT_CONNECT_TIMEOUT_S:g} s"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    text = text.removeprefix("nats: ").strip()
    return (text[:200] or type(e).__name__)


def _unreachable(conn: Connection, causes: list[BaseException], final: BaseException | None) -> BusError:
    # The most telling cause: an explicit refusal (auth, TLS) over a plain "no servers".
    picked = [c for c in causes if _cause(c) == "authorization violation" or isinstance(c, ssl.SSLError)]
    chosen = picked[-1] if picked else (causes[-1] if causes else final)
    cause = _cause(chosen) if chosen is not None else "unknown error"
    where = {"option": "-s/--nats", "environment": "NATS_URL"}.get(conn.url_from, conn.url_from.replace(
        "context ", "nats context "))
    hint = ("start one with `sandbus node`, or set NATS_URL / -s" if conn.is_default
            else f"the URL came from {where}")
    if cause == "authorization violation":
        hint = "check --user/--password, --token, --creds or --nkey"
    elif cause.startswith("TLS"):
        hint = "check --tlsca/--tlscert/--tlskey and the URL's scheme"
    return BusError(f"cannot reach NATS at {conn.shown_url} ({cause}); {hint}")


#: What a NATS server says when a user's permissions refuse a publish or a subscription.
_PERMISSION_VIOLATION = re.compile(r"permissions violation", re.IGNORECASE)


async def _connect(conn: Connection, on_refused: Callable[[str], None] | None = None) -> Client:
    """A connected client, or the reason why not (:class:`BusError`). ``on_refused``: called with the
    server's message when, once connected, it refuses a publish or a subscription of this client."""
    from sandbus.sdk.client import Client

    causes: list[BaseException] = []
    connected = False

    async def on_error(e: Exception) -> None:
        if connected and on_refused is not None and _PERMISSION_VIOLATION.search(str(e)):
            on_refused(str(e))
        elif len(causes) < 32:
            causes.append(e)

    nc = _client_class(conn)()
    try:
        # One attempt per server (nats-py makes at most two), no waiting between, no reconnecting
        # later: a client command reports an unreachable bus at once instead of retrying it.
        await nc.connect(servers=list(conn.servers), allow_reconnect=False, max_reconnect_attempts=1,
                         reconnect_time_wait=0, connect_timeout=CLIENT_CONNECT_TIMEOUT_S, error_cb=on_error,
                         **conn.nats_kwargs())
    except Exception as e:
        # nats-py leaves a refused socket open, and can wait forever closing one whose TLS handshake
        # failed: closed, within a bound.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 0.5)
        raise _unreachable(conn, causes, e) from None
    from sandbus.bus.wire import server_info_problem

    problem = server_info_problem(nc)
    if problem is not None:  # something that only pretends to be a NATS server
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 0.5)
        raise BusError(f"NATS at {conn.shown_url} is not a server sandbus can use: {problem}")
    connected = True
    return Client(nc)


def _client_class(conn: Connection) -> type[Any]:
    """nats-py's client as sandbus guards it; when TLS is asked for, the one that refuses to go on
    unencrypted (nats-py alone would, with a server that does not require TLS: see
    :class:`~sandbus.bus.connection.TlsStrictClient`; imported only then, as it costs a client command
    0.1 s)."""
    if conn.tls_ca or conn.tls_cert or any(s.startswith("tls://") for s in conn.servers):
        from sandbus.bus.connection import TlsStrictClient

        return TlsStrictClient
    from sandbus.sdk.nats_guard import GuardedNatsClient

    return GuardedNatsClient


def run_on_nats(call: Callable[[NatsClient], Awaitable[T]], conn: Connection,
                exit_code: Callable[[SandbusError], int]) -> T:
    """:func:`client_run` of ``call`` on the client's NATS connection, with ``exit_code`` mapping failures.
    Warnings go to stderr through the CLI's formatter: they may quote what someone wrote into a bucket,
    and reach the terminal escaped like every other text from the bus."""
    from sandbus.host.cli.output import setup_logging

    setup_logging(0)

    async def go(client: Client) -> T:
        return await call(client.nc)

    result: T = client_run(go, conn, exit_code)
    return result


def client_run(coro_factory: Callable[[Client], Any], conn: Connection,
               exit_code: Callable[[SandbusError], int] | None = None) -> Any:
    """Connect, run ``coro_factory(client)``, close; any failure is one line and its exit code.

    ``conn`` is the resolved :class:`Connection` that :func:`with_connection` passes a command. ``exit_code``
    maps a failure to its exit code (default: :func:`exit_code_for` of an answer over the bus, where "not
    found" means no node serves the plugin).
    """
    # nats-py logs each failed attempt, with its traceback: the command says what failed itself, once.
    logging.getLogger("nats").setLevel(logging.CRITICAL + 1)
    logging.getLogger("asyncio").setLevel(logging.ERROR)  # its notes on TLS shutdowns, not the user's concern

    async def go() -> Any:
        refused: list[str] = []
        work: asyncio.Task[Any] | None = None

        def on_refused(message: str) -> None:
            # The server refused what the command asked of it (a publish, a subscription): nothing will
            # answer, so the command ends now, saying why, instead of at its timeout.
            refused.append(message)
            if work is not None:
                work.cancel()

        client = await _connect(conn, on_refused)
        try:
            work = asyncio.ensure_future(coro_factory(client))
            try:
                return await work
            except asyncio.CancelledError:
                if not refused:
                    raise
            raise SecurityViolationError(f"NATS at {conn.shown_url} refused it ({refused[0][:200]}): the user "
                                         "you connect as may not do this (docs/security.md lists each role's "
                                         "permissions)")
        except SandbusError:  # already says what went wrong (a BusError is an OSError too)
            raise
        except (TimeoutError, OSError) as e:
            raise BusError(f"NATS at {conn.shown_url}: {_cause(e)}") from e
        except Exception as e:
            if type(e).__module__.startswith("nats."):  # the library's own errors (connection closed...)
                raise BusError(f"NATS at {conn.shown_url}: {_cause(e)}") from e
            raise
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 2.0)

    try:
        with client_tracing():
            return asyncio.run(go())
    except SandbusError as e:
        fail(str(e), exit_code(e) if exit_code is not None else exit_code_for(e, over_bus=True))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None

