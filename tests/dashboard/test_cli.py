"""``sandbus dashboard`` on the command line: its refusals are one line and an exit code; it stops cleanly."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbus.bus.server import NatsServer
from tests.bus.conftest import NodeProcess, free_port
from tests.dashboard.stack import ROOT, DashboardProcess, api_state, make_plugins, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    server = NatsServer(jetstream=False).start()
    try:
        yield server.url
    finally:
        server.stop()


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    return subprocess.run([sys.executable, "-m", "sandbus", "dashboard", "--no-context", *args], capture_output=True,
                          text=True, timeout=30, cwd=ROOT, env=env)


@pytest.mark.parametrize(("args", "message"), [
    (["--interval", "0.1"], "--interval must be between 0.5 and 3600 seconds"),
    (["--interval", "nan"], "--interval must be between 0.5 and 3600 seconds"),
    (["--jaeger-url", "javascript:alert(1)"], "--jaeger-url must be an http(s) URL"),
    (["--jaeger-url", "http://user:pw@jaeger:16686"], "--jaeger-url must be an http(s) URL"),
    (["--jaeger-url", 'http://jaeger:16686/"><script>'], "--jaeger-url must be an http(s) URL"),
    (["--allow-host", "evil.example:80"], "--allow-host takes a host name"),
])
def test_bad_options_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    proc = _run("--nats", "nats://127.0.0.1:1", *args)
    assert proc.returncode == 2, proc
    assert len(proc.stderr.splitlines()) == 1
    assert message in proc.stderr


def test_an_unreachable_bus_is_said_at_once() -> None:
    proc = _run("--nats", "nats://127.0.0.1:1")
    assert proc.returncode == 5, proc
    assert proc.stderr.startswith("sandbus: NATS at nats://127.0.0.1:1 is unreachable (")


def test_a_port_in_use_is_a_usage_error_with_a_hint(nats_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = _run("--nats", nats_url, "--port", str(taken.getsockname()[1]))
    assert proc.returncode == 2, proc
    assert "cannot listen on 127.0.0.1:" in proc.stderr
    assert "--port 0 picks a free port" in proc.stderr


def test_control_without_credentials_warns(nats_url: str, tmp_path: Path) -> None:
    dashboard = DashboardProcess(nats_url, tmp_path / "dashboard.log", "--allow-control").wait_ready()
    assert "warning: --allow-control without credentials" in dashboard.output()
    assert dashboard.stop() == 0


def test_listening_on_the_network_warns_and_sigterm_stops_it(nats_url: str, tmp_path: Path) -> None:
    dashboard = DashboardProcess(nats_url, tmp_path / "dashboard.log", "--host", "0.0.0.0").wait_ready()
    assert "warning: listening on 0.0.0.0: the dashboard is reachable from the network" in dashboard.output()
    assert dashboard.stop() == 0


def test_a_bus_outage_is_shown_then_recovered(tmp_path: Path, plugins_dir: Path) -> None:
    """NATS goes away: the page says the nodes cannot be polled (the log says it once), and once NATS is back
    the dashboard reconnects by itself and shows the node again."""
    port = free_port()
    plugins = make_plugins(tmp_path, plugins_dir)
    server = NatsServer(jetstream=False, port=port).start()
    node = NodeProcess("out-n1", plugins, server.url, tmp_path / "node.log")
    dashboard: DashboardProcess | None = None
    try:
        node.wait_ready()
        dashboard = DashboardProcess(server.url, tmp_path / "dashboard.log", "--interval", "0.5").wait_ready()
        url = dashboard.url
        wait_for(lambda: [n["node_id"] for n in api_state(url)["nodes"]] == ["out-n1"], "the node")
        server.stop()
        status = wait_for(lambda: not (s := api_state(url)["status"])["ok"] and s, "the outage shown")
        assert status["message"].startswith("cannot poll the nodes: ")
        server = NatsServer(jetstream=False, port=port).start()
        wait_for(lambda: api_state(url)["status"]["ok"], "polling again", timeout=30)
        wait_for(lambda: [n["node_id"] for n in api_state(url)["nodes"]] == ["out-n1"]
              and api_state(url)["nodes"][0]["reachable"], "the node again", timeout=30)
        output = dashboard.output()
        assert output.count("polling the nodes failed") == 1
        assert "reconnected to NATS" in output
        assert "Traceback" not in output
    finally:
        if dashboard is not None:
            dashboard.stop()
        node.terminate()
        server.stop()


def test_max_clients_bounds_the_open_streams(nats_url: str, tmp_path: Path) -> None:
    dashboard = DashboardProcess(nats_url, tmp_path / "dashboard.log", "--max-clients", "2").wait_ready()
    parts = urllib.parse.urlsplit(dashboard.url)
    streams = [http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10) for _ in range(3)]
    try:
        statuses = []
        for conn in streams:
            conn.request("GET", "/api/events")
            statuses.append(conn.getresponse().status)
        assert statuses == [200, 200, 503]
        streams[0].close()  # a page goes away: its place is free again (once the server notices)
        wait_for(lambda: _status_of_new_stream(dashboard.url) == 200, "a free place")
    finally:
        for conn in streams:
            conn.close()
        dashboard.stop()


def _status_of_new_stream(url: str) -> int:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("GET", "/api/events")
        return conn.getresponse().status
    finally:
        conn.close()
