"""The Python side of Extism's host ABI: config, variables, logging, HTTP status and headers.

Each function reads its arguments from the kernel's memory through the calling instance's
:class:`~sandbus.host.sandbox.extism.invoker.ExtismInvoker`: a key or a value is a kernel block, found in
the kernel's block table (an offset that names no live block is an :class:`AbiViolationError` naming the
function) and bounded before a byte of it is copied. What they return (a config value, a variable) is a
new kernel block the plugin reads with ``load_u64`` / ``load_u8`` and frees.

``http_request`` is the network: a plain sandbox denies it like any ungranted capability; a node links
its own (host/node/hostfuncs.py), which runs Extism's request through the same guarded machinery as
``sandbus_v1.http_request`` (grant check, resolve once, public addresses only, size caps, the call's
deadline).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import orjson

from sandbus.host.sandbox.extism.abi import EXTISM_ENV, HOST_IMPORTS
from sandbus.host.sandbox.extism.invoker import ExtismInvoker
from sandbus.host.sandbox.hostfuncs import HostFunction, HostFunctions
from sandbus.sdk.errors import AbiViolationError, PayloadTooLargeError, SecurityViolationError

if TYPE_CHECKING:
    from sandbus.host.sandbox.instance import CallContext

__all__ = ["EXTISM_LOG_LEVELS", "MAX_CONFIG_KEY", "MAX_VARS", "MAX_VAR_KEY", "extism_host_functions", "extism_invoker"]

#: The longest config or variable key read from a plugin, in bytes.
MAX_CONFIG_KEY = 4096
MAX_VAR_KEY = 4096
#: The most variables one instance holds. ``max_var_bytes`` counts their keys and values, but each one
#: costs the host a dict entry and two objects (~150 bytes) besides: without a count, a plugin setting
#: 1-byte keys to empty values would hold a hundred times its ``max_var_bytes`` in the host's memory.
MAX_VARS = 4096

#: Extism's log levels, as ``get_log_level`` numbers them, with the Python level each ``log_*`` writes at.
EXTISM_LOG_LEVELS = {"trace": (0, 5), "debug": (1, logging.DEBUG), "info": (2, logging.INFO),
                     "warn": (3, logging.WARNING), "error": (4, logging.ERROR)}
#: What ``get_log_level`` returns when the plugin's logger records nothing.
_LOG_OFF = 0x7FFF_FFFF


def extism_invoker(ctx: CallContext) -> ExtismInvoker:
    """The calling instance's Extism state; an ABI violation when called outside one of its calls."""
    inv = ctx.invoker
    if not isinstance(inv, ExtismInvoker):
        raise AbiViolationError("an Extism host function was called outside a call of an Extism plugin",
                                plugin=ctx.plugin)
    return inv


def _key(inv: ExtismInvoker, off: int, cap: int, what: str) -> str:
    try:
        return inv.block(off, cap, what).decode()
    except UnicodeDecodeError as e:
        raise AbiViolationError(f"extism:host/env.{what}: the key is not UTF-8: {e}", plugin=inv.ctx.plugin,
                                function=what) from e


def _config_get(ctx: CallContext, key_off: int) -> int:
    inv = extism_invoker(ctx)
    value = inv.config.get(_key(inv, key_off, MAX_CONFIG_KEY, "config_get"))
    return 0 if value is None else inv.alloc_bytes(value)


def _var_get(ctx: CallContext, key_off: int) -> int:
    inv = extism_invoker(ctx)
    value = inv.vars.get(_key(inv, key_off, MAX_VAR_KEY, "var_get"))
    return 0 if value is None else inv.alloc_bytes(value)


def _var_set(ctx: CallContext, key_off: int, value_off: int) -> None:
    """Set (or, with value offset 0, remove) a variable; the instance's variables stay under ``max_var_bytes``."""
    inv = extism_invoker(ctx)
    key = _key(inv, key_off, MAX_VAR_KEY, "var_set")
    old = inv.vars.get(key)
    held = inv.var_bytes - (len(key.encode()) + len(old) if old is not None else 0)
    if value_off == 0:
        if old is not None:
            del inv.vars[key]
            inv.var_bytes = held
        return
    if old is None and len(inv.vars) >= MAX_VARS:
        raise PayloadTooLargeError(f"extism:host/env.var_set: the plugin's variables would number {MAX_VARS + 1}, "
                                   f"above the {MAX_VARS} one instance may hold", plugin=ctx.plugin,
                                   function="var_set", size=MAX_VARS + 1, limit=MAX_VARS, direction="vars")
    cap = ctx.limits.max_var_bytes
    room = cap - held - len(key.encode())
    if room < 0:
        raise _vars_full(ctx, cap, held + len(key.encode()))
    try:
        value = inv.block(value_off, room, "var_set")
    except PayloadTooLargeError as e:
        raise _vars_full(ctx, cap, held + len(key.encode()) + int(e.details.get("size", 0))) from None
    inv.vars[key] = value
    inv.var_bytes = held + len(key.encode()) + len(value)


def _vars_full(ctx: CallContext, cap: int, wanted: int) -> PayloadTooLargeError:
    # Not audited here: the call fails with it, and the sandbox audits every limit error it raises.
    return PayloadTooLargeError(f"extism:host/env.var_set: the plugin's variables would hold {wanted} bytes, "
                                f"above the {cap}-byte max_var_bytes", plugin=ctx.plugin, function="var_set",
                                size=wanted, limit=cap, direction="vars")


def _logger(level: int) -> HostFunction:
    name = next(n for n, (num, _) in EXTISM_LOG_LEVELS.items() if num == level)
    py_level = EXTISM_LOG_LEVELS[name][1]
    what = f"log_{name}"

    def log(ctx: CallContext, off: int) -> None:
        inv = extism_invoker(ctx)
        room = max(0, ctx.limits.log_bytes - ctx.stats.log_bytes)
        try:
            data = inv.block(off, room, what)
        except PayloadTooLargeError as e:
            # Over the per-call cap: dropped unread, and the call fails with limit.log when it returns
            # (as for sandbus_v1.log).
            ctx.stats.log_dropped += int(e.details.get("size", 0))
            ctx.log_overflow = True
            return
        ctx.log(py_level, data.decode(errors="replace"))

    return HostFunction(what, *HOST_IMPORTS[what], log, module=EXTISM_ENV)


def _get_log_level(ctx: CallContext) -> int:
    effective = ctx.logger.getEffectiveLevel()
    for number, py_level in sorted(EXTISM_LOG_LEVELS.values()):
        if effective <= py_level:
            return number
    return _LOG_OFF


def _http_status_code(ctx: CallContext) -> int:
    return extism_invoker(ctx).http_status


def _http_headers(ctx: CallContext) -> int:
    inv = extism_invoker(ctx)
    if inv.http_headers is None:
        return 0
    return inv.alloc_bytes(orjson.dumps(inv.http_headers))


def _http_denied(ctx: CallContext, req_off: int, body_off: int) -> int:
    """Only reached with the network capability granted, in a host without HTTP machinery (no node)."""
    raise SecurityViolationError("extism:host/env.http_request: this host makes no HTTP requests (a plain "
                                 "sandbox; a node links the guarded one)", plugin=ctx.plugin,
                                 capability="network", function="http_request")


@functools.cache
def extism_host_functions() -> HostFunctions:
    """Extism's host functions as a plain sandbox provides them (a node adds its ``http_request``); one
    registry for the process (never modified: instances only read it)."""
    reg = HostFunctions()

    def add(name: str, impl: object, capability: str | None = None) -> None:
        reg.add(HostFunction(name, *HOST_IMPORTS[name], impl, capability, EXTISM_ENV))  # type: ignore[arg-type]

    add("config_get", _config_get)
    add("var_get", _var_get)
    add("var_set", _var_set)
    add("get_log_level", _get_log_level)
    add("http_status_code", _http_status_code)
    add("http_headers", _http_headers)
    add("http_request", _http_denied, capability="network")
    for level in range(5):
        reg.add(_logger(level))
    return reg
