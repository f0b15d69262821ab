"""The installed distribution's version, read from its metadata on first use (``sandbus.__version__``)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("sandbus")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0.0.0"
