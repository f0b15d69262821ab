"""Run by tests/guests/test_hardening_component.py in a fresh interpreter: Python components trap on
MemoryError (plugins/py_echo) and on unbounded recursion (tests/guests/py_adversary), again and again,
then the process exits. It must exit with 0.

Usage: python -m tests.guests.f09_exit_probe PY_ECHO.wasm PY_ADVERSARY.wasm ROUNDS close|leave
"""

from __future__ import annotations

import sys
from pathlib import Path

from sandbus.host.sandbox import Limits, Sandbox
from sandbus.sdk.errors import MemoryLimitError, StackLimitError, TrapError


def main() -> int:
    echo_wasm, adversary_wasm, rounds, ending = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    limits = Limits(memory_bytes=32 * 1024 * 1024)
    echo, adversary = Sandbox(echo_wasm, limits=limits), Sandbox(adversary_wasm, limits=limits)
    seen: list[str] = []
    # The recursion traps first, the memory traps last: the abort at exit came from what the last
    # trapping instances left behind when the interpreter shut down.
    calls = ([(adversary, "recurse", {}, TrapError),  # CPython's RecursionError
              (adversary, "recurse", {"limit": 10**6}, StackLimitError)] * rounds  # the wasm stack itself
             + [(echo, "probe", {"what": "memory"}, MemoryLimitError)] * rounds)
    for sb, function, request, expected in calls:
        try:
            sb.call(function, request)
        except expected as e:
            seen.append(type(e).__name__)
        else:
            print(f"{function} did not trap", file=sys.stderr)
            return 1
    if ending == "close":
        echo.close()
        adversary.close()
    # "leave": the sandbox and its stores are collected while the interpreter shuts down.
    print(" ".join(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
