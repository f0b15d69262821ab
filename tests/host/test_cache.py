"""The compiled-module cache: disk hits across processes' worth of caches, damaged entries, privacy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandbus.host.sandbox import ModuleCache, Sandbox
from sandbus.host.sandbox.engine import get_engine


def test_second_cache_loads_from_disk_without_compiling(tmp_path: Path, plugins_dir: Path) -> None:
    wasm = (plugins_dir / "text_processor.wasm").read_bytes()
    first = ModuleCache(tmp_path / "c")
    Sandbox(wasm, name="tp", cache=first).close()
    assert (first.compiles, first.hits_disk) == (1, 0)
    assert len(list((tmp_path / "c").glob("*.cwasm"))) == 1
    second = ModuleCache(tmp_path / "c")
    with Sandbox(wasm, name="tp", cache=second) as sb:
        assert sb.call("handle_request", {"action": "get_status"})["success"] is True
    assert (second.compiles, second.hits_disk) == (0, 1)


def test_memory_layer_hits(tmp_path: Path, plugins_dir: Path) -> None:
    cache = ModuleCache(tmp_path / "c")
    wasm = (plugins_dir / "echo.wasm").read_bytes()
    handle = get_engine(512 * 1024)
    assert cache.load(handle, wasm) is cache.load(handle, wasm)
    assert (cache.compiles, cache.hits_memory) == (1, 1)


def test_damaged_entry_is_recompiled(tmp_path: Path, plugins_dir: Path) -> None:
    wasm = (plugins_dir / "echo.wasm").read_bytes()
    ModuleCache(tmp_path / "c").load(get_engine(512 * 1024), wasm)
    (entry,) = (tmp_path / "c").glob("*.cwasm")
    entry.write_bytes(b"garbage")
    cache = ModuleCache(tmp_path / "c")
    with Sandbox(wasm, name="echo", cache=cache) as sb:
        assert sb.call("handle_request", [1, 2]) == [1, 2]
    assert cache.compiles == 1


def test_cache_shared_between_processes(tmp_path: Path, plugins_dir: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from sandbus.host.sandbox import ModuleCache, Sandbox;"
        "c = ModuleCache(Path(sys.argv[1])); Sandbox(Path(sys.argv[2]), cache=c).close();"
        "print(c.compiles, c.hits_disk)"
    )
    args = [sys.executable, "-c", code, str(tmp_path / "c"), str(plugins_dir / "text_processor.wasm")]
    assert subprocess.run(args, check=True, capture_output=True, text=True).stdout.split() == ["1", "0"]
    assert subprocess.run(args, check=True, capture_output=True, text=True).stdout.split() == ["0", "1"]


def test_world_writable_cache_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(PermissionError, match="chmod 700"):
        ModuleCache(d)
