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
import statistics
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

from extism_sdk_side import ExtismLimits, build_reflect, extism_available, extism_plugin  # noqa: E402

from sandbus.host.sandbox import Limits, Sandbox  # noqa: E402
from tests.host.extism.guests import plugin  # noqa: E402

SIZES = (100, 10_000)


def per_call_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Best-of-``repeats`` mean per call (the min filters scheduler noise on a shared machine)."""
    for _ in range(min(calls, 2000)):
        fn()
    return min(_mean_us(fn, calls) for _ in range(repeats))


def _mean_us(fn: Callable[[], object], calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def alternating(sides: dict[str, Callable[[], object]], calls: int, rounds: int) -> dict[str, list[float]]:
    """Each side's mean per call in every round, the sides measured one after another within a round: a
    ratio taken per round compares the two under the same load of the machine."""
    for fn in sides.values():
        for _ in range(min(calls, 2000)):
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            times[name].append(_mean_us(fn, calls))
    return times


def _ratio(ours: list[float], theirs: list[float]) -> str:
    ratios = sorted(a / b for a, b in zip(ours, theirs, strict=True))
    return f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    args = parser.parse_args()
    calls, rounds = (2000, 3) if args.quick else (20_000, 7)
    guests: list[tuple[str, bytes, str]] = [("WAT echo", plugin(), "echo"), ("WAT copy echo", plugin(), "copy_echo")]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            guests.append(("AS-PDK echo", build_reflect(Path(tmp)).read_bytes(), "reflect"))
        except Exception as e:  # no node/npm here: the WAT rows still compare the same ABI
            print(f"(AS-PDK echo skipped: {type(e).__name__}: {e})")
    own = bytes(wasmtime.wat2wasm((ROOT / "tests" / "host" / "wat" / "mini_echo.wat").read_text()))
    sdk = extism_available()

    table = Table(title=f"Extism plugin per-call time, us (best of {rounds} alternating rounds x {calls} calls; "
                        "ratios: median of the per-round ratios, and their range)")
    for col in ("plugin", "input", "sandbus", "sandbus, fuel off", "Extism SDK", "sandbus / Extism",
                "Extism SDK, sandbus' limits", "sandbus / that"):
        table.add_column(col, justify="right" if col != "plugin" else "left")
    for label, wasm, function in guests:
        for size in SIZES:
            data = bytes(i % 251 for i in range(size))
            with Sandbox(wasm, name="bench", limits=Limits(max_instances=1)) as metered, \
                    Sandbox(wasm, name="bench", limits=Limits(max_instances=1, fuel=None)) as unmetered:
                assert metered.call_bytes(function, data) == data
                sides: dict[str, Callable[[], object]] = {
                    "ours": lambda sb=metered, f=function, d=data: sb.call_bytes(f, d, validate=False),
                    "unmetered": lambda sb=unmetered, f=function, d=data: sb.call_bytes(f, d, validate=False)}
                if sdk:
                    plain, limited = extism_plugin(wasm), extism_plugin(wasm, limits=ExtismLimits())
                    assert plain.call(function, data) == data
                    assert limited.call(function, data) == data
                    sides["extism"] = lambda p=plain, f=function, d=data: p.call(f, d)
                    sides["limited"] = lambda p=limited, f=function, d=data: p.call(f, d)
                t = alternating(sides, calls, rounds)
            row = [label, f"{size} B", f"{min(t['ours']):.2f}", f"{min(t['unmetered']):.2f}"]
            if sdk:
                row += [f"{min(t['extism']):.2f}", _ratio(t["ours"], t["extism"]), f"{min(t['limited']):.2f}",
                        _ratio(t["ours"], t["limited"])]
            else:
                row += ["-", "-", "-", "-"]
            table.add_row(*row)
    for size in SIZES:
        body = b'"' + b"x" * (size - 2) + b'"'
        with Sandbox(own, name="own", limits=Limits(max_instances=1)) as sb:
            fn = sb.functions[0]
            ours = per_call_us(lambda sb=sb, fn=fn, body=body: sb.call_bytes(fn, body, validate=False), calls,
                               rounds)
        table.add_row("our ABI echo (reference)", f"{size} B", f"{ours:.2f}", "", "", "", "", "")
    Console(width=200).print(table)
    print("target: sandbus / Extism <= 0.5x. Extism's limits column: the same plugin under a fuel budget of 10^9, "
          "a 5 s timeout and 64 MiB, as sandbus runs it by default.")
    if not sdk:
        print("the Extism Python SDK is not installed (pip install extism): no Extism column")


if __name__ == "__main__":
    main()
