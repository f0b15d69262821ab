"""host.manager exports its API from __init__ with a sorted __all__; host re-exports the manager."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("name", ["host.manager", "host"])
def test_all_is_sorted_and_resolvable(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == sorted(exported, key=str)
    for attr in exported:
        assert hasattr(module, attr), f"{name}.__all__ names missing {attr!r}"


def test_host_reexports_the_manager() -> None:
    import host
    import host.manager

    for attr in ("DiscoveryReport", "PluginInfo", "PluginManager", "PluginStatus", "PluginWatcher"):
        assert getattr(host, attr) is getattr(host.manager, attr)
