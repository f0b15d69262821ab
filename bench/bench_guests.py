"""Guest languages side by side: the echo plugin of each guest SDK, through the same Sandbox.

One table: wasm size; cold load (compile + instantiate + init, empty module cache); warm load (a fresh
process in effect: an empty memory layer over the disk cache the cold load filled, so deserialize +
instantiate + init); per-call time of an echo of a ~100 B JSON request through the pooled sandbox.

    python bench/bench_guests.py [--quick]

Run `plugins/build.sh` first (`make plugins`); a plugin that was not built (no node, no componentize-py) is
listed as missing.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_sandbox import per_call_us  # noqa: E402 - same measurement as the sandbox table

from sandbus.host.sandbox import ModuleCache, Sandbox  # noqa: E402

PLUGINS = ROOT / "plugins" / "build"
REQUEST = b'{"action":"process_data","data":{"input":"' + b"x" * 55 + b'"}}'  # 100 bytes

#: (label, plugin, function): each one answers with its input, or (text_processor) with its "data".
GUESTS = (
    ("WAT (hand-written)", "echo", "handle_request"),
    ("C (sandbus.h)", "text_processor", "handle_request"),
    ("AssemblyScript (@sandbus/guest)", "as_echo", "echo"),
    ("AssemblyScript, envelope", "as_echo", "handle_request"),
    ("Python component (componentize-py)", "py_echo", "echo"),
    ("Python component, envelope", "py_echo", "handle_request"),
)


def load_ms(wasm: bytes, name: str, directory: Path) -> float:
    """Milliseconds to a ready Sandbox (first instance created and initialised) with a fresh memory layer."""
    cache = ModuleCache(directory)
    t = time.perf_counter()
    sb = Sandbox(wasm, name=name, cache=cache)
    ms = (time.perf_counter() - t) * 1000
    sb.close()
    return ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer iterations (CI smoke run)")
    args = ap.parse_args()
    n, repeats, warm_runs = (500, 3, 3) if args.quick else (5000, 5, 7)
    console = Console(width=160)
    table = Table(title=f"guest SDKs: load and call ({len(REQUEST)} B request; per call: best of "
                        f"{repeats} × {n} calls; warm load: median of {warm_runs})")
    for col in ("guest", "plugin", "function", "kind", "wasm size", "cold load ms", "warm load ms",
                "per call µs"):
        table.add_column(col, justify="right")
    loads: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, plugin, function in GUESTS:
            path = PLUGINS / f"{plugin}.wasm"
            if not path.exists():
                table.add_row(label, plugin, function, "-", "missing", "-", "-", "-")
                continue
            wasm = path.read_bytes()
            directory = Path(tmp) / plugin
            if plugin not in loads:
                cold = load_ms(wasm, plugin, directory)
                warm = statistics.median(load_ms(wasm, plugin, directory) for _ in range(warm_runs))
                loads[plugin] = (cold, warm)
            cold, warm = loads[plugin]
            with Sandbox(wasm, name=plugin, cache=ModuleCache(directory)) as sb:
                kind = "component" if sb.kind == "component" else "core module"
                sb.call_bytes(function, REQUEST)
                t_call = per_call_us(functools.partial(sb.call_bytes, function, REQUEST), n, repeats)
            table.add_row(label, plugin, function, kind, f"{len(wasm):,} B", f"{cold:,.1f}", f"{warm:,.2f}",
                          f"{t_call:,.1f}")
    console.print(table)
    console.print("cold load = compile + instantiate + init; warm load = the module cache's disk layer "
                  "(deserialize) + instantiate + init. Components are called through wasmtime-py's component "
                  "API (values lifted and lowered per call); core modules through the fast path.")


if __name__ == "__main__":
    main()
