"""The direct dispatch of requests (GuardedNatsClient.dispatch_directly, Requests.request_direct), attacked
the way a hostile NATS client and an unlucky operator would, against a real nats-server and real plugins.

Each attack runs the same requests through a node on the direct path and one on the queued path
(``bus.direct_dispatch = False``) where the two can be compared: a request must get the same answer
either way, every request gets an answer, and no call runs twice."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import ClassVar

import orjson
import pytest
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from sandbus.bus.requests import Requests
from sandbus.bus.server import NatsServer
from sandbus.sdk.nats_guard import GuardedNatsClient
from tests.bus.conftest import a_node

pytestmark = pytest.mark.asyncio


class RawRequester:
    """A bare NATS client on a socket: sends protocol lines nats-py would refuse to build, and collects
    the replies on ``<inbox>.<n>`` (body and raw header block, by n)."""

    _count = 0
    #: (inbox, n) of every requester's replies, in the order they arrived
    arrivals: ClassVar[list[tuple[bytes, int]]] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        RawRequester._count += 1
        self.inbox = b"_R%d" % RawRequester._count
        self.reader, self.writer = reader, writer
        self.replies: dict[int, list[tuple[bytes, bytes]]] = {}
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, port: int) -> RawRequester:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        await reader.readline()  # INFO
        self = cls(reader, writer)
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\n'
                     b'SUB %s.> 1\r\n' % self.inbox)
        self._task = asyncio.ensure_future(self._read())
        await self.ping()
        return self

    async def ping(self) -> None:
        """Returns once the server has processed everything sent before."""
        self._pong = asyncio.get_running_loop().create_future()
        self.writer.write(b"PING\r\n")
        await asyncio.wait_for(self._pong, 10)

    async def _read(self) -> None:
        reader = self.reader
        while True:
            line = await reader.readline()
            if not line:
                return
            if line.startswith(b"PING"):
                self.writer.write(b"PONG\r\n")
            elif line.startswith(b"PONG"):
                if not self._pong.done():
                    self._pong.set_result(None)
            elif line.startswith((b"MSG ", b"HMSG ")):
                fields = line.rstrip(b"\r\n").split(b" ")  # nats-server's separator (a subject may hold \x0b)
                total = int(fields[-1])
                header_size = int(fields[-2]) if fields[0] == b"HMSG" else 0
                payload = await reader.readexactly(total + 2)
                n = int(fields[1].split(b".")[1])
                self.replies.setdefault(n, []).append((payload[header_size:total], payload[:header_size]))
                RawRequester.arrivals.append((self.inbox, n))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def request(self, subject: bytes, n: int, block: bytes, body: bytes, suffix: bytes = b"") -> None:
        """An HPUB to ``subject`` (``block`` as it is: any bytes) with the reply subject
        ``<inbox>.<n><suffix>``."""
        self.writer.write(b"HPUB %s %s.%d%s %d %d\r\n%s%s\r\n" % (subject, self.inbox, n, suffix, len(block),
                                                                    len(block) + len(body), block, body))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.writer.close()


_ECHO = b"sandbus.req.echo.handle_request"
#: header blocks a hostile client sends with a request: a status line, non-ASCII bytes, 60 KB of
#: headers, duplicate keys, CR or LF alone inside an id or a trace context, a name with a space
_BLOCKS: list[bytes] = [
    b"NATS/1.0 503\r\n\r\n",
    b"NATS/1.0 503\r\nSandbus-Msg-Id: s-1\r\n\r\n",
    b"NATS/1.0 100 Idle Heartbeat\r\nSandbus-Msg-Id: s-2\r\n\r\n",
    b"NATS/1.0\r\nSandbus-Msg-Id: caf\xc3\xa9\r\n\r\n",
    b"NATS/1.0\r\nSandbus-Msg-Id: \xff\xfe\r\n\r\n",
    b"NATS/1.0\r\nX-Big: " + b"a" * 60_000 + b"\r\nSandbus-Msg-Id: big-1\r\n\r\n",
    b"NATS/1.0\r\nSandbus-Msg-Id: first\r\nSandbus-Msg-Id: second\r\n\r\n",
    b"NATS/1.0\r\nSandbus-Msg-Id: a\rb\r\n\r\n",
    b"NATS/1.0\r\nSandbus-Msg-Id: a\nInjected: yes\r\n\r\n",
    b"NATS/1.0\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\rX: y\r\n\r\n",
    b"NATS/1.0\r\ntraceparent:  00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 \r\n\r\n",
    b"NATS/1.0\r\nSandbus-Msg-Id : spaced\r\n\r\n",
    b"NATS/1.0\r\nSandbus Msg-Id: x\r\n\r\n",
    b"NATS/1.0\r\nSandbus-Trace-Debug: 1\r\n\r\n",
    b"NATS/1.0\r\n\r\n",
    b"NATS/1.0XXSandbus-Msg-Id: no-crlf\r\n\r\n",
]


_SENT_TRACE = b"0af7651916cd43dd8448eb211c80319c"


def _shown(block: bytes) -> bytes:
    """A reply's header block without the node's id and a trace context the node made (they differ
    between the two nodes; one the client sent is kept)."""
    return b"\r\n".join(b"traceparent: (the node's)" if line.startswith(b"traceparent:") and _SENT_TRACE not in line
                         else line for line in block.split(b"\r\n") if not line.startswith(b"Sandbus-Node:"))


async def _hostile_answers(plugins: Path, server: NatsServer, direct: bool) -> dict[int, list[tuple[bytes, bytes]]]:
    async with a_node(plugins, server.url, direct, "hd" if direct else "hq"):
        raw = await RawRequester.connect(server.port)
        try:
            for i, block in enumerate(_BLOCKS):
                raw.request(_ECHO, i, block, b'{"n": %d}' % i)
            await raw.ping()
            async with asyncio.timeout(10):
                while len(raw.replies) < len(_BLOCKS):
                    await asyncio.sleep(0.01)  # replies arrive on the raw reader task
            await raw.ping()
            return {n: [(body, _shown(block)) for body, block in got] for n, got in raw.replies.items()}
        finally:
            await raw.close()


async def test_hostile_headers_get_the_same_answer_on_both_paths(bus_plugins: Path, nats_server: NatsServer) -> None:
    direct = await _hostile_answers(bus_plugins, nats_server, True)
    queued = await _hostile_answers(bus_plugins, nats_server, False)
    assert set(direct) == set(range(len(_BLOCKS)))
    assert all(len(got) == 1 for got in direct.values())  # one answer each, nothing ran twice
    for i in range(len(_BLOCKS)):
        assert direct[i] == queued[i], _BLOCKS[i][:80]
    assert orjson.loads(direct[6][0][0]) == {"n": 6}
    assert b"Sandbus-Msg-Id: second" in direct[6][0][1]  # the last of duplicate keys, as nats-py reads them


def _error_code(block: bytes) -> str | None:
    for line in block.split(b"\r\n"):
        if line.startswith(b"Sandbus-Error-Code:"):
            return line.split(b":", 1)[1].strip().decode()
    return None


@pytest.mark.parametrize("direct", [True, False])
async def test_a_reload_and_an_unload_during_a_flood_answer_every_request_once(
        bus_plugins: Path, nats_server: NatsServer, direct: bool) -> None:
    total, batch = 6000, 150
    async with a_node(bus_plugins, nats_server.url, direct, "fl") as node:
        raws = [await RawRequester.connect(nats_server.port) for _ in range(3)]
        control = await RawRequester.connect(nats_server.port)
        try:
            for start in range(0, total, batch):
                for n in range(start, start + batch):
                    raws[n % 3].request(_ECHO, n, b"NATS/1.0\r\nSandbus-Msg-Id: m%d\r\n\r\n" % n, b'{"n": %d}' % n)
                if start == batch * (total // batch // 3):
                    control.request(b"sandbus.node.fl.reload", 1, b"NATS/1.0\r\n\r\n", b'{"plugin": "echo"}')
                if start == batch * (2 * total // batch // 3):
                    control.request(b"sandbus.node.fl.unload", 2, b"NATS/1.0\r\n\r\n", b'{"plugin": "echo"}')
                await asyncio.sleep(0.002)  # the node's loop is this one: let it read
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while sum(len(r.replies) for r in raws) < total or len(control.replies) < 2:
                missing = sorted(set(range(total)) - {n for r in raws for n in r.replies})
                assert loop.time() < deadline, (f"{len(missing)} requests unanswered: {missing[:20]}...; control "
                                                f"replies {control.replies}")
                await asyncio.sleep(0.02)  # replies arrive on the raw reader tasks
            for r in raws:
                await r.ping()
            replies = {n: got for r in raws for n, got in r.replies.items()}
            assert sorted(replies) == list(range(total))
            twice = [n for n, got in replies.items() if len(got) != 1]
            assert twice == []
            codes: dict[str | None, int] = {}
            for n, [(body, block)] in replies.items():
                # nats-server's own answer once no node subscribes (the client asked for it)
                code = "no responders" if block.startswith(b"NATS/1.0 503") else _error_code(block)
                codes[code] = codes.get(code, 0) + 1
                assert code == "no responders" or b"Sandbus-Msg-Id: m%d\r\n" % n in block
                if code is None:
                    assert orjson.loads(body) == {"n": n}
            assert set(codes) <= {None, "plugin.not_found", "no responders"}, codes
            assert codes.get(None, 0) >= total // 3, codes
            async with asyncio.timeout(10):
                while node.bus.served("echo") is not None:
                    await asyncio.sleep(0.01)  # the node unsubscribes in a task after the unload
        finally:
            for r in [*raws, control]:
                await r.close()


async def test_a_restart_of_nats_server_during_a_flood_leaves_the_direct_path_working(
        bus_plugins: Path, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    queued: list[str] = []
    on_request = Requests.on_request

    async def counted(self: Requests, msg: Msg) -> None:
        queued.append(msg.subject)
        await on_request(self, msg)

    monkeypatch.setattr(Requests, "on_request", counted)
    async with a_node(bus_plugins, nats_server.url, True, "rc") as node:
        nc = node.bus.nc
        assert isinstance(nc, GuardedNatsClient)
        raw = await RawRequester.connect(nats_server.port)
        for n in range(3000):
            raw.request(_ECHO, n, b"NATS/1.0\r\n\r\n", b"{}")
        restart = asyncio.ensure_future(asyncio.to_thread(nats_server.restart))  # the node's loop keeps running
        for n in range(3000, 4000):  # raw writes while the server goes away: refused, or buffered by nats-py
            if not raw.writer.is_closing():
                raw.request(_ECHO, n, b"NATS/1.0\r\n\r\n", b"{}")
            if n % 100 == 0:
                await asyncio.sleep(0.005)
        await restart
        with contextlib.suppress(OSError):  # the server it wrote to is gone
            await raw.close()
        async with asyncio.timeout(20):
            while not (nc.is_connected and nc.stats["reconnects"] >= 1):
                await asyncio.sleep(0.02)  # nats-py reconnects with its own backoff
        client = GuardedNatsClient()
        await client.connect(nats_server.url)
        try:
            async with asyncio.timeout(20):
                while True:  # until the node's subscriptions are on the new server
                    with contextlib.suppress(NatsError):
                        await client.request(_ECHO.decode(), b"{}", timeout=0.5)
                        break
                    await asyncio.sleep(0.02)
            queued.clear()
            # One at a time: a burst may be queued by the loop's turns (bus/turns.py), on either path.
            replies = [await client.request(_ECHO.decode(), b'{"n": %d}' % n, timeout=10) for n in range(200)]
        finally:
            await client.close()
        assert [orjson.loads(r.data) for r in replies] == [{"n": n} for n in range(200)]
        assert queued == []  # still answered in the read loop after the reconnect
        assert nc.read_loop_restarts == 0
        assert nc._direct  # the registration survived the resubscribe


async def test_a_flood_waiting_for_its_turns_is_checked_once_a_request(
        bus_plugins: Path, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # Under a flood most requests wait for their turn on the loop: the direct path declines them to
    # the queued one. It used to check each body before declining, and the queued path checked it
    # again (a client's 1 MB body was parsed twice; a flood cost 1.8 JSON checks a request).
    import sandbus.bus.requests as requests_module

    checks: list[int] = []
    check_json = requests_module.check_json

    def counted(data: bytes, plugin: str) -> None:
        checks.append(len(data))
        check_json(data, plugin)

    monkeypatch.setattr(requests_module, "check_json", counted)
    async with a_node(bus_plugins, nats_server.url, True, "tn") as node:
        node.bus.turns.slice_s = 0.0  # every request after the first of a loop iteration waits for a turn
        raw = await RawRequester.connect(nats_server.port)
        try:
            total = 300
            for n in range(total):
                raw.request(_ECHO, n, b"NATS/1.0\r\n\r\n", b'{"n": %d}' % n)
            async with asyncio.timeout(20):
                while len(raw.replies) < total:
                    await asyncio.sleep(0.01)  # replies arrive on the raw reader task
            assert all(orjson.loads(got[0][0]) == {"n": n} for n, got in raw.replies.items())
            assert len(checks) == total
        finally:
            await raw.close()


#: reply subjects a hostile client may give: bytes nats-py splits on, UTF-8, wildcards, empty tokens
_ODD_REPLIES = [b".\x0b", b".\x0c7", b".caf\xc3\xa9", b".*", b".>", b"..x", b".", b".\x7f"]


async def _odd_outcome(plugins: Path, server: NatsServer, direct: bool) -> tuple[dict[int, int], int, int, int]:
    """Replies per request (to odd reply subjects), echo's executions after requests with no reply
    subject, and the node connection's reconnects and errors."""
    async with a_node(plugins, server.url, direct, "od" if direct else "oq") as node:
        raw = await RawRequester.connect(server.port)
        try:
            for i, suffix in enumerate(_ODD_REPLIES):
                raw.request(_ECHO, i, b"NATS/1.0\r\n\r\n", b"{}", suffix)
            for _ in range(50):  # no reply subject: run (side effects count), answered to nobody
                raw.send(b"PUB %s 2\r\n{}\r\n" % _ECHO)
            raw.request(_ECHO, 99, b"NATS/1.0\r\n\r\n", b"{}")
            async with asyncio.timeout(10):
                while 99 not in raw.replies or node.manager.info("echo").executions < 59:
                    await asyncio.sleep(0.01)  # replies arrive on the raw reader task
            await raw.ping()
            nc = node.bus.nc
            assert nc is not None
            assert nc.is_connected
            return ({n: len(got) for n, got in raw.replies.items()}, node.manager.info("echo").executions,
                    nc.stats["reconnects"], nc.stats["errors_received"])
        finally:
            await raw.close()


async def test_no_reply_subject_and_odd_reply_subjects_are_handled_alike(bus_plugins: Path,
                                                                          nats_server: NatsServer) -> None:
    direct = await _odd_outcome(bus_plugins, nats_server, True)
    queued = await _odd_outcome(bus_plugins, nats_server, False)
    assert direct == queued
    replies, executions, reconnects, errors = direct
    assert errors == 0
    assert executions == len(_ODD_REPLIES) + 51  # each request ran once
    assert reconnects == 0
    assert replies[99] == 1


async def test_requests_queued_behind_a_flood_are_not_overtaken_by_newer_ones(
        bus_plugins: Path, nats_server: NatsServer) -> None:
    # Requests that had to wait for a turn are queued for the subscription's callback; newer ones the
    # read loop could run at once used to go ahead of them, turn after turn, so under a steady flood
    # the queued ones starved (a client whose burst was queued got no answer in 10 s while the others
    # were served). A plugin's requests are answered in the order they arrived.
    async with a_node(bus_plugins, nats_server.url, True, "fo") as node:
        node.bus.turns.slice_s = 0.0  # one request a loop iteration runs at once, the others wait for turns
        first, second = await RawRequester.connect(nats_server.port), await RawRequester.connect(nats_server.port)
        try:
            for n in range(300):
                first.request(_ECHO, n, b"NATS/1.0\r\n\r\n", b"{}")
            await first.ping()
            for n in range(300):  # a steady stream behind the burst
                second.request(_ECHO, n, b"NATS/1.0\r\n\r\n", b"{}")
                await asyncio.sleep(0)
            async with asyncio.timeout(30):
                while len(first.replies) < 300 or len(second.replies) < 300:
                    await asyncio.sleep(0.01)  # replies arrive on the raw reader tasks
            await second.ping()
            inboxes = [inbox for inbox, _ in RawRequester.arrivals if inbox in (first.inbox, second.inbox)]
            # Answered in arrival order: the burst first. A call that overran its inline budget on a loaded
            # machine finishes in a thread a little later, so a newer answer may come before the last few of
            # the burst; without the ordering only 7 of the burst were answered before the first newer one.
            before = inboxes.index(second.inbox)
            assert before >= 290, f"only {before} of the burst answered before the first newer request"
        finally:
            await first.close()
            await second.close()


async def test_megabyte_header_blocks_are_dropped_without_holding_the_read_loop(
        bus_plugins: Path, nats_server: NatsServer) -> None:
    # A header block of a megabyte of one-line headers took 80 ms to parse (186 ms with nats-py's
    # parser), in the read loop: twenty of them held a node for more than 1.6 s. Blocks of more than
    # MAX_HEADER_LINES lines are not parsed; their messages are dropped and reported, like undecodable
    # ones. A long header on few lines is read as before.
    async with a_node(bus_plugins, nats_server.url, True, "hb") as node:
        nc = node.bus.nc
        assert isinstance(nc, GuardedNatsClient)
        raw = await RawRequester.connect(nats_server.port)
        try:
            size = nc.max_payload - 64
            block = b"NATS/1.0\r\n" + b"a:\r\n" * ((size - 12) // 4) + b"\r\n"
            raw.request(_ECHO, 0, b"NATS/1.0\r\nSandbus-Msg-Id: long\r\nb: " + b"x" * (size // 2) + b"\r\n\r\n",
                        b"{}")
            for n in range(1, 21):
                raw.request(_ECHO, n, block, b"{}")
            loop = asyncio.get_running_loop()
            start = loop.time()
            raw.request(_ECHO, 99, b"NATS/1.0\r\n\r\n", b'{"after": true}')
            async with asyncio.timeout(20):
                while 99 not in raw.replies:
                    await asyncio.sleep(0.005)  # replies arrive on the raw reader task
            took = loop.time() - start
            assert orjson.loads(raw.replies[99][0][0]) == {"after": True}
            assert b"Sandbus-Msg-Id: long\r\n" in raw.replies[0][0][1]
            assert took < 0.8, f"a request behind twenty 1 MB header blocks waited {took:.2f} s"
            assert nc.dropped_messages == 20
            assert nc.is_connected
            assert nc.read_loop_restarts == 0
        finally:
            await raw.close()
