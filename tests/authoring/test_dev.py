"""`sandbus dev`: a real process builds a scaffolded C project, serves it on its embedded nats-server,
rebuilds and hot-reloads on each save, keeps the old version when a build or a load fails, and stops
everything (itself, the node, the server) within ~2 s of a signal."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest

from sandbus.host.authoring import Project, scaffold
from sandbus.host.authoring.devloop import SourceWatcher, describe_grants, dev_policy, is_source
from sandbus.host.lifecycle.manifest import parse_manifest
from sandbus.host.lifecycle.policy import resolve
from sandbus.sdk.client import Client
from sandbus.sdk.errors import SecurityViolationError, TrapError
from tests.authoring.conftest import SANDBUS, sandbus

#: The scaffold's reply prefix, and an edit that makes the reply say which version answered.
REPLY_PREFIX = r'"{\"success\":true,\"result\":"'
REPLY_V2 = r'"{\"success\":true,\"v\":2,\"result\":"'
TRAP_AFTER = "sandbus_buf_init(&out);"
TRAP = "\n    if (len > 0 && in[0] == '[') __builtin_trap();"
#: What a stop may take, from the signal to the exit (the goal is 2 s; a loaded CI machine gets a margin).
STOP_BUDGET_S = 3.0


class DevProcess:
    """``sandbus dev`` as a child process, its stdout and stderr collected line by line."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen([str(SANDBUS), "dev", *args], cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._readers = [threading.Thread(target=self._read, args=(s,), daemon=True)
                         for s in (self.proc.stdout, self.proc.stderr)]
        for reader in self._readers:
            reader.start()
        self.server_pid: int | None = None

    def _read(self, stream: TextIO) -> None:
        for line in stream:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    async def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first match of ``pattern`` in the output, waiting up to ``timeout`` for it."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.text(), re.MULTILINE)
            if match is not None:
                return match
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no {pattern!r} in the output of sandbus dev (exit {self.proc.poll()}):\n{self.text()}")
            await asyncio.sleep(0.05)  # polling the collected output, bounded by the deadline

    async def ready(self) -> str:
        """Wait for the ready line; the server's URL (its PID is noted for the teardown)."""
        server = await self.wait_for(r"nats-server \(JetStream\) on (nats://127\.0\.0\.1:\d+), pid (\d+)")
        self.server_pid = int(server[2])
        await self.wait_for(r"^ready: ", timeout=30.0)
        return server[1]

    def stop(self, sig: int) -> float:
        """Send ``sig``; the seconds until the process exited."""
        started = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"sandbus dev did not exit within 10 s of signal {sig}:\n{self.text()}")
        for reader in self._readers:
            reader.join(timeout=5)
        return time.monotonic() - started

    def kill(self) -> None:
        """Teardown: whatever is still running goes, by PID."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.server_pid is not None and _alive(self.server_pid):
            os.kill(self.server_pid, signal.SIGKILL)
        for reader in self._readers:
            reader.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): only a process that is not one is running.
    with contextlib.suppress(OSError):
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:3]
    return False


@pytest.fixture
def greeter(tmp_path: Path) -> Project:
    return scaffold("greeter", "c", tmp_path)


@pytest.fixture
def dev_processes() -> Iterator[list[DevProcess]]:
    started: list[DevProcess] = []
    yield started
    for dev in started:
        dev.kill()


async def _reply(url: str) -> dict[str, Any]:
    async with await Client.connect(url) as client:
        reply: dict[str, Any] = await client.request("greeter", "handle_request", {"n": 1}, timeout=5)
        return reply


async def _until_reply(url: str, wanted: dict[str, Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with await Client.connect(url) as client:
        while True:
            reply = await client.request("greeter", "handle_request", {"n": 1}, timeout=5)
            if reply == wanted:
                return
            assert time.monotonic() < deadline, f"the reply is still {reply}"
            await asyncio.sleep(0.05)  # polling requests, bounded by the deadline


async def test_dev_rebuilds_reloads_keeps_the_old_version_on_a_broken_build_and_stops_on_ctrl_c(
        greeter: Project, dev_processes: list[DevProcess]) -> None:
    dev = DevProcess(str(greeter.root), cwd=greeter.root.parent)
    dev_processes.append(dev)
    url = await dev.ready()
    assert not url.endswith(":4222")  # a free port, never the default bus
    assert f"sandbus request greeter handle_request '{{}}' -s {url}" in dev.text()
    v1 = {"success": True, "result": {"n": 1}, "error": None}
    assert await _reply(url) == v1
    await dev.wait_for(r"\[plugin greeter\] DEBUG greeter: replying")  # the plugin's own log line

    source = greeter.root / "greeter.c"
    text = source.read_text()
    assert REPLY_PREFIX in text
    # Version 2 says so in its reply, and traps on a JSON array.
    assert TRAP_AFTER in text
    source.write_text(text.replace(REPLY_PREFIX, REPLY_V2).replace(TRAP_AFTER, TRAP_AFTER + TRAP))
    v2 = {"success": True, "v": 2, "result": {"n": 1}, "error": None}
    await _until_reply(url, v2)
    await dev.wait_for(r"rebuilt in \d+\.\d\d s; reloaded greeter 0\.1\.0")
    async with await Client.connect(url) as client:
        with pytest.raises(TrapError):
            await client.request("greeter", "handle_request", [1], timeout=5)
    await dev.wait_for(r"greeter: call failed \(sandbox\.trap\): handle_request trapped")  # shown as it happens

    # A compile error: one failure line with the compiler's message, and version 2 keeps answering.
    source.write_text(source.read_text() + "\nthis is not C;\n")
    await dev.wait_for(r"build failed in \d+\.\d\d s; greeter 0\.1\.0 keeps serving:")
    await dev.wait_for(r"error: unknown type name 'this'")
    assert await _reply(url) == v2
    # Saved again unchanged: one more line, not the compiler's output again.
    source.write_text(source.read_text())
    await dev.wait_for(r"build failed in \d+\.\d\d s; greeter 0\.1\.0 keeps serving \(the same error as above\)")
    assert dev.text().count("unknown type name 'this'") == 1
    assert "Traceback" not in dev.text()

    took = dev.stop(signal.SIGINT)
    assert dev.proc.returncode == 0, dev.text()
    assert took < STOP_BUDGET_S, f"stopping took {took:.2f} s"
    assert dev.server_pid is not None
    assert not _alive(dev.server_pid)


async def test_dev_keeps_the_old_version_when_the_node_refuses_the_new_one_and_stops_on_sigterm(
        greeter: Project, dev_processes: list[DevProcess], tmp_path: Path) -> None:
    policy = tmp_path / "strict.toml"
    policy.write_text('[capabilities]\nallowed = ["compute"]\n')
    dev = DevProcess(str(greeter.root), "--policy", str(policy), cwd=tmp_path)
    dev_processes.append(dev)
    url = await dev.ready()
    v1 = {"success": True, "result": {"n": 1}, "error": None}
    assert await _reply(url) == v1

    # The manifest now requires the clock, which the policy does not allow: the build succeeds, the
    # node refuses the new version, and the old one answers on.
    manifest = greeter.manifest
    manifest.write_text(manifest.read_text().replace('required = ["compute"]', 'required = ["compute", "clock"]'))
    refused = await dev.wait_for(r"rebuilt in \d+\.\d\d s; the node refused it, greeter 0\.1\.0 keeps serving:\n"
                                 r"  (.*)")
    assert "requires capability 'clock'" in refused[1]
    assert await _reply(url) == v1
    assert "Traceback" not in dev.text()

    took = dev.stop(signal.SIGTERM)
    assert dev.proc.returncode == 0, dev.text()
    assert took < STOP_BUDGET_S, f"stopping took {took:.2f} s"
    assert dev.server_pid is not None
    assert not _alive(dev.server_pid)


def test_dev_refuses_what_is_not_a_project_and_a_missing_toolchain_with_one_line(
        greeter: Project, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = sandbus("dev", str(empty), timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1, r.stderr  # one line
    assert "is not a plugin project" in r.stderr

    r = sandbus("dev", str(greeter.root), env={**os.environ, "CLANG": "clang-not-installed-here"}, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "clang-not-installed-here is not installed" in r.stderr
    assert "install it with: apt-get install clang" in r.stderr
    assert "nats-server" not in r.stdout  # nothing was started
    assert "Traceback" not in r.stderr


ASKS_FOR_EVERYTHING = """
[plugin]
name = "asker"
version = "1.0.0"

[capabilities]
required = ["compute", "filesystem", "environment", "network", "messaging"]
optional = ["clock"]

[permissions]
read_files = ["data/*.txt"]
write_files = ["out"]
environment_vars = ["DEV_TEST_VAR"]
network_hosts = ["api.example.com:443"]
publish_topics = ["orders.*"]
request_plugins = ["pricing.quote"]

[resources]
memory_mb = 512
timeout_seconds = 60.0

[subscriptions]
topics = ["events.>"]
"""


def test_the_development_policy_grants_what_the_manifest_asks_for_and_nothing_else(tmp_path: Path) -> None:
    manifest = parse_manifest(ASKS_FOR_EVERYTHING, expected_name="asker")
    data = tmp_path / "data" / "asker"
    for d in ("data", "out"):
        (data / d).mkdir(parents=True)
    env = {"DEV_TEST_VAR": "yes", "AWS_SECRET_ACCESS_KEY": "no"}
    # The author's environment is given only by name on the command line: a manifest naming it is not enough.
    with pytest.raises(SecurityViolationError, match="DEV_TEST_VAR"):
        resolve(manifest, dev_policy(manifest, data), data_root=data, host_env=env)
    assert "--pass-env DEV_TEST_VAR" in describe_grants(manifest)
    policy = dev_policy(manifest, data, pass_env=["DEV_TEST_VAR"])
    grant = resolve(manifest, policy, data_root=data, host_env=env)
    assert grant.granted == {"compute", "filesystem", "environment", "network", "messaging", "clock"}
    assert grant.capabilities.env == {"DEV_TEST_VAR": "yes"}  # only the variable it names
    assert grant.network_hosts == ("api.example.com:443",)
    assert grant.network_addresses == ()  # loopback and private addresses stay refused
    assert grant.may_publish("orders.new")
    assert not grant.may_publish("payments.new")
    assert grant.may_request("pricing", "quote")
    assert not grant.may_request("pricing", "admin")
    assert grant.limits.memory_bytes == 512 * 1024 * 1024
    assert grant.limits.timeout_s == 60.0
    assert {(g.guest, g.writable) for g in grant.capabilities.dirs} == {("/data", False), ("/out", True)}

    # It is the policy of that manifest: another one asking for more is refused under it.
    greedy = parse_manifest(ASKS_FOR_EVERYTHING.replace('"DEV_TEST_VAR"', '"DEV_TEST_VAR", "AWS_SECRET_ACCESS_KEY"')
                            .replace('"api.example.com:443"', '"api.example.com:443", "evil.example.net"'),
                            expected_name="asker")
    with pytest.raises(SecurityViolationError, match="AWS_SECRET_ACCESS_KEY"):
        resolve(greedy, policy, data_root=data, host_env=env)


@pytest.mark.parametrize(("rel", "source"), [
    ("greeter.c", True), ("util.h", True), ("greeter.toml", True), ("new.c", True),
    ("build/greeter.wasm", False), ("build/x.c", False), (".greeter.c.swp", False), ("greeter.c~", False),
    ("test_greeter.py", False), ("README.md", False), ("other.toml", False), ("sub/x.c", False),
])
def test_what_counts_as_a_source_of_a_c_project(greeter: Project, rel: str, source: bool) -> None:
    assert is_source(greeter, greeter.root / rel) is source


def test_the_source_watcher_rebuilds_once_for_a_burst_of_saves_and_never_for_other_files(greeter: Project) -> None:
    runs: list[float] = []
    ran = threading.Event()

    def on_change() -> None:
        runs.append(time.monotonic())
        ran.set()

    with SourceWatcher(greeter, on_change, debounce_s=0.1):
        (greeter.build_dir / "x").mkdir(parents=True)
        for other in ("README.md", "test_greeter.py", ".greeter.c.swp", "build/x/y.c", "build/greeter.wasm"):
            (greeter.root / other).write_text("x")
        source = greeter.root / "greeter.c"
        text = source.read_text()
        for i in range(5):  # an editor's atomic saves: write beside, rename over
            tmp = greeter.root / f".greeter.c.{i}.tmp"
            tmp.write_text(f"{text}\n/* {i} */\n")
            os.replace(tmp, source)
        assert ran.wait(10), "no rebuild after the saves"
        settled = time.monotonic() + 0.5
        while time.monotonic() < settled:  # any second run would come within a few debounce periods
            ran.clear()
            ran.wait(max(0.0, settled - time.monotonic()))
    assert len(runs) == 1, runs
