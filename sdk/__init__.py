"""The contract every side of sandbus shares: errors, envelopes, subjects, the client."""

from sandbus.sdk import errors
from sandbus.sdk.errors import SandbusError

__all__ = ["SandbusError", "errors"]
