"""Property-based fuzzing of what a node accepts from NATS (hypothesis, bounded and reproducible).

One real nats-server and one real node process serve the whole module. Inputs go in through
nats-py where it can send them (subjects, headers, bodies, envelopes, control requests) and through
a raw TCP socket speaking the NATS protocol where it cannot (subjects and header lines that are not
UTF-8, control lines past the server's limit). The properties, after every input:

* the node is still serving: a canary echo request is answered within a short bound;
* a request the node serves (it has a reply subject and reaches a subscription of the node) is
  answered, not left to time out, and the answer is a plugin reply (JSON) or a well-formed sandbus
  error reply (``Sandbus-Error-Code`` header, a JSON ``{"error": {...}}`` body); never a traceback.

Examples are derandomized (the same inputs in every run) and few, so the module stays within
tens of seconds; failures are reported without shrinking, for the same reason.
"""

from __future__ import annotations

import asyncio
import enum
import re
import shutil
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import nats
import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, MaxPayloadError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from sandbus.bus.server import NatsServer
from sandbus.sdk.envelope import H_ERROR_CODE, error_from_reply
from sandbus.sdk.errors import SandbusError
from tests.bus.conftest import RECORDER_TOML, NodeProcess

T = TypeVar("T")

NODE_ID = "fz"
SERVED = ("echo", "rec_a")
VERBS = ("list", "stats", "load", "unload", "reload")
#: how long a served request may go unanswered before it counts as silence
REPLY_BOUND_S = 3.0
#: how long the canary may take (a node that replaced a dead connection needs a moment)
CANARY_BOUND_S = 3.0
#: how long a fresh message on a durable topic may take to reach its plugin (a pull request that
#: is lost or miscounted shows up as a wait of its expiry, 5 s, plus the loop's 2 s margin)
DURABLE_BOUND_S = 5.0

POLICY = """
[capabilities]
allowed = ["compute", "messaging"]
[messaging]
publish_topics = ["seen.*"]
subscribe_topics = ["orders.*"]
[limits]
max_fuel = 10000000000000
"""

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None, report_multiple_bugs=False,
                phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))


class RawNats:
    """The NATS protocol over a plain socket: sends bytes nats-py never would.

    Each ``send`` ends with a PING and waits for the PONG (or for the server to close the
    connection after a protocol error), so the server has routed the input before the test looks
    at the node. A closed connection is opened again on the next send.
    """

    def __init__(self, url: str) -> None:
        host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
        self.addr = (host, int(port))
        self.sock: socket.socket | None = None

    def _open(self) -> socket.socket:
        sock = socket.create_connection(self.addr, timeout=2.0)
        self._read_until(sock, b"\r\n")  # INFO
        sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true,'
                     b'"protocol":1,"name":"raw-fuzz"}\r\nPING\r\n')
        self._read_until(sock, b"PONG\r\n")
        return sock

    @staticmethod
    def _read_until(sock: socket.socket, marker: bytes) -> bytes:
        data = b""
        deadline = time.monotonic() + 2.0
        while marker not in data and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break  # the server closed the connection (a protocol error): fine for a fuzzer
            data += chunk
        return data

    def send(self, raw: bytes) -> None:
        if self.sock is None:
            self.sock = self._open()
        try:
            self.sock.sendall(raw + b"\r\nPING\r\n")
            got = self._read_until(self.sock, b"PONG\r\n")
        except OSError:
            got = b""
        if b"PONG" not in got:
            self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Refused(enum.Enum):
    """The server itself refused an input (and may have closed the connection): the node never saw it."""

    REFUSED = "refused"


REFUSED = Refused.REFUSED


class FuzzBus:
    """The module's server, node, one nats-py client on a private loop, and a raw socket."""

    def __init__(self, server: NatsServer, node: NodeProcess, start: Callable[[], NodeProcess]) -> None:
        self.server = server
        self.node = node
        self._start = start
        self.loop = asyncio.new_event_loop()
        self.nc: NatsClient = self.run(nats.connect(server.url, max_reconnect_attempts=3))
        self.reconnects = 0
        self.raw = RawNats(server.url)
        self.canaries = 0
        self.restarts = 0

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def client(self) -> NatsClient:
        """The fuzzing client; a new one when the server closed the last (an input it refused)."""
        if self.nc.is_closed:
            self.reconnects += 1
            self.nc = self.run(nats.connect(self.server.url, max_reconnect_attempts=3))
        return self.nc

    def canary(self) -> None:
        """The node answers an echo request within CANARY_BOUND_S (retrying while it reconnects)."""
        self.canaries += 1
        body = orjson.dumps({"canary": self.canaries})

        async def ask() -> None:
            deadline = self.loop.time() + CANARY_BOUND_S
            while True:
                left = deadline - self.loop.time()
                if left <= 0:
                    raise AssertionError(f"node stopped serving: no canary reply within {CANARY_BOUND_S} s")
                try:
                    msg = await self.client().request("sandbus.req.echo.handle_request", body, timeout=left)
                except NoRespondersError:
                    await asyncio.sleep(0.05)  # the node's connection is being replaced; bounded by deadline
                    continue
                except NatsTimeoutError:
                    continue
                assert orjson.loads(msg.data) == {"canary": self.canaries}
                return

        self.run(ask())

    def ensure_serving(self) -> None:
        """Each property starts on a serving node: one that an earlier property broke is replaced."""
        try:
            self.canary()
        except AssertionError:
            self.node.terminate()
            self.restarts += 1
            self.node = self._start()
            self.canary()

    def request(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> Msg | Refused | None:
        """A request through nats-py: its reply, None when nobody listens or nobody answers in time,
        REFUSED when the server (not the node) refused the input and closed our connection."""
        async def ask() -> Msg | Refused | None:
            try:
                return await self.client().request(subject, data, timeout=REPLY_BOUND_S, headers=headers)
            except (NoRespondersError, NatsTimeoutError):
                return None
            except (ConnectionClosedError, MaxPayloadError):
                return REFUSED

        return self.run(ask())

    def close(self) -> None:
        self.raw.close()
        if not self.nc.is_closed:
            self.run(self.nc.close())
        self.loop.close()


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory, plugins_dir: Path,
        c_guest_flags: Callable[..., Path]) -> Iterator[FuzzBus]:
    root = tmp_path_factory.mktemp("fuzz-node")
    plugins = root / "plugins"
    plugins.mkdir()
    for ext in ("wasm", "toml"):
        shutil.copy(plugins_dir / f"echo.{ext}", plugins / f"echo.{ext}")
    shutil.copy(c_guest_flags("recorder", "rec_a", '-DPLUGIN_NAME="rec_a"'), plugins / "rec_a.wasm")
    (plugins / "rec_a.toml").write_text(RECORDER_TOML.format(name="rec_a", durable="true"))
    (root / "policy.toml").write_text(POLICY)
    server = NatsServer(jetstream=True).start()
    logs = iter(range(100))

    def start() -> NodeProcess:
        node = NodeProcess(NODE_ID, plugins, server.url, root / f"node-{next(logs)}.log")
        try:
            node.wait_ready()
        except BaseException:
            node.terminate()
            raise
        return node

    fuzz: FuzzBus | None = None
    node = start()
    try:
        fuzz = FuzzBus(server, node, start)
        yield fuzz
    finally:
        if fuzz is not None:
            fuzz.close()
            fuzz.node.terminate()
        else:
            node.terminate()
        server.stop()


# -- what a good answer looks like ------------------------------------------------------------------

_SERVED_SUBJECT = re.compile(
    rf"(sandbus\.req\.({'|'.join(SERVED)})\.[^.*>]+|sandbus\.msg\.({'|'.join(SERVED)})"
    rf"|sandbus\.node\.{NODE_ID}\.({'|'.join(VERBS)})|sandbus\.topic(\.[^.*>]+)+)"
)


def served(subject: str) -> bool:
    """Whether a request on ``subject`` reaches the node (or the topic stream) and must be answered."""
    return _SERVED_SUBJECT.fullmatch(subject) is not None


def check_reply(subject: str, msg: Msg | Refused | None) -> None:
    """A served request is answered; any answer is JSON or a well-formed error reply, never a traceback."""
    if msg is REFUSED:
        return
    if msg is None:
        assert not served(subject), f"no reply within {REPLY_BOUND_S} s to a request on {subject!r}"
        return
    data = bytes(msg.data)
    headers = msg.headers or {}
    for blob in (data.decode(errors="replace"), *headers.values()):
        assert "Traceback (most recent call last)" not in blob, f"a traceback leaked in the reply on {subject!r}"
    if H_ERROR_CODE in headers:
        body = orjson.loads(data)
        assert isinstance(body, dict), body
        assert isinstance(body.get("error"), dict), body
        assert isinstance(body["error"].get("message"), str), body
        assert isinstance(error_from_reply(data, headers), SandbusError)
    else:
        try:
            orjson.loads(data)  # a plugin reply, a control result, or JetStream's ack of a topic message
        except orjson.JSONDecodeError as e:
            raise AssertionError(f"reply on {subject!r} is neither JSON nor an error reply: "
                                 f"headers {headers}, body {data[:200]!r}") from e


# -- strategies -------------------------------------------------------------------------------------

#: one subject token nats-py can send: no dot, no whitespace, no control characters
TOKEN = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp"),
                              exclude_characters=".\x7f"), min_size=1, max_size=24)
TOKENS = st.one_of(TOKEN, st.sampled_from(["*", ">", "", "echo", "rec_a", "handle_request", "handle_message",
                                           "nope", "orders", "created", *VERBS]))
PREFIXES = st.sampled_from(["sandbus.req", "sandbus.req.echo", "sandbus.req.rec_a", "sandbus.msg",
                            "sandbus.msg.echo", "sandbus.topic", "sandbus.topic.orders", f"sandbus.node.{NODE_ID}",
                            "sandbus"])
SUBJECTS = st.builds(lambda p, ts: ".".join([p, *ts]), PREFIXES, st.lists(TOKENS, max_size=5)).filter(
    lambda s: len(s.encode()) < 900 and " " not in s)

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),  # orjson's integer range
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40))
JSON = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                    max_leaves=20)


def _deep(depth: int, kind: str) -> bytes:
    opener, closer = ("[", "]") if kind == "list" else ('{"a":', "}")
    inner = "1" if kind == "dict" else ""
    return (opener * depth + inner + closer * depth).encode()


BODIES = st.one_of(
    st.binary(max_size=200),
    JSON.map(orjson.dumps),
    st.builds(_deep, st.integers(1, 1100), st.sampled_from(["list", "dict"])),
    st.integers(1, 20_000).map(lambda n: b"9" * n),  # huge integers
    st.sampled_from([b"1e999", b"-1e999", b"NaN", b'"\\ud800"', b"\xef\xbb\xbf{}", b"{}" * 3, b"", b"null",
                     b'{"a":1,"a":2}', b"[" * 5000]),
)

HEADER_NAME = st.one_of(
    st.sampled_from(["traceparent", "tracestate", "Sandbus-Msg-Id", "Sandbus-From", "Sandbus-Hops",
                     "Sandbus-Trace-Debug", "Nats-Msg-Id", "Content-Type", "Status", "Description"]),
    st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,30}", fullmatch=True),
)
class Big(str):
    """A long header value that hypothesis reports as ``'x' * n`` instead of printing it whole."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"{self[:4]!r} * {len(self) // max(1, len(self[:4]))}"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


HEADER_VALUE = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=80),
    st.sampled_from(["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "1", "-1", "99999999999999999999"]),
    # up to 4 x 200 KB: the whole message stays under the server's 1 MB max payload
    st.builds(lambda n, c: Big(c * n), st.integers(1_000, 50_000), st.sampled_from(["x", "a=b,", "é", "k=v "])),
)
HEADERS = st.dictionaries(HEADER_NAME, HEADER_VALUE, max_size=4)

ENVELOPES = st.fixed_dictionaries(
    {},
    optional={"id": st.one_of(st.text(max_size=40), JSON), "from": st.one_of(st.text(max_size=40), JSON),
              "to": st.one_of(st.text(max_size=40), JSON), "topic": st.one_of(st.text(max_size=40), JSON),
              "payload": JSON, "timestamp": st.one_of(st.floats(), st.integers(), st.text(max_size=10)),
              "headers": st.one_of(st.dictionaries(st.text(max_size=10), JSON, max_size=3), JSON),
              "extra": JSON},
)

CONTROL_BODIES = st.one_of(
    BODIES,
    st.fixed_dictionaries({"plugin": st.one_of(st.text(max_size=40), JSON,
                                               st.sampled_from(["../../etc/passwd", "nope", "/", ".", "a" * 300])),
                           }, optional={"force": JSON}).map(orjson.dumps),
)

#: a subject token of raw bytes, most of them not UTF-8 (a lone continuation byte, a truncated or
#: overlong sequence, an encoded surrogate, a code point past U+10FFFF)
_BAD_UTF8 = st.sampled_from([b"\xff", b"\x80", b"\xc3", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80",
                             b"\xf4\x90\x80\x80", b"\xe2\x82"])
RAW_BYTE_TOKEN = st.one_of(
    st.builds(lambda a, bad, b: a + bad + b, st.binary(max_size=8), _BAD_UTF8, st.binary(max_size=8)),
    st.binary(min_size=1, max_size=20),
).filter(lambda b: b != b"" and not any(c in b for c in b" \t\r\n."))


# -- properties ---------------------------------------------------------------------------------------

def test_fuzz_node_subjects(bus: FuzzBus) -> None:
    bus.ensure_serving()

    @FUZZ
    @given(subject=SUBJECTS, body=st.one_of(st.just(b"{}"), BODIES))
    def prop(subject: str, body: bytes) -> None:
        if subject.startswith(f"sandbus.node.{NODE_ID}.unload") or subject.startswith(
                f"sandbus.node.{NODE_ID}.load"):
            body = b"{}"  # never unload the canary (control bodies have their own property)
        check_reply(subject, bus.request(subject, body))
        bus.canary()

    prop()


def test_fuzz_node_headers(bus: FuzzBus) -> None:
    bus.ensure_serving()

    @FUZZ
    @given(headers=HEADERS, subject=st.sampled_from(["sandbus.req.echo.handle_request", "sandbus.msg.echo",
                                                     "sandbus.req.rec_a.handle_request"]), traced=st.booleans())
    def prop(headers: dict[str, str], subject: str, traced: bool) -> None:
        if traced:  # `sandbus trace`'s header: the node traces this request whatever its sampling
            headers = {**headers, "Sandbus-Trace-Debug": "1"}
        check_reply(subject, bus.request(subject, b'{"h":1}', headers=headers or None))
        bus.canary()

    prop()


def test_fuzz_node_bodies(bus: FuzzBus) -> None:
    bus.ensure_serving()

    @FUZZ
    @given(body=BODIES, subject=st.sampled_from(["sandbus.req.echo.handle_request", "sandbus.msg.echo",
                                                  "sandbus.msg.rec_a"]))
    def prop(body: bytes, subject: str) -> None:
        check_reply(subject, bus.request(subject, body))
        bus.canary()

    prop()


def test_fuzz_node_envelopes(bus: FuzzBus) -> None:
    """PluginMessage-like objects as direct messages and on a durable topic; the topic keeps delivering."""
    bus.ensure_serving()

    @FUZZ
    @given(envelope=ENVELOPES, subject=st.sampled_from(["sandbus.msg.echo", "sandbus.msg.rec_a",
                                                        "sandbus.topic.orders.fuzz"]))
    def prop(envelope: dict[str, Any], subject: str) -> None:
        try:
            body = orjson.dumps(envelope)
        except TypeError:
            return  # not encodable by our side either (nesting past orjson's writer)
        check_reply(subject, bus.request(subject, body))
        bus.canary()

    prop()
    durable_canary(bus)


def durable_canary(bus: FuzzBus) -> None:
    """A fresh message on the durable topic still reaches rec_a (its delivery loop survived the fuzz)."""
    async def check() -> None:
        sub = await bus.nc.subscribe("sandbus.topic.seen.rec_a")
        await bus.nc.flush()
        marker = f"durable-canary-{time.monotonic_ns()}"
        ack = await bus.nc.request("sandbus.topic.orders.canary", orjson.dumps({"marker": marker}), timeout=2)
        assert b"error" not in ack.data, ack.data
        deadline = bus.loop.time() + DURABLE_BOUND_S
        while (left := deadline - bus.loop.time()) > 0:
            try:
                seen = await sub.next_msg(timeout=left)
            except NatsTimeoutError:
                break
            if marker.encode() in seen.data:
                await sub.unsubscribe()
                return
        info = await bus.nc.jetstream().consumer_info("SANDBUS_TOPICS", "plugin-rec_a")
        raise AssertionError("the durable topic stopped delivering to rec_a after the fuzzed messages: "
                             f"consumer {info.num_pending} pending, {info.num_ack_pending} unacknowledged, "
                             f"{info.num_waiting} pull requests waiting, delivered {info.delivered}")

    bus.run(check())


def test_fuzz_node_control(bus: FuzzBus) -> None:
    bus.ensure_serving()

    @FUZZ
    @given(verb=st.one_of(st.sampled_from(VERBS), TOKEN), body=CONTROL_BODIES)
    def prop(verb: str, body: bytes) -> None:
        try:
            decoded = orjson.loads(body)
        except orjson.JSONDecodeError:
            decoded = None
        if verb in ("unload", "load", "reload") and isinstance(decoded, dict) and decoded.get("plugin") in SERVED:
            return  # the canary and the topic plugin must stay loaded
        subject = f"sandbus.node.{NODE_ID}.{verb}"
        check_reply(subject, bus.request(subject, body))
        bus.canary()

    prop()


def test_fuzz_node_raw_protocol(bus: FuzzBus) -> None:
    """Subjects and header lines that are not UTF-8, and oversized control lines, over a raw socket."""
    bus.ensure_serving()

    def pub(subject: bytes, body: bytes, reply: bytes = b"_INBOX.raw") -> bytes:
        return b"PUB " + subject + b" " + reply + b" " + str(len(body)).encode() + b"\r\n" + body

    def hpub(subject: bytes, header_lines: list[bytes], body: bytes) -> bytes:
        hdr = b"NATS/1.0\r\n" + b"".join(line + b"\r\n" for line in header_lines) + b"\r\n"
        return (b"HPUB " + subject + b" _INBOX.raw " + str(len(hdr)).encode() + b" "
                + str(len(hdr) + len(body)).encode() + b"\r\n" + hdr + body)

    raw_subject = st.builds(lambda p, ts: b".".join([p, *ts]),
                            st.sampled_from([b"sandbus.req.echo", b"sandbus.msg", b"sandbus.topic.orders",
                                             f"sandbus.node.{NODE_ID}".encode(), b"sandbus.req"]),
                            st.lists(RAW_BYTE_TOKEN, min_size=1, max_size=3))
    header_line = st.one_of(
        st.binary(max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b),
        st.builds(lambda name, value: name + b": " + value,
                  st.sampled_from([b"traceparent", b"tracestate", b"Sandbus-From", b"X-\xff\xfe"]),
                  st.binary(max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b)),
    )
    raw_input = st.one_of(
        st.builds(pub, raw_subject, st.sampled_from([b"{}", b"\xff\xfe", b"[1]"])),
        st.builds(hpub, st.sampled_from([b"sandbus.req.echo.handle_request", b"sandbus.msg.echo",
                                         b"sandbus.topic.orders.raw"]), st.lists(header_line, max_size=3),
                  st.just(b"{}")),
        st.builds(hpub, raw_subject, st.lists(header_line, max_size=2), st.just(b"{}")),
        st.integers(4_000, 70_000).map(lambda n: pub(b"sandbus.req.echo." + b"x" * n, b"{}")),
        st.integers(1, 5).map(lambda n: b"NATS/1.0 503\r\n" * n),  # status lines where a command belongs
    )

    @FUZZ
    @given(raw=raw_input)
    def prop(raw: bytes) -> None:
        bus.raw.send(raw)
        bus.canary()

    prop()


def test_fuzz_node_log_shows_no_unhandled_exception(bus: FuzzBus) -> None:
    """After all the fuzzing, the node's log holds no traceback and no task whose exception was lost."""
    bus.canary()
    for log in sorted(bus.node.log.parent.glob("node-*.log")):  # every node the fuzzing ran, restarted ones too
        text = log.read_text(errors="replace")
        assert "Task exception was never retrieved" not in text, log
        assert "Traceback (most recent call last)" not in text, text[text.find("Traceback"):][:3000]
    assert bus.restarts == 0, "a property left the node unable to serve (see the failures above)"
