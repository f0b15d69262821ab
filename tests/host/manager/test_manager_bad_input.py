"""Bad input, one case each: the broken plugin is reported with a clear reason, the rest keep working."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbus.host.lifecycle import PluginManager, PluginStatus
from sandbus.host.lifecycle.policy import Policy
from sandbus.sdk.errors import (
    DependencyError,
    InvalidModuleError,
    ManifestError,
    PluginNotFoundError,
    SandbusError,
    SecurityViolationError,
)
from tests.conftest import AuditLog
from tests.host.manager.factory import plugin_manifest, plugin_wasm, wasm_reply, write_plugin

Make = Callable[..., PluginManager]

GOOD_WASM = plugin_wasm("bad")


def _manifest_only(text: str) -> Callable[[Path], None]:
    def write(d: Path) -> None:
        (d / "bad.toml").write_text(text, encoding="utf-8")
        (d / "bad.wasm").write_bytes(GOOD_WASM)

    return write


def _files(toml: str | None, wasm: bytes | None) -> Callable[[Path], None]:
    def write(d: Path) -> None:
        if toml is not None:
            (d / "bad.toml").write_text(toml, encoding="utf-8")
        if wasm is not None:
            (d / "bad.wasm").write_bytes(wasm)

    return write


CASES: list[tuple[str, Callable[[Path], None], type[SandbusError], str]] = [
    ("manifest missing", _files(None, GOOD_WASM), ManifestError, "manifest missing: expected bad.toml"),
    ("module missing", _files(plugin_manifest("bad"), None), PluginNotFoundError, "module missing: expected bad.wasm"),
    ("unparsable toml", _manifest_only('[plugin\nname = "bad"\n'), ManifestError, "not valid TOML at line 1"),
    ("wrong type", _manifest_only('[plugin]\nname = "bad"\nversion = 1\n'), ManifestError,
     "[plugin.version]: expected a string, found 1 (int)"),
    ("unknown key", _manifest_only('[plugin]\nname = "bad"\nversion = "1.0.0"\nauthr = "me"\n'), ManifestError,
     "unknown key 'authr' in [plugin]; did you mean 'author'?"),
    ("unknown section", _manifest_only('[plugin]\nname = "bad"\nversion = "1.0.0"\n[plugins]\n'), ManifestError,
     "unknown section [plugins]"),
    ("traversal path", _manifest_only(plugin_manifest(
        "bad", extra='[capabilities]\nrequired = ["filesystem"]\n[permissions]\nread_files = ["../../etc"]')),
     ManifestError, "contains a '..' component"),
    ("absolute path", _manifest_only(plugin_manifest(
        "bad", extra='[capabilities]\nrequired = ["filesystem"]\n[permissions]\nwrite_files = ["/etc"]')),
     ManifestError, "found absolute path '/etc'"),
    ("name disagrees with file", _manifest_only(plugin_manifest("other")), ManifestError,
     "plugin name 'other' does not match the file: expected 'bad'"),
    ("version not semver", _manifest_only(plugin_manifest("bad", "1.0")), ManifestError,
     "must be a semantic version like '1.2.3'"),
    ("runtime too old", _manifest_only(plugin_manifest(
        "bad", extra='min_runtime_version = "99.0.0"')), ManifestError, "requires sandbus runtime >= 99.0.0"),
    ("capability refused", _manifest_only(plugin_manifest(
        "bad", extra='[capabilities]\nrequired = ["network"]')), SecurityViolationError,
     "requires capability 'network', which the default policy does not allow"),
    ("resource above ceiling", _manifest_only(plugin_manifest(
        "bad", extra="[resources]\nmemory_mb = 4096")), SecurityViolationError,
     "asks for [resources] memory_mb = 4096, above the ceiling of 256"),
    ("missing dependency", _manifest_only(plugin_manifest("bad", deps={"pricing": "^2.1"})), DependencyError,
     "requires 'pricing' ^2.1, but no plugin 'pricing' is available"),
    ("not wasm", _files(plugin_manifest("bad"), b"hello, world"), InvalidModuleError,
     "not a valid WebAssembly module"),
    ("empty wasm", _files(plugin_manifest("bad"), b""), InvalidModuleError, "not a valid WebAssembly module (0 bytes)"),
    ("truncated wasm", _files(plugin_manifest("bad"), GOOD_WASM[: len(GOOD_WASM) // 2]), InvalidModuleError,
     "not a valid WebAssembly module"),
    ("sha256 mismatch", _files(plugin_manifest("bad", sha256=hashlib.sha256(b"other").hexdigest()), GOOD_WASM),
     SecurityViolationError, "wasm sha256 mismatch"),
]


@pytest.mark.parametrize(("case", "write", "error", "needle"), CASES, ids=[c[0] for c in CASES])
def test_bad_plugin_is_reported_and_the_rest_serve(
    pdir: Path, make_manager: Make, audit: AuditLog,
    case: str, write: Callable[[Path], None], error: type[SandbusError], needle: str,
) -> None:
    write_plugin(pdir, "good", reply="fine")
    write(pdir)
    manager = make_manager(pdir)
    report = manager.discover_and_load()
    assert report.loaded == ("good",)
    assert set(report.failed) == {"bad"}
    assert needle in report.failed["bad"], report.failed["bad"]
    info = manager.info("bad")
    assert info.status is PluginStatus.FAILED
    assert info.last_error_code == error.code
    assert manager.execute_json("good", "handle_request") == wasm_reply("fine")
    with pytest.raises(PluginNotFoundError, match="failed to load"):
        manager.execute("bad", "handle_request", b"{}")
    failed = [e for e in audit if e.kind == "lifecycle.load_failed"]
    assert [e.plugin for e in failed] == ["bad"]
    assert failed[0].details["error"] == error.code


def test_non_utf8_manifest(pdir: Path, make_manager: Make) -> None:
    (pdir / "bad.toml").write_bytes(b'[plugin]\nname = "\xff\xfe"\n')
    (pdir / "bad.wasm").write_bytes(GOOD_WASM)
    report = make_manager(pdir).discover_and_load()
    assert "not UTF-8" in report.failed["bad"]


def test_policy_refusal_is_audited(pdir: Path, make_manager: Make, audit: AuditLog) -> None:
    (pdir / "bad.toml").write_text(plugin_manifest("bad", extra='[capabilities]\nrequired = ["network"]'))
    (pdir / "bad.wasm").write_bytes(GOOD_WASM)
    make_manager(pdir).discover_and_load()
    refused = next(e for e in audit if e.kind == "policy.refused")
    assert refused.plugin == "bad"
    assert refused.details["capability"] == "network"


def test_dependency_cycle(pdir: Path, make_manager: Make) -> None:
    write_plugin(pdir, "alpha", deps={"beta": "^1.0"})
    write_plugin(pdir, "beta", deps={"alpha": "^1.0"})
    write_plugin(pdir, "good")
    report = make_manager(pdir).discover_and_load()
    assert report.loaded == ("good",)
    assert report.failed == {
        "alpha": "plugin 'alpha': dependency cycle: alpha -> beta -> alpha",
        "beta": "plugin 'beta': dependency cycle: alpha -> beta -> alpha",
    }


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", ".hidden", "", "x\0y"])
def test_traversal_names_are_refused(pdir: Path, make_manager: Make, name: str) -> None:
    manager = make_manager(pdir)
    with pytest.raises(PluginNotFoundError, match="is not a plugin name"):
        manager.load(name)
    with pytest.raises(PluginNotFoundError, match="is not a plugin name"):
        manager.reload(name)


def test_symlink_escape_in_data_dir_is_refused(pdir: Path, tmp_path: Path, make_manager: Make) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    data_root = tmp_path / "data"
    (data_root / "bad").mkdir(parents=True)
    (data_root / "bad" / "files").symlink_to(outside)
    (pdir / "bad.toml").write_text(plugin_manifest(
        "bad", extra='[capabilities]\nrequired = ["filesystem"]\n[permissions]\nread_files = ["files"]'))
    (pdir / "bad.wasm").write_bytes(GOOD_WASM)
    policy = Policy.model_validate({"capabilities": {"allowed": ["compute", "filesystem"]},
                                    "filesystem": {"readable": [str(data_root)]}})
    report = make_manager(pdir, policy=policy, data_root=data_root).discover_and_load()
    assert "outside the data root" in report.failed["bad"]


def test_unreadable_file_is_reported(pdir: Path, make_manager: Make) -> None:
    write_plugin(pdir, "good")
    (pdir / "bad.wasm").write_bytes(GOOD_WASM)
    (pdir / "bad.toml").mkdir()  # a directory where the manifest should be
    manager = make_manager(pdir)
    report = manager.discover_and_load()
    assert report.loaded == ("good",)
    assert "cannot read" in report.failed["bad"]
    manager.sync("bad")  # the watcher's path records it the same way
    assert manager.info("bad").status is PluginStatus.FAILED
