"""Every code block of docs/guide.md runs, in document order, in one empty directory, so the guide cannot rot.

* ```bash: run with ``bash -euo pipefail`` in that directory, the repository's venv first on PATH and
  SANDBUS_NATS pointing at a nats-server this test starts (so nothing depends on port 4222); each block
  runs in its own process group, which is killed by its PID afterwards should anything outlive it.
* ```python: executed in this process (one namespace for the whole guide), cwd = that directory.
* ```LANG file=PATH: written to PATH first; Python files are compiled (syntax), TOML files validated.
* ```toml: validated as a manifest (it has [plugin]) or an operator policy.
* ```text: output and trees, not code.

Anything else fails the test: a block nobody checks is a block that can rot.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sandbus.bus.server import NatsServer
from sandbus.host.lifecycle.manifest import parse_manifest
from sandbus.host.lifecycle.policy import Policy

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide.md"
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    lang: str
    attrs: dict[str, str]
    code: str
    line: int

    def __str__(self) -> str:
        return f"docs/guide.md:{self.line} ({self.lang})"


def blocks(text: str) -> list[Block]:
    out = []
    for m in _FENCE.finditer(text):
        info = m[1].split()
        attrs = dict(a.split("=", 1) for a in info[1:] if "=" in a)
        out.append(Block(info[0] if info else "", attrs, m[2], text.count("\n", 0, m.start()) + 1))
    return out


def test_guide_has_runnable_blocks() -> None:
    found = blocks(GUIDE.read_text(encoding="utf-8"))
    kinds = {b.lang for b in found}
    assert {"bash", "python", "toml", "c"} <= kinds
    assert sum(b.lang == "python" and "file" not in b.attrs for b in found) >= 2


def _check_toml(block: Block, path: Path | None) -> None:
    data = tomllib.loads(block.code)
    if "plugin" in data:
        parse_manifest(block.code, source=str(block), expected_name=path.stem if path else None)
    else:
        Policy.model_validate(data)


def _run_bash(block: Block, cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block.code], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        # anything the block left running (a node it started) goes with its process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 0, f"{block} failed with exit {proc.returncode}:\n{block.code}\n--- output:\n{out}"


@pytest.mark.slow
def test_guide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "guide"
    work.mkdir()
    monkeypatch.chdir(work)
    server = NatsServer(jetstream=True).start()
    try:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "SANDBUS_NATS": server.url, "PYTHONDONTWRITEBYTECODE": "1"}
        namespace: dict[str, Any] = {"__name__": "guide"}
        for block in blocks(GUIDE.read_text(encoding="utf-8")):
            target = work / block.attrs["file"] if "file" in block.attrs else None
            if target is not None:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(block.code, encoding="utf-8")
                if target.suffix == ".py":
                    compile(block.code, str(target), "exec")
                elif block.lang == "toml":
                    _check_toml(block, target)
            elif block.lang == "bash":
                _run_bash(block, work, env)
            elif block.lang == "python":
                exec(compile(block.code, str(block), "exec"), namespace)
            elif block.lang == "toml":
                _check_toml(block, None)
            elif block.lang != "text":
                pytest.fail(f"{block}: a ```{block.lang} block is neither run nor written to a file")
    finally:
        server.stop()
