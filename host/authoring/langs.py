"""Sources of the AssemblyScript and Python scaffolds. They name their guest SDK (``@sandbus/guest``,
``sandbus_guest``) but not where it is installed: ``sandbus build`` supplies the SDK of the installation
it runs from, so a project can be committed and built on another machine."""

from __future__ import annotations

from sandbus.host.authoring import templates as t

__all__ = ["ASC_VERSION", "assemblyscript_files", "python_files"]

#: The AssemblyScript compiler version the SDK is built and tested with.
ASC_VERSION = "0.28.20"


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
