"""Calling into one wasm instance: the fast path over wasmtime-py internals, and the ordinary API.

Why two paths: ``Func.__call__`` re-reads the function type through ctypes on
every call (~25 us); the C API's unchecked call with cached types and a reused
raw-value buffer costs ~1.5 us (ARCHITECTURE.md, part B). That difference is
most of a node's per-request cost, so we take the fast path when the pinned
wasmtime-py exposes what it needs, and fall back to the ordinary API otherwise.

On the fast path, a whole ABI round trip (budget, alloc, copy in, call, bounds
checks, copy out, dealloc, fuel and memory readings: about twelve C calls) runs
in one call into host/sandbox/_native.c when it is built: ~1 us instead of
~10 us through ctypes for a 100-byte echo (bench/bench_sandbox.py). It calls the
same C functions of the same libwasmtime (their addresses come from ctypes), so
the two agree by construction; ``tests/host/test_invoke.py`` checks that all three
paths (native, ctypes, ordinary API) give the same replies, fuel, memory and errors.

The unchecked call is only safe because:
  * we only call exports whose signature ``instance.py`` verified at load;
  * every (ptr, len) is bounds-checked against a freshly read memory size
    before any ``memmove``/``string_at`` (a guest may grow or lie);
  * traps and errors are turned into exceptions and their handles freed.
Both invokers raise ``wasmtime.Trap`` or ``wasmtime.WasmtimeError`` for a failed call (the
public API may also raise a host function's exception itself). The exception a host function
raised is taken from the calling instance's own ``CallContext`` (host/sandbox/hostcall.py), never
from wasmtime-py's process-wide ``LAST_EXCEPTION``, which another thread may have filled.
"""

from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import wasmtime

from sandbus.sdk.errors import AbiViolationError

if TYPE_CHECKING:
    from types import ModuleType

__all__ = [
    "FAST_PATH_REASON",
    "FastInvoker",
    "GuestAllocFailed",
    "Invoker",
    "address_of",
    "PlainInvoker",
    "NATIVE_REASON",
    "RawFunc",
    "ReplyTooLarge",
    "Signature",
    "fast_path_available",
    "fuel_left_raw",
    "make_invoker",
    "native_available",
    "native_module",
    "raise_failure",
    "raw_memory",
    "raw_memory_base",
    "raw_memory_size",
    "set_budget_raw",
    "signed",
]

U64 = 0xFFFF_FFFF_FFFF_FFFF

#: (parameter kinds, result kind or None); kinds are "i32" / "i64". Verified at load.
Signature = tuple[tuple[str, ...], str | None]


class Invoker(Protocol):
    """What the instance needs from a call path."""

    def call(self, name: str, *args: int) -> int | None: ...

    def memory_size(self) -> int: ...

    def read(self, ptr: int, length: int) -> bytes: ...

    def write(self, ptr: int, data: bytes) -> None: ...

    def set_budget(self, fuel: int | None, epoch_ticks: int) -> None:
        """Fresh fuel (unless metering is off) and a fresh wall-clock deadline for the next call."""

    def fuel_left(self) -> int: ...

    #: After a successful :meth:`round_trip`: the fuel left (0 without metering) and the memory size.
    fuel_left_after: int
    memory_after: int

    def round_trip(self, function: str, payload: bytes, max_output: int, fuel: int | None,
                   epoch_ticks: int) -> bytes:
        """The whole ABI call: budget, alloc, write, call, read, dealloc. Raises GuestAllocFailed /
        ReplyTooLarge / AbiViolationError (bounds) besides whatever the guest raised."""
        ...


class GuestAllocFailed(Exception):
    """``sandbus_alloc`` returned 0 for a non-empty input."""


class ReplyTooLarge(Exception):
    """The guest's reply length exceeds the output cap; ``args[0]`` is the length."""


def _check_bounds(ptr: int, length: int, size: int, what: str) -> None:
    if ptr < 0 or length < 0 or ptr + length > size:
        raise AbiViolationError(
            f"{what}: range [{ptr}, {ptr + length}) is outside guest memory of {size} bytes",
            ptr=ptr,
            length=length,
            memory_size=size,
        )


# ---------------------------------------------------------------------------
# Fast path (wasmtime-py 50 internals)
# ---------------------------------------------------------------------------

FAST_PATH_REASON = ""
try:
    from wasmtime import _ffi as _wffi

    _dll = _wffi.dll
    # Our own function pointers (not the bindings' cached ones) so we can use
    # plain integer argument types without changing wasmtime-py's own calls.
    _call_unchecked = _dll._FuncPtr(("wasmtime_func_call_unchecked", _dll))
    _call_unchecked.restype = ctypes.c_void_p
    _call_unchecked.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    _mem_data = _dll._FuncPtr(("wasmtime_memory_data", _dll))
    _mem_data.restype = ctypes.c_void_p
    _mem_data.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    _mem_size = _dll._FuncPtr(("wasmtime_memory_data_size", _dll))
    _mem_size.restype = ctypes.c_size_t
    _mem_size.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    _set_fuel = _dll._FuncPtr(("wasmtime_context_set_fuel", _dll))
    _set_fuel.restype = ctypes.c_void_p
    _set_fuel.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    _get_fuel = _dll._FuncPtr(("wasmtime_context_get_fuel", _dll))
    _get_fuel.restype = ctypes.c_void_p
    _get_fuel.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    _set_deadline = _dll._FuncPtr(("wasmtime_context_set_epoch_deadline", _dll))
    _set_deadline.restype = None
    _set_deadline.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    _ValRaw = _wffi.wasmtime_val_raw_t
    _TrapPtr = ctypes.POINTER(_wffi.wasm_trap_t)
    _ErrPtr = ctypes.POINTER(_wffi.wasmtime_error_t)
    if ctypes.sizeof(_ValRaw) != 16:
        raise AttributeError(f"wasmtime_val_raw_t is {ctypes.sizeof(_ValRaw)} bytes, expected 16")
except (ImportError, AttributeError) as _e:  # pragma: no cover - depends on the installed wasmtime
    FAST_PATH_REASON = f"wasmtime-py internals changed: {_e}"


def fast_path_available() -> bool:
    return not FAST_PATH_REASON


def _bind_native() -> tuple[ModuleType | None, str]:  # the module is host/sandbox/_native
    """The compiled round trip, bound to this process's libwasmtime; (None, why) when unavailable."""
    if FAST_PATH_REASON:
        return None, FAST_PATH_REASON
    if os.environ.get("SANDBUS_NATIVE", "1") == "0":
        return None, "turned off by SANDBUS_NATIVE=0"
    try:
        from sandbus.host.sandbox import _native as mod
    except ImportError as e:
        return None, f"host/sandbox/_native.c is not built ({e}); pip install -e . builds it"
    addrs = [ctypes.cast(f, ctypes.c_void_p).value
             for f in (_call_unchecked, _mem_data, _mem_size, _set_fuel, _get_fuel, _set_deadline)]
    mod.bind(*addrs)
    return mod, ""


_native, NATIVE_REASON = _bind_native()


def native_module() -> ModuleType | None:
    """The compiled helper, bound to this process's libwasmtime (None when unavailable)."""
    return _native


def native_available() -> bool:
    """Whether round trips run in the compiled helper (else through ctypes; ~10 us slower per call)."""
    return _native is not None


def address_of(obj: Any) -> int:
    """The address a ctypes pointer (a wasmtime-py handle) holds, for the compiled helpers."""
    value = ctypes.cast(obj, ctypes.c_void_p).value
    assert value is not None
    return value


class _RawFunc:
    """One export called through ``wasmtime_func_call_unchecked`` with a reused buffer (also
    host/sandbox/extism/invoker.py's way to call its kernel and the plugin, as :data:`RawFunc`)."""

    __slots__ = ("_buf", "_buf_addr", "_ctx", "_func", "_func_addr", "_result", "_trap", "_trap_addr")

    def __init__(self, ctx: int, func: wasmtime.Func, sig: Signature) -> None:
        self._ctx = ctx
        self._func = func  # keeps the wasmtime_func_t alive
        self._func_addr = ctypes.addressof(func._func)
        self._result = sig[1]
        self._buf = (_ValRaw * max(1, len(sig[0])))()
        self._buf_addr = ctypes.addressof(self._buf)
        self._trap = ctypes.c_void_p()
        self._trap_addr = ctypes.addressof(self._trap)

    def __call__(self, *args: int) -> int | None:
        buf = self._buf
        for i, a in enumerate(args):
            buf[i].i64 = a  # an i32 is read from the low half (little-endian union)
        err = _call_unchecked(self._ctx, self._func_addr, self._buf_addr, len(buf), self._trap_addr)
        if err or self._trap.value:
            self._raise(err)
        if self._result is None:
            return None
        if self._result == "i32":
            return buf[0].i32 & 0xFFFF_FFFF
        return buf[0].i64 & U64

    def call2(self, a: int, b: int) -> int:
        """Two i32 arguments, the raw 64-bit result (callers mask as needed)."""
        buf = self._buf
        buf[0].i64 = a
        buf[1].i64 = b
        err = _call_unchecked(self._ctx, self._func_addr, self._buf_addr, 2, self._trap_addr)
        if err or self._trap.value:
            self._raise(err)
        return int(buf[0].i64)

    def call0(self) -> int:
        """No arguments; the signed result (an i32 read as an i32: the raw slot's upper half is not defined)."""
        buf = self._buf
        err = _call_unchecked(self._ctx, self._func_addr, self._buf_addr, len(buf), self._trap_addr)
        if err or self._trap.value:
            self._raise(err)
        return int(buf[0].i32) if self._result == "i32" else int(buf[0].i64)

    def call1(self, a: int) -> int:
        buf = self._buf
        buf[0].i64 = a
        err = _call_unchecked(self._ctx, self._func_addr, self._buf_addr, 1, self._trap_addr)
        if err or self._trap.value:
            self._raise(err)
        return int(buf[0].i32) & 0xFFFF_FFFF

    def _raise(self, err: int | None) -> None:
        trap_addr = self._trap.value
        self._trap.value = None
        _raise_failure(err, trap_addr)


RawFunc = _RawFunc


def raise_failure(err: int | None, trap_addr: int | None) -> NoReturn:
    """Raise what a failed unchecked call left (a trap or an error), freeing both handles."""
    _raise_failure(err, trap_addr)


def raw_memory(store: wasmtime.Store, memory: wasmtime.Memory) -> tuple[int, int]:
    """(context address, memory handle address) for :func:`raw_memory_base` / :func:`raw_memory_size`."""
    return address_of(store._context()), ctypes.addressof(memory._memory)


def raw_memory_base(ctx: int, mem: int) -> int:
    """The memory's base address now (re-read after every call into the store: it may move)."""
    base = _mem_data(ctx, mem)
    assert base is not None
    return int(base)


def raw_memory_size(ctx: int, mem: int) -> int:
    return int(_mem_size(ctx, mem))


def set_budget_raw(ctx: int, fuel: int | None, epoch_ticks: int) -> None:
    """Fresh fuel (unless metering is off) and a fresh epoch deadline, through the C API."""
    if fuel is not None:
        err = _set_fuel(ctx, fuel)
        if err:
            raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(err, _ErrPtr))
    _set_deadline(ctx, epoch_ticks)


def fuel_left_raw(ctx: int) -> int:
    out = ctypes.c_uint64()
    err = _get_fuel(ctx, ctypes.byref(out))
    if err:
        raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(err, _ErrPtr))
    return int(out.value)


def _raise_failure(err: int | None, trap_addr: int | None) -> NoReturn:
    """Raise what a failed unchecked call left: the trap, or the error.

    A host function's exception is not ours to find here: it is in the calling instance's
    ``CallContext.host_error`` (host/sandbox/hostcall.py), which the instance prefers to this trap.
    wasmtime-py's process-wide ``LAST_EXCEPTION`` may hold another thread's exception at any time.
    """
    # Take ownership of both handles so they are freed whatever we raise.
    trap = wasmtime.Trap._from_ptr(ctypes.cast(trap_addr, _TrapPtr)) if trap_addr else None
    error = wasmtime.WasmtimeError._from_ptr(ctypes.cast(err, _ErrPtr)) if err else None
    if trap is not None:
        raise trap
    assert error is not None
    raise error


class FastInvoker:
    """Calls through the C API directly; see the module docstring for why it is safe.

    ``native``: do the whole round trip in the compiled helper (host/sandbox/_native.c) when it is
    built; otherwise (or with ``native=False``) the same steps run through ctypes.
    """

    def __init__(self, store: wasmtime.Store, instance: wasmtime.Instance, memory: wasmtime.Memory,
                 signatures: dict[str, Signature], *, native: bool = True) -> None:
        self._store = store  # keep alive: the context pointer belongs to it
        self._ctx = address_of(store._context())
        self._mem = memory
        self._mem_addr = ctypes.addressof(memory._memory)
        self._fuel_out = ctypes.c_uint64()
        self._fuel_out_addr = ctypes.addressof(self._fuel_out)
        exports = instance.exports(store)
        self._funcs: dict[str, _RawFunc] = {}
        for name, sig in signatures.items():
            f = exports[name]
            assert isinstance(f, wasmtime.Func)
            self._funcs[name] = _RawFunc(self._ctx, f, sig)
        self._known_size = 0
        self._alloc = self._funcs["sandbus_alloc"]
        self._dealloc = self._funcs.get("sandbus_dealloc")
        self.native = native and _native is not None
        self._func_addrs = {name: f._func_addr for name, f in self._funcs.items()}
        self._alloc_addr = self._alloc._func_addr
        self._dealloc_addr = self._dealloc._func_addr if self._dealloc is not None else 0
        self.fuel_left_after = 0
        self.memory_after = 0

    def round_trip(self, function: str, payload: bytes, max_output: int, fuel: int | None,
                   epoch_ticks: int) -> bytes:
        if not self.native:
            return self._round_trip_ctypes(function, payload, max_output, fuel, epoch_ticks)
        assert _native is not None
        if type(payload) is not bytes:  # a bytearray or memoryview from a caller: the C side takes bytes
            payload = bytes(payload)
        out: tuple[int, bytes | None, int, int, int] = _native.round_trip(
            self._ctx, self._mem_addr, self._alloc_addr, self._func_addrs[function], self._dealloc_addr, payload,
            max_output, -1 if fuel is None else fuel, epoch_ticks)
        code, reply, a, b, c = out
        if code == 0:
            self.fuel_left_after, self.memory_after = a, b
            assert reply is not None
            return reply
        if code == 1:
            _raise_failure(a or None, b or None)
        if code == 2:
            raise GuestAllocFailed(a)
        if code == 3:
            raise ReplyTooLarge(a)
        _check_bounds(a, b, c, "input buffer from sandbus_alloc" if code == 4 else "reply")
        raise AssertionError(f"native round trip returned code {code} for an in-bounds range")  # pragma: no cover

    def _round_trip_ctypes(self, function: str, payload: bytes, max_output: int, fuel: int | None,
                           epoch_ticks: int) -> bytes:
        # One straight-line method: at ~1.5 us per wasm call, Python call overhead is the cost to cut.
        ctx, mem = self._ctx, self._mem_addr
        if fuel is not None:
            err = _set_fuel(ctx, fuel)
            if err:
                raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(err, _ErrPtr))
        _set_deadline(ctx, epoch_ticks)
        n = len(payload)
        p = self._alloc.call1(n)
        if not p and n:
            raise GuestAllocFailed(n)
        # Linear memory never shrinks, so a range inside the last size we read is still inside;
        # only a range beyond it needs a fresh read (and then the real check).
        if p + n > self._known_size:
            self._known_size = _mem_size(ctx, mem)
            _check_bounds(p, n, self._known_size, "input buffer from sandbus_alloc")
        ctypes.memmove(_mem_data(ctx, mem) + p, payload, n)
        packed = self._funcs[function].call2(p, n) & U64
        rp, rl = packed >> 32, packed & 0xFFFF_FFFF
        if rl > max_output:
            raise ReplyTooLarge(rl)
        if rp + rl > self._known_size:
            self._known_size = _mem_size(ctx, mem)
            _check_bounds(rp, rl, self._known_size, "reply")
        # The base is re-read after every call: memory.grow may have moved it.
        out = ctypes.string_at(_mem_data(ctx, mem) + rp, rl)
        if self._dealloc is not None:
            self._dealloc.call2(rp, rl)
            if p:
                self._dealloc.call2(p, n)
        self.fuel_left_after = self.fuel_left() if fuel is not None else 0
        self.memory_after = int(_mem_size(ctx, mem))
        return out

    def call(self, name: str, *args: int) -> int | None:
        return self._funcs[name](*args)

    def memory_size(self) -> int:
        return int(_mem_size(self._ctx, self._mem_addr))

    def set_budget(self, fuel: int | None, epoch_ticks: int) -> None:
        if fuel is not None:
            err = _set_fuel(self._ctx, fuel)
            if err:
                raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(err, _ErrPtr))
        _set_deadline(self._ctx, epoch_ticks)

    def fuel_left(self) -> int:
        err = _get_fuel(self._ctx, self._fuel_out_addr)
        if err:
            raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(err, _ErrPtr))
        return int(self._fuel_out.value)

    def _base(self) -> int:
        base = _mem_data(self._ctx, self._mem_addr)
        assert base is not None
        return int(base)

    def read(self, ptr: int, length: int) -> bytes:
        # Size and base are re-read on every access: memory.grow may have moved them.
        _check_bounds(ptr, length, self.memory_size(), "read")
        return ctypes.string_at(self._base() + ptr, length)

    def write(self, ptr: int, data: bytes) -> None:
        _check_bounds(ptr, len(data), self.memory_size(), "write")
        ctypes.memmove(self._base() + ptr, data, len(data))


# ---------------------------------------------------------------------------
# Ordinary path (public wasmtime-py API)
# ---------------------------------------------------------------------------


class PlainInvoker:
    """The public API: slower, and what we fall back to when internals move."""

    def __init__(self, store: wasmtime.Store, instance: wasmtime.Instance, memory: wasmtime.Memory,
                 signatures: dict[str, Signature]) -> None:
        self._store = store
        self._mem = memory
        self.fuel_left_after = 0
        self.memory_after = 0
        exports = instance.exports(store)
        self._funcs: dict[str, tuple[wasmtime.Func, Signature]] = {}
        for name, sig in signatures.items():
            f = exports[name]
            assert isinstance(f, wasmtime.Func)
            self._funcs[name] = (f, sig)

    def call(self, name: str, *args: int) -> int | None:
        func, (params, result) = self._funcs[name]
        # The ordinary API range-checks: hand it the signed view of each value.
        signed = [_signed(a, k) for a, k in zip(args, params, strict=True)]
        value = func(self._store, *signed)
        if result is None:
            return None
        return int(value) & (0xFFFF_FFFF if result == "i32" else U64)

    def memory_size(self) -> int:
        return int(self._mem.data_len(self._store))

    def set_budget(self, fuel: int | None, epoch_ticks: int) -> None:
        if fuel is not None:
            self._store.set_fuel(fuel)
        self._store.set_epoch_deadline(epoch_ticks)

    def fuel_left(self) -> int:
        return int(self._store.get_fuel())

    def round_trip(self, function: str, payload: bytes, max_output: int, fuel: int | None,
                   epoch_ticks: int) -> bytes:
        self.set_budget(fuel, epoch_ticks)
        n = len(payload)
        p = self.call("sandbus_alloc", n) or 0
        if not p and n:
            raise GuestAllocFailed(n)
        _check_bounds(p, n, self.memory_size(), "input buffer from sandbus_alloc")
        self._mem.write(self._store, payload, p)
        packed = self.call(function, p, n) or 0
        rp, rl = packed >> 32, packed & 0xFFFF_FFFF
        if rl > max_output:
            raise ReplyTooLarge(rl)
        _check_bounds(rp, rl, self.memory_size(), "reply")
        out = bytes(self._mem.read(self._store, rp, rp + rl))
        if "sandbus_dealloc" in self._funcs:
            self.call("sandbus_dealloc", rp, rl)
            if p:
                self.call("sandbus_dealloc", p, n)
        self.fuel_left_after = self.fuel_left() if fuel is not None else 0
        self.memory_after = self.memory_size()
        return out

    def read(self, ptr: int, length: int) -> bytes:
        _check_bounds(ptr, length, self.memory_size(), "read")
        return bytes(self._mem.read(self._store, ptr, ptr + length))

    def write(self, ptr: int, data: bytes) -> None:
        _check_bounds(ptr, len(data), self.memory_size(), "write")
        self._mem.write(self._store, data, ptr)


def signed(value: int, kind: str) -> int:
    """``value`` as the signed ``kind`` ("i32" / "i64") the ordinary API takes."""
    return _signed(value, kind)


def _signed(value: int, kind: str) -> int:
    bits = 32 if kind == "i32" else 64
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def make_invoker(store: wasmtime.Store, instance: wasmtime.Instance, memory: wasmtime.Memory,
                 signatures: dict[str, Signature], *, fast: bool = True, native: bool = True) -> Invoker:
    if fast and fast_path_available():
        return FastInvoker(store, instance, memory, signatures, native=native)
    return PlainInvoker(store, instance, memory, signatures)
