"""Capture a guest's stdout / stderr without running Python on wasmtime's threads.

wasmtime's WASI (the preview 2 implementation, which also backs preview 1) hands a custom output stream
to a background task on its own tokio runtime: the stream's write callback *and* its finalizer run on a
tokio worker thread, at whatever time the runtime gets to them. wasmtime-py's ``WasiConfig.stdout_custom``
makes both of them Python (ctypes) callbacks. A write or a finalizer that is still pending when the
interpreter shuts down (typically the last lines of a guest that trapped, or a store dropped late) makes
the worker take the GIL during finalization; CPython then ends that thread with ``pthread_exit``, whose
forced unwind crosses Rust's non-unwinding thread entry, and the process aborts (SIGABRT, "panic in a
function that cannot unwind"). The same callbacks also ran the plugin's logging on a foreign thread,
concurrently with the call that produced the output.

So no Python is handed to wasmtime here. Each stream is a non-blocking pipe: the callback is libc's
``write`` and the finalizer libc's ``close``, both called with the pipe's write end as their ``data``
argument (a ``void *`` holding the descriptor, which both read as their ``int`` first argument). The host
reads what arrived from the read end, on the calling thread, after each call. The pipe's capacity bounds
what one call can leave there; a write that does not fit fails for the guest (the callback returns -1)
instead of blocking a wasmtime thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
from typing import Any

import wasmtime
from wasmtime import _bindings as _ffi

__all__ = ["GuestOutput", "OUTPUT_PIPE_MAX"]

#: Largest pipe asked for (the default unprivileged ``/proc/sys/fs/pipe-max-size``).
OUTPUT_PIPE_MAX = 1024 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
# The exact callback types wasmtime-py's bindings declare, so ctypes passes the raw C pointers through.
_WRITE_T: Any = _ffi._wasi_config_set_stdout_custom.argtypes[1]
_CLOSE_T: Any = _ffi._wasi_config_set_stdout_custom.argtypes[3]
_WRITE = ctypes.cast(_libc.write, _WRITE_T)
_CLOSE = ctypes.cast(_libc.close, _CLOSE_T)
_SETTERS = {"stdout": _ffi.wasi_config_set_stdout_custom, "stderr": _ffi.wasi_config_set_stderr_custom}


class GuestOutput:
    """One guest output stream (stdout or stderr) as a pipe whose write end wasmtime owns.

    Parameters:
        config: the WASI configuration the stream is set on; from then on wasmtime owns the write end
            and closes it (through libc's ``close``) when it drops the stream, on whichever thread.
        stream: ``"stdout"`` or ``"stderr"``.
        capacity: bytes one call may leave in the pipe before the guest's writes fail; raised to what the
            kernel grants (at least a page, at most :data:`OUTPUT_PIPE_MAX`). A caller that enforces a
            cap of N bytes asks for more than N, so that going over the cap is visible in :meth:`drain`.
    """

    def __init__(self, config: wasmtime.WasiConfig, stream: str, capacity: int) -> None:
        setter = _SETTERS[stream]
        read_fd, write_fd = os.pipe()  # not inheritable (PEP 446)
        try:
            os.set_blocking(read_fd, False)
            os.set_blocking(write_fd, False)
            self.capacity = 65536  # Linux's default; other systems: at least 4 KiB, in practice 16-64 KiB
            if hasattr(fcntl, "F_SETPIPE_SZ"):  # Linux
                with contextlib.suppress(OSError):  # over the user's pipe quota: the default still bounds it
                    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, max(4096, min(capacity, OUTPUT_PIPE_MAX)))
                self.capacity = fcntl.fcntl(read_fd, fcntl.F_GETPIPE_SZ)
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            raise
        self._fd: int | None = read_fd
        # After this call the write end belongs to wasmtime: never close it here.
        setter(config.ptr(), _WRITE, ctypes.c_void_p(write_fd), _CLOSE)

    def fileno(self) -> int:
        """The read end (for ``select.poll``); -1 once closed."""
        return -1 if self._fd is None else self._fd

    def drain(self) -> bytes:
        """Everything the guest wrote since the last drain (at most the pipe's capacity)."""
        fd = self._fd
        if fd is None:
            return b""
        chunks: list[bytes] = []
        total = 0
        while total <= self.capacity:  # bounded: the pipe holds at most `capacity` bytes
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not chunk:  # wasmtime closed the write end
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        """Close the read end (a late write by wasmtime then fails with EPIPE, SIGPIPE being ignored)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()
