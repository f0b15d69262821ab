"""Client-side tracing for the CLI's client commands: their ``send`` spans exported when ``OTEL_*`` says so."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["client_tracing"]


@contextlib.contextmanager
def client_tracing() -> Iterator[None]:
    """Around a client command: export its spans when the environment configures an exporter."""
    yield
