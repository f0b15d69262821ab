"""What a plugin project is: a directory with a manifest ``NAME.toml`` and sources in one language.

The language is recognised from the files, not from a config file, so the repository's own plugin
directories (``plugins/echo``: ``echo.wat`` + ``echo.toml``) are projects too:

=================  ================================================
language           recognised by
=================  ================================================
``wat``            ``NAME.wat``
``c``              one or more ``*.c`` files
``extism-as``      AssemblyScript whose ``package.json`` depends on Extism's PDK ``@extism/as-pdk``
``assemblyscript`` ``assembly/index.ts`` (or ``NAME.ts``)
``python``         ``app.py`` (the componentize-py entry module)
=================  ================================================

A project builds into ``DIR/build/`` (``NAME.wasm`` + a copy of ``NAME.toml``): a plugin directory a
node can serve as it is.
"""

from __future__ import annotations

import enum
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import sandbus.sdk
from sandbus.host.authoring.errors import AuthoringError
from sandbus.host.lifecycle.manifest import MAX_TOML_BYTES, loads_toml, read_capped

__all__ = [
    "BUILD_DIR",
    "EXTISM_AS_PDK",
    "Language",
    "Project",
    "check_project_name",
    "depends_on_extism_pdk",
    "detect_project",
    "guest_sdk_dir",
]

#: Where ``sandbus build`` writes, inside the project.
BUILD_DIR = "build"
#: The npm package of Extism's AssemblyScript PDK: a project depending on it builds an Extism plugin.
EXTISM_AS_PDK = "@extism/as-pdk"
#: A package.json larger than this is not read (it is a project's, not a registry's).
_MAX_PACKAGE_JSON = 256 * 1024

_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")  # fullmatch: "name\n" is not a name


class Language(enum.StrEnum):
    """The guest languages ``sandbus new`` scaffolds and ``sandbus build`` compiles."""

    C = "c"
    ASSEMBLYSCRIPT = "assemblyscript"
    PYTHON = "python"
    WAT = "wat"
    #: An Extism plugin in AssemblyScript, with Extism's PDK ``@extism/as-pdk`` (docs/guide.md, "Extism plugins").
    EXTISM_AS = "extism-as"

    @property
    def is_assemblyscript(self) -> bool:
        """Compiled by ``asc`` from ``assembly/index.ts`` (or ``NAME.ts``), with or without Extism's PDK."""
        return self in (Language.ASSEMBLYSCRIPT, Language.EXTISM_AS)


def check_project_name(name: str) -> str:
    """A project is named like its plugin: the manifest rule, since the name becomes a NATS token.

    Raises:
        AuthoringError: saying what the rule is and what was given.
    """
    if not _NAME_RE.fullmatch(name):
        raise AuthoringError(
            f"invalid plugin name {name!r}: it must match ^[a-z][a-z0-9_]{{0,62}}$ (a lowercase letter, then "
            "lowercase letters, digits or '_'; at most 63 characters), because it becomes the manifest name, "
            "the file name and a NATS subject token"
        )
    return name


def guest_sdk_dir(language: Language) -> Path:
    """The guest SDK shipped inside the ``sdk`` package for ``language`` (it may not exist yet for
    every language: the builder says so when it needs it).

    Raises:
        AuthoringError: an Extism plugin has none here: its PDK is the project's own npm dependency.
    """
    if language is Language.EXTISM_AS:
        raise AuthoringError(f"an Extism plugin uses Extism's PDK ({EXTISM_AS_PDK}), not a sandbus guest SDK")
    sub = {Language.C: "c", Language.ASSEMBLYSCRIPT: "assemblyscript", Language.PYTHON: "python",
           Language.WAT: "wat"}[language]
    return Path(sandbus.sdk.__file__).resolve().parent / "guest" / sub


@dataclass(frozen=True)
class Project:
    """A recognised plugin project.

    Parameters:
        root: the project directory.
        name: the plugin name (the manifest's stem and ``[plugin] name``).
        language: the guest language.
    """

    root: Path
    name: str
    language: Language

    @property
    def manifest(self) -> Path:
        return self.root / f"{self.name}.toml"

    @property
    def build_dir(self) -> Path:
        return self.root / BUILD_DIR

    @property
    def entry(self) -> Path:
        """The AssemblyScript entry file: ``assembly/index.ts`` (the scaffold's), else ``NAME.ts``."""
        scaffolded = self.root / "assembly" / "index.ts"
        return scaffolded if scaffolded.is_file() else self.root / f"{self.name}.ts"

    @property
    def wasm(self) -> Path:
        """Where the build puts the module."""
        return self.build_dir / f"{self.name}.wasm"

    def sources(self) -> list[Path]:
        """The files whose change makes the build stale (the manifest is copied, not compiled)."""
        root = self.root
        if self.language is Language.WAT:
            files = [root / f"{self.name}.wat"]
        elif self.language is Language.C:
            files = sorted(root.glob("*.c")) + sorted(root.glob("*.h"))
        elif self.language.is_assemblyscript:
            files = sorted((root / "assembly").rglob("*.ts")) + sorted(root.glob("*.ts"))
            files += [p for p in (root / "package.json", root / "package-lock.json", root / "asconfig.json")
                      if p.exists()]
        else:
            files = [p for p in sorted(root.rglob("*.py")) if _is_python_source(root, p)]
        return files


def _is_python_source(root: Path, path: Path) -> bool:
    """Guest sources of a Python project: everything but tests, conftest and build products."""
    rel = path.relative_to(root)
    if rel.parts[0] in (BUILD_DIR, ".venv", "node_modules") or "__pycache__" in rel.parts:
        return False
    return not (path.name.startswith("test_") or path.name == "conftest.py")


def _manifest_name(root: Path) -> str:
    """The project's name: the stem of its one manifest (``[plugin] name`` must agree; the build
    checks that with the real manifest loader)."""
    candidates = []
    for toml in sorted(root.glob("*.toml")):
        try:
            raw, _ = read_capped(toml, MAX_TOML_BYTES)  # a regular file, bounded, parsed with the node's bounds
            data = loads_toml(raw.decode("utf-8")) if len(raw) <= MAX_TOML_BYTES else {}
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            continue
        if isinstance(data.get("plugin"), dict):
            candidates.append(toml.stem)
    if not candidates:
        raise AuthoringError(f"{root} is not a plugin project: no manifest NAME.toml with a [plugin] table "
                             "(create one with `sandbus new NAME`)", path=str(root))
    if len(candidates) > 1:
        raise AuthoringError(f"{root} has several manifests ({', '.join(c + '.toml' for c in candidates)}); "
                             "a project builds exactly one plugin", path=str(root))
    return candidates[0]


def depends_on_extism_pdk(root: Path) -> bool:
    """Whether ``root/package.json`` lists Extism's AssemblyScript PDK among its (dev) dependencies. An
    unreadable or oversized file says no: the project is then an ordinary AssemblyScript one."""
    try:
        raw, _ = read_capped(root / "package.json", _MAX_PACKAGE_JSON)
        package = json.loads(raw) if len(raw) <= _MAX_PACKAGE_JSON else None
    except (OSError, ValueError, RecursionError):  # RecursionError: nesting deeper than json can parse
        return False
    if not isinstance(package, dict):
        return False
    return any(isinstance(deps := package.get(key), dict) and EXTISM_AS_PDK in deps
               for key in ("dependencies", "devDependencies"))


def detect_project(root: str | Path) -> Project:
    """Recognise the project in ``root``: its manifest's name and its language.

    Raises:
        AuthoringError: not a directory, no (or several) manifests, or no source in a known language.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise AuthoringError(f"{root} is not a directory", path=str(root))
    name = _manifest_name(root)
    if (root / f"{name}.wat").is_file():
        language = Language.WAT
    elif any(root.glob("*.c")):
        language = Language.C
    elif (root / "assembly" / "index.ts").is_file() or (root / f"{name}.ts").is_file():
        language = Language.EXTISM_AS if depends_on_extism_pdk(root) else Language.ASSEMBLYSCRIPT
    elif (root / "app.py").is_file():
        language = Language.PYTHON
    else:
        raise AuthoringError(
            f"cannot tell the language of {root}: expected {name}.wat (WAT), *.c (C), assembly/index.ts or "
            f"{name}.ts (AssemblyScript), or app.py (Python)", path=str(root), plugin=name)
    return Project(root, name, language)
