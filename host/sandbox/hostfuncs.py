"""Host functions: what a guest may call on the host, in the ``sandbus_v1`` import namespace.

A host function receives a :class:`CallContext` (the calling plugin, bounds-checked
access to its memory, its capabilities, the auditor) and the raw wasm arguments.
Raising inside a host function aborts the guest call with that exception
(a :class:`SecurityViolationError` stays a security violation for the caller).
The bus adds publish/request/kv by registering more functions here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdk.errors import AbiViolationError, SecurityViolationError

from .audit import AuditLevel

if TYPE_CHECKING:
    from .instance import CallContext

__all__ = ["ABI_NAMESPACE", "HostFunction", "HostFunctions", "LOG_LEVELS", "builtin_host_functions"]

ABI_NAMESPACE = "sandbus_v1"

#: Guest log levels (the ``level`` argument of ``sandbus_v1.log``) to Python logging levels.
LOG_LEVELS = {0: 5, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}

HostImpl = Callable[..., Any]


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


def _log(ctx: CallContext, level: int, ptr: int, length: int) -> None:
    ctx.log(LOG_LEVELS.get(level, logging.INFO), ctx.read_str(ptr, length, "log message"))


def _time_now_ms(ctx: CallContext) -> int:
    return time.time_ns() // 1_000_000


def _env_get(ctx: CallContext, name_ptr: int, name_len: int, buf_ptr: int, buf_cap: int) -> int:
    name = ctx.read_str(name_ptr, name_len, "env name")
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
