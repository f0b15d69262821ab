"""Extism plugins on the bus, end to end: a real nats-server, a real node, a real Extism .wasm (WAT,
tests/extism_bus/guest.py) loaded by the host's Extism runtime, the Python client and the CLI.

What is checked is what a user of the platform relies on: bytes go in and come back unchanged (all 256
byte values, NULs, invalid UTF-8), the reply says its media type (octet-stream, or what the manifest
declares), an error reply is JSON told apart by its headers, direct and topic messages reach
``handle_message`` as the JSON envelope, a durable message that keeps failing is dead-lettered with its
body intact, and hostile input (a body over the cap, a content type forging headers, topics with nowhere
to go) is refused as a typed error.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import wasmtime
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from sandbus.bus.connection import ConnectOptions
from sandbus.bus.server import NatsServer
from sandbus.host.lifecycle.manifest import parse_manifest
from sandbus.host.lifecycle.policy import load_policy
from sandbus.host.node.node import Node
from sandbus.sdk.client import Client
from sandbus.sdk.errors import (
    AbiViolationError,
    GuestError,
    InvalidJsonError,
    ManifestError,
    PayloadTooLargeError,
    UnknownFunctionError,
)
from tests.extism_bus.conftest import start_node
from tests.extism_bus.guest import EXTISM_WAT, FAIL_MESSAGE, extism_wasm

ROOT = Path(__file__).resolve().parents[2]
EVERY_BYTE = bytes(range(256))
HOSTILE = b"\xff\xfe\x00\x00\xc3(\x00\r\nSandbus-Error-Code: forged\r\n\r\n\x80"

MANIFEST = """
[plugin]
name = "{name}"
version = "1.0.0"
{content_type}
[capabilities]
required = ["compute"]
[resources]
timeout_seconds = 2
max_instances = 1
max_var_bytes = 65536
{subscriptions}
"""

POLICY = """
[capabilities]
allowed = ["compute"]
[messaging]
subscribe_topics = [">"]
"""

#: the same plugin whose handle_message always fails (its ``fail`` renamed), for the dead-letter test
FAILING_WAT = EXTISM_WAT.replace('(export "handle_message")', '(export "keep")').replace(
    '(export "fail")', '(export "handle_message")')


def write_plugin(d: Path, name: str, *, wasm: bytes | None = None, content_type: str | None = None,
                 topics: tuple[str, ...] = (), durable: bool = False) -> None:
    (d / f"{name}.wasm").write_bytes(wasm if wasm is not None else extism_wasm())
    subscriptions = ""
    if topics:
        subscriptions = (f"[subscriptions]\ntopics = {orjson.dumps(list(topics)).decode()}\n"
                         f"durable = {'true' if durable else 'false'}\n")
    (d / f"{name}.toml").write_text(MANIFEST.format(
        name=name, content_type="" if content_type is None else f"content_type = {orjson.dumps(content_type).decode()}",
        subscriptions=subscriptions))


@pytest.fixture(scope="module")
def plugins(tmp_path_factory: pytest.TempPathFactory, plugins_dir: Path) -> Path:
    base = tmp_path_factory.mktemp("extism_bus")
    d = base / "plugins"
    d.mkdir()
    for ext in ("wasm", "toml"):  # a JSON plugin of our own ABI beside them
        shutil.copy(plugins_dir / f"echo.{ext}", d / f"echo.{ext}")
    (base / "policy.toml").write_text(POLICY)
    write_plugin(d, "bytes_echo", topics=("extism.core.*",))
    write_plugin(d, "json_echo", content_type="application/json")
    write_plugin(d, "text_echo", content_type='text/plain; charset="utf-8"')
    write_plugin(d, "dlq_extism", wasm=bytes(wasmtime.wat2wasm(FAILING_WAT)),
                 topics=("extism.durable.*",), durable=True)
    return d


@pytest.fixture
async def node(big_server: NatsServer, plugins: Path) -> AsyncIterator[Node]:
    n = await start_node(big_server, plugins, "x1")
    try:
        yield n
    finally:
        await n.stop()
        n.manager.close()


async def raw_request(nc: NatsClient, subject: str, body: bytes, headers: dict[str, str] | None = None,
                      timeout: float = 5.0) -> Msg:
    return await nc.request(subject, body, timeout=timeout, headers=headers)


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    """``check()``'s first truthy value, asked again until ``timeout`` (each call is a round trip to the node)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)  # between round trips, bounded by the deadline


# -- requests ------------------------------------------------------------------------------------------------


async def test_every_byte_value_round_trips_through_node_and_client(node: Node, client: Client) -> None:
    reply = await client.request_raw("bytes_echo", "echo", EVERY_BYTE)
    assert reply.data == EVERY_BYTE
    assert reply.content_type == "application/octet-stream"
    assert reply.node == "x1"
    # Any body, any Content-Type (or none): NULs, invalid UTF-8 and CR/LF reach the plugin unchanged.
    for body, headers in ((HOSTILE, None), (HOSTILE, {"Content-Type": "application/json"}), (b"", None)):
        msg = await raw_request(client.nc, "sandbus.req.bytes_echo.echo", body, headers)
        assert bytes(msg.data) == body
        assert (msg.headers or {}).get("Content-Type") == "application/octet-stream"
        assert "Sandbus-Error-Code" not in (msg.headers or {})


async def test_a_declared_media_type_is_the_replys_content_type(node: Node, client: Client) -> None:
    reply = await client.request_detailed("json_echo", "echo", {"vowels": "aeiou"})
    assert reply.content_type == "application/json"
    assert reply.json() == {"vowels": "aeiou"}
    text = await client.request_raw("text_echo", "echo", "héllo".encode(), content_type="text/plain")
    assert (text.data, text.content_type) == ("héllo".encode(), 'text/plain; charset="utf-8"')


async def test_list_and_stats_say_each_plugins_kind_and_content_type(node: Node, client: Client) -> None:
    listed = await client.control("x1", "list")
    kinds = {p["name"]: (p["kind"], p["content_type"]) for p in listed["plugins"]}
    assert kinds == {"bytes_echo": ("extism", "application/octet-stream"),
                     "json_echo": ("extism", "application/json"),
                     "text_echo": ("extism", 'text/plain; charset="utf-8"'),
                     "dlq_extism": ("extism", "application/octet-stream"),
                     "echo": ("module", "application/json")}
    (view,) = [v for v in await client.nodes() if v["node_id"] == "x1"]
    assert {p["name"]: p["kind"] for p in view["plugins"]}["bytes_echo"] == "extism"


async def test_a_json_plugin_beside_them_is_unchanged(node: Node, client: Client) -> None:
    reply = await client.request_detailed("echo", "handle_request", {"a": 1})
    assert reply.content_type == "application/json"
    assert reply.json() == {"a": 1}
    with pytest.raises(InvalidJsonError):  # a JSON plugin's body is JSON, whatever the Content-Type says
        await client.request_raw("echo", "handle_request", HOSTILE)


async def test_a_failing_plugin_answers_a_json_error_reply(node: Node, client: Client) -> None:
    with pytest.raises(GuestError) as caught:
        await client.request_raw("bytes_echo", "fail", b"\x00")
    assert "vowels went missing" in caught.value.message
    msg = await raw_request(client.nc, "sandbus.req.bytes_echo.fail", b"")
    headers = msg.headers or {}
    assert headers["Sandbus-Error-Code"] == "sandbox.guest_error"
    assert headers["Content-Type"] == "application/json", "an error reply is JSON, whatever the plugin's type"
    assert "X-Forged" not in headers, "the plugin's CR/LF never reaches the wire raw"
    assert "\r" not in headers["Sandbus-Error"]
    assert "\n" not in headers["Sandbus-Error"]
    body = orjson.loads(msg.data)
    assert body["error"]["code"] == "sandbox.guest_error"
    assert FAIL_MESSAGE.split("\r")[0] in body["error"]["message"]
    # A function it does not export: the caller's mistake, the same as for any plugin.
    with pytest.raises(UnknownFunctionError):
        await client.request_raw("bytes_echo", "nope", b"")
    stats = await client.control("x1", "stats")
    echo = next(p for p in stats["plugins"] if p["name"] == "bytes_echo")
    assert echo["errors"] >= 2
    assert echo["rejected"] >= 1


async def test_a_body_over_the_input_cap_is_refused_typed(node: Node, client: Client) -> None:
    big = b"\x00" * (1024 * 1024 + 1)
    with pytest.raises(PayloadTooLargeError) as caught:
        await client.request_raw("bytes_echo", "echo", big)
    assert caught.value.details.get("direction") == "input"
    # The node keeps serving.
    assert (await client.request_raw("bytes_echo", "echo", b"ok")).data == b"ok"


async def test_the_client_refuses_a_body_over_the_servers_max_payload(node: Node, client: Client) -> None:
    with pytest.raises(PayloadTooLargeError):
        await client.request_raw("bytes_echo", "echo", b"\x00" * (4 * 1024 * 1024 + 1))
    with pytest.raises(ValueError, match="media type"):
        await client.request_raw("bytes_echo", "echo", b"", content_type="text/plain\r\nX-Forged: 1")


# -- messages --------------------------------------------------------------------------------------------------


async def test_a_direct_message_reaches_handle_message_as_the_json_envelope(node: Node, client: Client) -> None:
    reply = await client.send_raw("bytes_echo", EVERY_BYTE, timeout=5.0)
    assert reply is not None
    assert reply.content_type == "application/octet-stream"
    envelope = orjson.loads(reply.data)
    assert (envelope["to"], envelope["topic"]) == ("bytes_echo", None)
    assert envelope["headers"] == {"Content-Type": "application/octet-stream", "Content-Transfer-Encoding": "base64"}
    assert base64.b64decode(envelope["payload"]) == EVERY_BYTE
    # A JSON message is wrapped as for any plugin: its payload is the JSON value.
    wrapped = await client.send_raw("json_echo", b'{"n": [1]}', content_type="application/json", timeout=5.0)
    assert wrapped is not None
    assert wrapped.content_type == "application/json"
    assert wrapped.json()["payload"] == {"n": [1]}
    assert (await client.send("json_echo", {"n": 2}, timeout=5.0))["payload"] == {"n": 2}


async def test_a_core_topic_message_reaches_handle_message(node: Node, client: Client) -> None:
    await client.publish_raw("extism.core.created", HOSTILE, durable=False)

    async def delivered() -> dict[str, Any] | None:
        last = (await client.request_raw("bytes_echo", "last", b"")).data
        envelope = orjson.loads(last) if last else None
        return envelope if envelope and envelope["topic"] == "extism.core.created" else None

    envelope = await eventually(delivered, 10.0, "the topic message in handle_message")
    assert envelope["to"] is None
    assert base64.b64decode(envelope["payload"]) == HOSTILE


async def test_a_durable_bytes_message_that_keeps_failing_is_dead_lettered_intact(node: Node, client: Client) -> None:
    letters: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_letter(msg: Msg) -> None:
        await letters.put(msg)

    sub = await client.nc.subscribe("sandbus.dlq.dlq_extism", cb=on_letter)
    await client.nc.flush()
    msg_id = await client.publish_raw("extism.durable.created", HOSTILE, content_type="image/x-test")
    # Retried like a trap (GuestError is the plugin's fault): 5 deliveries over ~8 s of backoff.
    letter = await asyncio.wait_for(letters.get(), timeout=30.0)
    await sub.unsubscribe()
    headers = letter.headers or {}
    assert bytes(letter.data) == HOSTILE, "the original body, byte for byte"
    assert headers["Content-Type"] == "image/x-test"
    assert headers["Sandbus-Error-Code"] == "sandbox.guest_error"
    assert headers["Sandbus-Deliveries"] == "5"
    assert headers["Sandbus-Msg-Id"] == msg_id


# -- manifests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["text/plain\r\nX-Forged: 1", "text/plain\nX: y", "application/json\x00",
                                   "no-slash", "a/b; c", "é/x", "a/" + "b" * 300])
def test_a_content_type_that_could_forge_headers_is_a_manifest_error(value: str) -> None:
    text = MANIFEST.format(name="p", content_type=f"content_type = {orjson.dumps(value).decode()}", subscriptions="")
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, source="p.toml")
    assert caught.value.key == "plugin.content_type"
    assert caught.value.path == "p.toml"
    assert "\n" not in str(caught.value).split(": ", 1)[0]


def test_max_var_bytes_is_bounded() -> None:
    text = MANIFEST.format(name="p", content_type="", subscriptions="").replace("max_var_bytes = 65536",
                                                                              "max_var_bytes = 68719476736")
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, source="p.toml")
    assert caught.value.key == "resources.max_var_bytes"


def test_manifests_that_cannot_work_do_not_load_and_say_the_fix(tmp_path: Path, plugins_dir: Path) -> None:
    from sandbus.host.lifecycle import PluginManager

    d = tmp_path / "plugins"
    d.mkdir()
    wasm = bytes(wasmtime.wat2wasm(EXTISM_WAT.replace('(export "handle_message")', '(export "k")')))
    write_plugin(d, "deaf", wasm=wasm, topics=("a.b",))
    # A JSON plugin (our ABI) declaring a bytes media type: refused too.
    write_plugin(d, "json_plugin", wasm=(plugins_dir / "echo.wasm").read_bytes(), content_type="image/png")
    # A manifest whose content type would forge a header: refused at load, the others keep loading.
    write_plugin(d, "forged", content_type="text/plain\r\nSandbus-Error-Code: forged")
    write_plugin(d, "fine", content_type="application/json")
    (tmp_path / "policy.toml").write_text(POLICY)
    with PluginManager(d, policy=load_policy(tmp_path / "policy.toml")) as manager:
        report = manager.discover_and_load()
        assert manager.names() == ["fine"]
    assert "plugin.content_type" in report.failed["forged"]
    assert "handle_message" in report.failed["deaf"]
    assert "subscriptions.topics" in report.failed["deaf"]
    assert "plugin.content_type" in report.failed["json_plugin"]


# -- the CLI ---------------------------------------------------------------------------------------------------


def run_cli(*args: str, url: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "sandbus", *args], input=stdin, capture_output=True,
                          env={**os.environ, "NATS_URL": url}, cwd=ROOT, timeout=60)


async def test_the_cli_sends_raw_bytes_and_writes_the_raw_reply(node: Node, big_server: NatsServer,
                                                                 tmp_path: Path) -> None:
    data = tmp_path / "in.bin"
    data.write_bytes(EVERY_BYTE)
    url = big_server.url
    done = await asyncio.to_thread(run_cli, "request", "bytes_echo", "echo", "--data-file", str(data), url=url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == EVERY_BYTE
    piped = await asyncio.to_thread(run_cli, "request", "bytes_echo", "echo", "--data-file", "-", url=url,
                                    stdin=HOSTILE)
    assert (piped.returncode, piped.stdout) == (0, HOSTILE)
    as_json = await asyncio.to_thread(run_cli, "request", "bytes_echo", "echo", "--raw", "héllo", "--json", url=url)
    assert as_json.returncode == 0, as_json.stderr
    doc = orjson.loads(as_json.stdout)
    assert doc["content_type"] == "application/octet-stream"
    assert base64.b64decode(doc["base64"]) == "héllo".encode()
    assert doc["size"] == len("héllo".encode())
    # A JSON-declared plugin's reply prints as JSON; a failing call exits 1 with the error on stderr.
    declared = await asyncio.to_thread(run_cli, "request", "json_echo", "echo", '{"a": [1]}', url=url)
    assert (declared.returncode, orjson.loads(declared.stdout)) == (0, {"a": [1]})
    failed = await asyncio.to_thread(run_cli, "request", "bytes_echo", "fail", "--raw", "x", url=url)
    assert failed.returncode == 1
    assert b"vowels went missing" in failed.stderr
    assert failed.stdout == b""
    bad_type = await asyncio.to_thread(run_cli, "request", "bytes_echo", "echo", "--raw", "x", "--content-type",
                                       "a/b\r\nX: 1", url=url)
    assert bad_type.returncode == 2
    assert b"media type" in bad_type.stderr


async def test_the_cli_publishes_raw_bytes(node: Node, big_server: NatsServer, client: Client) -> None:
    done = await asyncio.to_thread(run_cli, "pub", "extism.core.cli", "--data-file", "-", "--core", "--json",
                                   url=big_server.url, stdin=EVERY_BYTE)
    assert done.returncode == 0, done.stderr
    msg_id = orjson.loads(done.stdout)["id"]

    async def delivered() -> dict[str, Any] | None:
        last = (await client.request_raw("bytes_echo", "last", b"")).data
        envelope = orjson.loads(last) if last else None
        return envelope if envelope and envelope["id"] == msg_id else None

    envelope = await eventually(delivered, 10.0, "the CLI's message in handle_message")
    assert base64.b64decode(envelope["payload"]) == EVERY_BYTE


async def test_sandbus_ls_wide_shows_the_kind(node: Node, big_server: NatsServer) -> None:
    done = await asyncio.to_thread(run_cli, "ls", "--wide", url=big_server.url)
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.decode().splitlines() if "bytes_echo" in line)
    assert "extism" in row.split()
    module_row = next(line for line in done.stdout.decode().splitlines() if " echo " in f" {line} ")
    assert "module" in module_row.split()


def test_sandbus_run_calls_an_extism_plugin_with_bytes(tmp_path: Path) -> None:
    wasm = tmp_path / "x.wasm"
    wasm.write_bytes(extism_wasm())
    data = tmp_path / "in.bin"
    data.write_bytes(EVERY_BYTE)
    done = run_cli("run", str(wasm), "-f", "echo", "--data-file", str(data), url="nats://127.0.0.1:1")
    assert (done.returncode, done.stdout) == (0, EVERY_BYTE)
    failed = run_cli("run", str(wasm), "-f", "fail", "--raw", "-i", "x", url="nats://127.0.0.1:1")
    assert failed.returncode == 1
    assert b"vowels went missing" in failed.stderr
    unknown = run_cli("run", str(wasm), "-f", "nope", "--raw", "-i", "x", url="nats://127.0.0.1:1")
    assert unknown.returncode == 2
    assert b"echo, fail, handle_message, last" in unknown.stderr


async def test_request_on_a_bytes_reply_says_to_use_request_raw(node: Node, client: Client) -> None:
    with pytest.raises(AbiViolationError, match="request_raw"):
        await client.request("bytes_echo", "echo", b"\xff not JSON")
    assert await client.request("json_echo", "echo", {"a": 1}) == {"a": 1}


def test_max_var_bytes_reaches_the_limits_under_the_policys_ceiling(tmp_path: Path) -> None:
    from sandbus.host.lifecycle.policy import Policy, resolve
    from sandbus.sdk.errors import SecurityViolationError

    policy = Policy.default()

    def resolved(manifest: Any) -> Any:
        return resolve(manifest, policy, data_root=tmp_path, host_env={})

    asked = parse_manifest(MANIFEST.format(name="p", content_type="", subscriptions=""), source="p.toml")
    assert resolved(asked).limits.max_var_bytes == 65536
    silent = parse_manifest(MANIFEST.format(name="p", content_type="", subscriptions="").replace(
        "max_var_bytes = 65536\n", ""), source="p.toml")
    assert resolved(silent).limits.max_var_bytes == 1024 * 1024, "the policy's default"
    greedy = parse_manifest(MANIFEST.format(name="p", content_type="", subscriptions="").replace(
        "max_var_bytes = 65536", "max_var_bytes = 33554432"), source="p.toml")
    with pytest.raises(SecurityViolationError, match="max_var_bytes"):
        resolved(greedy)


async def test_a_reload_from_bytes_to_json_never_hands_the_json_plugin_a_body_the_bus_took_unchecked(
        big_server: NatsServer, tmp_path: Path, plugins_dir: Path) -> None:
    """The bus decides "check the body as JSON, or not" from what it was last told; a reload that turns a
    bytes plugin into a JSON plugin is served before the bus hears of it. The node checks such a body
    itself, so the JSON plugin's promise (valid JSON) holds in that window too."""
    d = tmp_path / "plugins"
    d.mkdir()
    write_plugin(d, "morph")
    n = Node.create(d, ConnectOptions.from_urls(big_server.url), node_id="morph1")
    assert n.manager.discover_and_load().ok
    await n.start()
    try:
        assert n.manager.body("morph") == "bytes"
        # Same name, now our own ABI's JSON echo, reloaded with no turn of the loop for the bus to sync.
        (d / "morph.wasm").write_bytes((plugins_dir / "echo.wasm").read_bytes())
        n.manager.reload("morph")
        assert n.manager.body("morph") == "json"
        rejected = n.manager.info("morph").rejected
        with pytest.raises(InvalidJsonError):
            n.try_inline("morph", "handle_request", HOSTILE)
        assert n.manager.info("morph").rejected == rejected + 1
        # A JSON body still goes through on the same path.
        result = n.try_inline("morph", "handle_request", b'{"a": 1}')
        assert result is None or orjson.loads(result.reply) is not None
    finally:
        await n.stop()
        n.manager.close()
