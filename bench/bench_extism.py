"""Per-call time of the same Extism plugin on sandbus (pooled) and in the Extism Python SDK, in one process.

Rows, each at 100 B and 10 KB of input:
  * the WAT echo: ``output_set(input_offset, input_length)``, the least a plugin can do;
  * the WAT copy echo: the input read eight bytes at a time into a new block and output from there, as
    the PDKs do (every load and store is a call into the kernel);
  * the AssemblyScript-PDK echo (tests/extism/guests/reflect.ts), when its compiler is installed;
  * for reference, our own ABI's echo (tests/host/wat/mini_echo.wat) on sandbus.
The Extism column runs the same bytes through ``extism.Plugin.call`` (when ``import extism`` works), the ratio
is sandbus / Extism (the target is at most 0.5). sandbus runs with its default limits (fuel metering on);
the last column is the same call with ``fuel = None`` (the Extism SDK meters no fuel).

    python bench/bench_extism.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import wasmtime
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from extism_sdk_side import build_reflect, extism_available, measure_extism  # noqa: E402

from sandbus.host.sandbox import Limits, Sandbox  # noqa: E402
from tests.host.extism.guests import plugin  # noqa: E402

SIZES = (100, 10_000)


def per_call_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Best-of-``repeats`` mean per call (the min filters scheduler noise on a shared machine)."""
    for _ in range(min(calls, 2000)):
        fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t) / calls * 1e6)
    return min(runs)


def sandbus_us(wasm: bytes, function: str, data: bytes, calls: int, repeats: int, *, fuel: bool = True) -> float:
    limits = Limits(max_instances=1) if fuel else Limits(max_instances=1, fuel=None)
    with Sandbox(wasm, name="bench", limits=limits) as sb:
        assert sb.call_bytes(function, data, validate=False) == data
        call = sb.call_bytes
        return per_call_us(lambda: call(function, data, validate=False), calls, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer calls and repeats")
    args = parser.parse_args()
    calls, repeats = (2000, 3) if args.quick else (20_000, 7)
    guests: list[tuple[str, bytes, str]] = [("WAT echo", plugin(), "echo"), ("WAT copy echo", plugin(), "copy_echo")]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            guests.append(("AS-PDK echo", build_reflect(Path(tmp)).read_bytes(), "reflect"))
        except Exception as e:  # no node/npm here: the WAT rows still compare the same ABI
            print(f"(AS-PDK echo skipped: {type(e).__name__}: {e})")
    own = bytes(wasmtime.wat2wasm((ROOT / "tests" / "host" / "wat" / "mini_echo.wat").read_text()))
    sdk = extism_available()

    table = Table(title=f"Extism plugin per-call time, us (best of {repeats} x {calls} calls)")
    for col in ("plugin", "input", "sandbus", "Extism SDK", "sandbus / Extism", "sandbus, fuel off"):
        table.add_column(col, justify="right" if col != "plugin" else "left")
    for label, wasm, function in guests:
        for size in SIZES:
            data = bytes(i % 251 for i in range(size))
            ours = sandbus_us(wasm, function, data, calls, repeats)
            unmetered = f"{sandbus_us(wasm, function, data, calls, repeats, fuel=False):.2f}"
            if sdk:
                theirs = measure_extism(wasm, function, size, calls=calls, repeats=repeats, data=data).min_us
                table.add_row(label, f"{size} B", f"{ours:.2f}", f"{theirs:.2f}", f"{ours / theirs:.2f}x", unmetered)
            else:
                table.add_row(label, f"{size} B", f"{ours:.2f}", "-", "-", unmetered)
    for size in SIZES:
        body = b'"' + b"x" * (size - 2) + b'"'
        with Sandbox(own, name="own", limits=Limits(max_instances=1)) as sb:
            fn = sb.functions[0]
            ours = per_call_us(lambda sb=sb, fn=fn, body=body: sb.call_bytes(fn, body, validate=False), calls,
                               repeats)
        table.add_row("our ABI echo (reference)", f"{size} B", f"{ours:.2f}", "", "", "")
    Console().print(table)
    if not sdk:
        print("the Extism Python SDK is not installed (pip install extism): no Extism column")


if __name__ == "__main__":
    main()
