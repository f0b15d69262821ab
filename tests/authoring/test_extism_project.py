"""Extism projects (``sandbus new NAME --lang extism-as``): recognised by the PDK in package.json, built with
asc and Extism's PDK, checked against the Extism host ABI, and the scaffold's plugin behaves the same in the
Extism Python SDK and in sandbus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import extism
import pytest

from sandbus.host.authoring import BuildError, Language, ToolchainMissingError, build_project, detect_project, scaffold
from sandbus.host.authoring.build import is_stale
from sandbus.host.sandbox import Sandbox
from sandbus.sdk.errors import GuestError
from tests.extism.conftest import HERE as EXTISM_TESTS
from tests.extism.conftest import install_pdk


def _extism_project(tmp_path: Path, name: str = "greeter") -> Path:
    """A scaffolded extism-as project using the PDK and compiler the Extism tests pin (no registry needed)."""
    install_pdk()
    project = scaffold(name, Language.EXTISM_AS, tmp_path)
    (project.root / "node_modules").symlink_to(EXTISM_TESTS / "node_modules", target_is_directory=True)
    return project.root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scaffold, built once for the module's tests."""
    root = _extism_project(tmp_path_factory.mktemp("extism-project"))
    build_project(root)
    return root


def test_the_pdk_in_package_json_makes_an_extism_project(tmp_path: Path) -> None:
    project = scaffold("plain_as", Language.ASSEMBLYSCRIPT, tmp_path)
    assert detect_project(project.root).language is Language.ASSEMBLYSCRIPT
    package = project.root / "package.json"
    for key in ("devDependencies", "dependencies"):
        package.write_text(json.dumps({key: {"@extism/as-pdk": "1.0.0"}}))
        assert detect_project(project.root).language is Language.EXTISM_AS


@pytest.mark.parametrize("package", [b"{not json", b"[" * 100_000 + b"]" * 100_000, b'"@extism/as-pdk"',
                                     b'{"devDependencies": ["@extism/as-pdk"]}', b"\xff\xfe",
                                     b'{"x": "' + b"y" * 300_000 + b'", "devDependencies": {"@extism/as-pdk": "1"}}'],
                         ids=["malformed", "deep", "string", "list", "not-utf8", "oversized"])
def test_an_unreadable_package_json_is_plain_assemblyscript(tmp_path: Path, package: bytes) -> None:
    """What package.json says is read bounded and never trusted to be well formed: anything odd is not Extism."""
    project = scaffold("odd", Language.ASSEMBLYSCRIPT, tmp_path)
    (project.root / "package.json").write_bytes(package)
    assert detect_project(project.root).language is Language.ASSEMBLYSCRIPT


def test_build_makes_an_extism_module(built: Path) -> None:
    project = detect_project(built)
    assert project.language is Language.EXTISM_AS
    wasm = project.wasm.read_bytes()
    import wasmtime

    module = wasmtime.Module(wasmtime.Engine(), wasm)
    assert {i.module for i in module.imports} == {"extism:host/env"}  # no WASI, no env.abort
    assert "handle_request" in {e.name for e in module.exports}
    assert not is_stale(project)
    again = build_project(built)
    assert not again.built  # incremental: nothing changed


def test_a_changed_lock_file_makes_the_build_stale(built: Path, tmp_path: Path) -> None:
    project = detect_project(built)
    lock = built / "package-lock.json"
    try:
        lock.write_text("{}")
        os.utime(lock, ns=(project.wasm.stat().st_mtime_ns + 10**9,) * 2)
        assert is_stale(project)
    finally:
        lock.unlink()


def test_the_scaffold_runs_in_extisms_own_host(built: Path) -> None:
    plugin = extism.Plugin(detect_project(built).wasm.read_bytes(), wasi=False, functions=[])
    assert bytes(plugin.call("handle_request", b'{"hello": "world"}')) == \
        b'{"success":true,"result":{"hello": "world"},"error":null}'
    with pytest.raises(extism.Error, match="greeter: empty request"):
        plugin.call("handle_request", b"")


def test_the_scaffold_runs_the_same_in_sandbus(built: Path) -> None:
    wasm = detect_project(built).wasm
    plugin = extism.Plugin(wasm.read_bytes(), wasi=False, functions=[])
    with Sandbox(wasm) as sb:
        for request in (b'{"hello": "world"}', b"[1, 2.5, null]", '"ünï 😀"'.encode()):
            assert sb.call_bytes("handle_request", request) == bytes(plugin.call("handle_request", request))
        with pytest.raises(GuestError, match="greeter: empty request"):
            sb.call_bytes("handle_request", b"")


def test_the_generated_test_passes(built: Path) -> None:
    test = subprocess.run([sys.executable, "-m", "pytest", str(built), "-q", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, timeout=600, cwd=built.parent,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert test.returncode == 0, test.stdout + test.stderr
    assert "3 passed" in test.stdout


def test_without_node_the_build_names_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = scaffold("no_node", Language.EXTISM_AS, tmp_path)  # no node_modules: the PDK must be installed
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(ToolchainMissingError) as missing:
        build_project(project.root)
    assert missing.value.details["tool"] == "node"
    assert "npm install" in missing.value.details["install"]
    assert not (project.root / "build" / "no_node.wasm").exists()


def test_a_module_without_the_pdk_is_refused(tmp_path: Path) -> None:
    """A project that says it is an Extism plugin but builds a module importing nothing from Extism."""
    root = _extism_project(tmp_path, "pretender")
    (root / "assembly" / "index.ts").write_text("export function run(): i32 { return 0; }\n")
    with pytest.raises(BuildError) as refused:
        build_project(root)
    assert refused.value.message.startswith("pretender compiled, but imports nothing from extism:host/env")
    assert not (root / "build" / "pretender.wasm").exists()


@pytest.mark.parametrize(("rel", "source"), [
    ("assembly/index.ts", True), ("assembly/lib/util.ts", True), ("package.json", True),
    ("package-lock.json", True), ("greeter.toml", True), ("node_modules/@extism/as-pdk/index.ts", False),
    ("build/greeter.wasm", False), ("test_greeter.py", False), ("assembly/.index.ts.swp", False),
])
def test_what_counts_as_a_source_of_an_extism_project(tmp_path: Path, rel: str, source: bool) -> None:
    """`sandbus dev` rebuilds for the entry file, its modules, the npm pins and the manifest; never for the
    PDK's own files in node_modules."""
    from sandbus.host.authoring.devloop import is_source

    project = scaffold("greeter", Language.EXTISM_AS, tmp_path)
    assert is_source(project, project.root / rel) is source
