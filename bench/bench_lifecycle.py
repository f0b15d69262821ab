"""Plugin lifecycle numbers: hot reload under load, loading 100 plugins from a warm cache, RSS per idle plugin.

* hot reload: a client thread calls the plugin in a loop while the .wasm is replaced (``os.replace``,
  what deploy tools and editors do) N times; for each, the time from the file landing to the first
  reply from the new version, and every failed call. The watcher runs with its default 100 ms
  debounce, which is most of the latency by design.
* 100 plugins: 100 distinct modules (copies of text_processor with a custom section naming the copy,
  so every one has its own digest and compiled code) loaded by a fresh manager: cold (compiling),
  warm from disk (a restart: a new process's cache over the same directory), warm from memory.
* RSS: a child process measures its resident set before and after loading N distinct copies of a
  small plugin (echo, and text_processor) and divides; the 1,000-plugin figure is that slope times
  1,000 -- an extrapolation, not a measurement.

* warm load of a large guest (the componentize-py py_echo, ~19 MB): a plugin loaded by a manager's loader
  whose module cache already holds the compiled code, as on a restart (a fresh memory layer over the disk
  cache), step by step: reading the file, hashing it, scanning its headers, deserializing the compiled code,
  the rest (instantiate, init, health; the component's checked exports and imports come from the cache).
  Measured with the digest memo missing (the file is read and hashed once) and hitting (neither), side by
  side, each the median of N. With ``--before TREE`` (a checkout
  of an earlier version: ``git archive <rev> | tar -x -C TREE``), the same manager load runs in child
  processes on both trees, alternating, three rounds: before / after side by side.

    python bench/bench_lifecycle.py [--quick] [--reloads N] [--plugins N] [--rss-count N] [--warm-only]
                                    [--before TREE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import wasmtime
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbus.host.lifecycle import PluginManager  # noqa: E402
from sandbus.host.sandbox import ModuleCache  # noqa: E402

PLUGINS = ROOT / "plugins" / "build"
MIB = 1024 * 1024

REPLY_WAT = """
(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (data (i32.const 16) "{reply}")
  (func (export "sandbus_abi_version") (result i32) (i32.const 1))
  (func (export "sandbus_alloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "sandbus_dealloc") (param i32 i32) (global.set $heap (i32.const 1024)))
  (func (export "handle_request") (param i32 i32) (result i64) (i64.const {packed}))
)
"""


def reply_module(version: int) -> bytes:
    """A plugin answering ``{"v":<version>}``: the client can tell versions apart."""
    reply = json.dumps({"v": version}, separators=(",", ":"))
    escaped = reply.replace('"', '\\"')
    return bytes(wasmtime.wat2wasm(REPLY_WAT.format(reply=escaped, packed=(16 << 32) | len(reply))))


def with_custom_section(wasm: bytes, tag: str) -> bytes:
    """The same module with a custom section appended: same behaviour, its own digest."""
    name = b"copy"
    body = bytes([len(name)]) + name + tag.encode()
    size, out = len(body), bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        out.append(byte | (0x80 if size else 0))
        if not size:
            break
    return wasm + b"\x00" + bytes(out) + body


def manifest(name: str, version: str = "1.0.0") -> str:
    return f'[plugin]\nname = "{name}"\nversion = "{version}"\n'


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- hot reload ------------------------------------------------------------------------------------

def bench_hot_reload(workdir: Path, reloads: int) -> dict[str, float]:
    plugin_dir = workdir / "reload"
    plugin_dir.mkdir()
    (plugin_dir / "svc.toml").write_text(manifest("svc"))
    (plugin_dir / "svc.wasm").write_bytes(reply_module(0))
    replies: list[tuple[float, int]] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    with PluginManager(plugin_dir, cache=ModuleCache(workdir / "cache-reload")) as manager:
        manager.discover_and_load()
        manager.watch()  # the shipped defaults: 100 ms debounce

        def client() -> None:
            while not stop.is_set():
                try:
                    v = manager.execute_json("svc", "handle_request", {})["v"]
                    replies.append((time.perf_counter(), v))
                except BaseException as e:
                    failures.append(e)

        thread = threading.Thread(target=client, name="client")
        thread.start()
        latencies: list[float] = []
        try:
            for version in range(1, reloads + 1):
                wasm = reply_module(version)
                tmp = plugin_dir / ".svc.wasm.tmp"
                tmp.write_bytes(wasm)
                idx = len(replies)
                os.replace(tmp, plugin_dir / "svc.wasm")
                landed = time.perf_counter()
                answered: float | None = None
                while answered is None:
                    n = len(replies)
                    answered = next((t for t, v in replies[idx:n] if v == version), None)
                    idx = n
                    if answered is None:
                        if time.perf_counter() > landed + 10:
                            raise RuntimeError(f"version {version} never answered")
                        time.sleep(0.001)
                latencies.append((answered - landed) * 1000)
                time.sleep(0.05)  # let the client settle on the new version
        finally:
            stop.set()
            thread.join()
    latencies.sort()
    return {
        "median_ms": statistics.median(latencies),
        "p90_ms": latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))],
        "max_ms": latencies[-1],
        "reloads": float(reloads),
        "calls": float(len(replies)),
        "failed": float(len(failures)),
    }


# -- 100 plugins -----------------------------------------------------------------------------------

def bench_many(workdir: Path, count: int) -> dict[str, float]:
    plugin_dir = workdir / "many"
    plugin_dir.mkdir()
    base = (PLUGINS / "text_processor.wasm").read_bytes()
    for i in range(count):
        name = f"tp{i:04d}"
        (plugin_dir / f"{name}.toml").write_text(manifest(name))
        (plugin_dir / f"{name}.wasm").write_bytes(with_custom_section(base, name))
    cache_dir = workdir / "cache-many"
    out: dict[str, float] = {}

    def load(cache: ModuleCache, label: str) -> None:
        gc.collect()
        start = time.perf_counter()
        manager = PluginManager(plugin_dir, cache=cache)
        report = manager.discover_and_load()
        out[label] = time.perf_counter() - start
        assert len(report.loaded) == count, report.failed
        manager.execute_json("tp0000", "handle_request", {"action": "get_status"})
        manager.close()

    load(ModuleCache(cache_dir), "cold_s")  # compiles everything, fills the disk cache
    load(ModuleCache(cache_dir), "warm_disk_s")  # a restart: deserialise from disk
    warm = ModuleCache(cache_dir)
    load(warm, "warm_disk_again_s")
    load(warm, "warm_memory_s")  # same process, same cache object
    out["count"] = float(count)
    out["wasm_kib"] = len(base) / 1024
    return out


# -- RSS -------------------------------------------------------------------------------------------

def rss_child(plugin: str, count: int, workdir: Path) -> None:
    """Runs in a fresh process: print JSON with RSS before/after loading ``count`` copies of ``plugin``."""
    plugin_dir = workdir / f"rss-{plugin}"
    plugin_dir.mkdir(parents=True)
    base = (PLUGINS / f"{plugin}.wasm").read_bytes()
    for i in range(count):
        name = f"p{i:04d}"
        (plugin_dir / f"{name}.toml").write_text(manifest(name))
        (plugin_dir / f"{name}.wasm").write_bytes(with_custom_section(base, name))
    cache = ModuleCache(workdir / f"cache-rss-{plugin}")
    # Warm everything that is paid once per process (engine, imports, first compile) outside the sample.
    warmup_dir = workdir / f"rss-warmup-{plugin}"
    warmup_dir.mkdir()
    (warmup_dir / "w.toml").write_text(manifest("w"))
    (warmup_dir / "w.wasm").write_bytes(base)
    warmup = PluginManager(warmup_dir, cache=cache)
    warmup.discover_and_load()
    # Fill the disk cache for the copies, as a restarted node would find it.
    filler = PluginManager(plugin_dir, cache=cache, max_plugins=count)
    filler.discover_and_load()
    filler.close()
    cache = ModuleCache(workdir / f"cache-rss-{plugin}")
    gc.collect()
    before = rss_bytes()
    manager = PluginManager(plugin_dir, cache=cache, max_plugins=count)
    report = manager.discover_and_load()
    assert len(report.loaded) == count, report.failed
    gc.collect()
    after = rss_bytes()
    request = {"action": "get_status"} if plugin == "text_processor" else {"hello": "world"}
    for name in manager.names():
        manager.execute_json(name, "handle_request", request)
    gc.collect()
    after_call = rss_bytes()
    print(json.dumps({"plugin": plugin, "count": count, "before": before, "after": after,
                      "after_call": after_call, "wasm_bytes": len(base)}))


def bench_rss(workdir: Path, runs: list[tuple[str, int]]) -> list[dict[str, float | str]]:
    rows: list[dict[str, float | str]] = []
    for plugin, count in runs:
        child = subprocess.run([sys.executable, __file__, "--rss-child", plugin, "--rss-count", str(count),
                                "--workdir", str(workdir / f"{plugin}-{count}")],
                               capture_output=True, text=True, check=True)
        data = json.loads(child.stdout.strip().splitlines()[-1])
        per = (data["after"] - data["before"]) / count
        per_call = (data["after_call"] - data["before"]) / count
        rows.append({"plugin": plugin, "count": count, "per_plugin": per, "per_plugin_called": per_call,
                     "wasm_bytes": data["wasm_bytes"], "total_mib": (data["after"] - data["before"]) / MIB,
                     "per_1000_mib": per * 1000 / MIB, "per_1000_called_mib": per_call * 1000 / MIB})
    return rows


def bench_warm_load(work: Path, runs: int, plugin: str = "py_echo") -> dict[str, float]:
    """Milliseconds per step of a warm load of ``plugin`` (median of ``runs``); see the module docstring."""
    import hashlib

    from wasmtime.component import Component

    from sandbus.host.lifecycle.loader import build_version, parse_files, read_plugin_files
    from sandbus.host.lifecycle.manifest import read_capped
    from sandbus.host.lifecycle.policy import Policy, resolve
    from sandbus.host.sandbox import Auditor
    from sandbus.host.sandbox.compiler import check_bounds
    from sandbus.host.sandbox.engine import get_engine
    from sandbus.host.sandbox.filememo import RACY_S

    directory = work / "warm-plugins"
    directory.mkdir()
    for suffix in (".wasm", ".toml"):
        src = PLUGINS / f"{plugin}{suffix}"
        (directory / src.name).write_bytes(src.read_bytes())
        os.utime(directory / src.name, ns=(0, 0))  # mtime far in the past; ctime is now (see the memo's rule)
    cache_dir = work / "warm-cache"

    def manager_load(memo: bool) -> tuple[float, bool]:
        cache = ModuleCache(cache_dir, memo=memo)
        t = time.perf_counter()
        files = read_plugin_files(directory, plugin, memo=cache.memo)
        manifest = parse_files(files)
        grant = resolve(manifest, Policy.default(), data_root=work / "data", host_env={})
        version = build_version(files, manifest, grant, auditor=Auditor(), cache=cache)
        ms = (time.perf_counter() - t) * 1000
        read = files.module is not None and files.module.data is not None
        version.sandbox.close()
        return ms, read

    manager_load(False)  # compile once (seconds): every run below is warm
    # A file is memoised once it is older than the racy window (the copy above is new): wait for that.
    deadline = time.monotonic() + 30
    while time.time_ns() - os.stat(directory / f"{plugin}.wasm").st_ctime_ns < (RACY_S + 0.1) * 1e9:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    manager_load(True)  # records the memo entry
    wasm_path = directory / f"{plugin}.wasm"
    wasm = read_capped(wasm_path, 64 * MIB)[0]
    digest = hashlib.sha256(wasm).hexdigest()
    handle = get_engine(512 * 1024, fuel=True)

    def step(fn: Any) -> float:
        samples = []
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1000)
        return statistics.median(samples)

    limits_bytes = 64 * MIB
    entry = next(cache_dir.glob(f"{digest}-*.component.cwasm"))
    from sandbus.host.sandbox import Limits

    out = {
        "read_ms": step(lambda: read_capped(wasm_path, limits_bytes)),
        "sha256_ms": step(lambda: hashlib.sha256(wasm).hexdigest()),
        "scan_ms": step(lambda: check_bounds(wasm, Limits(max_module_bytes=limits_bytes), plugin)),
        "deserialize_ms": step(lambda: Component.deserialize_file(handle.engine, str(entry))),
    }
    misses, hits = [], []
    for _ in range(runs):  # interleaved, so both see the same machine
        ms, read = manager_load(False)
        assert read
        misses.append(ms)
        ms, read = manager_load(True)
        assert not read, "the memo did not hit"
        hits.append(ms)
    out["load_miss_ms"] = statistics.median(misses)
    out["load_hit_ms"] = statistics.median(hits)
    out["wasm_mib"] = len(wasm) / MIB
    out["directory"], out["cache_dir"] = str(directory), str(cache_dir)  # type: ignore[assignment]
    return out


#: One process's warm manager loads (read the plugin's files, then build its version), on whatever tree
#: ``sys.path`` starts with: milliseconds as a JSON list.
_WARM_CHILD = """
import inspect, json, sys, time
from pathlib import Path
from sandbus.host.lifecycle.loader import build_version, parse_files, read_plugin_files
from sandbus.host.lifecycle.policy import Policy, resolve
from sandbus.host.sandbox import Auditor, ModuleCache
directory, plugin, cache_dir, runs, data = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), \
    Path(sys.argv[5])
memo = "memo" in inspect.signature(read_plugin_files).parameters
out = []
for i in range(runs + 1):
    cache = ModuleCache(cache_dir)
    t = time.perf_counter()
    files = read_plugin_files(directory, plugin, **({"memo": cache.memo} if memo else {}))
    manifest = parse_files(files)
    grant = resolve(manifest, Policy.default(), data_root=data, host_env={})
    version = build_version(files, manifest, grant, auditor=Auditor(), cache=cache)
    ms = (time.perf_counter() - t) * 1000
    version.sandbox.close()
    if i:  # the first warms the process (imports, engine)
        out.append(ms)
print(json.dumps(out))
"""


def bench_before_after(work: Path, warm: dict[str, Any], before: Path, runs: int) -> list[tuple[float, float]]:
    """(before, after) median ms of a warm manager load per round, each tree in its own child process."""
    rounds = []
    for _ in range(3):
        medians = []
        for tree in (before, ROOT):
            env = {**os.environ, "PYTHONPATH": str(tree)}
            done = subprocess.run([sys.executable, "-c", _WARM_CHILD, warm["directory"], "py_echo", warm["cache_dir"],
                                   str(runs), str(work / "data")], env=env, cwd=tree, capture_output=True,
                                  text=True, check=True)
            medians.append(statistics.median(json.loads(done.stdout)))
        rounds.append((medians[0], medians[1]))
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer reloads and plugins")
    parser.add_argument("--reloads", type=int, default=30)
    parser.add_argument("--plugins", type=int, default=100)
    parser.add_argument("--rss-count", type=int, default=200)
    parser.add_argument("--rss-measured", type=int, default=1000, help="echo copies for the direct RSS run")
    parser.add_argument("--warm-only", action="store_true", help="only the warm load of the large guest")
    parser.add_argument("--warm-runs", type=int, default=15)
    parser.add_argument("--before", type=Path, help="a checkout of an earlier version to compare the warm load with")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.rss_count, args.workdir)
        return
    if args.quick:
        args.reloads, args.rss_count, args.rss_measured = 10, 100, 300
    console = Console(width=max(130, Console().width))
    with tempfile.TemporaryDirectory(prefix="sandbus-bench-") as tmp:
        work = Path(tmp)
        os.environ["SANDBUS_CACHE_DIR"] = str(work / "shared-cache")
        warm = bench_warm_load(work, 5 if args.quick else args.warm_runs) if (PLUGINS / "py_echo.wasm").exists() \
            else None
        if warm is not None:
            print_warm(console, warm)
            if args.before is not None:
                print_before_after(console, bench_before_after(work, warm, args.before.resolve(), args.warm_runs))
        if args.warm_only:
            return
        reload_stats = bench_hot_reload(work, args.reloads)
        many = bench_many(work, args.plugins)
        rss = bench_rss(work, [("echo", args.rss_count), ("text_processor", args.rss_count),
                               ("echo", args.rss_measured)])

    table = Table(title="plugin lifecycle", title_justify="left")
    for col in ("measure", "result", "target"):
        table.add_column(col)
    verdict = "ok" if reload_stats["median_ms"] <= 250 and reload_stats["failed"] == 0 else "MISSED"
    table.add_row(f"hot reload, file landed -> new version answers ({int(reload_stats['reloads'])} os.replace)",
                  f"median {reload_stats['median_ms']:.0f} ms, p90 {reload_stats['p90_ms']:.0f} ms, "
                  f"max {reload_stats['max_ms']:.0f} ms", f"<= 250 ms median ({verdict})")
    table.add_row("failed calls during the reloads",
                  f"{int(reload_stats['failed'])} of {int(reload_stats['calls']):,}", "0")
    count = int(many["count"])
    verdict = "ok" if many["warm_disk_s"] <= 1.0 else "MISSED"
    table.add_row(f"load {count} plugins ({many['wasm_kib']:.0f} KiB C module each), cold cache (compile)",
                  f"{many['cold_s'] * 1000:.0f} ms", "")
    table.add_row(f"load {count} plugins, warm disk cache (a restart)",
                  f"{many['warm_disk_s'] * 1000:.0f} ms (again: {many['warm_disk_again_s'] * 1000:.0f} ms)",
                  f"<= 1 s ({verdict})")
    table.add_row(f"load {count} plugins, warm in-memory cache (same process)",
                  f"{many['warm_memory_s'] * 1000:.0f} ms", "")
    for row in rss:
        n = int(row["count"])
        measured = n >= 1000
        verdict = "ok" if float(row["per_1000_mib"]) <= 1024 else "MISSED"
        thousand = (f"{n:,} measured: {float(row['total_mib']):.0f} MiB" if measured
                    else f"1,000 extrapolated: {float(row['per_1000_mib']):.0f} MiB")
        table.add_row(
            f"RSS per idle plugin: {row['plugin']} ({int(row['wasm_bytes']):,} B wasm), {n:,} loaded",
            f"{float(row['per_plugin']) / 1024:.0f} KiB each; {thousand}; after one call each: "
            f"{float(row['per_plugin_called']) / 1024:.0f} KiB each",
            f"1,000 < 1 GiB ({verdict})")
    console.print(table)
    console.print("RSS rows under 1,000 plugins extrapolate linearly from the measured slope (RSS after minus "
                  "before loading, in a fresh process whose engine and disk cache were already warm).")


def print_warm(console: Console, warm: dict[str, float]) -> None:
    table = Table(title=f"warm load of py_echo ({warm['wasm_mib']:.1f} MiB component), compiled code on disk; "
                        "median ms", title_justify="left")
    for col in ("step / load", "ms", "target"):
        table.add_column(col)
    table.add_row("read the file (read_capped)", f"{warm['read_ms']:.2f}", "")
    table.add_row("sha256 of the bytes", f"{warm['sha256_ms']:.2f}", "")
    table.add_row("bounds: header scan (check_bounds)", f"{warm['scan_ms']:.2f}", "")
    table.add_row("deserialize the compiled component (from its file)", f"{warm['deserialize_ms']:.2f}", "")
    table.add_row("load, memo miss: read + hash once + scan + deserialize + instantiate + init + health",
                  f"{warm['load_miss_ms']:.2f}", "")
    verdict = "ok" if warm["load_hit_ms"] <= 10 else "MISSED"
    table.add_row("load, memo hit: no read, no hash, no scan; deserialize + instantiate + init + health",
                  f"{warm['load_hit_ms']:.2f}", f"<= 10 ms ({verdict})")
    console.print(table)


def print_before_after(console: Console, rounds: list[tuple[float, float]]) -> None:
    table = Table(title="warm load of py_echo through the manager's loader (read files + build version), "
                        "before / after, median ms per round", title_justify="left")
    for col in ("round", "before", "after", "after / before"):
        table.add_column(col)
    for i, (before, after) in enumerate(rounds, 1):
        table.add_row(str(i), f"{before:.2f}", f"{after:.2f}", f"{after / before:.2f}")
    befores, afters = [r[0] for r in rounds], [r[1] for r in rounds]
    verdict = "ok" if max(afters) <= 10 else "MISSED"
    table.add_row("range", f"{min(befores):.2f}-{max(befores):.2f}", f"{min(afters):.2f}-{max(afters):.2f}",
                  f"target after <= 10 ms ({verdict})")
    console.print(table)


if __name__ == "__main__":
    main()
