"""Sources of the AssemblyScript and Python scaffolds, which point at their SDKs in sdk/guest/."""

from __future__ import annotations

from sandbus.host.authoring import templates as t
from sandbus.host.authoring.project import Language, guest_sdk_dir

__all__ = ["ASC_VERSION", "assemblyscript_files", "python_files"]

#: The AssemblyScript compiler version the SDK is built and tested with.
ASC_VERSION = "0.28.20"


def assemblyscript_files(name: str) -> dict[str, str]:
    """``assembly/index.ts`` and a ``package.json`` naming the SDK (a ``file:`` dependency on this
    installation's ``sdk/guest/assemblyscript``) and the compiler. ``sandbus build`` does not need
    ``npm install`` when the SDK's own compiler is installed: it resolves ``@sandbus/guest`` itself."""
    sdk = guest_sdk_dir(Language.ASSEMBLYSCRIPT)
    return {
        "assembly/index.ts": t.render(t.AS_INDEX, name=name),
        "package.json": t.render(t.AS_PACKAGE_JSON, name=name, description=f"{name}: a sandbus plugin",
                                 sdk_dir=str(sdk), asc_version=ASC_VERSION),
    }


def python_files(name: str) -> dict[str, str]:
    """``app.py``: the module componentize-py compiles (``sandbus build`` adds the SDK's
    ``sandbus_guest`` module and WIT world)."""
    return {"app.py": t.render(t.PYTHON_APP, name=name)}
