"""What the CLI prints and how it exits: plain help with its brackets, the exit-code table, --version,
completion, one-line usage errors, every manifest error, `ls` in 80 columns, --json that parses, the exit
codes of a call over the bus, and the client commands' import set. Real nats-server, real node, real
console script."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer

from sandbus.bus.server import NatsServer
from sandbus.host.cli.main import COMMAND_MODULES, EXIT_CODES, MODULES, PLAIN_COERCION
from sandbus.host.lifecycle.manifest import MAX_REPORTED_ERRORS, parse_manifest
from sandbus.sdk.errors import ManifestError

SANDBUS = Path(sys.executable).parent / "sandbus"
#: A port nothing listens on: a command that got as far as connecting would fail with exit 5, not 2.
NOWHERE = "nats://127.0.0.1:9"


def _env(columns: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "NATS_", "SANDBUS_NATS", "_TYPER", "SANDBUS_DEBUG"))}
    return {**env, "COLUMNS": str(columns), **(extra or {})}


def sandbus(*args: str, columns: int = 200, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert SANDBUS.exists(), "the sandbus console script is not installed (pip install -e .)"
    return subprocess.run([str(SANDBUS), *args], capture_output=True, text=True, timeout=60,
                          env=_env(columns, env), stdin=subprocess.DEVNULL)


def one_line(stderr: str) -> str:
    """The one line a failed command printed (anything more, or a traceback, fails the test)."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("sandbus: "), stderr
    return lines[0]


# --------------------------------------------------------------------------------------------------
# Help, version, completion
# --------------------------------------------------------------------------------------------------


def test_help_is_plain_text_and_keeps_its_brackets() -> None:
    r = sandbus("plugins", "check", "--help")
    assert r.returncode == 0, r.stderr
    assert "[resources.memory_mb]" in r.stdout  # rich markup would have eaten it
    r = sandbus("request", "--help")
    assert r.returncode == 0, r.stderr
    assert "[default: handle_request]" in r.stdout
    assert "\x1b" not in r.stdout  # no colours
    assert "╭" not in r.stdout  # no panels: plain text


def test_root_help_ends_with_the_exit_codes() -> None:
    r = sandbus("--help")
    assert r.returncode == 0, r.stderr
    help_text = r.stdout.split("Exit codes:", 1)[1]
    for code, meaning in EXIT_CODES:
        assert f"{code:<3d} {meaning}" in help_text, code
    assert [c for c, _ in EXIT_CODES] == [0, 1, 2, 3, 4, 5, 6, 7, 70]
    assert max(len(line) for line in r.stdout.splitlines()) <= 80


def test_version_is_the_installed_distribution() -> None:
    r = sandbus("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"sandbus {importlib.metadata.version('sandbus')}\n"


@pytest.mark.parametrize(("shell", "marker"), [("bash", "complete -o"), ("zsh", "compdef")])
def test_completion_script(shell: str, marker: str) -> None:
    # typer's switch to name the shell instead of detecting the one this test runs under
    r = sandbus("--show-completion", shell, env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert r.returncode == 0, r.stderr
    assert marker in r.stdout
    assert "_SANDBUS_COMPLETE" in r.stdout


def test_completion_completes_commands_and_options() -> None:
    """What the bash script asks the command: the words that complete the one being typed."""
    r = sandbus(env={"_SANDBUS_COMPLETE": "complete_bash", "COMP_WORDS": "sandbus re", "COMP_CWORD": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["request", "replay"]
    r = sandbus(env={"_SANDBUS_COMPLETE": "complete_bash", "COMP_WORDS": "sandbus req", "COMP_CWORD": "1"})
    assert r.stdout.split() == ["request"]
    r = sandbus(env={"_SANDBUS_COMPLETE": "complete_bash", "COMP_WORDS": "sandbus ls --wi", "COMP_CWORD": "2"})
    assert r.stdout.split() == ["--wide"]


def test_command_table_names_each_commands_module() -> None:
    """main() imports only the module of the command it runs: the table must say where each command is."""
    for module_name in MODULES:
        app = typer.Typer()
        importlib.import_module(f"sandbus.host.cli.{module_name}").register(app)
        for command in app.registered_commands:
            name = command.name or (command.callback.__name__ if command.callback else "")
            assert COMMAND_MODULES.get(name) == module_name, (name, module_name)


# --------------------------------------------------------------------------------------------------
# Usage errors: exit 2, one line, before anything connects
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "needle"), [
    (["request", "text_processor", '{"action":1}'],
     "FUNCTION looks like JSON: did you mean `sandbus request text_processor handle_request"),
    (["request", "echo", "handle_request", "{bad"], "payload is not valid JSON"),
    (["request", "echo", "handle_request", "[" * 300 + "]" * 300], "nests deeper than 254 levels"),
    (["request", "ech o"], "plugin 'ech o'"),
    (["request"], "Missing argument"),
    (["request", "echo", "--bogus"], "No such option: --bogus"),
    (["request", "echo", "--timeout", "abc"], "'abc' is not a valid number"),
    (["request", "echo", "--timeout", "nan"], "expected a finite number above 0"),
    (["pub", "orders.*", "{}"], "wildcards"),
    (["pub", "orders.>", "{}"], "wildcards"),
    (["pub", "a b", "{}"], "whitespace"),
    (["pub", "x.y", "{bad"], "payload is not valid JSON"),
    (["ls", "--timeout", "-1"], "expected a finite number above 0"),
    (["run", "{echo}", "--fuel", "9" * 30], "expected 0 (unmetered) to"),
    (["run", "{echo}", "--fuel", "x"], "is not a valid integer"),
    (["plugins", "check", "x" * 5000], "File name too long"),
])
def test_usage_errors_are_one_line_and_exit_2(plugins_dir: Path, args: list[str], needle: str) -> None:
    connects = args[0] in ("request", "pub", "ls")
    r = sandbus(*[a.replace("{echo}", str(plugins_dir / "echo.wasm")) for a in args],
                *(["-s", NOWHERE] if connects else []))
    assert r.returncode == 2, r.stderr
    assert needle in one_line(r.stderr)


def test_an_error_of_sandbus_itself_is_one_line_and_exit_70() -> None:
    script = """
import sys
from sandbus.host.cli.main import app, main
@app.command()
def boom() -> None:
    raise RuntimeError("a bug")
main(["boom"])
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=_env(200))
    assert r.returncode == 70, r.stderr
    assert "internal error: RuntimeError: a bug" in one_line(r.stderr)


# --------------------------------------------------------------------------------------------------
# Manifest errors: every one shown
# --------------------------------------------------------------------------------------------------

BAD_MANIFEST = """
[plugin]
name = "echo"
version = "1.0.0"
description = "x"
author = 7
license = "Apache-2.0"
min_runtime_version = "0.1.0"
[capabilities]
required = ["compute"]
[resources]
memory_mb = "lots"
bogus = 1
max_instances = -1
[extra]
a = 1
"""


def test_plugins_check_shows_every_error_of_a_manifest(tmp_path: Path, plugins_dir: Path) -> None:
    shutil.copy(plugins_dir / "echo.wasm", tmp_path / "echo.wasm")
    (tmp_path / "echo.toml").write_text(BAD_MANIFEST)
    r = sandbus("plugins", "check", str(tmp_path), columns=400)
    assert r.returncode == 1, r.stdout + r.stderr
    for key in ("[plugin.author]", "[resources.memory_mb]", "[resources.bogus]", "[resources.max_instances]",
                "[extra]"):
        assert key in r.stdout, (key, r.stdout)
    assert "more error" not in r.stdout
    r = sandbus("plugins", "check", str(tmp_path), "--json")
    (info,) = json.loads(r.stdout)
    assert info["last_error"].count("\n") == 4  # five errors, one per line


def test_manifest_errors_are_bounded() -> None:
    keys = "\n".join(f"unknown_{i} = 1" for i in range(MAX_REPORTED_ERRORS + 10))
    text = BAD_MANIFEST.replace("[extra]\na = 1\n", "") .replace("bogus = 1", keys)
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, source="echo.toml", expected_name="echo")
    message = str(caught.value)
    assert message.startswith("echo.toml: [plugin.author]: expected a string")
    lines = message.splitlines()
    assert len(lines) == MAX_REPORTED_ERRORS + 1
    total = MAX_REPORTED_ERRORS + 10 + 3  # the unknown keys, author, memory_mb, max_instances
    assert lines[-1] == f"(and {total - MAX_REPORTED_ERRORS} more errors)"


# --------------------------------------------------------------------------------------------------
# Over the bus: a real nats-server, with and without a node
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def empty_bus() -> Iterator[str]:
    server = NatsServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def node_bus(tmp_path_factory: pytest.TempPathFactory, plugins_dir: Path) -> Iterator[str]:
    """A nats-server and a node serving echo and text_processor."""
    served = tmp_path_factory.mktemp("served")
    for name in ("echo", "text_processor"):
        for ext in ("wasm", "toml"):
            shutil.copy(plugins_dir / f"{name}.{ext}", served / f"{name}.{ext}")
    server = NatsServer().start()
    log = tmp_path_factory.mktemp("node") / "node.log"
    try:
        with log.open("wb") as out:
            node = subprocess.Popen([str(SANDBUS), "node", "--plugins", str(served), "-s", server.url, "--no-watch",
                                     "--node-id", "cli-output"], stdout=out, stderr=subprocess.STDOUT,
                                    env=_env(200, {"PYTHONUNBUFFERED": "1"}))
        try:
            deadline = time.monotonic() + 60
            while b"node cli-output ready" not in log.read_bytes():
                assert node.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            yield server.url
        finally:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(timeout=20)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
    finally:
        server.stop()


def test_ls_without_a_node_says_so(empty_bus: str) -> None:
    r = sandbus("ls", "-s", empty_bus, "--timeout", "0.2")
    assert r.returncode == 6, r.stderr
    assert f"no sandbus node answered on {empty_bus} within 0.2 s" in one_line(r.stderr)
    assert r.stdout == ""
    r = sandbus("ls", "-s", empty_bus, "--timeout", "0.2", "--json")
    assert r.returncode == 6, r.stderr
    assert json.loads(r.stdout) == []


def test_ls_fits_80_columns_and_json_parses(node_bus: str) -> None:
    sandbus("request", "echo", "-s", node_bus)  # a call, so the counters are not all zero
    r = sandbus("ls", "-s", node_bus, columns=80)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, r.stdout
    assert re.search(r"\bplugin\s+version\s+status\s+calls\s+errors\s+p50 ms\s+p99 ms\b", r.stdout), r.stdout
    assert re.search(r"\bcli-output\s+echo\s+1\.0\.0\s+loaded\s+[1-9]", r.stdout), r.stdout
    wide = sandbus("ls", "-s", node_bus, "--wide", columns=80)
    assert wide.returncode == 0, wide.stderr
    assert "last error" in wide.stdout
    assert "rejected" in wide.stdout
    assert all(len(line.split()) > 3 for line in wide.stdout.splitlines() if "echo" in line)  # one line a row
    r = sandbus("ls", "-s", node_bus, "--json")
    assert r.returncode == 0, r.stderr
    (view,) = json.loads(r.stdout)
    assert view["node_id"] == "cli-output"
    assert {p["name"] for p in view["plugins"]} == {"echo", "text_processor"}


def test_request_and_pub_print_json(node_bus: str) -> None:
    r = sandbus("request", "echo", "handle_request", '{"n": [1, 2]}', "-s", node_bus)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"n": [1, 2]}
    r = sandbus("pub", "x.y", "1", "-s", node_bus)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"[0-9a-f]{32}\n", r.stdout), r.stdout
    r = sandbus("pub", "x.y", "1", "--json", "-s", node_bus)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"[0-9a-f]{32}", json.loads(r.stdout)["id"])


def test_exit_codes_of_a_call_over_the_bus(node_bus: str) -> None:
    r = sandbus("request", "nobody_serves_this", "-s", node_bus)
    assert r.returncode == 6, r.stderr
    assert "no node serves plugin 'nobody_serves_this'" in one_line(r.stderr)
    r = sandbus("request", "echo", "no_such_function", "-s", node_bus)
    assert r.returncode == 2, r.stderr  # the caller's mistake, said by the node
    assert "no_such_function" in one_line(r.stderr)
    r = sandbus("request", "text_processor", "handle_request", '{"action": "fly"}', "-s", node_bus)
    assert r.returncode == 1, r.stderr  # the plugin's own "success": false
    assert json.loads(r.stdout)["success"] is False


def test_no_reply_in_time_exits_7(empty_bus: str) -> None:
    """Someone listens but never answers: the call may have run, which is not "nobody serves it"."""
    import asyncio

    from sandbus.sdk.nats_guard import GuardedNatsClient

    async def go() -> subprocess.CompletedProcess[str]:
        nc = GuardedNatsClient()
        await nc.connect(empty_bus)
        try:
            await nc.subscribe("sandbus.req.silent.*")  # takes the request, never replies
            await nc.flush()
            return await asyncio.to_thread(sandbus, "request", "silent", "-s", empty_bus, "--timeout", "0.3")
        finally:
            await nc.close()

    r = asyncio.run(go())
    assert r.returncode == 7, r.stderr
    assert "within 0.3 s" in one_line(r.stderr)


# --------------------------------------------------------------------------------------------------
# What a client command loads
# --------------------------------------------------------------------------------------------------

IMPORT_SET = """
import json, sys
code = None
try:
    from sandbus.host.cli import main
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""
#: What a client command must not load: the host extra, the plugin runtime, pydantic (typer's value
#: conversion and the old envelope model), the OpenTelemetry SDK (without OTEL_*), rich (plain output).
HEAVY = ("wasmtime", "watchdog", "semantic_version", "pydantic", "pydantic_core", "opentelemetry.sdk", "rich",
         "sandbus.host.sandbox.sandbox", "sandbus.host.lifecycle", "sandbus.host.node", "sandbus.host.authoring")


@pytest.mark.parametrize(("args", "code"), [(["request", "echo"], 6), (["pub", "x.y", "1"], 0)])
def test_client_commands_load_only_the_client(empty_bus: str, args: list[str], code: int) -> None:
    assert PLAIN_COERCION  # typer's conversion without pydantic is in place
    r = subprocess.run([sys.executable, "-c", IMPORT_SET, *args, "-s", empty_bus], capture_output=True, text=True,
                       timeout=60, env=_env(200))
    result = json.loads(r.stdout.splitlines()[-1])  # after what the command printed
    assert result["code"] == code, r.stderr
    loaded = [m for m in result["modules"] if m.startswith(HEAVY)]
    assert loaded == [], loaded
