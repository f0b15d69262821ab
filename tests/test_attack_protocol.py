"""Attacks on the wire protocol and the CLI as a hostile NATS client, a hostile responder, a squatter on
the default port or a careless user would make them; each test failed before its fix. Real nats-server,
real node and CLI processes, real plugins.

Probed and found holding (no test here; the area's own tests cover them): CR/LF, non-UTF-8 bytes and
duplicate keys in raw request headers (an invalid ``Sandbus-Msg-Id`` is ignored, the node keeps
serving); ``Content-Type`` with odd case, parameters and whitespace; NaN / 1e400 timestamps
(``request.invalid_json``); control bodies that are huge, deep, not UTF-8 or name ``../`` paths
(``request.invalid_control`` / ``plugin.not_found``, bounded); a nats context that is a FIFO, a symlink
to ``/dev/zero``, or holds control characters or CR/LF in its name, URL or secrets; escape sequences
in replies, errors and ``ls`` answers (escaped by the CLI).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import nats
import orjson
import pytest
from nats.aio.msg import Msg

from sandbus.bus.connection import ConnectOptions
from sandbus.bus.server import NatsServer, listener_uids, nats_server_binary, probe_nats, stop_process
from sandbus.host.node.node import Node
from sandbus.sdk.errors import NodeIdInUseError
from tests.bus.conftest import POLICY, ROOT, NodeProcess


@pytest.fixture
def echo_plugins(tmp_path: Path, plugins_dir: Path) -> Path:
    d = tmp_path / "plugins"
    d.mkdir()
    for ext in ("wasm", "toml"):
        shutil.copy(plugins_dir / f"echo.{ext}", d / f"echo.{ext}")
    (tmp_path / "policy.toml").write_text(POLICY)
    return d


@pytest.fixture
def server() -> Iterator[NatsServer]:
    srv = NatsServer(jetstream=False).start()
    try:
        yield srv
    finally:
        srv.stop()


async def _until(condition: object, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)  # yields to the NATS callbacks that change the condition


def _refusal_lines(log: Path) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if "request.refused" in line]


def test_a_flood_of_distinct_bad_requests_is_folded_in_the_log_and_the_audit_trail(
        echo_plugins: Path, server: NatsServer, tmp_path: Path) -> None:
    """600 bad requests, each refused with a different message (a JSON error at another position, an
    unknown function with another name): every caller gets its ``request.*`` reply and every refusal
    is counted in the audit trail, but the node's log and the audit subject do not grow one entry per
    request (before: 600 log lines and ~600 audit messages: a log flood at the attacker's rate)."""
    node = NodeProcess("flood", echo_plugins, server.url, tmp_path / "flood.log")
    try:
        node.wait_ready()

        async def go() -> None:
            nc = await nats.connect(server.url)
            audits: list[dict[str, object]] = []

            async def on(msg: Msg) -> None:
                audits.append(orjson.loads(msg.data))

            await nc.subscribe("sandbus.audit.flood", cb=on)
            await nc.flush()
            bad_json = [nc.request("sandbus.req.echo.handle_request", b" " * i + b"}", timeout=10)
                        for i in range(300)]
            bad_function = [nc.request(f"sandbus.req.echo.nope_{i}", b"{}", timeout=10) for i in range(300)]
            replies = await asyncio.gather(*bad_json, *bad_function)
            codes = {(r.headers or {}).get("Sandbus-Error-Code") for r in replies}
            assert codes == {"request.invalid_json", "request.unknown_function"}

            def refused() -> int:
                return sum(int(str(a.get("count", 1))) for a in audits if a.get("kind") == "request.refused")

            await _until(lambda: refused() == 600, 5, "the audit counts of 600 refusals")
            assert len(audits) <= 20, f"{len(audits)} audit messages for 600 refusals"
            await nc.close()

        asyncio.run(go())
        lines = _refusal_lines(tmp_path / "flood.log")
        assert 1 <= len(lines) <= 20, f"{len(lines)} log lines for 600 refusals"
    finally:
        node.terminate()


def _config(path: Path, port: int, max_payload: int) -> Path:
    path.write_text(f"host: 127.0.0.1\nport: {port}\nmax_payload: {max_payload}\n")
    return path


def test_a_reconnect_to_a_server_with_a_smaller_max_payload_answers_too_large_not_a_dropped_connection(
        echo_plugins: Path, server: NatsServer, tmp_path: Path) -> None:
    """The node's server is replaced by one with an 8 KiB max payload; a request that fits it but whose
    echo does not (with the reply's headers) must get ``limit.payload``. Before: the node kept the 1 MiB
    it read at start, sent the reply, the server closed the node's connection and the caller timed out."""
    port = int(server.url.rsplit(":", 1)[1])
    node = NodeProcess("shrink", echo_plugins, server.url, tmp_path / "shrink.log")
    small: NatsServer | None = None
    try:
        node.wait_ready()

        async def before() -> None:  # served under the first server's max payload
            nc = await nats.connect(server.url)
            reply = await nc.request("sandbus.req.echo.handle_request", b'"x"', timeout=5)
            assert reply.data == b'"x"'
            await nc.close()

        asyncio.run(before())
        server.stop()
        small = NatsServer(jetstream=False, config=_config(tmp_path / "small.conf", port, 8192)).start()

        async def go() -> None:
            log = tmp_path / "shrink.log"
            await _until(lambda: "reconnected" in log.read_text(errors="replace"), 15, "the node's reconnect")
            nc = await nats.connect(small.url)
            try:
                body = b'"' + b"x" * (8192 - 20) + b'"'
                reply = await nc.request("sandbus.req.echo.handle_request", body, timeout=5)
                assert (reply.headers or {}).get("Sandbus-Error-Code") == "limit.payload", (reply.headers, reply.data)
                ok = await nc.request("sandbus.req.echo.handle_request", b'{"still": "serving"}', timeout=5)
                assert orjson.loads(ok.data) == {"still": "serving"}
            finally:
                await nc.close()

        asyncio.run(go())
        assert "Maximum Payload" not in (tmp_path / "shrink.log").read_text(errors="replace")
    finally:
        node.terminate()
        if small is not None:
            small.stop()



async def sandbus(*args: str, env: dict[str, str]) -> tuple[int, bytes]:
    """Run the ``sandbus`` command (at most 30 s, then killed): its exit code and its output, stderr included."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "sandbus", *args, cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out

async def test_a_responder_spoofing_the_node_id_probe_gets_a_short_printable_message(
        echo_plugins: Path, server: NatsServer) -> None:
    """Whoever may subscribe to ``sandbus.node.<id>.list`` can keep a node with that id from starting
    (by design: the same principal could take its control requests; the deploy permissions give that
    subject to nodes only). What it answers must not reach the operator: a 100 kB version with
    escape sequences was quoted whole in ``NodeIdInUseError`` before (the CLI escapes and cuts its
    output; an application logging the error did not)."""
    nc = await nats.connect(server.url)

    async def answer(msg: Msg) -> None:
        await msg.respond(orjson.dumps({"version": "\x1b]0;pwned\x07\x1b[2J" + "A" * 100_000}))

    await nc.subscribe("sandbus.node.spoofed.list", cb=answer)
    await nc.flush()
    try:
        node = Node.create(echo_plugins, ConnectOptions.from_urls(server.url), node_id="spoofed", durable=False)
        try:
            with pytest.raises(NodeIdInUseError) as refused:
                await node.start()
        finally:
            await node.stop(timeout=1)
        message = str(refused.value)
        assert "another node" in message
        assert "\x1b" not in message
        assert "\x07" not in message
        assert len(message) < 500, f"{len(message)} characters"

        returncode, out = await sandbus(
            "node", "--plugins", str(echo_plugins), "--nats", server.url, "--node-id", "spoofed", "--policy",
            str(echo_plugins.parent / "policy.toml"), "--no-watch", env={**os.environ, "PYTHONUNBUFFERED": "1"})
        text = out.decode(errors="replace")
        assert returncode != 0
        assert "another node" in text
        assert "\x1b" not in text
        assert len(text) < 4000, f"{len(text)} characters of output"
    finally:
        await nc.close()


def test_a_password_written_into_the_url_never_reaches_the_node_log(echo_plugins: Path, tmp_path: Path) -> None:
    """``--nats nats://user:password@host`` (as NATS_URL is often written): the node's log lines for
    serving, reconnecting and a node id in use showed the URL whole, password included."""
    secret = "s3cret-pw-77"
    probe = NatsServer(jetstream=False).start()  # only to learn a free port
    port = int(probe.url.rsplit(":", 1)[1])
    probe.stop()
    conf = tmp_path / "auth.conf"
    conf.write_text(f'host: 127.0.0.1\nport: {port}\nauthorization {{ user: "u", password: "{secret}" }}\n')
    url = f"nats://u:{secret}@127.0.0.1:{port}"
    first = NatsServer(jetstream=False, config=conf).start()
    second: NatsServer | None = None
    node = NodeProcess("pw", echo_plugins, url, tmp_path / "pw.log")
    twin: NodeProcess | None = None
    try:
        node.wait_ready()
        twin = NodeProcess("pw", echo_plugins, url, tmp_path / "twin.log")
        assert twin.proc.wait(timeout=30) != 0
        first.stop()
        second = NatsServer(jetstream=False, config=conf).start()

        async def reconnected() -> None:
            log = tmp_path / "pw.log"
            await _until(lambda: "reconnected" in log.read_text(errors="replace"), 15, "the node's reconnect")

        asyncio.run(reconnected())
        twin_log = (tmp_path / "twin.log").read_text(errors="replace")
        assert "another node" in twin_log
        for log in (tmp_path / "pw.log", tmp_path / "twin.log"):
            text = log.read_text(errors="replace")
            assert secret not in text, text[-2000:]
    finally:
        if twin is not None:
            twin.terminate()
        node.terminate()
        for srv in (first, second):
            if srv is not None:
                srv.stop()


#: error bodies a responder that is not a well-behaved node may send (code in the header, as a node does)
HOSTILE_ERRORS: list[tuple[str, object]] = [
    ("manifest.invalid", {"message": "m", "details": {"plugin": "x", "message": "y", "path": 7, "key": ["k"]}}),
    ("sandbox.trap", {"message": "t", "details": {"backtrace": [1, {"a": 2}, None]}}),
    ("sandbox.trap", {"message": "t", "details": {"backtrace": 5}}),
    ("limit.timeout", {"message": ["not", "text"], "plugin": {"a": 1}, "details": "abc"}),
    ("limit.timeout", {"message": "\x1b]0;pwned\x07" * 40_000, "plugin": "p" * 100_000, "details": [[1, 2]]}),
]


async def test_a_hostile_error_reply_raises_the_typed_error_bounded(server: NatsServer) -> None:
    """Whatever answers ``sandbus.req.<plugin>.<function>`` (any client may subscribe there on an open bus)
    chooses the error body. A ``details`` that is not an object, a ``details.plugin`` colliding with the
    constructor, a backtrace that is not a list of strings made the client raise ValueError / TypeError
    (the CLI: exit 70, "a bug of sandbus") instead of the error; a 300 kB message reached the caller
    and the terminal whole."""
    from sandbus.sdk.client import Client
    from sandbus.sdk.errors import SandbusError

    nc = await nats.connect(server.url)

    def responder(code: str, body: object) -> Callable[[Msg], Awaitable[None]]:
        async def answer(msg: Msg) -> None:
            await nc.publish(msg.reply, orjson.dumps({"error": body}), headers={"Sandbus-Error-Code": code})
        return answer

    for i, (code, body) in enumerate(HOSTILE_ERRORS):
        await nc.subscribe(f"sandbus.req.hostile{i}.fn", cb=responder(code, body))
    await nc.flush()
    try:
        async with await Client.connect(server.url) as client:
            for i, (code, _) in enumerate(HOSTILE_ERRORS):
                with pytest.raises(SandbusError) as raised:
                    await client.request(f"hostile{i}", "fn", {})
                assert raised.value.code == code
                assert len(str(raised.value)) < 20_000
        for i in range(len(HOSTILE_ERRORS)):
            returncode, err = await sandbus("request", f"hostile{i}", "fn", "{}",
                                            env={**os.environ, "NATS_URL": server.url, "SANDBUS_DEBUG": ""})
            assert returncode not in (0, 70), err[-2000:]
            assert b"Traceback" not in err
            assert b"\x1b" not in err
            assert len(err) < 50_000, f"{len(err)} bytes on stderr"
    finally:
        await nc.close()


async def _fake_nats(max_payload: object) -> tuple[asyncio.Server, int]:
    """Something on a port that speaks just enough NATS (INFO, PONG) and states ``max_payload``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = {"server_id": "FAKE", "version": "9.9.9", "headers": True, "proto": 1, "max_payload": max_payload}
        writer.write(b"INFO " + orjson.dumps(info) + b"\r\n")
        try:
            while line := await reader.readline():
                if line.startswith(b"PING"):
                    writer.write(b"PONG\r\n")
                elif line.startswith((b"PUB", b"HPUB")):
                    await reader.readexactly(int(line.split()[-1]) + 2)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    fake = await asyncio.start_server(serve, "127.0.0.1", 0)
    return fake, fake.sockets[0].getsockname()[1]


@pytest.mark.parametrize("max_payload", ["lots", -5])
async def test_a_fake_nats_on_the_default_port_with_a_hostile_info_is_refused_in_one_line(
        echo_plugins: Path, tmp_path: Path, max_payload: object) -> None:
    """``sandbus node`` with no URL joins whatever speaks NATS on the default port; ``sandbus request``
    connects there too. A squatter whose INFO states a max payload that is not a positive number made
    the first publish fail inside nats-py: exit 70, "internal error ... please report it"."""
    fake, port = await _fake_nats(max_payload)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    env.update(SANDBUS_DEFAULT_NATS_PORT=str(port), XDG_CONFIG_HOME=str(tmp_path / "xdg"), PYTHONUNBUFFERED="1")
    commands = (["node", "--plugins", str(echo_plugins), "--no-watch", "--policy",
                 str(echo_plugins.parent / "policy.toml")], ["request", "echo", "handle_request", "{}"])
    try:
        for args in commands:
            returncode, out = await sandbus(*args, env=env)
            text = out.decode(errors="replace")
            assert returncode == 5, (args[0], returncode, text[-2000:])
            assert "max_payload" in text
            assert "internal error" not in text
    finally:
        fake.close()
        await fake.wait_closed()


class _Slowloris:
    """An "OTLP collector" that answers HTTP 200 with a 100 MB body, one byte every 0.1 s."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
                    while not self.stop.wait(0.1):
                        conn.sendall(b"x")
                except OSError:
                    continue

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(5)


def test_a_collector_that_answers_one_byte_at_a_time_does_not_hold_the_cli(server: NatsServer) -> None:
    """With ``OTEL_*`` set, a client command exports its spans when it ends, "bounded by the exporter's
    timeout" (1 s) -- but that timeout bounds each socket read: a collector trickling its answer held
    ``sandbus request`` for minutes (killed at 60 s in the probe). Now the export is abandoned at its
    deadline and the command ends with its own exit code and one warning."""
    collector = _Slowloris()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "OTEL_"))}
    env.update(NATS_URL=server.url, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.port}",
               OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf")
    proc = subprocess.Popen([sys.executable, "-m", "sandbus", "request", "nobody", "fn", "{}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    started = time.monotonic()
    try:
        _, err = proc.communicate(timeout=15)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        collector.close()
    assert proc.returncode == 6, err[-2000:]  # no node serves it: the command's own answer
    assert b"not exported" in err
    assert elapsed < 6, f"{elapsed:.1f} s"


@pytest.mark.skipif(os.getuid() != 0 or listener_uids(1) is None,
                    reason="needs root (to start a server as another user) and Linux /proc/net")
def test_a_nats_server_of_another_user_on_the_default_port_is_not_joined(echo_plugins: Path, tmp_path: Path) -> None:
    """Any local user may start a NATS server on the default port first; ``sandbus node`` without a URL
    joined it, so that user could call this user's plugins (with their grants) and read the replies.
    Now a server of another user (not root) is left alone: the node embeds its own and says so."""
    with socket.create_server(("127.0.0.1", 0)) as s:  # a free port, released for the server
        port = s.getsockname()[1]
    squatter = subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)], user="nobody",
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    env.update(SANDBUS_DEFAULT_NATS_PORT=str(port), XDG_CONFIG_HOME=str(tmp_path / "xdg"), PYTHONUNBUFFERED="1")
    log = tmp_path / "node.log"
    node: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 10
        while not isinstance(probe_nats("127.0.0.1", port), dict):
            assert time.monotonic() < deadline, "the other user's server did not start"
            time.sleep(0.05)  # polling the port for the server's INFO, bounded
        with log.open("wb") as out:
            node = subprocess.Popen(
                [sys.executable, "-m", "sandbus", "node", "--plugins", str(echo_plugins), "--no-watch",
                 "--policy", str(echo_plugins.parent / "policy.toml"), "--data-dir", str(tmp_path / "data")],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while " ready" not in log.read_text(errors="replace"):
            assert node.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)  # polling the node's log for its ready line, bounded
        text = log.read_text(errors="replace")
        assert "joining" not in text
        assert "another user" in text
        assert f"127.0.0.1:{port} " not in text.split("another user")[0]  # served on its own server
    finally:
        if node is not None:
            stop_process(node, 20)
        stop_process(squatter, 10)
