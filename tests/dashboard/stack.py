"""Real parts for the dashboard's tests, its screenshot and its benchmark: plugins, a dashboard process, Chromium.

Nothing here is a stand-in: the dashboard is ``python -m sandbus dashboard`` in its own process, reading a real
nats-server that real nodes serve real plugins on; the browser is Debian's chromium driven through Debian's
chromedriver (no driver or browser downloaded).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import wasmtime

from sandbus.bus.server import stop_process

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

#: A plugin that logs its request (guest text: hostile by design) at warning level, then echoes it.
SHOUTER_WAT = """(module
  (import "sandbus_v1" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (func (export "sandbus_abi_version") (result i32) (i32.const 1))
  (func (export "sandbus_alloc") (param $n i32) (result i32)
    (local $p i32) (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n))) (local.get $p))
  (func (export "sandbus_dealloc") (param i32 i32) (global.set $heap (i32.const 1024)))
  (func (export "handle_request") (param $p i32) (param $n i32) (result i64)
    (call $log (i32.const 3) (local.get $p) (local.get $n))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $p)) (i64.const 32)) (i64.extend_i32_u (local.get $n))))
)
"""

MANIFEST = """[plugin]
name = "{name}"
version = "1.0.0"
description = {description}
author = "tests"
license = "Apache-2.0"
min_runtime_version = "0.1.0"
[capabilities]
required = ["compute"]
[resources]
timeout_seconds = 2
max_instances = 2
"""

#: What a hostile author writes into a manifest description, and a guest into its log lines: the page must
#: show it as text, and none of it may run.
XSS_DESCRIPTION = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
XSS_LOG = '<script>window.__pwned=3</script><img src=y onerror="window.__pwned=4">'

POLICY = '[capabilities]\nallowed = ["compute"]\n'


def wait_for(condition: Any, what: str, timeout: float = 10.0) -> Any:
    """Poll ``condition()`` until it is truthy and return it; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)  # polling a process or the dashboard's JSON for the condition, bounded
    return value


def api_state(url: str) -> dict[str, Any]:
    """The dashboard's ``/api/state`` at ``url`` (its base, ending in ``/``)."""
    with urllib.request.urlopen(url + "api/state", timeout=10) as r:
        value: dict[str, Any] = json.loads(r.read())
        return value


def shouter_wasm() -> bytes:
    return bytes(wasmtime.wat2wasm(SHOUTER_WAT))


def make_plugins(base: Path, plugins_dir: Path, *, extra: int = 0) -> Path:
    """``base/plugins``: the built echo and text_processor, ``shouter`` (logs its input), ``evil`` (echo with a
    hostile description), and ``extra`` more copies of shouter (``p00``, ``p01``...); ``base/policy.toml``."""
    plugins = base / "plugins"
    plugins.mkdir(parents=True)
    for name in ("echo", "text_processor"):
        for ext in ("wasm", "toml"):
            shutil.copy(plugins_dir / f"{name}.{ext}", plugins / f"{name}.{ext}")
    shutil.copy(plugins_dir / "echo.wasm", plugins / "evil.wasm")
    (plugins / "evil.toml").write_text(MANIFEST.format(name="evil", description=_toml_str(XSS_DESCRIPTION)))
    shouter = shouter_wasm()
    for name in ("shouter", *(f"p{i:02d}" for i in range(extra))):
        (plugins / f"{name}.wasm").write_bytes(shouter)
        (plugins / f"{name}.toml").write_text(MANIFEST.format(name=name, description='"logs what it is sent"'))
    (base / "policy.toml").write_text(POLICY)
    return plugins


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class DashboardProcess:
    """``sandbus dashboard`` in a child process on a free port; its URL and (with control) token parsed from
    what it prints."""

    def __init__(self, url: str, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sandbus", "dashboard", "--nats", url, "--no-context", "--port", "0", *args],
            stdout=self._log_file, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.url = ""
        self.token: str | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> DashboardProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"dashboard exited {self.proc.returncode}: {self.output()[-4000:]}")
            out = self.output()
            found = re.search(r"dashboard on (http://\S+/) ", out)
            if found:
                self.url = found.group(1)
                if "control allowed" in out:
                    token = re.search(r"#token=([A-Za-z0-9_-]+) ", out)
                    if token is None:
                        time.sleep(0.02)  # the token line follows the first one
                        continue
                    self.token = token.group(1)
                return self
            time.sleep(0.02)  # polling its output for the ready line, bounded
        raise AssertionError(f"dashboard not ready in {timeout} s: {self.output()[-4000:]}")

    def stop(self) -> int:
        code = stop_process(self.proc, 10.0)
        self._log_file.close()
        return code


@contextlib.contextmanager
def chrome(width: int = 1500, height: int = 1100) -> Iterator[WebDriver]:
    """Headless Chromium from Debian's packages, driven through its chromedriver; a fresh profile (removed
    after), no background traffic (the machine has no outside network, and the page needs none)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="sandbus-chromium-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            driver.set_page_load_timeout(30)
            yield driver
        finally:
            driver.quit()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
