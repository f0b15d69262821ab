"""The ``sandbus`` command line: :func:`main` is the console script."""

from sandbus.host.cli.main import main

__all__ = ["main"]
