"""The contract every side of sandbus shares: errors, envelopes, subjects, the client."""

from . import errors
from .errors import SandbusError

__all__ = ["SandbusError", "errors"]
