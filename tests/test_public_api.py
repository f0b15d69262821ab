"""Each package exports its public API from __init__, with a sorted __all__ that names real objects."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("name", ["sandbus", "sandbus.sdk", "sandbus.sdk.errors", "sandbus.bus", "sandbus.host",
                                  "sandbus.host.sandbox", "sandbus.host.lifecycle"])
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
