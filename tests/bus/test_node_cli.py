"""``sandbus node`` as an operator meets it: one bus per machine, refusals in one line, Ctrl-C that stops.

Real ``sandbus node`` processes and real nats-servers. The "default port" is moved with
``SANDBUS_DEFAULT_NATS_PORT`` to a port each test owns, so no test depends on (or disturbs) 127.0.0.1:4222.
Every process is stopped by PID in teardown; every wait is for a line in a log, bounded.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbus.bus.server import NatsServer, stop_process
from sandbus.host.cli.connect import CHILD_ENV_NAMES
from sandbus.sdk.client import Client

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    """A ``sandbus node`` process writing to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, *, own_group: bool = False) -> None:
        self.log = log
        self._out = log.open("wb")
        # own_group: a process group of its own, as a terminal gives the command it runs in the foreground
        self.proc = subprocess.Popen([sys.executable, "-m", "sandbus", "node", *args], stdout=self._out,
                                     stderr=subprocess.STDOUT, env=env, cwd=log.parent,
                                     start_new_session=own_group)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, *needles: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if all(n in text for n in needles):
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}: {text}")
            time.sleep(0.02)  # polling the node's log for a line, bounded by the deadline
        raise AssertionError(f"{needles} not seen within {timeout} s: {self.text()}")

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self._out.close()


@pytest.fixture
def node_env(tmp_path: Path) -> dict[str, str]:
    """No NATS_* variable, an empty nats CLI configuration, and a default port of this test's own."""
    (tmp_path / "config").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in CHILD_ENV_NAMES and not k.startswith("OTEL_")}
    return {**env, "PYTHONUNBUFFERED": "1", "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "SANDBUS_DEFAULT_NATS_PORT": str(_free_port())}


@pytest.fixture
def plugins(tmp_path: Path, plugins_dir: Path) -> Path:
    d = tmp_path / "plugins"
    d.mkdir()
    for ext in ("wasm", "toml"):
        shutil.copy(plugins_dir / f"echo.{ext}", d / f"echo.{ext}")
    return d


@pytest.fixture
def start(tmp_path: Path, plugins: Path, node_env: dict[str, str]) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def start(name: str, *args: str, env: dict[str, str] | None = None, own_group: bool = False) -> Node:
        node = Node(["--plugins", str(plugins), "--data-dir", str(tmp_path / f"{name}-data"), *args],
                    env or node_env, tmp_path / f"{name}.log", own_group=own_group)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


def _echo(url: str) -> object:
    async def go() -> object:
        async with await Client.connect(url) as c:
            return await c.request("echo", "handle_request", {"one": "bus"}, timeout=5)

    return asyncio.run(go())


def test_a_node_without_a_url_joins_the_nats_server_on_the_default_port(
        start: Callable[..., Node], node_env: dict[str, str]) -> None:
    port = int(node_env["SANDBUS_DEFAULT_NATS_PORT"])
    with NatsServer(jetstream=False, port=port) as server:
        node = start("j1", "--node-id", "j1", "--no-watch", "--no-durable")
        text = node.wait_for("node j1 ready")
        assert f"joining the NATS server already listening on nats://127.0.0.1:{port} (nats-server " in text
        assert "embedded nats-server" not in text
        assert _echo(server.url) == {"one": "bus"}  # served on that bus, not on one of its own


def test_a_default_port_taken_by_something_else_gets_the_embedded_server_elsewhere(
        start: Callable[..., Node], node_env: dict[str, str]) -> None:
    port = int(node_env["SANDBUS_DEFAULT_NATS_PORT"])
    with socket.socket() as squatter:  # listens, never speaks NATS
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        node = start("e1", "--node-id", "e1", "--no-watch", "--no-durable")
        text = node.wait_for("node e1 ready")
    assert f"port {port} is taken by something that is not a NATS server" in text
    url = re.search(r"embedded nats-server \(JetStream\) on (nats://127\.0\.0\.1:(\d+))", text)
    assert url is not None, text
    assert int(url.group(2)) != port, text
    assert _echo(url.group(1)) == {"one": "bus"}


@pytest.mark.parametrize("flag", ["--nats", "-s"])
def test_an_empty_url_is_a_usage_error(start: Callable[..., Node], flag: str) -> None:
    node = start("u1", flag, "")
    assert node.proc.wait(timeout=30) == 2
    assert node.text().splitlines() == ["sandbus: -s/--server: no NATS server URL given (an empty -s/--nats is "
                                        "not the default; leave it out)"]


def test_a_second_node_with_the_same_id_refuses_to_start(start: Callable[..., Node]) -> None:
    with NatsServer(jetstream=False) as server:
        first = start("d1", "--node-id", "twin", "--nats", server.url, "--no-watch", "--no-durable")
        first.wait_for("node twin ready")
        second = start("d2", "--node-id", "twin", "--nats", server.url, "--no-watch", "--no-durable")
        assert second.proc.wait(timeout=30) == 2, second.text()
        errors = [line for line in second.text().splitlines() if line.startswith("sandbus:")]
        assert len(errors) == 1, second.text()
        assert "twin" in errors[0], second.text()
        assert "Traceback" not in second.text()
        assert first.proc.poll() is None  # the first node serves on
        assert _echo(server.url) == {"one": "bus"}


@pytest.mark.parametrize("ctrl_c", ["process", "terminal"])
def test_ctrl_c_stops_the_node_owning_the_bus_within_2_s(start: Callable[..., Node], node_env: dict[str, str],
                                                        ctrl_c: str) -> None:
    """The owner of the embedded server, two workers of its own, and an independent node joined to it.

    ``process``: SIGINT to the node alone. ``terminal``: SIGINT to its whole process group, as Ctrl-C in a
    terminal sends it (before, it reached the nats-server too, which left at once under the draining
    nodes: ~10.6 s and 60-odd reconnect warnings).
    """
    port = int(node_env["SANDBUS_DEFAULT_NATS_PORT"])
    owner = start("n1", "--node-id", "n1", "--workers", "3", "--no-watch", own_group=True)
    text = owner.wait_for("node n1 ready", "node n1-w1 ready", "node n1-w2 ready")
    assert f"embedded nats-server (JetStream) on nats://127.0.0.1:{port}," in text
    other = start("n2", "--node-id", "n2", "--no-watch", "--no-durable")
    assert "joining the NATS server" in other.wait_for("node n2 ready")
    server_pid = int(re.search(r"pid (\d+);", text).group(1))  # type: ignore[union-attr]
    owned = _children(owner.proc.pid)
    assert server_pid in owned
    assert len(owned) == 3  # two workers and the server

    started = time.monotonic()
    if ctrl_c == "terminal":
        os.killpg(owner.proc.pid, signal.SIGINT)
    else:
        os.kill(owner.proc.pid, signal.SIGINT)
    code = owner.proc.wait(timeout=15)
    took = time.monotonic() - started
    assert code == 0, owner.text()
    assert took <= 2.0, (took, owner.text())
    for pid in owned:  # nothing of the owner's left behind, the server included
        assert not _alive(pid), pid
    log = owner.text()
    assert all(f"node {n} draining" in log for n in ("n1", "n1-w1", "n1-w2")), log  # each drained, none killed
    assert "WARNING" not in log, log  # no reconnect chatter while stopping
    assert other.proc.poll() is None  # the independent node is not the owner's to stop


@pytest.mark.parametrize("refusal", ["password", "tls"])
def test_a_permanent_connection_failure_stops_the_node_with_one_line(start: Callable[..., Node],
                                                                     node_env: dict[str, str], refusal: str) -> None:
    """Retrying cannot mend a wrong password, nor TLS asked of a server without it (where nats-py alone
    would send the password in the clear): the node says so and exits 5, instead of warning forever."""
    with NatsServer(jetstream=False, extra_args=["--user", "op", "--pass", "right"]) as server:
        url = server.url if refusal == "password" else server.url.replace("nats://", "tls://")
        node = start("a1", "--node-id", "a1", "--no-watch", "--no-durable", "-s", url, "--user", "op",
                     env={**node_env, "NATS_PASSWORD": "wrong" if refusal == "password" else "right"})
        assert node.proc.wait(timeout=30) == 5, node.text()
    cause = ("authorization violation" if refusal == "password"
             else "TLS: the server does not offer TLS, and TLS was asked for")
    errors = [line for line in node.text().splitlines() if "sandbus" in line and "NATS" in line]
    assert errors == [f"sandbus: cannot connect to NATS at {url}: {cause}"], node.text()
    assert "WARNING" not in node.text()


def test_workers_get_the_secrets_in_their_environment_never_in_argv(
        start: Callable[..., Node], tmp_path: Path) -> None:
    with NatsServer(jetstream=False, extra_args=["--user", "op", "--pass", "s3cret-in-env-only"]) as server:
        owner = start("w1", "--node-id", "w1", "--workers", "2", "--no-watch", "--no-durable", "-s", server.url,
                      "--user", "op", "--password", "s3cret-in-env-only")
        owner.wait_for("node w1 ready", "node w1-w1 ready")
        [worker] = _children(owner.proc.pid)
        argv = Path(f"/proc/{worker}/cmdline").read_bytes().split(b"\0")
        assert b"s3cret-in-env-only" not in b" ".join(argv)
        assert b"--no-context" in argv  # it uses exactly what its parent resolved
        assert b"NATS_PASSWORD=s3cret-in-env-only" in Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
