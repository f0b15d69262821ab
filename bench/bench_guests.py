"""Guest languages side by side: the echo plugin of each guest SDK, through the same Sandbox.

One table: wasm size; cold load (compile + instantiate + init, empty module cache); warm load (a fresh
process in effect: an empty memory layer over the disk cache the cold load filled, so deserialize +
instantiate + init); per-call time of an echo of a ~100 B JSON request through the pooled sandbox. For a
component, the per-call time is measured side by side in two sandboxes of the same plugin: one calling through
host/sandbox/_component.c (what a sandbox uses when it is built: the call, and the host interface's log), one
through wasmtime-py's component API (the fallback); the target is at most 30 µs per Python echo call.

    python bench/bench_guests.py [--quick]

Run `plugins/build.sh` first (`make plugins`); a plugin that was not built (no node, no componentize-py) is
listed as missing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_sandbox import per_call_us  # noqa: E402 - same measurement as the sandbox table

from sandbus.host.sandbox import ModuleCache, Sandbox  # noqa: E402
from sandbus.host.sandbox import component as component_mod  # noqa: E402
from sandbus.host.sandbox.component import component_native_available  # noqa: E402

PLUGINS = ROOT / "plugins" / "build"
REQUEST = b'{"action":"process_data","data":{"input":"' + b"x" * 55 + b'"}}'  # 100 bytes
#: Per call, through the pooled sandbox, of the Python component's echo.
TARGET_PY_ECHO_US = 30.0

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


@contextlib.contextmanager
def wasmtime_py_components() -> Iterator[None]:
    """Component instances built inside use wasmtime-py's API, as on a host without _component.c."""
    saved = component_mod._native
    component_mod._native = None
    try:
        yield
    finally:
        component_mod._native = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer iterations (CI smoke run)")
    args = ap.parse_args()
    n, repeats, warm_runs = (500, 3, 3) if args.quick else (5000, 5, 7)
    console = Console(width=160)
    table = Table(title=f"guest SDKs: load and call ({len(REQUEST)} B request; per call: best of "
                        f"{repeats} × {n} calls; warm load: median of {warm_runs})")
    for col in ("guest", "plugin", "function", "kind", "wasm size", "cold load ms", "warm load ms",
                "per call µs", "per call µs, wasmtime-py API"):
        table.add_column(col, justify="right")
    loads: dict[str, tuple[float, float]] = {}
    py_echo: tuple[float, float] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for label, plugin, function in GUESTS:
            path = PLUGINS / f"{plugin}.wasm"
            if not path.exists():
                table.add_row(label, plugin, function, "-", "missing", "-", "-", "-", "-")
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
                call = functools.partial(sb.call_bytes, function, REQUEST)
                call()
                t_call = per_call_us(call, n, repeats)
                t_api = "-"
                if sb.kind == "component":
                    with wasmtime_py_components():
                        plain = Sandbox(wasm, name=plugin, cache=ModuleCache(directory))
                    with plain:
                        plain_call = functools.partial(plain.call_bytes, function, REQUEST)
                        plain_call()
                        t_plain = per_call_us(plain_call, n, repeats)
                    t_call = min(t_call, per_call_us(call, n, repeats))  # again, after: side by side
                    t_api = f"{t_plain:,.1f}"
                    if function == "echo":
                        py_echo = (t_call, t_plain)
            table.add_row(label, plugin, function, kind, f"{len(wasm):,} B", f"{cold:,.1f}", f"{warm:,.2f}",
                          f"{t_call:,.1f}", t_api)
    console.print(table)
    console.print("cold load = compile + instantiate + init; warm load = the module cache's disk layer "
                  "(deserialize) + instantiate + init. Core modules are called through the fast path; components "
                  "through host/sandbox/_component.c" + ("" if component_native_available() else
                                                          " (NOT BUILT here: wasmtime-py's API)") +
                  ", and for comparison through wasmtime-py's component API (values lifted and lowered in Python).")
    if py_echo is not None:
        native_us, api_us = py_echo
        verdict = "met" if native_us <= TARGET_PY_ECHO_US else "MISSED"
        console.print(f"target: Python component echo ≤ {TARGET_PY_ECHO_US:g} µs per call: {native_us:,.1f} µs "
                      f"({verdict}); through wasmtime-py's API {api_us:,.1f} µs ({api_us / native_us:.1f}×)")


if __name__ == "__main__":
    main()
