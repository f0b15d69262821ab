"""sandbus.host.lifecycle exports its API from __init__ with a sorted __all__; host re-exports the manager."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("name", ["sandbus.host.lifecycle", "sandbus.host"])
def test_all_is_sorted_and_resolvable(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == sorted(exported, key=str)
    for attr in exported:
        assert hasattr(module, attr), f"{name}.__all__ names missing {attr!r}"


def test_host_reexports_the_manager() -> None:
    import sandbus.host
    import sandbus.host.lifecycle
    for attr in ("DiscoveryReport", "PluginInfo", "PluginManager", "PluginStatus", "PluginWatcher"):
        assert getattr(sandbus.host, attr) is getattr(sandbus.host.lifecycle, attr)
