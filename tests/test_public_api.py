"""``import sandbus`` is the public API; each package exports its own from __init__, with a sorted __all__ that
names real objects."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest


@pytest.mark.parametrize("name", ["sandbus", "sandbus.sdk", "sandbus.sdk.errors", "sandbus.bus", "sandbus.host",
                                  "sandbus.host.sandbox", "sandbus.host.lifecycle", "sandbus.host.telemetry"])
def test_all_is_sorted_and_resolvable(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == sorted(exported, key=str), f"{name}.__all__ is not sorted"
    for attr in exported:
        assert hasattr(module, attr), f"{name}.__all__ names missing {attr!r}"


def test_error_tree_has_one_root_and_unique_codes() -> None:
    from sandbus.sdk import errors

    classes = [getattr(errors, n) for n in errors.__all__ if isinstance(getattr(errors, n), type)]
    assert all(issubclass(c, errors.SandbusError) for c in classes)
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes))
    for c in classes:
        assert errors.error_class_for_code(c.code) is c


def test_public_api_names_the_objects_that_do_the_work() -> None:
    """``from sandbus import ...`` gives the very objects of the modules below it (one class object per class,
    so ``isinstance`` agrees whichever way a caller imported it)."""
    import sandbus
    from sandbus import (
        Client,
        ClusterAgent,
        Node,
        PluginBus,
        PluginManager,
        PluginMessage,
        Registry,
        Sandbox,
        SandboxBuilder,
        SandbusError,
    )
    from sandbus.bus.plugin_bus import PluginBus as DefinedBus
    from sandbus.host.cluster.agent import ClusterAgent as DefinedAgent
    from sandbus.host.cluster.registry import Registry as DefinedRegistry
    from sandbus.host.lifecycle.manager import PluginManager as DefinedManager
    from sandbus.host.node.node import Node as DefinedNode
    from sandbus.host.sandbox.sandbox import Sandbox as DefinedSandbox
    from sandbus.host.sandbox.sandbox import SandboxBuilder as DefinedBuilder
    from sandbus.sdk.client import Client as DefinedClient
    from sandbus.sdk.envelope import PluginMessage as DefinedMessage
    from sandbus.sdk.errors import SandbusError as DefinedError

    pairs = [(Sandbox, DefinedSandbox), (SandboxBuilder, DefinedBuilder), (PluginManager, DefinedManager),
             (Node, DefinedNode), (PluginBus, DefinedBus), (Client, DefinedClient), (PluginMessage, DefinedMessage),
             (SandbusError, DefinedError), (Registry, DefinedRegistry), (ClusterAgent, DefinedAgent)]
    for exported, defined in pairs:
        assert exported is defined
        assert exported.__name__ in sandbus.__all__
        assert exported.__name__ in dir(sandbus)
    assert sandbus.errors is importlib.import_module("sandbus.sdk.errors")
    assert isinstance(sandbus.__version__, str)


def test_unknown_public_name_is_an_attribute_error() -> None:
    import sandbus

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = sandbus.Nope
    with pytest.raises(ImportError, match="cannot import name 'Nope'"):
        from sandbus import Nope  # type: ignore[attr-defined]  # noqa: F401


@pytest.mark.parametrize("name", ["sandbus", "sandbus.bus", "sandbus.host", "sandbus.host.sandbox",
                                  "sandbus.host.telemetry"])
def test_lazy_names_are_not_submodules(name: str) -> None:
    """A lazy name that is also a submodule would turn into the module once the submodule is imported
    (sandbus/_lazy.py); each name maps to a module that exists and defines it."""
    module = importlib.import_module(name)
    where: dict[str, str] = module._WHERE
    assert set(where) <= set(module.__all__)
    folder = Path(module.__file__ or "").parent
    for attr, source in where.items():
        assert not (folder / f"{attr}.py").exists(), attr
        assert not (folder / attr / "__init__.py").exists(), attr
        assert hasattr(importlib.import_module(source), attr), (attr, source)
