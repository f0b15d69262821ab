"""`sandbus inspect`: kind, size, exports, imports, ABI version and manifest, as a node sees them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import wasmtime

from sandbus.host.authoring import AuthoringError, inspect_wasm
from tests.authoring.conftest import sandbus

WAT_V2 = """(module
  (memory (export "memory") 1)
  (func (export "sandbus_abi_version") (result i32) (i32.const 2))
  (func (export "sandbus_alloc") (param i32) (result i32) (i32.const 16))
  (func (export "handle_request") (param i32 i32) (result i64) (i64.const 0)))"""

COMPONENT = """(component
  (core module $m (func (export "f") (param i32) (result i32) local.get 0))
  (core instance $i (instantiate $m))
  (func $f (param "x" u32) (result u32) (canon lift (core func $i "f")))
  (export "double" (func $f)))"""


@pytest.mark.parametrize("name", ["echo", "text_processor"])
def test_repo_plugins(plugins_dir: Path, name: str) -> None:
    r = sandbus("inspect", str(plugins_dir / f"{name}.wasm"), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is True
    assert report["kind"] == "core module"
    assert report["abi_ok"] is True
    assert report["abi_version"] == 1
    assert report["functions"] == ["handle_request"]
    assert report["manifest"]["valid"] is True
    assert report["manifest"]["name"] == name
    assert report["size"] == (plugins_dir / f"{name}.wasm").stat().st_size
    exports = {e["name"]: e for e in report["exports"]}
    assert exports["handle_request"]["signature"] == "(i32, i32) -> i64"
    assert exports["memory"]["kind"] == "memory"


def test_table_output(plugins_dir: Path) -> None:
    r = sandbus("inspect", str(plugins_dir / "text_processor.wasm"))
    assert r.returncode == 0
    for needle in ("core module", "ABI version", "handle_request", "sandbus_v1", "log",
                   "valid: text_processor 1.0.0", "a node accepts this module"):
        assert needle in r.stdout, needle


def test_abi_violation_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.wasm"
    bad.write_bytes(wasmtime.wat2wasm('(module (memory (export "memory") 1))'))
    r = sandbus("inspect", str(bad), "--json")
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["abi_ok"] is False
    assert "sandbus_abi_version" in report["abi_error"]
    assert report["manifest"] is None


def test_wrong_abi_version_is_reported(tmp_path: Path) -> None:
    v2 = tmp_path / "v2.wasm"
    v2.write_bytes(wasmtime.wat2wasm(WAT_V2))
    report = inspect_wasm(v2)
    assert report.abi_ok
    assert report.abi_version == 2
    assert not report.ok
    r = sandbus("inspect", str(v2))
    assert r.returncode == 1
    assert "would refuse" in r.stdout


def test_foreign_imports_are_flagged(tmp_path: Path) -> None:
    m = tmp_path / "env.wasm"
    m.write_bytes(wasmtime.wat2wasm(WAT_V2.replace("(i32.const 2)", "(i32.const 1)").replace(
        "(module", '(module (import "env" "abort" (func (param i32 i32 i32 i32)))', 1)))
    report = inspect_wasm(m)
    assert report.import_problems == ("import env.abort: only sandbus_v1 and wasi_snapshot_preview1 may be imported",)
    assert report.load_error is not None
    assert not report.ok


def test_manifest_problems(plugins_dir: Path, tmp_path: Path) -> None:
    wasm = tmp_path / "echo.wasm"
    wasm.write_bytes((plugins_dir / "echo.wasm").read_bytes())
    (tmp_path / "echo.toml").write_text('[plugin]\nname = "other"\nversion = "1.0.0"\n')
    report = inspect_wasm(wasm)
    assert report.manifest is not None
    assert not report.manifest.valid
    assert "does not match the file" in (report.manifest.error or "")
    assert not report.ok
    (tmp_path / "echo.toml").unlink()
    r = sandbus("inspect", str(wasm))
    assert r.returncode == 0
    assert "a node needs one" in r.stdout


def test_component(tmp_path: Path) -> None:
    comp = tmp_path / "comp.wasm"
    comp.write_bytes(wasmtime.wat2wasm(COMPONENT))
    report = inspect_wasm(comp)
    assert report.kind == "component"
    assert [(e.name, e.signature) for e in report.exports] == [("double", "func(x: u32) -> u32")]
    assert report.abi_ok is None
    assert "handle-request" in report.import_problems[0]  # not our world
    assert not report.ok


def test_not_wasm(tmp_path: Path, plugins_dir: Path) -> None:
    r = sandbus("inspect", str(plugins_dir / "echo.toml"))
    assert r.returncode == 2
    assert "not a WebAssembly binary" in r.stderr
    r = sandbus("inspect", str(tmp_path / "missing.wasm"))
    assert r.returncode == 2
    assert "cannot read" in r.stderr
    (tmp_path / "trunc.wasm").write_bytes(b"\0asm\x01\0\0\0\x01\xff")
    with pytest.raises(AuthoringError, match="not a valid WebAssembly module"):
        inspect_wasm(tmp_path / "trunc.wasm")


# -- Extism plugins -------------------------------------------------------------------------------------------


def test_an_extism_plugin_is_recognised_with_its_functions_and_imports(tmp_path: Path) -> None:
    from tests.extism_bus.guest import extism_wasm

    wasm = tmp_path / "vowels.wasm"
    wasm.write_bytes(extism_wasm())
    r = sandbus("inspect", str(wasm), "--json")
    report = json.loads(r.stdout)
    assert report["kind"] == "extism"
    assert report["functions"] == ["echo", "fail", "handle_message", "last"]
    assert {(i["module"], i["name"]) for i in report["imports"]} >= {("extism:host/env", "input_length"),
                                                                      ("extism:host/env", "var_set")}
    assert report["load_error"] is None
    assert report["manifest"] is None
    assert r.returncode == 0, "a module a node accepts (its manifest aside)"
    table = sandbus("inspect", str(wasm))
    for needle in ("Extism plugin (extism:host/env)", "echo, fail, handle_message, last", "input_length"):
        assert needle in table.stdout, needle


def test_inspect_manifest_writes_one_a_node_loads_and_never_overwrites(tmp_path: Path) -> None:
    from sandbus.host.lifecycle.manifest import load_manifest
    from tests.extism_bus.guest import extism_wasm

    wasm = tmp_path / "vowels.wasm"
    wasm.write_bytes(extism_wasm())
    r = sandbus("inspect", str(wasm), "--manifest", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["manifest"]["valid"] is True
    manifest = load_manifest(tmp_path / "vowels.toml", expected_name="vowels")
    assert manifest.plugin.content_type == "application/octet-stream"
    assert manifest.resources.max_var_bytes == 1048576
    text = (tmp_path / "vowels.toml").read_text()
    for notion in ("allowed_hosts", "allowed_paths", "memory.max_pages", "timeout_ms", "config"):
        assert notion in text, notion
    again = sandbus("inspect", str(wasm), "--manifest")
    assert again.returncode == 2
    assert "exists" in again.stderr
    assert (tmp_path / "vowels.toml").read_text() == text


def test_an_extism_plugin_importing_an_embedders_functions_is_flagged(tmp_path: Path) -> None:
    wasm = tmp_path / "user.wasm"
    wasm.write_bytes(wasmtime.wat2wasm("""(module
      (import "extism:host/env" "input_length" (func (result i64)))
      (import "extism:host/user" "lookup" (func (param i64) (result i64)))
      (memory (export "memory") 1)
      (func (export "run") (result i32) (i32.const 0)))"""))
    r = sandbus("inspect", str(wasm), "--json")
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["kind"] == "extism"
    assert any("extism:host/user.lookup" in p for p in report["import_problems"])
