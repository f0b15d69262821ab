"""Extism plugins in the sandbox: a ``.wasm`` built with any Extism PDK runs as a sandbus plugin.

The pieces, one job each: :mod:`.kernel` (our kernel module, which owns the memory a plugin shares with
its host), :mod:`.abi` (what makes a module an Extism plugin, its callable exports, its imports),
:mod:`.invoker` (one call through the kernel), :mod:`.hostfuncs` (config, variables, logging, HTTP state)
and :mod:`.instance` (the kernel and the plugin in one store). The user's guide is docs/extism.md.
"""

from __future__ import annotations

from sandbus.host.sandbox.extism.abi import EXTISM_ENV, EXTISM_USER, inspect_extism, is_extism
from sandbus.host.sandbox.extism.instance import ExtismInstance

__all__ = ["EXTISM_ENV", "EXTISM_USER", "ExtismInstance", "inspect_extism", "is_extism"]
