"""plugins/count_vowels, the example Extism plugin `make run` serves: built by plugins/build.sh with the PDK its
own package-lock.json pins, loaded by sandbus as an Extism plugin, answering what Extism's own host answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import extism
import orjson
import wasmtime

from sandbus.bus.server import NatsServer
from sandbus.host.lifecycle.manifest import load_manifest
from sandbus.host.sandbox import Limits, Sandbox
from tests.bus.conftest import NodeProcess


def test_count_vowels_is_built_as_an_extism_plugin(plugins_dir: Path) -> None:
    wasm = plugins_dir / "count_vowels.wasm"
    assert wasm.exists(), "plugins/build.sh did not build count_vowels (node/npm missing?)"
    module = wasmtime.Module(wasmtime.Engine(), wasm.read_bytes())
    assert {i.module for i in module.imports} == {"extism:host/env"}
    manifest = load_manifest(plugins_dir / "count_vowels.toml")
    assert manifest.plugin.content_type == "application/json"


def test_count_vowels_answers_what_extism_answers(plugins_dir: Path) -> None:
    wasm = plugins_dir / "count_vowels.wasm"
    plugin = extism.Plugin(wasm.read_bytes(), wasi=False, functions=[])
    with Sandbox(wasm) as sb:
        assert sb.kind == "extism"
        assert sb.functions == ("count_vowels",)
        for text in (b"Hello, World!", b"", "ünïcödé".encode(), b"aeiou" * 10_000):
            out = sb.call_bytes("count_vowels", text)
            assert out == bytes(plugin.call("count_vowels", text))
            assert orjson.loads(out)["count"] == sum(ch in b"aeiouAEIOU" for ch in text)


def test_count_vowels_memory_stays_bounded_over_many_calls(plugins_dir: Path) -> None:
    """Built with AssemblyScript's collecting runtime: once warm, thousands of calls on one instance -- about
    50 MB of garbage, three times its 16 MB of memory -- leave its memory where it was."""
    data = b"x" * 16_000
    with Sandbox(plugins_dir / "count_vowels.wasm", limits=Limits(memory_bytes=16 * 1024 * 1024)) as sb:
        for _ in range(300):
            sb.call_bytes("count_vowels", data)
        warm = sb.call_detailed("count_vowels", data).memory_bytes
        for _ in range(3000):
            sb.call_bytes("count_vowels", data)
        assert sb.call_detailed("count_vowels", data).memory_bytes == warm
        assert sb.pool.replaced == 0


def test_make_runs_node_serves_count_vowels_to_the_cli(plugins_dir: Path, tmp_path: Path) -> None:
    """What README's `make run` section shows: a node on plugins/build with plugins/policy.toml serves
    count_vowels, and `sandbus request count_vowels count_vowels --raw 'Hello'` prints its JSON."""
    server = NatsServer(jetstream=True).start()
    node = NodeProcess("cv1", plugins_dir, server.url, tmp_path / "node.log")
    try:
        node.wait_ready()
        r = subprocess.run([sys.executable, "-m", "sandbus", "request", "count_vowels", "count_vowels", "--raw",
                            "Hello, World!", "--nats", server.url], capture_output=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        assert orjson.loads(r.stdout) == {"count": 3, "total": 3, "vowels": "aeiouAEIOU"}
    finally:
        node.terminate()
        server.stop()
