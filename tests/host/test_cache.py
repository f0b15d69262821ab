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


# -- the digest memo: a warm load neither hashes nor reads a module file whose identity it knows ----------


def _memo_cache(tmp_path: Path, racy_s: float = 0.05) -> ModuleCache:
    from sandbus.host.sandbox.filememo import FileMemo

    cache = ModuleCache(tmp_path / "c")
    cache.memo = FileMemo(cache.directory, racy_s=racy_s)  # a short racy window, waited for below
    return cache


def _aged(path: Path, seconds: float) -> None:
    """Wait (bounded) until ``path`` last changed more than ``seconds`` ago: only then is it memoised."""
    import time

    deadline = time.monotonic() + 10
    while time.time_ns() - os.stat(path).st_ctime_ns <= seconds * 1e9 + 2e7:
        assert time.monotonic() < deadline, "the file never aged"
        time.sleep(0.01)


def _reply_wasm(version: int) -> bytes:
    from tests.host.manager.factory import plugin_wasm

    return plugin_wasm(f"v{version}")  # same length for one-digit versions


def test_memo_hit_reads_nothing_and_the_load_uses_the_cache(tmp_path: Path) -> None:
    import hashlib

    from sandbus.host.lifecycle.loader import read_plugin_files

    pdir = tmp_path / "p"
    pdir.mkdir()
    wasm = _reply_wasm(1)
    (pdir / "x.wasm").write_bytes(wasm)
    cache = _memo_cache(tmp_path)
    assert cache.memo is not None
    _aged(pdir / "x.wasm", 0.05)
    first = read_plugin_files(pdir, "x", memo=cache.memo)
    assert first.module is not None
    assert first.module.data == wasm
    assert first.module.digest == hashlib.sha256(wasm).hexdigest()
    with Sandbox(first.module, name="x", cache=cache) as sb:
        assert sb.call("handle_request", {}) == {"reply": "v1"}
    again = read_plugin_files(pdir, "x", memo=cache.memo)
    assert again.module is not None
    assert again.module.data is None
    assert again.fingerprint == first.fingerprint
    restarted = _memo_cache(tmp_path)  # a new process: the memo is on disk beside the compiled code
    assert restarted.memo is not None
    cold = read_plugin_files(pdir, "x", memo=restarted.memo)
    assert cold.module is not None
    assert cold.module.data is None
    with Sandbox(cold.module, name="x", cache=restarted) as sb:
        assert sb.call("handle_request", {}) == {"reply": "v1"}
    assert (restarted.compiles, restarted.hits_disk) == (0, 1)


def test_memo_attack_file_rewritten_in_place_with_same_size_and_mtime(tmp_path: Path) -> None:
    """The attack: rewrite the module in place (same inode), same size, and put its old mtime back. The
    file's ctime moved (no user can set it), so the stale digest and compiled code are not reused."""
    import hashlib

    from sandbus.host.lifecycle.loader import read_plugin_files

    pdir = tmp_path / "p"
    pdir.mkdir()
    path = pdir / "x.wasm"
    old, new = _reply_wasm(1), _reply_wasm(2)
    assert len(old) == len(new)
    assert old != new
    path.write_bytes(old)
    cache = _memo_cache(tmp_path)
    assert cache.memo is not None
    _aged(path, 0.05)
    first = read_plugin_files(pdir, "x", memo=cache.memo)
    assert first.module is not None
    Sandbox(first.module, name="x", cache=cache).close()
    assert read_plugin_files(pdir, "x", memo=cache.memo).module.data is None  # type: ignore[union-attr]  # memoised
    before = os.stat(path)
    with open(path, "r+b") as f:  # in place: same inode, same size
        f.write(new)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    files = read_plugin_files(pdir, "x", memo=cache.memo)
    assert files.module is not None
    assert files.module.data == new
    assert files.module.digest == hashlib.sha256(new).hexdigest()
    with Sandbox(files.module, name="x", cache=cache) as sb:
        assert sb.call("handle_request", {}) == {"reply": "v2"}


def test_memo_skips_a_file_changed_too_recently(tmp_path: Path) -> None:
    """A file written within the racy window (the kernel's timestamps are coarse) is never memoised."""
    from sandbus.host.lifecycle.loader import read_plugin_files

    pdir = tmp_path / "p"
    pdir.mkdir()
    (pdir / "x.wasm").write_bytes(_reply_wasm(1))
    cache = _memo_cache(tmp_path, racy_s=3600)
    assert cache.memo is not None
    for _ in range(2):
        files = read_plugin_files(pdir, "x", memo=cache.memo)
        assert files.module is not None
        assert files.module.data is not None
    assert not list((tmp_path / "c").glob("*.id.json"))


def test_memo_hit_whose_file_changes_before_the_compile_is_refused(tmp_path: Path) -> None:
    """A memo hit defers the read to the compile; if the file changed meanwhile, the load fails (typed)
    instead of compiling bytes other than the digest's."""
    from sandbus.host.lifecycle.loader import read_plugin_files
    from sandbus.sdk.errors import SandboxError

    pdir = tmp_path / "p"
    pdir.mkdir()
    path = pdir / "x.wasm"
    path.write_bytes(_reply_wasm(1))
    cache = _memo_cache(tmp_path)
    assert cache.memo is not None
    _aged(path, 0.05)
    read_plugin_files(pdir, "x", memo=cache.memo)
    hit = read_plugin_files(pdir, "x", memo=cache.memo).module
    assert hit is not None
    assert hit.data is None
    with open(path, "r+b") as f:
        f.write(_reply_wasm(2))
    with pytest.raises(SandboxError, match="changed while it was loading"):
        Sandbox(hit, name="x", cache=ModuleCache(tmp_path / "empty"))  # nothing compiled: it must read



def test_memo_entry_proven_stale_is_dropped(tmp_path: Path) -> None:
    """A write through a shared writable mapping of the file changes its bytes without moving its ctime (the
    kernel stamps a mapped page once, when it first becomes writable): the memo's identity still matches.
    The load then reads the file, finds bytes other than the digest's and fails, as it must; but the entry
    stayed, so every later load failed the same way, for ever. It is dropped: the next load hashes again."""
    import hashlib
    import mmap

    from sandbus.host.lifecycle.loader import read_plugin_files
    from sandbus.sdk.errors import SandboxError

    pdir = tmp_path / "p"
    pdir.mkdir()
    path = pdir / "x.wasm"
    old, new = _reply_wasm(1), _reply_wasm(2)
    path.write_bytes(old)
    cache = _memo_cache(tmp_path)
    assert cache.memo is not None
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), len(old)) as mapped:
        mapped[:] = old  # every page of the file now mapped writable (and stamped, once)
        _aged(path, 0.05)
        assert read_plugin_files(pdir, "x", memo=cache.memo).module.data == old  # type: ignore[union-attr]
        identity = os.stat(path)
        mapped[:] = new
        if os.stat(path).st_ctime_ns != identity.st_ctime_ns:
            pytest.skip("this file system stamps every write through a mapping")
        hit = read_plugin_files(pdir, "x", memo=cache.memo).module
        assert hit is not None
        assert hit.data is None
        assert hit.digest == hashlib.sha256(old).hexdigest()
        with pytest.raises(SandboxError, match="changed while it was loading"):
            Sandbox(hit, name="x", cache=ModuleCache(tmp_path / "empty"))
        files = read_plugin_files(pdir, "x", memo=cache.memo)
        assert files.module is not None
        assert files.module.data == new
        assert files.module.digest == hashlib.sha256(new).hexdigest()
        restarted = _memo_cache(tmp_path)  # on disk too: the entry is now the bytes hashed last
        assert restarted.memo is not None
        cold = read_plugin_files(pdir, "x", memo=restarted.memo).module
        assert cold is not None
        assert cold.digest == hashlib.sha256(new).hexdigest()

def test_forged_memo_entry_is_ignored(tmp_path: Path) -> None:
    """An entry another user could have written (group-writable) is not trusted."""
    from sandbus.host.lifecycle.loader import read_plugin_files

    pdir = tmp_path / "p"
    pdir.mkdir()
    path = pdir / "x.wasm"
    path.write_bytes(_reply_wasm(1))
    cache = _memo_cache(tmp_path)
    assert cache.memo is not None
    _aged(path, 0.05)
    read_plugin_files(pdir, "x", memo=cache.memo)
    (entry,) = (tmp_path / "c").glob("*.id.json")
    entry.chmod(0o664)
    fresh = _memo_cache(tmp_path)
    assert fresh.memo is not None
    files = read_plugin_files(pdir, "x", memo=fresh.memo)
    assert files.module is not None
    assert files.module.data is not None


def test_component_info_is_kept_beside_the_compiled_code(tmp_path: Path, plugins_dir: Path) -> None:
    """A warm load takes the component's checked exports and imports from the cache; an entry written by other
    checking code (or damaged) is not used: the component is inspected again."""
    import hashlib
    import shutil

    import orjson

    from sandbus.host.sandbox import default_cache_dir

    if not (plugins_dir / "py_echo.wasm").exists():
        pytest.skip("py_echo was not built (componentize-py missing)")
    wasm = (plugins_dir / "py_echo.wasm").read_bytes()
    digest = hashlib.sha256(wasm).hexdigest()
    Sandbox(wasm, name="py_echo", cache=ModuleCache(default_cache_dir())).close()  # compiled once per session
    own = tmp_path / "c"
    ModuleCache(own)
    for entry in default_cache_dir().glob(f"{digest}-*.component.cwasm"):
        shutil.copy(entry, own / entry.name)
        (own / entry.name).chmod(0o600)
    with Sandbox(wasm, name="py_echo", cache=ModuleCache(own)) as sb:
        genuine = sb.component_info
    assert genuine is not None
    assert genuine.host_functions  # the world imports host functions: a forged empty list would show
    (info_file,) = own.glob("*.info.json")
    with Sandbox(wasm, name="py_echo", cache=ModuleCache(own)) as sb:
        assert sb.component_info == genuine
        assert sb.call("echo", {"x": 1}) == {"x": 1}
    stored = orjson.loads(info_file.read_bytes())
    stored["info"]["host_functions"] = []
    stored["checker"] = "0" * 64
    info_file.write_bytes(orjson.dumps(stored))  # made by other checking code: not used
    with Sandbox(wasm, name="py_echo", cache=ModuleCache(own)) as sb:
        assert sb.component_info == genuine
    info_file.write_bytes(b"{not json")
    with Sandbox(wasm, name="py_echo", cache=ModuleCache(own)) as sb:
        assert sb.component_info == genuine
    assert orjson.loads(info_file.read_bytes())["checker"] != "0" * 64  # rewritten by the inspection
