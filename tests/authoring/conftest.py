"""Fixtures of the authoring tests: the sandbus.sdk.testing fixtures (dogfooded), the CLI, and a probe plugin
project built by sandbus.host.authoring itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sandbus.sdk.testing.pytest_plugin import sandbus_bus, sandbus_plugin

__all__ = ["sandbus_bus", "sandbus_plugin"]

#: The console script installed beside the interpreter running the tests.
SANDBUS = Path(sys.executable).parent / "sandbus"
GUESTS = Path(__file__).resolve().parent / "guests"


def sandbus(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the installed ``sandbus`` command; output captured as text."""
    assert SANDBUS.exists(), "the sandbus console script is not installed (pip install -e .)"
    return subprocess.run([str(SANDBUS), *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def probe_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/authoring/guests/probe.{c,toml} as a project (built on first use by the harness)."""
    root = tmp_path_factory.mktemp("projects") / "probe"
    root.mkdir()
    for name in ("probe.c", "probe.toml"):
        shutil.copy(GUESTS / name, root / name)
    return root
