"""Errors of the authoring tools (``sandbus new`` / ``build`` / ``inspect``), in the one sandbus tree.

    SandbusError
    └── AuthoringError        (ValueError) a project cannot be created or understood
        └── BuildError        the toolchain ran and failed (compiler output in ``details["output"]``)
            └── ToolchainMissingError   a compiler is not installed: names it and how to install it

They live here rather than in ``sandbus.sdk.errors`` because they never travel on the wire: only the
author's own command line sees them.
"""

from __future__ import annotations

from typing import Any

from sandbus.sdk.errors import SandbusError

__all__ = ["AuthoringError", "BuildError", "ToolchainMissingError"]


class AuthoringError(SandbusError, ValueError):
    """A project cannot be scaffolded or recognised (bad name, existing directory, unknown language)."""

    code = "authoring.invalid_project"


class BuildError(AuthoringError):
    """Compiling the plugin failed; ``details["output"]`` holds what the compiler said."""

    code = "authoring.build_failed"


class ToolchainMissingError(BuildError):
    """The language's compiler is not installed.

    Parameters:
        tool: what is missing (``clang``, ``asc``, ``componentize-py``...).
        install: the command that installs it.
    """

    code = "authoring.toolchain_missing"

    def __init__(self, message: str, *, tool: str, install: str, plugin: str | None = None,
                 **details: Any) -> None:
        self.tool = tool
        self.install = install
        super().__init__(message, plugin=plugin, tool=tool, install=install, **details)
