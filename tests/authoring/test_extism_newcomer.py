"""What someone bringing an Extism plugin meets first: the manifest `sandbus inspect --manifest` writes for
it, and the messages that tell them to send bytes rather than JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import wasmtime

from sandbus.host.lifecycle.manifest import load_manifest
from tests.authoring.conftest import sandbus

#: An Extism plugin that calls out over HTTP and exports no handle_message.
HTTP_PLUGIN = """(module
  (import "extism:host/env" "input_length" (func (result i64)))
  (import "extism:host/env" "http_request" (func (param i64 i64) (result i64)))
  (memory (export "memory") 1)
  (func (export "fetch") (result i32) (i32.const 0)))"""

#: A node refuses a connection on port 1 of loopback: the commands below must fail before connecting.
NO_BUS = "nats://127.0.0.1:1"


def test_the_manifest_of_an_http_plugin_says_how_to_grant_the_network(tmp_path: Path) -> None:
    wasm = tmp_path / "fetcher.wasm"
    wasm.write_bytes(wasmtime.wat2wasm(HTTP_PLUGIN))
    r = sandbus("inspect", str(wasm), "--manifest", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    text = (tmp_path / "fetcher.toml").read_text()
    manifest = load_manifest(tmp_path / "fetcher.toml", expected_name="fetcher")
    assert manifest.capabilities.required == ("compute",)
    assert manifest.subscriptions.topics == ()
    # No handle_message: a manifest subscribing to topics would not load, so none is suggested.
    assert "[subscriptions]" not in text
    assert "no handle_message export" in text
    # Uncommenting what the comment says grants the network and names the hosts: a manifest that loads.
    granted = text.replace('required = ["compute"]\n', "")
    granted = re.sub(r'^# (required = \["compute", "network"\]|\[permissions\]|network_hosts = .*)$', r"\1",
                     granted, flags=re.M)
    (tmp_path / "fetcher.toml").write_text(granted)
    manifest = load_manifest(tmp_path / "fetcher.toml", expected_name="fetcher")
    assert "network" in manifest.capabilities.required
    assert manifest.permissions.network_hosts == ("api.example.com:443",)


def test_a_plugin_with_handle_message_is_offered_subscriptions(tmp_path: Path) -> None:
    from tests.extism_bus.guest import extism_wasm

    wasm = tmp_path / "listener.wasm"
    wasm.write_bytes(extism_wasm())
    assert sandbus("inspect", str(wasm), "--manifest").returncode == 0
    text = (tmp_path / "listener.toml").read_text()
    assert "# [subscriptions]" in text
    assert "network" not in text.split("\n[capabilities]\n")[1].split("\n[resources]\n")[0], "no HTTP calls"


def test_a_file_name_that_is_no_plugin_name_is_told_how_to_rename(tmp_path: Path) -> None:
    wasm = tmp_path / "My-Plugin.wasm"
    wasm.write_bytes(wasmtime.wat2wasm(HTTP_PLUGIN))
    r = sandbus("inspect", str(wasm), "--manifest")
    assert r.returncode == 2
    assert "rename My-Plugin.wasm" in r.stderr
    assert "my_plugin.wasm" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "My-Plugin.toml").exists()


def test_text_where_json_is_expected_points_at_raw(tmp_path: Path) -> None:
    wasm = tmp_path / "fetcher.wasm"
    wasm.write_bytes(wasmtime.wat2wasm(HTTP_PLUGIN))
    run = sandbus("run", str(wasm), "-f", "fetch", "-i", "Hello")
    assert run.returncode == 2
    assert "--input is not valid JSON" in run.stderr
    assert "--raw" in run.stderr
    request = sandbus("request", "fetcher", "fetch", "Hello", "-s", NO_BUS, "--no-context")
    assert request.returncode == 2
    assert "payload is not valid JSON" in request.stderr
    assert "--raw" in request.stderr


def test_pub_says_where_published_bytes_arrive() -> None:
    r = sandbus("pub", "--help")
    assert r.returncode == 0
    assert "Publish FILE's bytes" in r.stdout
    assert "plugins whose input is bytes" not in r.stdout, "a topic's bytes reach subscribers, not an input"


def test_the_json_of_inspect_is_unchanged_by_the_manifest_hints(tmp_path: Path) -> None:
    wasm = tmp_path / "fetcher.wasm"
    wasm.write_bytes(wasmtime.wat2wasm(HTTP_PLUGIN))
    report = json.loads(sandbus("inspect", str(wasm), "--json").stdout)
    assert report["kind"] == "extism"
    assert report["functions"] == ["fetch"]


def test_the_dev_loop_suggests_a_function_the_plugin_has() -> None:
    from sandbus.host.cli.dev import call_hint

    url = "nats://127.0.0.1:4444"
    # An Extism plugin's functions have their own names: the hint names one of them.
    assert call_hint("vowels", ("count_vowels",), url) == f"sandbus request vowels count_vowels '{{}}' -s {url}"
    assert call_hint("greeter", ("handle_request", "other"), url).startswith("sandbus request greeter handle_request")
    assert call_hint("greeter", (), url).startswith("sandbus request greeter handle_request"), "nothing served yet"
