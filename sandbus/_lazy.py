"""Package attributes loaded on first use (PEP 562): importing a package costs only what its user touches.

``sandbus``, ``sandbus.bus``, ``sandbus.host``, ``sandbus.host.sandbox`` and ``sandbus.host.telemetry`` are
facades, several over modules that need the host extra (wasmtime, watchdog). Loaded eagerly, they would make
``from sandbus import Client`` and every CLI command need that extra too; loaded on first use, a client-only
install imports them freely and a host name fails only when it is asked for, with a ``ModuleNotFoundError``
that says which extra to install.

Each facade keeps a ``TYPE_CHECKING`` import of every name it exports and installs the two functions under
``if not TYPE_CHECKING:``, so type checkers and readers see exactly where each name comes from, and a type
checker reports a name the package does not export (a module ``__getattr__`` would make every name valid).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

from sandbus._extras import INSTALL_HOST, is_host_module

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, where: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``, which exports each name of ``where`` from the
    module it maps to. A name is imported once: its value is then stored in the package like any attribute.

    A name must not also be a submodule of ``package``: once the submodule is imported, the import
    system binds the module to that attribute and ``__getattr__`` is never asked again.
    """
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:  # also how ``from package import submodule`` learns to import the submodule
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            value = getattr(importlib.import_module(module), name)
        except ModuleNotFoundError as e:
            if e.name is None or not is_host_module(e.name):
                raise
            raise ModuleNotFoundError(f"{package}.{name} needs the host extra: {INSTALL_HOST} "
                                      f"(no module named {e.name!r})", name=e.name) from e
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *where})

    return __getattr__, __dir__
