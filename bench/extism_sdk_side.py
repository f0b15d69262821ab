"""The Extism side of the Extism benchmark: per-call time of one plugin function in the Extism Python SDK
(``extism`` on PyPI, its own wasmtime inside extism-sys), measured the way bench_extism.py measures sandbus, so
the two columns compare the same work: one ``Plugin.call`` with the input, the output copied out as bytes.

Use it from bench_extism.py::

    from extism_sdk_side import ExtismTiming, extism_available, measure_extism

    if extism_available():
        t = measure_extism(wasm_path, "reflect", 100)        # ExtismTiming(min_us=..., median_us=...)

or alone (prints the AS-PDK echo, tests/extism/guests/reflect.ts, at 100 B and 10 KB)::

    python bench/extism_sdk_side.py [--wasm PATH --function NAME] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REFLECT_SOURCE = ROOT / "tests" / "extism" / "guests" / "reflect.ts"

__all__ = ["ExtismLimits", "ExtismTiming", "build_reflect", "extism_available", "extism_plugin", "measure_extism"]


@dataclass(frozen=True)
class ExtismTiming:
    """Microseconds per call: the best and the median of the repeats (each repeat a mean over ``calls``)."""

    function: str
    size: int
    calls: int
    repeats: int
    min_us: float
    median_us: float


def extism_available() -> bool:
    """Whether the Extism Python SDK imports here (it is in the dev extra)."""
    try:
        import extism  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class ExtismLimits:
    """What sandbus enforces by default, as Extism's host can enforce it: a fuel budget per call
    (``extism_compiled_plugin_new_with_fuel_limit``, which the Python SDK does not wrap), a wall-clock
    timeout and a memory cap (its manifest's ``timeout_ms`` and ``memory.max_pages``)."""

    fuel: int = 1_000_000_000
    timeout_ms: int = 5_000
    max_pages: int = 1024


def extism_plugin(wasm_bytes: bytes, *, config: dict[str, str] | None = None,
                  limits: ExtismLimits | None = None) -> Any:
    """A warm ``extism.Plugin`` (no WASI, no host functions), under ``limits`` when given."""
    import extism

    if limits is None:
        return extism.Plugin(wasm_bytes, wasi=False, config=config, functions=[])
    from extism.extism import CompiledPlugin, _ffi, _lib, _wasm

    manifest = _wasm({"wasm": [{"data": wasm_bytes}], "timeout_ms": limits.timeout_ms,
                      "memory": {"max_pages": limits.max_pages}, **({"config": config} if config else {})})
    errmsg = _ffi.new("char**")
    compiled = CompiledPlugin.__new__(CompiledPlugin)
    compiled.functions = []
    compiled.pointer = _lib.extism_compiled_plugin_new_with_fuel_limit(manifest, len(manifest), _ffi.NULL, 0, False,
                                                                      limits.fuel, errmsg)
    if compiled.pointer == _ffi.NULL:
        raise RuntimeError(_ffi.string(errmsg[0]).decode())
    plugin = extism.Plugin(compiled)
    plugin._owns_compiled_plugin = True  # freed with the plugin
    return plugin


def measure_extism(wasm: Path | bytes, function: str, size: int, *, calls: int = 20_000, repeats: int = 7,
                   data: bytes | None = None, config: dict[str, str] | None = None,
                   limits: ExtismLimits | None = None) -> ExtismTiming:
    """Per-call time of ``function`` with a ``size``-byte input (``data`` if given) on one warm Extism plugin.

    The plugin is created once (no WASI, no host functions; under ``limits`` when given); a warm-up of
    ``min(calls, 2000)`` calls precedes the timed repeats.
    """
    wasm_bytes = wasm.read_bytes() if isinstance(wasm, Path) else wasm
    payload = data if data is not None else bytes(i % 251 for i in range(size))
    plugin: Any = extism_plugin(wasm_bytes, config=config, limits=limits)
    call = plugin.call
    for _ in range(min(calls, 2000)):
        call(function, payload)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            call(function, payload)
        runs.append((time.perf_counter() - t) / calls * 1e6)
    del plugin
    return ExtismTiming(function=function, size=len(payload), calls=calls, repeats=repeats, min_us=min(runs),
                        median_us=statistics.median(runs))


def build_reflect(out_dir: Path) -> Path:
    """The AS-PDK echo (tests/extism/guests/reflect.ts) compiled with the tests' pinned PDK and compiler (run
    the tests once, or ``npm ci`` in tests/extism, to install them)."""
    asc = ROOT / "tests" / "extism" / "node_modules" / ".bin" / "asc"
    if not asc.exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=asc.parents[2], check=True)
    out = out_dir / "reflect.wasm"
    # asc finds @extism/as-pdk in the node_modules of the directory it runs in.
    subprocess.run([str(asc), REFLECT_SOURCE.relative_to(asc.parents[2]).as_posix(), "-o", str(out), "-O3",
                    "--use", "abort="], cwd=asc.parents[2], check=True, capture_output=True, timeout=300)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--wasm", type=Path, help="an Extism plugin (default: the AS-PDK echo, built here)")
    parser.add_argument("--function", default="reflect")
    parser.add_argument("--quick", action="store_true", help="fewer calls and repeats")
    args = parser.parse_args()
    if not extism_available():
        sys.exit("the Extism Python SDK is not installed: pip install extism (it is in the dev extra)")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        wasm = args.wasm or build_reflect(Path(tmp))
        calls, repeats = (2000, 3) if args.quick else (20_000, 7)
        for size in (100, 10_000):
            t = measure_extism(wasm, args.function, size, calls=calls, repeats=repeats)
            print(f"extism {t.function} {t.size:>6} B: min {t.min_us:7.2f} us  median {t.median_us:7.2f} us")


if __name__ == "__main__":
    main()
