"""`sandbus new` -> `sandbus build` -> the generated test passes, for every language whose toolchain exists.

C and WAT always run (the C toolchain is installed by `make toolchain`; WAT needs none). AssemblyScript
and Python are skipped only when their compiler is genuinely absent, saying which. An Extism project
(extism-as) builds with the PDK and compiler the Extism tests pin (tests/extism/node_modules, linked into the
project, so the test needs no registry).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from sandbus.host.authoring import AuthoringError, Language, detect_project, guest_sdk_dir, scaffold
from sandbus.host.authoring.build import find_tool
from sandbus.host.cli.dev import _watched
from sandbus.host.lifecycle.manifest import load_manifest
from tests.authoring.conftest import sandbus
from tests.extism.conftest import HERE as EXTISM_TESTS
from tests.extism.conftest import install_pdk


def _cli_offers(language: Language) -> bool:
    from sandbus.host.cli.author import LanguageName

    return language.value in typing.get_args(LanguageName)


def _toolchain_missing(language: Language) -> str | None:
    if language is Language.ASSEMBLYSCRIPT:
        sdk_bin = guest_sdk_dir(language) / "node_modules" / ".bin"
        if find_tool("node") is None:
            return "Node.js is not installed (apt-get install nodejs npm)"
        if find_tool("asc", sdk_bin) is None:
            return "asc is not installed (npm install assemblyscript in sdk/guest/assemblyscript)"
    if language is Language.EXTISM_AS:
        if find_tool("node") is None or find_tool("npm") is None:
            return "Node.js and npm are not installed (apt-get install nodejs npm)"
        if not _cli_offers(language):
            return "the sandbus CLI does not offer --lang extism-as yet"
    if language is Language.PYTHON:
        if find_tool("componentize-py") is None:
            return "componentize-py is not installed (pip install componentize-py)"
        if not any((guest_sdk_dir(language) / "wit").glob("*.wit")):
            return "the Python guest SDK's WIT world (sdk/guest/python/wit) is not there"
    return None


LANGUAGES = [
    pytest.param(lang, marks=[pytest.mark.skipif(_toolchain_missing(lang) is not None,
                                                 reason=str(_toolchain_missing(lang)))]
                 + ([pytest.mark.slow] if lang in (Language.ASSEMBLYSCRIPT, Language.PYTHON, Language.EXTISM_AS)
                    else []),
                 id=lang.value)
    for lang in Language
]


@pytest.mark.parametrize("language", LANGUAGES)
def test_new_build_test_run(language: Language, tmp_path: Path) -> None:
    name = f"hello_{language.value[:2]}"
    r = sandbus("new", name, "--lang", language.value, "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    root = tmp_path / name
    assert f"sandbus build {root}" in r.stdout
    if language is Language.EXTISM_AS:  # the pinned PDK, offline (an author's first build runs npm install)
        install_pdk()
        (root / "node_modules").symlink_to(EXTISM_TESTS / "node_modules", target_is_directory=True)

    r = sandbus("build", str(root))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"built {root}/build/{name}.wasm" in r.stdout
    assert "checking manifest" in r.stderr  # progress is shown
    assert (root / "build" / f"{name}.toml").read_bytes() == (root / f"{name}.toml").read_bytes()

    # the generated test, run as an author would, in a fresh process
    test = subprocess.run([sys.executable, "-m", "pytest", str(root), "-q", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert test.returncode == 0, test.stdout + test.stderr
    assert "3 passed" in test.stdout

    r = sandbus("run", str(root / "build" / f"{name}.wasm"), "--input", '{"hello": "world"}')
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().replace(" ", "") == '{"success":true,"result":{"hello":"world"},"error":null}'

    r = sandbus("inspect", str(root / "build" / f"{name}.wasm"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "a node accepts this module" in r.stdout


@pytest.mark.parametrize("language", list(Language), ids=[lang.value for lang in Language])
def test_scaffold_files_and_manifest(language: Language, tmp_path: Path) -> None:
    project = scaffold("my_plugin", language, tmp_path)
    files = {str(p.relative_to(project.root)) for p in project.root.rglob("*") if p.is_file()}
    common = {"my_plugin.toml", "Makefile", "test_my_plugin.py", "conftest.py", "pytest.ini", "README.md",
              ".gitignore"}
    source = {Language.C: {"my_plugin.c"}, Language.WAT: {"my_plugin.wat"},
              Language.ASSEMBLYSCRIPT: {"assembly/index.ts", "package.json"}, Language.PYTHON: {"app.py"},
              Language.EXTISM_AS: {"assembly/index.ts", "package.json"}}
    assert files == common | source[language]
    manifest = load_manifest(project.manifest)  # valid, and named like the file
    assert manifest.name == "my_plugin"
    assert detect_project(project.root) == project
    assert "{{" not in "".join((project.root / f).read_text() for f in files)
    assert _watched(project).endswith("my_plugin.toml")  # what `sandbus dev` says it watches, for every language


def _machine_paths(tmp_path: Path) -> dict[str, str]:
    """Paths that would tie a project to the machine (and the directory) it was generated in."""
    repo = Path(__file__).resolve().parents[2]
    paths = {"checkout": str(repo), "venv": sys.prefix, "interpreter": str(Path(sys.executable).parent),
             "tmp_path": str(tmp_path), "home": str(Path.home())}
    for language in Language:
        if language is not Language.EXTISM_AS:  # Extism's PDK is an npm dependency, not a sandbus SDK
            paths[f"{language.value} SDK"] = str(guest_sdk_dir(language))
    return {what: path for what, path in paths.items() if path not in ("", "/")}


@pytest.mark.parametrize("language", [
    pytest.param(lang, marks=pytest.mark.skipif(not _cli_offers(lang), reason=f"the CLI has no --lang {lang.value}"),
                 id=lang.value) for lang in Language])
def test_scaffold_names_no_path_of_this_machine(language: Language, tmp_path: Path) -> None:
    r = sandbus("new", "portable", "--lang", language.value, "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    root = tmp_path / "portable"
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) >= 8
    for path in files:
        text = path.read_text(encoding="utf-8")
        for what, machine_path in _machine_paths(tmp_path).items():
            assert machine_path not in text, f"{path.name} names the {what} ({machine_path})"
    if language is Language.ASSEMBLYSCRIPT:
        package = json.loads((root / "package.json").read_text(encoding="utf-8"))
        assert "@sandbus/guest" not in package.get("dependencies", {})  # sandbus build supplies it
        assert "assemblyscript" in package["devDependencies"]
    if language is Language.EXTISM_AS:
        package = json.loads((root / "package.json").read_text(encoding="utf-8"))
        assert set(package["devDependencies"]) == {"@extism/as-pdk", "assemblyscript"}  # pinned versions


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_makefile_builds_and_tests_a_moved_project(tmp_path: Path) -> None:
    """Generated in one place, moved (as a clone elsewhere would be), then `make test` with the
    interpreter named on the command line: it builds and its tests pass."""
    project = scaffold("moved", Language.WAT, tmp_path / "first")
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(project.root, moved)
    r = subprocess.run(["make", "test", f"PYTHON={sys.executable}"], capture_output=True, text=True, timeout=300,
                       cwd=moved, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (moved / "build" / "moved.wasm").read_bytes()[:4] == b"\0asm"
    assert "3 passed" in r.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_makefile_says_how_to_name_the_interpreter(tmp_path: Path) -> None:
    project = scaffold("lost", Language.WAT, tmp_path)
    no_sandbus = tmp_path / "python-without-sandbus"
    no_sandbus.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n', encoding="utf-8")
    no_sandbus.chmod(0o755)
    r = subprocess.run(["make", "build", f"PYTHON={no_sandbus}"], capture_output=True, text=True, timeout=60,
                       cwd=project.root, stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    assert "cannot import sandbus" in r.stderr
    assert "make PYTHON=path/to/venv/bin/python" in r.stderr
    assert not (project.root / "build").exists()


@pytest.mark.parametrize("bad", ["Hello", "1st", "with-dash", "", "a" * 64, "../up", "x.y"])
def test_invalid_names_are_refused(bad: str, tmp_path: Path) -> None:
    r = sandbus("new", bad, "--dir", str(tmp_path))
    assert r.returncode == 2
    assert "invalid plugin name" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    r = sandbus("new", "taken", "--dir", str(tmp_path))
    assert r.returncode == 2
    assert "already exists" in r.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(AuthoringError, match="already exists"):
        scaffold("taken", Language.WAT, tmp_path)


def test_unknown_language_is_bad_usage(tmp_path: Path) -> None:
    r = sandbus("new", "x", "--lang", "cobol", "--dir", str(tmp_path))
    assert r.returncode == 2
    assert "cobol" in r.stderr
