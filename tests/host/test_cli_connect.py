"""How CLI commands reach NATS: the ``nats`` CLI's options, variables and contexts, and failures in one line.

Real ``sandbus`` processes against real nats-servers (with and without authentication); each test checks
which server a published message reached, so "the URL was honoured" is observed, not assumed. The
resolution rules themselves (precedence, refused context files) are also checked in-process, where a
case costs nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
import typer

from sandbus.bus.server import NatsServer
from sandbus.host.cli.connect import CHILD_ENV_NAMES, client_run, resolve_connection
from sandbus.host.cli.nats_context import MAX_CONTEXT_BYTES

SANDBUS = Path(sys.executable).parent / "sandbus"


def _closed_port() -> int:
    """A port nothing listens on (bound, then released: refused until someone takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty configuration home, for this process and the commands it runs; no NATS_* variable."""
    home = tmp_path / "config"
    home.mkdir()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    monkeypatch.setenv("SANDBUS_DEFAULT_NATS_PORT", str(_closed_port()))
    for name in CHILD_ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return home


def _context(home: Path, name: str, body: dict[str, Any] | str | bytes, *, select: bool = True) -> Path:
    d = home / "nats" / "context"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.json"
    raw = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    path.write_bytes(raw)
    if select:
        (home / "nats" / "context.txt").write_text(name + "\n")
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CHILD_ENV_NAMES and not k.startswith("OTEL_")}
    return {**env, **extra}


#: A command declared with ``@with_connection`` (as every command that connects is): it publishes one
#: message with core NATS onto its TOPIC argument. Run as its own process, like ``sandbus pub --core``.
FLAGS_COMMAND = """
import typer
from sandbus.host.cli.connect import Connection, client_run, with_connection

app = typer.Typer()

@app.command()
@with_connection
def pub(topic: str, conn: Connection) -> None:
    typer.echo(client_run(lambda c: c.publish(topic, {"n": 1}, durable=False), conn))

app()
"""


@dataclass
class Run:
    """One publishing command: its arguments, environment, and whether it is :data:`FLAGS_COMMAND`."""

    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    flags: bool = False


async def _publish_many(servers: list[NatsServer], runs: list[Run], auth: dict[str, Any] | None = None
                        ) -> list[tuple[subprocess.CompletedProcess[str], list[int]]]:
    """Each run publishes onto a topic of its own, all at once (``sandbus pub --core`` or
    :data:`FLAGS_COMMAND`); per run: the process, and per server how many of its messages arrived there."""
    seen: list[dict[str, int]] = [{} for _ in servers]
    ncs = [await nats.connect(s.url, **(auth or {})) for s in servers]
    try:
        for i, nc in enumerate(ncs):
            async def count(msg: Any, tally: dict[str, int] = seen[i]) -> None:
                tally[msg.subject] = tally.get(msg.subject, 0) + 1

            await nc.subscribe("sandbus.topic.>", cb=count)
            await nc.flush()

        async def one(i: int, run: Run) -> subprocess.CompletedProcess[str]:
            topic = f"t.run{i}"
            command = ([sys.executable, "-c", FLAGS_COMMAND, topic] if run.flags
                       else [str(SANDBUS), "pub", "--core", topic, '{"n": 1}'])
            proc = await asyncio.create_subprocess_exec(*command, *run.args, env=_env(**run.env),
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            return subprocess.CompletedProcess(command, proc.returncode or 0, out.decode(), err.decode())

        results = await asyncio.gather(*(one(i, run) for i, run in enumerate(runs)))
        for nc in ncs:
            await nc.flush()  # a round trip: whatever the server routed to us has arrived
        return [(r, [tally.get(f"sandbus.topic.t.run{i}", 0) for tally in seen]) for i, r in enumerate(results)]
    finally:
        for nc in ncs:
            await nc.close()


async def _publish_via_cli(servers: list[NatsServer], *args: str, env: dict[str, str] | None = None,
                           auth: dict[str, Any] | None = None,
                           flags: bool = False) -> tuple[subprocess.CompletedProcess[str], list[int]]:
    [result] = await _publish_many(servers, [Run(args, env or {}, flags)], auth)
    return result


@pytest.fixture
def two_servers() -> Iterator[tuple[NatsServer, NatsServer]]:
    a = NatsServer(jetstream=False).start()
    try:
        b = NatsServer(jetstream=False).start()
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


# -- where the command connects ---------------------------------------------------------------------------

async def test_nats_url_is_honoured_and_option_beats_environment_beats_context(
        xdg: Path, two_servers: tuple[NatsServer, NatsServer]) -> None:
    a, b = two_servers
    _context(xdg, "dev", {"description": "local", "url": a.url, "jetstream_domain": ""})
    outcomes = await _publish_many([a, b], [
        Run(),  # the selected context
        Run(env={"NATS_URL": b.url}),  # the environment over the context
        Run(("-s", a.url), {"NATS_URL": b.url}),  # the option over the environment
        Run(("--nats", b.url), {"SANDBUS_NATS": a.url}),  # the old spellings still work
        Run(env={"SANDBUS_NATS": b.url}),
        Run(("-s", b.url, "--no-context"), flags=True),
    ])
    assert [(r.returncode, counts) for r, counts in outcomes] == [
        (0, [1, 0]), (0, [0, 1]), (0, [1, 0]), (0, [0, 1]), (0, [0, 1]), (0, [0, 1])], outcomes


async def test_a_named_context_is_used_over_the_selected_one(
        xdg: Path, two_servers: tuple[NatsServer, NatsServer]) -> None:
    a, b = two_servers
    _context(xdg, "other", {"url": b.url}, select=False)
    _context(xdg, "dev", {"url": a.url})
    outcomes = await _publish_many([a, b], [Run(("--context", "other")), Run(env={"NATS_CONTEXT": "other"})])
    assert [(r.returncode, counts) for r, counts in outcomes] == [(0, [0, 1]), (0, [0, 1])], outcomes


def test_precedence_field_by_field(xdg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read: no TLS context is built from it here\n")
    _context(xdg, "dev", {"url": "nats://ctx:4222", "user": "cu", "password": "cp"})
    conn = resolve_connection()
    assert (conn.servers, conn.user, conn.password, conn.url_from) == (("nats://ctx:4222",), "cu", "cp",
                                                                      "context dev")
    # Authentication is taken as a whole: a token given here replaces the context's user and password.
    conn = resolve_connection(token="t")
    assert (conn.user, conn.password, conn.token) == (None, None, "t")
    conn = resolve_connection(server="nats://a:1, nats://b:2", no_context=True)
    assert (conn.servers, conn.user, conn.url_from) == (("nats://a:1", "nats://b:2"), None, "option")
    # The nats CLI takes a user without a password as a token.
    assert resolve_connection(user="tok", no_context=True).token == "tok"
    monkeypatch.setenv("SANDBUS_DEFAULT_NATS_PORT", "4999")
    conn = resolve_connection(no_context=True)
    assert (conn.url, conn.is_default) == ("nats://127.0.0.1:4999", True)


# -- authentication against real servers ------------------------------------------------------------------

async def test_user_and_password_from_a_context_and_from_options(xdg: Path) -> None:
    with NatsServer(jetstream=False, extra_args=["--user", "u", "--pass", "pw-ctx-1"]) as server:
        _context(xdg, "secure", {"url": server.url, "user": "u", "password": "pw-ctx-1"})
        outcomes = await _publish_many([server], [
            Run(),
            Run(("--no-context", "-s", server.url, "--user", "u"), {"NATS_PASSWORD": "pw-ctx-1"}, flags=True),
            Run(("-s", server.url), {"NATS_USER": "u", "NATS_PASSWORD": "pw-ctx-1"}),
            Run(("--no-context", "-s", server.url), flags=True),
        ], auth={"user": "u", "password": "pw-ctx-1"})
    assert [(r.returncode, counts) for r, counts in outcomes] == [(0, [1]), (0, [1]), (0, [1]), (5, [0])], outcomes
    assert outcomes[3][0].stderr.splitlines() == [
        f"sandbus: cannot reach NATS at {server.url} (authorization violation); "
        "check --user/--password, --token, --creds or --nkey"]


async def test_token(xdg: Path) -> None:
    with NatsServer(jetstream=False, extra_args=["--auth", "tok-42"]) as server:
        outcomes = await _publish_many([server], [
            Run(("-s", server.url), {"NATS_TOKEN": "tok-42"}),
            Run(("-s", server.url, "--token", "wrong"), flags=True),
        ], auth={"token": "tok-42"})
    assert [(r.returncode, counts) for r, counts in outcomes] == [(0, [1]), (5, [0])], outcomes
    assert len(outcomes[1][0].stderr.splitlines()) == 1, outcomes
    assert "(authorization violation)" in outcomes[1][0].stderr, outcomes


async def test_nkey_seed_file(xdg: Path, tmp_path: Path) -> None:
    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed + b"\n")
    (tmp_path / "server.conf").write_text(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    with NatsServer(jetstream=False, extra_args=["-c", str(tmp_path / "server.conf")]) as server:
        _context(xdg, "nk", {"url": server.url, "nkey": f"file://{seed_file}"})
        outcomes = await _publish_many([server], [
            Run(("-s", server.url, "--nkey", str(seed_file)), flags=True),
            Run(("-s", server.url), {"NATS_NKEY": str(seed_file)}),
            Run(),  # from the context
            Run(("--no-context", "-s", server.url)),
        ], auth={"nkeys_seed": str(seed_file)})
    assert [(r.returncode, counts) for r, counts in outcomes] == [(0, [1]), (0, [1]), (0, [1]), (5, [0])], outcomes


async def test_creds_file(xdg: Path, tmp_path: Path) -> None:
    from tests.bus.test_bus import _operator_mode

    conf, creds = _operator_mode(tmp_path)
    with NatsServer(jetstream=False, extra_args=["-c", str(conf)]) as server:
        r, counts = await _publish_via_cli([server], "-s", server.url, env={"NATS_CREDS": str(creds)},
                                           auth={"user_credentials": str(creds)})
        assert (r.returncode, counts) == (0, [1]), r.stderr


# -- refusals: one line each --------------------------------------------------------------------------------

def test_unreachable_is_one_line_and_exit_5_at_once(xdg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = os.environ["SANDBUS_DEFAULT_NATS_PORT"]
    expected = [f"sandbus: cannot reach NATS at nats://127.0.0.1:{port} (connection refused); "
                "start one with `sandbus node`, or set NATS_URL / -s"]
    r = subprocess.run([str(SANDBUS), "ls"], capture_output=True, text=True, timeout=30, env=_env())
    assert r.returncode == 5, r.stderr
    assert r.stderr.splitlines() == expected
    assert r.stdout == ""
    # The failure itself, timed without the interpreter's start (which a loaded machine stretches).
    started = time.monotonic()
    with pytest.raises(typer.Exit) as e:
        client_run(lambda c: c.nodes(), resolve_connection())
    took = time.monotonic() - started
    assert e.value.exit_code == 5
    assert capsys.readouterr().err.splitlines() == expected
    assert took < 1.0, took


def test_a_tls_failure_is_one_line_and_exit_5(xdg: Path, tmp_path: Path) -> None:
    import shutil

    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate (apt-get install openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    with NatsServer(jetstream=False, extra_args=["--tls", "--tlscert", str(cert), "--tlskey", str(key)]) as server:
        url = server.url.replace("nats://", "tls://")
        # A certificate nobody vouched for: refused, in one line.
        r = subprocess.run([str(SANDBUS), "ls", "-s", url], capture_output=True, text=True, timeout=30, env=_env())
        assert r.returncode == 5, r.stderr
        assert r.stderr.splitlines() == [f"sandbus: cannot reach NATS at {url} (TLS: self-signed certificate); "
                                         "check --tlsca/--tlscert/--tlskey and the URL's scheme"]
        # The same server, with its certificate as the CA: connected.
        r = subprocess.run([str(SANDBUS), "pub", "--core", "t.x", "1", "-s", url], capture_output=True, text=True,
                           timeout=30, env=_env(NATS_CA=str(cert)))
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""
    with NatsServer(jetstream=False) as plain:
        # TLS asked for, a server that does not offer it: refused before anything is sent in the clear
        # (nats-py alone would go on unencrypted, credentials included).
        url = plain.url.replace("nats://", "tls://")
        r = subprocess.run([str(SANDBUS), "pub", "--core", "t.x", "1", "-s", url], capture_output=True, text=True,
                           timeout=30, env=_env(NATS_PASSWORD="never-sent", NATS_USER="u"))
        assert r.returncode == 5, r.stderr
        assert r.stderr.splitlines() == [f"sandbus: cannot reach NATS at {url} (TLS: the server does not offer "
                                         "TLS, and TLS was asked for); check --tlsca/--tlscert/--tlskey and the "
                                         "URL's scheme"]


def test_an_empty_server_is_a_usage_error(xdg: Path) -> None:
    for flag in ("-s", "--nats"):
        r = subprocess.run([str(SANDBUS), "ls", flag, ""], capture_output=True, text=True, timeout=30, env=_env())
        assert r.returncode == 2, r.stderr
        assert r.stderr.splitlines() == ["sandbus: -s/--server: no NATS server URL given (an empty -s/--nats is "
                                         "not the default; leave it out)"]


def test_a_bad_context_file_is_one_line_and_exit_2(xdg: Path) -> None:
    _context(xdg, "broken", "{not json")
    r = subprocess.run([str(SANDBUS), "ls"], capture_output=True, text=True, timeout=30, env=_env())
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert "nats context 'broken'" in r.stderr, r.stderr
    assert "is not valid JSON" in r.stderr


@pytest.mark.parametrize(("body", "name", "expected"), [
    ("[1, 2]", "dev", "is not a JSON object"),
    ('{"url": 42}', "dev", "'url' must be a string"),
    ('{"user": ["u"]}', "dev", "'user' must be a string"),
    ('{"tls_first": "yes"}', "dev", "'tls_first' must be true or false"),
    (b"{" + b" " * MAX_CONTEXT_BYTES + b"}", "dev", f"larger than {MAX_CONTEXT_BYTES} bytes"),
    ('{"url": ""}', "dev", None),  # empty values are unset, as in the nats CLI
    ('{"creds": "nsc://op/acc/user"}', "dev", "nsc: references are not supported"),
    ('{"nkey": "op://vault/item/seed"}', "dev", "op: references are not supported"),
    ('{"creds": "/nonexistent/user.creds"}', "dev", "--creds /nonexistent/user.creds: No such file"),
    ('{"ca": "/dev/zero"}', "dev", "--tlsca /dev/zero: not a regular file"),
    ('{"cert": "/nonexistent.pem"}', "dev", "needs both --tlscert and --tlskey"),
])
def test_refused_context_files(xdg: Path, capsys: pytest.CaptureFixture[str], body: str | bytes, name: str,
                               expected: str | None) -> None:
    _context(xdg, name, body)
    if expected is None:
        assert resolve_connection().is_default
        return
    with pytest.raises(typer.Exit) as e:
        resolve_connection()
    assert e.value.exit_code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert expected in err, err


@pytest.mark.parametrize(("selection", "expected"), [
    ("../../etc/passwd", "invalid nats context name"),
    ("a/b", "invalid nats context name"),
    ("x\x1b[31m", "invalid nats context name"),
    ("missing", "unknown nats context 'missing'"),
])
def test_refused_context_names(xdg: Path, capsys: pytest.CaptureFixture[str], selection: str,
                               expected: str) -> None:
    (xdg / "nats").mkdir()
    (xdg / "nats" / "context.txt").write_text(selection)
    for kwargs in ({}, {"context": selection}):
        with pytest.raises(typer.Exit) as e:
            resolve_connection(**kwargs)  # type: ignore[arg-type]
        assert e.value.exit_code == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1, err
        assert expected in err, err
    assert resolve_connection(no_context=True).is_default  # --no-context skips it


def test_refused_option_combinations(xdg: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    seed = tmp_path / "seed.nk"
    seed.write_text("SU...\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for kwargs, expected in (
        ({"token": "t", "nkey": seed}, "choose one way to authenticate: --token and --nkey"),
        ({"password": "p"}, "--password needs --user"),
        ({"creds": fifo}, "not a regular file"),  # never opened: a FIFO would block the command
        ({"server": "nats://a:1\nnats://b:2"}, "space or control character"),
    ):
        with pytest.raises(typer.Exit) as e:
            resolve_connection(**kwargs)  # type: ignore[arg-type]
        assert e.value.exit_code == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1, (kwargs, err)
        assert expected in err, (kwargs, err)


def test_credentials_in_a_url_are_not_shown(xdg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = os.environ["SANDBUS_DEFAULT_NATS_PORT"]
    with pytest.raises(typer.Exit) as e:
        client_run(lambda c: c.nodes(), resolve_connection(server=f"nats://op:hunter2@127.0.0.1:{port}"))
    assert e.value.exit_code == 5
    err = capsys.readouterr().err
    assert err.startswith(f"sandbus: cannot reach NATS at nats://***@127.0.0.1:{port} (connection refused)"), err
    assert "hunter2" not in err
