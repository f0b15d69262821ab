"""``sandbus new NAME --lang L``: a plugin project that builds, runs and tests on the first try.

A project holds no path of the machine that generated it (no virtualenv, no SDK directory), so it can
be committed and built elsewhere: the Makefile runs ``python -m sandbus``, and ``sandbus build`` supplies
the guest SDK of the installation it runs from.

Every language gets the same files around its source, so the next two commands are the same
whatever the language (``sandbus build DIR``, ``python -m pytest DIR``):

    NAME/
      <source>          NAME.c | NAME.wat | assembly/index.ts + package.json | app.py
                        (extism-as: assembly/index.ts + a package.json naming Extism's PDK)
      NAME.toml         the manifest (validated with the node's loader before it is written)
      Makefile          make / make test / make run (through `python -m sandbus`)
      test_NAME.py      pytest, through the sandbus.sdk.testing fixture
      conftest.py       loads that fixture (pytest.ini: its settings)
      README.md, .gitignore
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sandbus.host.authoring import templates as t
from sandbus.host.authoring.errors import AuthoringError
from sandbus.host.authoring.project import Language, Project, check_project_name
from sandbus.host.lifecycle.manifest import parse_manifest

__all__ = ["scaffold"]

_TITLES = {Language.C: "C", Language.WAT: "WebAssembly text", Language.ASSEMBLYSCRIPT: "AssemblyScript",
           Language.PYTHON: "Python", Language.EXTISM_AS: "AssemblyScript (an Extism plugin)"}
# A componentize-py guest carries a whole CPython: more memory and fuel than a C one.
_RESOURCES = {Language.PYTHON: ("64", "1000000000")}
_DEFAULT_RESOURCES = ("16", "100000000")


def _sources(name: str, language: Language) -> dict[str, str]:
    if language is Language.C:
        return {f"{name}.c": t.render(t.C_SOURCE, name=name)}
    if language is Language.WAT:
        return {f"{name}.wat": t.render(t.WAT_SOURCE, name=name)}
    if language is Language.ASSEMBLYSCRIPT:
        from sandbus.host.authoring.langs import assemblyscript_files

        return assemblyscript_files(name)
    if language is Language.EXTISM_AS:
        from sandbus.host.authoring.langs import extism_as_files

        return extism_as_files(name)
    from sandbus.host.authoring.langs import python_files

    return python_files(name)


def scaffold(name: str, language: Language | str, parent: str | Path = ".", *,
             description: str | None = None) -> Project:
    """Create ``parent/name/`` with a working plugin in ``language``.

    Raises:
        AuthoringError: the name breaks the plugin-name rule, or ``parent/name`` already exists
            (nothing is ever overwritten).
    """
    check_project_name(name)
    language = Language(language)
    root = Path(parent).resolve() / name
    if root.exists() or root.is_symlink():
        raise AuthoringError(f"{root} already exists; refusing to overwrite it (choose another name or --dir)",
                             path=str(root), plugin=name)
    memory_mb, max_fuel = _RESOURCES.get(language, _DEFAULT_RESOURCES)
    title = _TITLES[language]
    values = {"name": name, "language": language.value, "language_title": title,
              # escaped for the TOML basic string it lands in (JSON escapes are valid TOML ones)
              "description": json.dumps(description or f"A sandbus plugin in {title}")[1:-1], "memory_mb": memory_mb,
              "max_fuel": max_fuel}
    manifest = t.render(t.MANIFEST, **values)
    parse_manifest(manifest, source=f"{name}.toml", expected_name=name)  # a template bug fails here, not later
    files = {
        f"{name}.toml": manifest,
        "Makefile": t.render(t.MAKEFILE, **values),
        f"test_{name}.py": t.render(t.TEST, **values),
        "conftest.py": t.CONFTEST,
        "pytest.ini": t.PYTEST_INI,
        "README.md": t.render(t.README, **values) + (t.render(t.EXTISM_AS_README, name=name)
                                                      if language is Language.EXTISM_AS else ""),
        ".gitignore": t.GITIGNORE,
        **_sources(name, language),
    }
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.with_name(f".{name}.new")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for rel, text in files.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        staging.rename(root)  # all or nothing: a failed scaffold leaves no half project behind
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Project(root, name, language)
