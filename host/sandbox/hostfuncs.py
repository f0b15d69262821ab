"""Host functions: what a guest may call on the host, in the ``sandbus_v1`` import namespace.

A host function receives a :class:`CallContext` (the calling plugin, bounds-checked
access to its memory, its capabilities, the auditor) and the raw wasm arguments.
Raising inside a host function aborts the guest call with that exception
(a :class:`SecurityViolationError` stays a security violation for the caller).
The bus adds publish/request/kv by registering more functions here.

Every (ptr, len) a guest passes is checked -- inside its memory, and within the cap of what it is
for -- *before* a byte is copied (:func:`check_span`, :func:`read_bounded`): a guest with 4 GB of
memory must not make the host copy and decode 4 GB to learn that it was too much.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sandbus.host.sandbox.audit import AuditLevel
from sandbus.sdk.errors import AbiViolationError, PayloadTooLargeError, SecurityViolationError

if TYPE_CHECKING:
    from sandbus.host.sandbox.instance import CallContext

__all__ = [
    "ABI_NAMESPACE",
    "LOG_LEVELS",
    "MAX_ENV_NAME",
    "HostFunction",
    "HostFunctions",
    "builtin_host_functions",
    "check_span",
    "read_bounded",
    "read_str_bounded",
]

ABI_NAMESPACE = "sandbus_v1"

#: Guest log levels (the ``level`` argument of ``sandbus_v1.log``) to Python logging levels.
LOG_LEVELS = {0: 5, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}

HostImpl = Callable[..., Any]

#: The longest environment variable name ``env_get`` reads (Linux allows far less in practice).
MAX_ENV_NAME = 4096


@dataclass(frozen=True)
class HostFunction:
    """One importable host function.

    Parameters:
        name: import name inside ``module``.
        params / results: wasm value kinds ("i32", "i64", "f32", "f64").
        impl: ``impl(ctx, *args)``; returns None, one value, or a tuple.
        capability: when set, a plugin without it gets a security violation on call.
        module: the import namespace.
    """

    name: str
    params: tuple[str, ...]
    results: tuple[str, ...]
    impl: HostImpl
    capability: str | None = None
    module: str = ABI_NAMESPACE


@dataclass
class HostFunctions:
    """A registry of host functions, keyed by (module, name)."""

    _funcs: dict[tuple[str, str], HostFunction] = field(default_factory=dict)

    def add(self, fn: HostFunction) -> None:
        self._funcs[(fn.module, fn.name)] = fn

    def register(
        self,
        name: str,
        params: Iterable[str] = (),
        results: Iterable[str] = (),
        *,
        capability: str | None = None,
        module: str = ABI_NAMESPACE,
    ) -> Callable[[HostImpl], HostImpl]:
        """Decorator form of :meth:`add`."""

        def deco(impl: HostImpl) -> HostImpl:
            self.add(HostFunction(name, tuple(params), tuple(results), impl, capability, module))
            return impl

        return deco

    def get(self, module: str, name: str) -> HostFunction | None:
        return self._funcs.get((module, name))

    def modules(self) -> set[str]:
        return {m for m, _ in self._funcs}

    def merged(self, other: HostFunctions | None) -> HostFunctions:
        out = HostFunctions(dict(self._funcs))
        if other is not None:
            out._funcs.update(other._funcs)
        return out

    def __iter__(self) -> Iterator[HostFunction]:
        return iter(self._funcs.values())


def check_span(ctx: CallContext, ptr: int, length: int, what: str) -> None:
    """Raise :class:`AbiViolationError` unless ``[ptr, ptr + length)`` lies in guest memory; copies nothing
    (it compares the span with the memory's current size, read fresh: the guest may have grown it)."""
    if ptr < 0 or length < 0 or ptr + length > ctx.memory_size():
        raise AbiViolationError(f"{what}: range [{ptr}, {ptr + length}) is outside guest memory",
                                plugin=ctx.plugin, ptr=ptr, length=length)


def read_bounded(ctx: CallContext, ptr: int, length: int, cap: int, what: str) -> bytes:
    """``length`` bytes at ``ptr``, once they are known to be in guest memory and at most ``cap``.

    Raises:
        AbiViolationError: the span is outside guest memory.
        PayloadTooLargeError: ``length`` is above ``cap`` (nothing was copied).
    """
    check_span(ctx, ptr, length, what)
    if length > cap:
        raise PayloadTooLargeError(f"{what} of {length} bytes exceeds its {cap}-byte cap", plugin=ctx.plugin,
                                   size=length, limit=cap)
    return ctx.read(ptr, length)


def read_str_bounded(ctx: CallContext, ptr: int, length: int, cap: int, what: str) -> str:
    """:func:`read_bounded`, decoded as UTF-8 (:class:`AbiViolationError` if it is not)."""
    data = read_bounded(ctx, ptr, length, cap, what)
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise AbiViolationError(f"{what} is not valid UTF-8: {e}", plugin=ctx.plugin) from e


def _log(ctx: CallContext, level: int, ptr: int, length: int) -> None:
    check_span(ctx, ptr, length, "log message")
    if ctx.stats.log_bytes + length > ctx.limits.log_bytes:
        # Over the per-call cap: dropped unread, and the call fails with limit.log when it returns.
        ctx.stats.log_dropped += length
        ctx.log_overflow = True
        return
    ctx.log(LOG_LEVELS.get(level, logging.INFO), ctx.read_str(ptr, length, "log message"))


def _time_now_ms(ctx: CallContext) -> int:
    return time.time_ns() // 1_000_000


def _env_get(ctx: CallContext, name_ptr: int, name_len: int, buf_ptr: int, buf_cap: int) -> int:
    name = read_str_bounded(ctx, name_ptr, name_len, MAX_ENV_NAME, "env name")
    if name in ctx.capabilities.env_unset:
        return -1
    if name not in ctx.capabilities.env:
        ctx.auditor.emit(
            AuditLevel.CRITICAL, "security.env_denied", ctx.plugin,
            f"read of environment variable {name!r}, which was not granted", variable=name,
        )
        raise SecurityViolationError(
            f"environment variable {name!r} was not granted (allowed: {sorted(ctx.capabilities.env)})",
            plugin=ctx.plugin, variable=name,
        )
    value = ctx.capabilities.env[name].encode()
    if buf_cap < 0:
        raise AbiViolationError(f"env_get: negative buffer capacity {buf_cap}", plugin=ctx.plugin)
    ctx.write(buf_ptr, value[:buf_cap])
    return len(value)


def builtin_host_functions() -> HostFunctions:
    """The functions every host provides: log, time, env."""
    reg = HostFunctions()
    reg.add(HostFunction("log", ("i32", "i32", "i32"), (), _log))
    reg.add(HostFunction("time_now_ms", (), ("i64",), _time_now_ms, capability="clock"))
    reg.add(HostFunction("env_get", ("i32", "i32", "i32", "i32"), ("i32",), _env_get))
    return reg
