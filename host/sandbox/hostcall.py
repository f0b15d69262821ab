"""A host function's failure belongs to the call that made it, never to a process-wide slot.

wasmtime-py turns a Python exception raised by a host function into a trap, and keeps the exception in
one module global, ``wasmtime._func.LAST_EXCEPTION``; whichever thread next sees a failed call through
the public API raises whatever that slot holds. Under threads, one plugin's ``SecurityViolationError``
reached another plugin's caller, and the first caller got the other's trap.

So every host function we link records its exception in its instance's :class:`CallContext`
(``ctx.host_error``) before it is re-raised into the trampoline, and every call path (the compiled round
trip, the ctypes path, the public API, instantiation) asks the context, through :func:`take_failure`, what
its own call raised. Nothing of ours reads ``LAST_EXCEPTION``; :func:`install_last_exception_filter` also
stops wasmtime-py's public API from raising a *recorded* exception in another thread's call (it raises
that call's own trap instead). Exceptions that no sandbus host function recorded keep the library's
behaviour.
"""

from __future__ import annotations

import contextlib
import re
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import wasmtime

if TYPE_CHECKING:  # a private module: only its type name is needed
    from wasmtime._store import Storelike

__all__ = [
    "FailureSlot",
    "LostTrapReport",
    "RecordingLinker",
    "install_last_exception_filter",
    "last_exception_filtered",
    "library_maybe_raise",
    "mark_recorded",
    "recording",
    "take_failure",
    "wasi_guest_error",
]

#: Set on an exception once a CallContext holds it (the filter below then never hands it to another call):
#: a weak reference to that context, so that the call which recorded it knows it again.
_RECORDED = "_sandbus_recorded"

F = TypeVar("F", bound=Callable[..., Any])


class FailureSlot(Protocol):
    """What holds a call's host-function failure: a :class:`~sandbus.host.sandbox.instance.CallContext`."""

    host_error: BaseException | None


def mark_recorded(exc: BaseException, slot: FailureSlot | None = None) -> None:
    """Mark ``exc`` as held by ``slot``'s call (by no call in particular when ``slot`` is None)."""
    owner: Callable[[], object] = _NO_OWNER
    if slot is not None:
        with contextlib.suppress(TypeError):  # a slot that cannot be weakly referenced
            owner = weakref.ref(slot)
    with contextlib.suppress(AttributeError, TypeError):  # an exception type without a __dict__
        setattr(exc, _RECORDED, owner)


def _NO_OWNER() -> object:
    return None


def _recorded_by(exc: BaseException) -> object:
    """The slot that recorded ``exc``, ``_NO_OWNER`` if unknown or gone; None if ``exc`` was never recorded."""
    owner = getattr(exc, _RECORDED, None)
    if owner is None:
        return None
    return owner() if callable(owner) and owner() is not None else _NO_OWNER


def recording(slot: FailureSlot, fn: F) -> F:
    """``fn`` wrapped so that any exception it raises is first recorded in ``slot.host_error``."""
    if getattr(fn, "_sandbus_records_into", None) is slot:
        return fn

    def record(*args: Any) -> Any:
        try:
            return fn(*args)
        except BaseException as e:
            # A host function's exception always ends its call, so there is one per call.
            slot.host_error = e
            mark_recorded(e, slot)
            raise

    record._sandbus_records_into = slot  # type: ignore[attr-defined]
    return record  # type: ignore[return-value]


class RecordingLinker(wasmtime.Linker):
    """A linker whose every ``define_func`` records the function's failures in one call context."""

    def __init__(self, engine: wasmtime.Engine, slot: FailureSlot) -> None:
        super().__init__(engine)
        self._slot = slot

    def define_func(self, module: str, name: str, ty: wasmtime.FuncType, func: Callable[..., Any],
                    access_caller: bool = False) -> None:
        super().define_func(module, name, ty, recording(self._slot, func), access_caller)

    def instantiate(self, store: Storelike, module: wasmtime.Module) -> wasmtime.Instance:
        """Instantiate; a host function's exception in the start function is what this raises.

        wasmtime-py reports a start function that failed in a host function as a bare ``WasmtimeError``
        ("python exception"), which reads as an invalid module and hides a denial or a
        ``KeyboardInterrupt``: the exception recorded for this instantiation is raised instead.
        """
        self._slot.host_error = None
        try:
            return super().instantiate(store, module)
        except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
            failure = take_failure(self._slot, e)
            if failure is e:
                raise
            raise failure from e


class LostTrapReport(Exception):
    """This call failed, but the exception the engine raised for it was another call's.

    Only possible when :func:`install_last_exception_filter` could not be installed (the library's
    internals moved): the call's own trap details are lost, and the call is reported as a plain trap.
    """


def take_failure(slot: FailureSlot, exc: BaseException) -> BaseException:
    """What a failed call should raise, given what the engine raised for it (``exc``).

    A host function's recorded exception wins (the engine's own report of it is a bare "python
    exception" trap); otherwise the engine's error, unless it is an exception some *other* call recorded,
    which this call must never see.
    """
    recorded = slot.host_error
    slot.host_error = None
    if recorded is not None:
        _forget_last_exception(recorded)
        return recorded
    owner = _recorded_by(exc)
    if owner is slot:
        return exc  # this call's own failure, taken once already (e.g. by RecordingLinker.instantiate)
    if owner is not None:
        return LostTrapReport("the call trapped; its trap report was lost to a concurrent call")
    return exc


#: How wasmtime's WASI (wiggle) refuses a pointer or value the guest passed it, as the error's cause lines
#: read: "Pointer out of bounds: Region { start: 70000, len: 4 }", optionally behind "N: In func
#: wasi_snapshot_preview1::clock_time_get at write timestamp: ".
_WASI_GUEST_ERROR = re.compile(
    r"^\s*(?:\d+:\s*)?(?:In func (?P<func>[\w:]+) at [^\n]*?: )?"
    r"(?P<what>(?:Pointer (?:out of bounds|not aligned to \d+|overflow|already borrowed)"
    r"|Invalid (?:flag|enum) value|Invalid UTF-8 encountered|Slice length mismatch|Int conversion error"
    r"|Borrow checker out of handles)[^\n]*)$",
    re.M,
)


def wasi_guest_error(exc: BaseException, code: object) -> tuple[str, str | None] | None:
    """(what, WASI function or None) when ``exc`` is wasmtime's WASI refusing an argument from the guest.

    Such a refusal is the guest breaking the ABI, as much as a bad (ptr, len) handed to a sandbus host
    function. Only an engine error without a trap code qualifies (an instruction's own trap, such as "out
    of bounds memory access", has one), and only its cause lines are read: the backtrace before them
    carries function names from the guest's own name section, which the guest chooses.
    """
    if code is not None or not isinstance(exc, (wasmtime.Trap, wasmtime.WasmtimeError)):
        return None
    text = str(exc)
    if "Caused by:" in text:
        # The last one: a guest's function name (which may hold newlines) can only come before it.
        found = _WASI_GUEST_ERROR.search(text.rsplit("Caused by:", 1)[1])
    else:
        found = _WASI_GUEST_ERROR.match(text.split("\n", 1)[0])
    if found is None:
        return None
    return found.group("what").strip(), found.group("func")


# -- wasmtime-py's process-wide slot --------------------------------------------------------------

_filter_lock = threading.Lock()
_filter_installed = False
#: wasmtime-py's own ``maybe_raise_last_exn``, kept so a test can run without the filter.
library_maybe_raise: Callable[[], None] | None = None


def _forget_last_exception(exc: BaseException) -> None:
    """Drop the library's reference to ``exc`` (with its traceback it keeps an instance alive).

    Compare-then-clear is not atomic: another call's exception stored in between may be dropped too.
    That is harmless: every exception of ours is recorded in its own call context.
    """
    try:
        from wasmtime import _func
    except ImportError:  # pragma: no cover - internals moved
        return
    if getattr(_func, "LAST_EXCEPTION", None) is exc:
        _func.LAST_EXCEPTION = None


def install_last_exception_filter() -> bool:
    """Make wasmtime-py's public API skip exceptions a call context recorded (idempotent).

    ``wasmtime._func.enter_wasm`` calls the module global ``maybe_raise_last_exn`` after a failed call;
    we replace it by a version that drops a recorded exception instead of raising it in whichever call
    failed next. False when the internals moved: then :func:`take_failure` still keeps a foreign
    exception out of a call (as :class:`LostTrapReport`).
    """
    global _filter_installed
    with _filter_lock:
        if _filter_installed:
            return True
        try:
            from wasmtime import _func
        except ImportError:  # pragma: no cover
            return False
        global library_maybe_raise
        library_maybe_raise = getattr(_func, "maybe_raise_last_exn", None)
        if not callable(library_maybe_raise) or not hasattr(_func, "LAST_EXCEPTION"):
            return False  # pragma: no cover

        def maybe_raise_unrecorded() -> None:
            # The library's own logic (read, clear, raise), except for recorded exceptions.
            exn = _func.LAST_EXCEPTION
            if exn is None:
                return
            _func.LAST_EXCEPTION = None
            if _recorded_by(exn) is not None:
                return
            raise exn

        _func.maybe_raise_last_exn = maybe_raise_unrecorded
        _filter_installed = True
        return True


def last_exception_filtered() -> bool:
    return _filter_installed
