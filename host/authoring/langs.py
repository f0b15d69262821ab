"""Sources of the AssemblyScript and Python scaffolds. They name their guest SDK (``@sandbus/guest``,
``sandbus_guest``) but not where it is installed: ``sandbus build`` supplies the SDK of the installation
it runs from, so a project can be committed and built on another machine."""

from __future__ import annotations

from sandbus.host.authoring import templates as t

__all__ = ["ASC_VERSION", "EXTISM_AS_PDK_VERSION", "assemblyscript_files", "extism_as_files", "python_files"]

#: The AssemblyScript compiler version the SDK is built and tested with.
ASC_VERSION = "0.28.20"
#: The version of Extism's AssemblyScript PDK an ``extism-as`` scaffold pins (the one the tests build with).
EXTISM_AS_PDK_VERSION = "1.0.0"


def assemblyscript_files(name: str) -> dict[str, str]:
    """``assembly/index.ts`` and a ``package.json`` naming the compiler. The SDK is not an npm
    dependency (that would need its path on this machine): ``sandbus build`` resolves ``@sandbus/guest``
    to the installation's ``sdk/guest/assemblyscript`` at build time. ``npm install`` is needed only
    where no ``asc`` is installed yet; ``sandbus build`` runs it then."""
    return {
        "assembly/index.ts": t.render(t.AS_INDEX, name=name),
        "package.json": t.render(t.AS_PACKAGE_JSON, name=name, description=f"{name}: a sandbus plugin",
                                 asc_version=ASC_VERSION),
    }


def python_files(name: str) -> dict[str, str]:
    """``app.py``: the module componentize-py compiles (``sandbus build`` adds the SDK's
    ``sandbus_guest`` module and WIT world)."""
    return {"app.py": t.render(t.PYTHON_APP, name=name)}


def extism_as_files(name: str) -> dict[str, str]:
    """An Extism plugin: ``assembly/index.ts`` on Extism's PDK and a ``package.json`` pinning the PDK and the
    compiler. Unlike the sandbus SDK, the PDK is an ordinary npm dependency of the project (``sandbus build``
    runs ``npm install`` when it is missing), so the project builds with Extism's own tools too."""
    return {
        "assembly/index.ts": t.render(t.EXTISM_AS_INDEX, name=name),
        "package.json": t.render(t.EXTISM_AS_PACKAGE_JSON, name=name, description=f"{name}: an Extism plugin",
                                 asc_version=ASC_VERSION, pdk_version=EXTISM_AS_PDK_VERSION),
    }
