"""Calling an Extism plugin: one round trip through the kernel, and the kernel's memory for host functions.

A call is four calls into the store: ``sandbus_begin`` (free everything, set this call's memory cap,
allocate the input block), a copy of the input into it, the plugin's export, and ``sandbus_output``
(the output block's offset and length in one i64) -- or ``sandbus_error`` when the export returned
non-zero. Everything else the plugin does with its memory (the PDKs' many loads and stores) stays in
wasm. On the fast path the calls go through ``wasmtime_func_call_unchecked`` with reused buffers
(host/sandbox/invoke.py); without it, through wasmtime-py's ordinary API.

What the host reads back is checked the way host/sandbox/invoke.py checks our own ABI: the kernel
vouches for the block table, and the host checks every span against the memory's current size before
it copies a byte, and the output against ``max_output_bytes`` before it reads it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import wasmtime

from sandbus.host.sandbox.guest_text import escape_controls
from sandbus.host.sandbox.hostcall import take_failure
from sandbus.host.sandbox.invoke import (
    RawFunc,
    ReplyTooLarge,
    Signature,
    fast_path_available,
    fuel_left_raw,
    native_module,
    raise_failure,
    raw_memory,
    raw_memory_base,
    raw_memory_size,
    set_budget_raw,
    signed,
)
from sandbus.sdk.errors import AbiViolationError, GuestError, MemoryLimitError, PayloadTooLargeError

if TYPE_CHECKING:
    from sandbus.host.sandbox.instance import CallContext

__all__ = ["MAX_ERROR_BYTES", "ExtismInvoker", "KernelStopped", "config_values"]

U64 = 0xFFFF_FFFF_FFFF_FFFF
#: Bytes of a plugin's error text kept in the :class:`GuestError` (the rest is cut, marked with "...").
MAX_ERROR_BYTES = 4096

#: The kernel's host-side exports and their signatures.
_KERNEL_CALLS: dict[str, Signature] = {
    "sandbus_begin": (("i64", "i64"), "i64"),
    "sandbus_output": ((), "i64"),
    "sandbus_error": ((), "i64"),
    "sandbus_block": (("i64",), "i64"),
    "alloc": (("i64",), "i64"),
}


class KernelStopped(BaseException):
    """The engine stopped a kernel call a host function made (fuel, the timeout, a budget, the stack).

    Not an ``Exception``: nothing between the kernel call and the engine (a host function's own
    ``except Exception``, the binding that turns a host function's bug into a ``HostError``) may take it
    for a failure of the host function. The plugin's call ends with it; the invoker raises ``trap``, the
    engine's own report, so that the call is translated as any trap there (``OutOfFuelError``, a timeout,
    ``BudgetExceeded``) would be.
    """

    def __init__(self, trap: BaseException) -> None:
        super().__init__(str(trap))
        self.trap = trap


def config_values(settings: dict[str, Any]) -> dict[str, bytes]:
    """The plugin's settings as ``config_get`` serves them: strings as they are, anything else as its JSON."""
    return {str(k): v.encode() if isinstance(v, str) else orjson.dumps(v) for k, v in settings.items()}


def _check_span(off: int, length: int, size: int, what: str) -> None:
    if off < 0 or length < 0 or off + length > size:
        raise AbiViolationError(f"{what}: range [{off}, {off + length}) is outside the kernel memory of {size} bytes",
                                offset=off, length=length, memory_size=size)


class ExtismInvoker:
    """One Extism plugin instance's calls (the :class:`~sandbus.host.sandbox.invoke.Invoker` surface), its
    kernel memory, and the per-instance state Extism's host functions keep: variables, config, the last
    HTTP response.

    ``read`` / ``write`` / ``memory_size`` are the *plugin's* memory (what WASI and ``sandbus_v1``
    host functions see); the kernel's memory is reached through :meth:`block` and :meth:`alloc_bytes`.
    """

    def __init__(self, ctx: CallContext, store: wasmtime.Store, plugin: Callable[[str], wasmtime.Func],
                 memory: wasmtime.Memory | None, kernel: Callable[[str], wasmtime.Func],
                 kernel_memory: wasmtime.Memory, signatures: dict[str, Signature], memory_limit: int, *,
                 fast: bool = True, native: bool = True) -> None:
        """``plugin`` / ``kernel`` look up one export of the plugin / the kernel by name (only the exports
        a call uses are looked up, when first used: building an instance per call stays cheap)."""
        self.ctx = ctx
        self._store = store  # keeps the context pointer valid
        self._memory_limit = memory_limit
        self.fast = fast and fast_path_available()
        self.fuel_left_after = 0
        self.memory_after = 0
        #: Per instance: the plugin's variables (``var_set``) and their size, keys included.
        self.vars: dict[str, bytes] = {}
        self.var_bytes = 0
        #: ``config_get``'s table (set once, by the instance's init).
        self.config: dict[str, bytes] = {}
        #: The last HTTP response of the current call (reset when a call begins).
        self.http_status = 0
        self.http_headers: dict[str, str] | None = None
        self._mem = memory
        self._kmem = kernel_memory
        self._plugin_export = plugin
        self._signatures = signatures
        self._known = 0
        if self.fast:
            self._ctx, self._kmem_addr = raw_memory(store, kernel_memory)
            self._mem_addr = raw_memory(store, memory)[1] if memory is not None else 0
            self._raw: dict[str, RawFunc] = {}
            k = {name: RawFunc(self._ctx, kernel(name), sig) for name, sig in _KERNEL_CALLS.items()}
            self._begin, self._output, self._error = k["sandbus_begin"], k["sandbus_output"], k["sandbus_error"]
            self._kblock, self._kalloc = k["sandbus_block"], k["alloc"]
            mod = native_module() if native else None
            #: The compiled round trip (host/sandbox/_native.c) when it is built with the Extism entry point.
            self._native = getattr(mod, "extism_round_trip", None)
            self._native_addrs: dict[str, int] = {}
            self._begin_addr = self._begin._func_addr
            self._output_addr = self._output._func_addr
            self._error_addr = self._error._func_addr
        else:
            self._plain: dict[str, tuple[wasmtime.Func, Signature]] = {}
            self._kplain = {name: (kernel(name), sig) for name, sig in _KERNEL_CALLS.items()}

    # -- the Invoker surface -------------------------------------------------------------------------

    def _rawfunc(self, name: str) -> RawFunc:
        """The plugin's export ``name`` on the fast path (a verified signature: KeyError for any other)."""
        raw = self._raw.get(name)
        if raw is None:
            raw = self._raw[name] = RawFunc(self._ctx, self._plugin_export(name), self._signatures[name])
            self._native_addrs[name] = raw._func_addr
        return raw

    def call(self, name: str, *args: int) -> int | None:
        try:
            return self._call(name, *args)
        except BaseException as caught:
            self._reraise_stopped(caught)
            raise

    def _reraise_stopped(self, caught: BaseException) -> None:
        """When a host function's kernel call was stopped by the engine, raise the engine's trap (the slot
        that recorded the stop is emptied, and the library's reference to it dropped)."""
        if isinstance(self.ctx.host_error, KernelStopped):
            stopped = take_failure(self.ctx, caught)
            assert isinstance(stopped, KernelStopped)
            raise stopped.trap from None

    def _call(self, name: str, *args: int) -> int | None:
        if self.fast:
            return self._rawfunc(name)(*args)
        plain = self._plain.get(name)
        if plain is None:
            plain = self._plain[name] = (self._plugin_export(name), self._signatures[name])
        return _plain_call(self._store, *plain, args)

    def memory_size(self) -> int:
        if self._mem is None:
            return 0
        if self.fast:
            return raw_memory_size(self._ctx, self._mem_addr)
        return int(self._mem.data_len(self._store))

    def kernel_size(self) -> int:
        if self.fast:
            return raw_memory_size(self._ctx, self._kmem_addr)
        return int(self._kmem.data_len(self._store))

    def read(self, ptr: int, length: int) -> bytes:
        size = self.memory_size()
        if ptr < 0 or length < 0 or ptr + length > size:
            raise AbiViolationError(f"read: range [{ptr}, {ptr + length}) is outside guest memory of {size} bytes",
                                    ptr=ptr, length=length, memory_size=size)
        assert self._mem is not None
        if self.fast:
            return ctypes.string_at(raw_memory_base(self._ctx, self._mem_addr) + ptr, length)
        return bytes(self._mem.read(self._store, ptr, ptr + length))

    def write(self, ptr: int, data: bytes) -> None:
        size = self.memory_size()
        if ptr < 0 or ptr + len(data) > size:
            raise AbiViolationError(f"write: range [{ptr}, {ptr + len(data)}) is outside guest memory of "
                                    f"{size} bytes", ptr=ptr, length=len(data), memory_size=size)
        assert self._mem is not None
        if self.fast:
            ctypes.memmove(raw_memory_base(self._ctx, self._mem_addr) + ptr, data, len(data))
        else:
            self._mem.write(self._store, data, ptr)

    def set_budget(self, fuel: int | None, epoch_ticks: int) -> None:
        if self.fast:
            set_budget_raw(self._ctx, fuel, epoch_ticks)
            return
        if fuel is not None:
            self._store.set_fuel(fuel)
        self._store.set_epoch_deadline(epoch_ticks)

    def fuel_left(self) -> int:
        return fuel_left_raw(self._ctx) if self.fast else int(self._store.get_fuel())

    def round_trip(self, function: str, payload: bytes, max_output: int, fuel: int | None,
                   epoch_ticks: int) -> bytes:
        try:
            reply = self._round_trip(function, payload, max_output, fuel, epoch_ticks)
        except GuestError:
            # The plugin finished (its instance is kept): unless it finished holding more than the limit.
            self._check_total(function, self.kernel_size() + self.memory_size())
            raise
        except BaseException as caught:
            self._reraise_stopped(caught)
            raise
        self._check_total(function, self.memory_after)
        return reply

    def _check_total(self, function: str, held: int) -> None:
        """The kernel grows only into what the plugin's memory leaves it, but the plugin may grow its own
        memory after the kernel did (the store caps each memory alone): a call that ends with both above the
        memory limit fails, and its instance is dropped."""
        if held > self._memory_limit:
            raise MemoryLimitError(
                f"{function}: the plugin's memory and the kernel's hold {held} bytes, above the "
                f"{self._memory_limit}-byte memory limit", plugin=self.ctx.plugin, limit=self._memory_limit,
                function=function, size=held)

    def _round_trip(self, function: str, payload: bytes, max_output: int, fuel: int | None,
                    epoch_ticks: int) -> bytes:
        if not self.fast:
            return self._round_trip_plain(function, payload, max_output, fuel, epoch_ticks)
        self.http_status, self.http_headers = 0, None
        native: Callable[..., tuple[int, bytes | None, int, int, int]] | None = self._native
        if native is not None:
            addr = self._native_addrs.get(function) or self._rawfunc(function)._func_addr
            if type(payload) is not bytes:  # a bytearray or memoryview: the C side takes bytes
                payload = bytes(payload)
            code, reply, a, b, c = native(
                self._ctx, self._kmem_addr, self._mem_addr, self._begin_addr, addr,
                self._output_addr, self._error_addr, payload, max_output, -1 if fuel is None else fuel,
                epoch_ticks, self._memory_limit)
            if code == 0:
                self.fuel_left_after, self.memory_after = a, b
                assert reply is not None
                return reply
            if code == 1:
                raise_failure(a or None, b or None)
            if code == 3:
                raise ReplyTooLarge(a)
            if code == 6:
                raise self._guest_error(function, signed(a, "i32"), b)
            if code == 7:
                self._output_span(U64, max_output)
            _check_span(a, b, c, "input block from the kernel" if code == 4 else "output")
            raise AssertionError(f"native Extism round trip returned code {code}")  # pragma: no cover
        # Straight-line on purpose: at ~1.5 us per call into the store, Python overhead is the cost to cut.
        ctx, kmem = self._ctx, self._kmem_addr
        set_budget_raw(ctx, fuel, epoch_ticks)
        n = len(payload)
        cap = self._memory_limit - (raw_memory_size(ctx, self._mem_addr) if self._mem_addr else 0)
        p = self._begin.call2(n, max(cap, 0)) & U64
        if p + n > self._known:  # memory never shrinks: inside the last size read is still inside
            self._known = raw_memory_size(ctx, kmem)
            _check_span(p, n, self._known, "input block from the kernel")
        ctypes.memmove(raw_memory_base(ctx, kmem) + p, payload, n)
        rc = self._rawfunc(function).call0()
        if rc:
            packed = self._error.call0() & U64
            raise self._guest_error(function, rc, packed)
        packed = self._output.call0() & U64
        out_off, out_len = self._output_span(packed, max_output)
        if out_off + out_len > self._known:
            self._known = raw_memory_size(ctx, kmem)
            _check_span(out_off, out_len, self._known, "output")
        out = ctypes.string_at(raw_memory_base(ctx, kmem) + out_off, out_len)
        self.fuel_left_after = fuel_left_raw(ctx) if fuel is not None else 0
        # Read fresh: _known is only refreshed when a span reaches past it, and the kernel may have grown.
        self.memory_after = (raw_memory_size(ctx, kmem)
                             + (raw_memory_size(ctx, self._mem_addr) if self._mem_addr else 0))
        return out

    def _round_trip_plain(self, function: str, payload: bytes, max_output: int, fuel: int | None,
                          epoch_ticks: int) -> bytes:
        self.set_budget(fuel, epoch_ticks)
        self.http_status, self.http_headers = 0, None
        n = len(payload)
        p = self._kcall("sandbus_begin", n, max(self._memory_limit - self.memory_size(), 0))
        _check_span(p, n, self.kernel_size(), "input block from the kernel")
        self._kmem.write(self._store, payload, p)
        rc = signed(self._call(function) or 0, "i32")
        if rc:
            raise self._guest_error(function, rc, self._kcall("sandbus_error"))
        out_off, out_len = self._output_span(self._kcall("sandbus_output"), max_output)
        size = self.kernel_size()
        _check_span(out_off, out_len, size, "output")
        out = bytes(self._kmem.read(self._store, out_off, out_off + out_len))
        self.fuel_left_after = self.fuel_left() if fuel is not None else 0
        self.memory_after = size + self.memory_size()
        return out

    def _kcall(self, name: str, *args: int) -> int:
        func, sig = self._kplain[name]
        return (_plain_call(self._store, func, sig, args) or 0) & U64

    @staticmethod
    def _output_span(packed: int, max_output: int) -> tuple[int, int]:
        if packed == U64:
            raise AbiViolationError("the output block was freed after output_set, before the function returned",
                                    function="output_set")
        out_len = packed & 0xFFFF_FFFF
        if out_len > max_output:
            raise ReplyTooLarge(out_len)
        return packed >> 32, out_len

    def _guest_error(self, function: str, rc: int, packed: int) -> GuestError:
        """The plugin's own failure: its error text (bounded, control characters escaped), if it set one."""
        if packed == 0:
            text = f"{function} returned {rc} without setting an error"
        elif packed == U64:
            text = f"{function} returned {rc}; its error block was freed before it returned"
        else:
            off, length = packed >> 32, packed & 0xFFFF_FFFF
            size = self.kernel_size()
            _check_span(off, length, size, "error_set block")
            raw = self._kread(off, min(length, MAX_ERROR_BYTES))
            text = escape_controls(raw.decode(errors="replace")) + ("..." if length > MAX_ERROR_BYTES else "")
        return GuestError(text, plugin=self.ctx.plugin, function=function, return_code=rc)

    # -- the kernel memory, for host functions ---------------------------------------------------------

    def _kread(self, off: int, length: int) -> bytes:
        if self.fast:
            return ctypes.string_at(raw_memory_base(self._ctx, self._kmem_addr) + off, length)
        return bytes(self._kmem.read(self._store, off, off + length))

    def _nested(self, name: str, arg: int) -> int:
        """A kernel call made from inside a host function: a failure in it (the kernel's ``fail``) is this
        call's recorded error, raised as itself rather than as the engine's report of it."""
        try:
            if self.fast:
                raw = self._kblock if name == "sandbus_block" else self._kalloc
                return raw(arg) or 0
            return self._kcall(name, arg)
        except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
            failure = take_failure(self.ctx, e)
            if failure is e:  # the engine's own stop, not the kernel's fail(): see KernelStopped
                raise KernelStopped(e) from None
            raise failure from None

    def block(self, off: int, cap: int, what: str) -> bytes:
        """The bytes of the live kernel block at ``off``, at most ``cap`` of them.

        Raises:
            AbiViolationError: ``off`` names no live block (never allocated, freed, or not a block's start).
            PayloadTooLargeError: the block is longer than ``cap`` (nothing is copied).
        """
        off &= U64
        length = signed(self._nested("sandbus_block", off), "i64")
        if length < 0:
            raise AbiViolationError(f"extism:host/env.{what}: offset {off} names no live block of the kernel memory",
                                    plugin=self.ctx.plugin, function=what, offset=off)
        if length > cap:
            raise PayloadTooLargeError(f"extism:host/env.{what}: a block of {length} bytes exceeds its {cap}-byte cap",
                                       plugin=self.ctx.plugin, function=what, size=length, limit=cap)
        _check_span(off, length, self.kernel_size(), what)
        return self._kread(off, length)

    def alloc_bytes(self, data: bytes) -> int:
        """A new kernel block holding ``data``; its offset (the memory limit may refuse it: MemoryLimitError)."""
        off = self._nested("alloc", len(data)) & U64
        _check_span(off, len(data), self.kernel_size(), "alloc")
        if self.fast:
            ctypes.memmove(raw_memory_base(self._ctx, self._kmem_addr) + off, data, len(data))
        else:
            self._kmem.write(self._store, data, off)
        return off


def _plain_call(store: wasmtime.Store, func: wasmtime.Func, sig: Signature, args: tuple[int, ...]) -> int | None:
    params, result = sig
    value = func(store, *(signed(a, k) for a, k in zip(args, params, strict=True)))
    if result is None:
        return None
    return int(value) & (0xFFFF_FFFF if result == "i32" else U64)

