"""py_adversary - a hostile Python component for the hardening tests (tests/guests/test_hardening_component.py).

Functions (JSON in, JSON out, through sdk/guest/python/sandbus_guest.py):
  hoard    allocates 1 MB blocks until MemoryError (which traps: the SDK leaves it alone)
  recurse  calls itself without bound ({"limit": N} raises Python's recursion limit first, so that the
           wasm stack, not CPython's counter, runs out)
  crash    raises RecursionError at once: a trap on purpose, cheaply
  env      {"name": "VAR"} -> the variable through the host's env-get
  spew     {"bytes": N} writes N bytes to stdout, 64 KiB at a time, until a write fails; says how far it got
  fs       {"op": ..., "path": ..., "to": ..., "data": ...}: one file system operation, as a guest would try
           it: list, read, write, append, mkdir, rename, symlink, unlink, rmdir, readlink
"""

import os
import sys
from typing import Any

from sandbus_guest import Plugin, PluginError, function, getenv


def _deeper(n: int) -> int:
    return _deeper(n + 1) + 1


class WitWorld(Plugin):
    @function
    def hoard(self, request: Any) -> Any:
        blocks = []
        while True:
            blocks.append(bytearray(1 << 20))

    @function
    def recurse(self, request: Any) -> Any:
        if isinstance(request, dict) and "limit" in request:
            sys.setrecursionlimit(int(request["limit"]))
        return _deeper(0)

    @function
    def crash(self, request: Any) -> Any:
        raise RecursionError("on purpose")

    @function
    def spew(self, request: Any) -> Any:
        total, chunk = int(request["bytes"]), b"x" * 65536
        written = 0
        try:
            while written < total:
                written += sys.stdout.buffer.write(chunk[:total - written])
                sys.stdout.buffer.flush()
        except OSError as e:
            return {"written": written, "error": type(e).__name__}
        return {"written": written, "error": None}

    @function
    def env(self, request: Any) -> Any:
        return {"value": getenv(str(request["name"]))}

    @function
    def fs(self, request: Any) -> Any:
        op, path = str(request["op"]), str(request["path"])
        if op == "list":
            return {"names": sorted(os.listdir(path))}
        if op == "read":
            with open(path, encoding="utf-8", errors="replace") as f:
                return {"content": f.read(4096)}
        if op in ("write", "append"):
            with open(path, "w" if op == "write" else "a", encoding="utf-8") as f:
                f.write(str(request.get("data", "")))
            return {"written": path}
        if op == "mkdir":
            os.mkdir(path)
        elif op == "rename":
            os.rename(path, str(request["to"]))
        elif op == "symlink":
            os.symlink(str(request["to"]), path)  # `path` becomes a link whose target is `to`
        elif op == "unlink":
            os.unlink(path)
        elif op == "rmdir":
            os.rmdir(path)
        elif op == "readlink":
            return {"target": os.readlink(path)}
        else:
            raise PluginError(f"unknown op {op!r}")
        return {"done": op}
