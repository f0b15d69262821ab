"""plugins/build.sh on a machine without Node.js or componentize-py: the plugins it can build are built,
the others are skipped with one line per missing toolchain saying why, and the build succeeds -- so
``make run`` serves what it can instead of stopping at the first AssemblyScript plugin.

The machine without Node.js is made real: the script runs with a PATH holding only the tools it needs
(linked from this machine), so ``node``, ``npm`` and ``componentize-py`` are simply not there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "plugins" / "build.sh"
#: What build.sh runs besides the compilers (bash builtins aside).
_TOOLS = ("bash", "env", "dirname", "basename", "sed", "mkdir", "mktemp", "rm", "mv", "cp", "cmp", "find", "sort",
          "grep", "touch", "cat")


def _bare_path(tmp_path: Path) -> Path:
    """A bin directory with the shell tools and a ``python`` that runs this interpreter -- and no Node.js,
    npm or componentize-py (componentize-py is looked up next to ``$PYTHON``, so the venv's is hidden)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in _TOOLS:
        found = shutil.which(tool)
        assert found is not None, f"{tool} is needed to run build.sh"
        (bin_dir / tool).symlink_to(found)
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n', encoding="utf-8")
    python.chmod(0o755)
    return bin_dir


def test_missing_node_and_componentize_py_skip_with_one_line_each(tmp_path: Path) -> None:
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("clang is not installed (make toolchain)")
    bin_dir = _bare_path(tmp_path)
    for absent in ("node", "npm", "componentize-py"):
        assert shutil.which(absent, path=str(bin_dir)) is None  # the machine really lacks them
    work = tmp_path / "cwd"
    work.mkdir()
    r = subprocess.run([str(bin_dir / "bash"), str(SCRIPT), "-o", "out", "echo", "text_processor", "as_echo",
                        "py_echo"],
                       capture_output=True, text=True, timeout=300, cwd=work, stdin=subprocess.DEVNULL,
                       env={"PATH": str(bin_dir), "HOME": str(tmp_path), "PYTHON": str(bin_dir / "python"),
                            "CLANG": clang})
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""
    skips = [line for line in r.stdout.splitlines() if line.startswith("skip")]
    assert len(skips) == 2, r.stdout
    as_line = next(line for line in skips if "as_echo" in line)
    assert "(AssemblyScript): Node.js is not installed" in as_line
    assert "Node.js >= 20" in as_line  # and how to get it:
    assert "apt-get install nodejs npm" in as_line
    py_line = next(line for line in skips if "py_echo" in line)
    assert "componentize-py is not installed" in py_line
    assert "pip install componentize-py" in py_line

    out = work / "out"  # -o is relative to where the script was started
    built = sorted(p.name for p in out.iterdir())
    assert built == ["echo.toml", "echo.wasm", "text_processor.toml", "text_processor.wasm"]
    assert (out / "echo.wasm").read_bytes()[:4] == b"\0asm"
    assert (out / "text_processor.wasm").read_bytes()[:4] == b"\0asm"


def test_output_directory_option_needs_a_value(tmp_path: Path) -> None:
    r = subprocess.run(["bash", str(SCRIPT), "echo", "-o"], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    assert "-o needs a directory" in r.stderr
