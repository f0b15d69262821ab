"""Fixtures for the manager tests: a plugin directory, managers that are always closed, bounded waits."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbus.host.lifecycle import PluginManager
from sandbus.host.sandbox import ModuleCache
from tests.conftest import AuditLog
from tests.host.manager.factory import Gate


@pytest.fixture
def pdir(tmp_path: Path) -> Path:
    """An empty plugin directory."""
    d = tmp_path / "plugins"
    d.mkdir()
    return d


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.release.set()  # never leave a guest call (and its thread) hanging


@pytest.fixture
def make_manager(tmp_path: Path, audit: AuditLog) -> Iterator[Callable[..., PluginManager]]:
    """Build managers (audited into ``audit``, with a private module cache); all closed at teardown."""
    made: list[PluginManager] = []

    def make(directory: Path, **kwargs: Any) -> PluginManager:
        kwargs.setdefault("on_audit", audit)
        kwargs.setdefault("cache", ModuleCache(tmp_path / "module-cache"))
        manager = PluginManager(directory, **kwargs)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.close(timeout=10)
