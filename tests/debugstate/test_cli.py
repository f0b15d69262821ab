"""``sandbus logs`` and ``sandbus debug`` end to end: a `sandbus node` child process, the CLI as a child too."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from nats.aio.msg import Msg

from sandbus.bus.server import NatsServer
from sandbus.sdk.client import Client
from tests.bus.conftest import ROOT, NodeProcess

HOSTILE = "\x1b[31mred\x1b[0m [bold]x[/bold] \x1b]0;title\x07"
ESCAPED = "\\x1b[31mred\\x1b[0m [bold]x[/bold] \\x1b]0;title\\x07"


@pytest.fixture
def cli_node(log_plugins: Path, nats: NatsServer, tmp_path: Path) -> Iterator[NodeProcess]:
    node = NodeProcess("cli1", log_plugins, nats.url, tmp_path / "cli1.log", "--no-durable")
    try:
        node.wait_ready()
        yield node
    finally:
        node.terminate()


def sandbus(url: str, *args: str, color: bool = False) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "COLUMNS": "200"}
    if color:  # rich writes its own styles: the guest's escape sequences must still be inert text
        env["FORCE_COLOR"] = "1"
    else:
        env.pop("FORCE_COLOR", None)
        env["NO_COLOR"] = "1"
    return subprocess.run([sys.executable, "-m", "sandbus", *args, "--nats", url], capture_output=True,
                          timeout=60, cwd=ROOT, env=env)


async def _say(url: str, text: str, level: int = 2) -> None:
    async with await Client.connect(url) as client:
        await client.request("logger", "say", {"text": text, "level": level})


async def test_logs_prints_the_rings_merged_with_hostile_text_inert(cli_node: NodeProcess, nats: NatsServer) -> None:
    await _say(nats.url, "a debug line", level=1)
    await _say(nats.url, HOSTILE, level=3)
    await _say(nats.url, "an info line")
    async with await Client.connect(nats.url) as client:
        await client.request("flooder", "say", {"text": "flooder's line"})
    plain = sandbus(nats.url, "logs", "logger")
    assert plain.returncode == 0, plain.stderr
    out = plain.stdout.decode()
    assert "a debug line" in out
    assert ESCAPED in out  # markup shown as text, escape sequences as visible escapes
    assert "\x1b" not in out
    assert "flooder's line" not in out
    assert "cli1 logger@1.2.3 WARNING" in out
    colored = sandbus(nats.url, "logs", "logger", "--level", "warning", color=True)
    assert colored.returncode == 0, colored.stderr
    text = colored.stdout.decode()
    assert "\x1b[31mred" not in text  # rich's own styles only
    assert "[bold]x[/bold]" in text
    assert "a debug line" not in text
    as_json = sandbus(nats.url, "logs", "--json")
    lines = [orjson.loads(x) for x in as_json.stdout.splitlines()]
    assert {x["plugin"] for x in lines} == {"logger", "flooder"}
    assert [x["ts"] for x in lines] == sorted(x["ts"] for x in lines)
    assert any(x["message"] == ESCAPED for x in lines)
    # The node's stderr keeps its level: the guest's info line is there, its debug line is not.
    output = cli_node.output()
    assert "[plugin logger] INFO an info line" in output
    assert "a debug line" not in output


async def test_logs_follow_prints_new_lines_as_they_come(cli_node: NodeProcess, nats: NatsServer) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandbus", "logs", "logger", "-f", "--json", "--nats", nats.url, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        seen: list[dict[str, object]] = []

        async def read_until(message: str) -> None:
            while not any(x["message"] == message for x in seen):
                assert proc.stdout is not None
                raw = await proc.stdout.readline()
                assert raw, "sandbus logs -f ended"
                seen.append(orjson.loads(raw))

        # The follower subscribes at some point after it starts: say lines until one arrives, bounded.
        async with asyncio.timeout(30):
            for i in range(10_000):
                await _say(nats.url, f"live {i}")
                try:
                    async with asyncio.timeout(0.5):
                        await read_until(f"live {i}")
                    break
                except TimeoutError:
                    continue
            await _say(nats.url, "one more")
            await read_until("one more")
        keys = [(x["node"], x["seq"]) for x in seen]
        assert len(keys) == len(set(keys)), "a line printed twice (ring and live)"
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)


async def test_debug_prints_the_state_and_json(cli_node: NodeProcess, nats: NatsServer) -> None:
    await _say(nats.url, HOSTILE)
    as_json = sandbus(nats.url, "debug", "logger", "--json")
    assert as_json.returncode == 0, as_json.stderr
    (state,) = orjson.loads(as_json.stdout)
    assert (state["node_id"], state["plugin"], state["version"]) == ("cli1", "logger", "1.2.3")
    assert state["recent_logs"][-1]["message"] == ESCAPED
    shown = sandbus(nats.url, "debug", "logger", "--node", "cli1", color=True)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout.decode()
    for part in ("logger", "cli1", "instances", "latency", "recent log lines", "[bold]x[/bold]"):
        assert part in text, part
    assert "\x1b[31mred" not in text
    missing = sandbus(nats.url, "debug", "ghost")
    assert missing.returncode == 6
    assert b"no node has plugin 'ghost'" in missing.stderr
    bad = sandbus(nats.url, "logs", "--level", "loud")
    assert bad.returncode == 2


async def test_a_line_of_a_request_traced_on_the_fast_path_carries_its_trace(log_plugins: Path, nats: NatsServer,
                                                                            tmp_path: Path) -> None:
    """A node exporting traces serves an inline request through its fast spans (not the SDK): the line
    the plugin logged during it carries the caller's trace id."""
    from tests.telemetry.otlp_receiver import Receiver

    receiver = Receiver()
    node = NodeProcess("traced1", log_plugins, nats.url, tmp_path / "traced1.log", "--no-durable",
                       env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_TRACES_SAMPLER": "always_on"})
    try:
        node.wait_ready()
        trace_id = "0af7651916cd43dd8448eb211c80319c"
        async with await Client.connect(nats.url) as client:
            (before,) = await client.debug("logger", node="traced1")
            assert before["recent_logs"] == []
            async with client.logs("logger") as lines:
                await client.nc.request("sandbus.req.logger.say", b'{"text": "fast"}', timeout=5,
                                        headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"})
                line = await asyncio.wait_for(anext(aiter(lines)), 10)
            stats = await client.control("traced1", "stats")
        assert stats["request_spans"] == "fast"
        assert (line["message"], line["trace_id"]) == ("fast", trace_id)
    finally:
        node.terminate()
        receiver.close()


async def test_a_guest_cannot_forge_its_stderr_in_the_printed_line(cli_node: NodeProcess, nats: NatsServer) -> None:
    async with await Client.connect(nats.url) as client:
        await client.request("logger", "err", {"text": "real"})
        await client.request("logger", "say", {"text": "[stderr] forged"})
    out = sandbus(nats.url, "logs", "logger")
    assert out.returncode == 0, out.stderr
    (real,) = [x for x in out.stdout.decode().splitlines() if x.endswith(" real")]
    (forged,) = [x for x in out.stdout.decode().splitlines() if "forged" in x]
    assert "logger@1.2.3 [stderr] " in real  # the stream before the level, where the guest's text cannot reach
    assert "logger@1.2.3 INFO [stderr] forged" in forged


async def _fake_nodes(url: str) -> Client:
    """Two things answering discovery as nodes: ``hang1`` never answers its control requests, ``liar1``
    answers ``stats`` and ``debug`` with lines that are not log lines, or name another node."""
    client = await Client.connect(url)
    nc = client.nc

    async def ping(msg: Msg) -> None:
        for node_id in ("hang1", "liar1"):
            await nc.publish(msg.reply, orjson.dumps({"metadata": {"node_id": node_id}}))

    good = {"ts": "2026-12-03T08:00:00.000001Z", "node": "liar1", "plugin": "logger", "version": "1", "level": "info",
            "stream": None, "message": "liar's own line", "trace_id": None, "seq": 5, "dropped": 0}
    hostile = [{**good, "seq": "7"}, {**good, "seq": [1]}, {**good, "node": "cli1", "message": "forged for cli1"},
               {**good, "stream": "[evil]"}, {**good, "trace_id": "x" * 32}, {**good, "level": 5}, "a string", None]

    async def liar(msg: Msg) -> None:
        if msg.subject.endswith(".stats"):
            await msg.respond(orjson.dumps({"node_id": "liar1", "plugins": [{"name": "logger"}]}))
        else:
            await msg.respond(orjson.dumps({"node_id": "liar1", "plugin": "logger", "recent_logs": [*hostile, good]}))

    async def hang(msg: Msg) -> None:
        return None

    await nc.subscribe("$SRV.PING.sandbus-node", cb=ping)
    await nc.subscribe("sandbus.node.hang1.>", cb=hang)
    await nc.subscribe("sandbus.node.liar1.>", cb=liar)
    await nc.flush()
    return client


async def test_logs_names_a_node_that_does_not_answer_and_skips_what_is_not_a_line(cli_node: NodeProcess,
                                                                                   nats: NatsServer) -> None:
    await _say(nats.url, "cli1's line")
    fake = await _fake_nodes(nats.url)
    try:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sandbus", "logs", "--timeout", "1", "--nats", nats.url, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        elapsed = time.monotonic() - started
    finally:
        await fake.close()
    assert proc.returncode == 0, err
    text, errors = out.decode(), err.decode()
    assert "cli1's line" in text
    assert "liar's own line" in text
    assert "forged for cli1" not in text
    assert "[evil]" not in text
    assert "Traceback" not in errors
    assert "node hang1 did not answer" in errors
    assert "liar1" not in errors
    assert elapsed < 15


async def _read_json_until(proc: asyncio.subprocess.Process, seen: list[dict[str, object]], message: str) -> None:
    while not any(x["message"] == message for x in seen):
        assert proc.stdout is not None
        raw = await proc.stdout.readline()
        assert raw, "sandbus logs -f ended"
        seen.append(orjson.loads(raw))


async def _say_until_followed(url: str, proc: asyncio.subprocess.Process, seen: list[dict[str, object]],
                              text: str) -> None:
    """Say numbered lines until the follower prints one (it subscribes, or resubscribes, at some point)."""
    async with asyncio.timeout(60):
        for i in range(10_000):
            try:
                await _say(url, f"{text} {i}")
            except Exception:  # the node has not reconnected yet
                await asyncio.sleep(0.1)
                continue
            try:
                async with asyncio.timeout(0.5):
                    await _read_json_until(proc, seen, f"{text} {i}")
                return
            except TimeoutError:
                continue


async def test_logs_follow_survives_a_nats_restart_and_ctrl_c_exits_130(cli_node: NodeProcess,
                                                                        nats: NatsServer) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandbus", "logs", "logger", "-f", "--json", "--nats", nats.url, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        seen: list[dict[str, object]] = []
        await _say_until_followed(nats.url, proc, seen, "before")
        await asyncio.to_thread(nats.restart)
        await _say_until_followed(nats.url, proc, seen, "after")
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 130, err
        assert b"Traceback" not in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_logs_follow_waits_for_nodes_that_start_later(nats: NatsServer) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandbus", "logs", "-f", "--nats", nats.url, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert b"no sandbus node answered yet" in line
        assert proc.returncode is None
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 20)
        assert proc.returncode == 130
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_debug_and_logs_of_what_does_not_exist_exit_6(cli_node: NodeProcess, nats: NatsServer) -> None:
    for args in (("debug", "ghost", "--node", "cli1"), ("debug", "logger", "--node", "nosuchnode"),
                 ("logs", "ghost", "--node", "cli1"), ("logs", "--node", "nosuchnode")):
        done = sandbus(nats.url, *args, "--timeout", "1")
        assert done.returncode == 6, (args, done.stderr)
        assert done.stderr.count(b"\n") == 1, (args, done.stderr)  # one line, no traceback


async def test_operator_commands_answer_as_a_newcomer_expects(cli_node: NodeProcess, nats: NatsServer) -> None:
    """A plugin no node has is exit 6 for ``logs`` as for ``debug``; ``--level`` takes any case; a node
    that is not there is named in correct English."""
    missing = sandbus(nats.url, "logs", "nosuch")
    assert missing.returncode == 6, missing
    assert b"no node has plugin 'nosuch'" in missing.stderr
    assert missing.stdout == b""
    upper = sandbus(nats.url, "logs", "logger", "--level", "WARNING")
    assert upper.returncode == 0, upper.stderr
    no_node = sandbus(nats.url, "debug", "logger", "--node", "nosuch")
    assert no_node.returncode == 6
    assert b"node 'nosuch' did not answer" in no_node.stderr
    assert b"serves node" not in no_node.stderr


async def test_logs_follow_of_a_plugin_no_node_has_says_so_once_and_follows(cli_node: NodeProcess,
                                                                           nats: NatsServer) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandbus", "logs", "nosuch", "-f", "--nats", nats.url, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(30):
            said = await proc.stderr.readline()
        assert b"no node has plugin 'nosuch' yet" in said
        assert proc.returncode is None  # still following
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 20)
    assert proc.returncode == 130


async def test_logs_follow_says_at_once_that_the_server_is_going_away(nats: NatsServer) -> None:
    """A server in lame duck mode closes its clients only after a grace period (10 s): the follower says
    at once that the connection will be lost, and Ctrl-C then ends it with 130 and no traceback."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandbus", "logs", "-f", "--nats", nats.url, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        assert nats.pid is not None
        async with asyncio.timeout(30):
            first = await proc.stderr.readline()
        assert b"no sandbus node answered yet" in first
        os.kill(nats.pid, signal.SIGUSR2)  # lame duck mode
        async with asyncio.timeout(5):  # well within the server's grace period
            said = await proc.stderr.readline()
        assert b"the NATS server is shutting down" in said
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            _, rest = await proc.communicate()
    assert proc.returncode == 130
    assert b"Traceback" not in rest, rest
    assert b"never retrieved" not in rest, rest


async def test_debug_text_reads_as_an_operator_expects(cli_node: NodeProcess, nats: NatsServer) -> None:
    """Limits with debug_info, rounded latencies, memory in KiB/MiB, instances busy or idle, every time
    in one format (ISO 8601 UTC with Z), audit events with their time."""
    import re

    await _say(nats.url, "hello")
    shown = sandbus(nats.url, "debug", "logger")
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout.decode()
    assert "debug_info=false" in text
    assert re.search(r"memory_bytes=\d+ [KM]iB", text), text
    assert re.search(r"p50_ms\s+\d+\.\d\d\b", text), text
    assert re.search(r"^\s*\d+\s+\d+ [KM]iB\s+idle\s+\d+\s*$", text, re.MULTILINE), text
    assert "+00:00" not in text
    assert re.search(r"loaded \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z,", text), text
    assert re.search(r"^  \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z info lifecycle\.load: ", text, re.MULTILINE), text
