"""Replaying a recorded call offline (host/sandbox/record.py says what a record holds).

    outcome = replay(load_record(Path("record.json")))
    outcome.reproduced   # the same reply, or the same error, as when it was recorded

The module is loaded from the record's path (or the one given), and must have the recorded sha256; it
runs under the recorded limits, configuration and grants (no directories: their contents were not
recorded), on a fresh instance, each of its host calls answered from the record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from sandbus.host.sandbox.config import Capabilities, Limits
from sandbus.host.sandbox.record import CallRecord
from sandbus.host.sandbox.sandbox import Sandbox
from sandbus.sdk.errors import SandboxError, SandbusError

__all__ = ["ReplayOutcome", "replay"]


@dataclass
class ReplayOutcome:
    """How a replayed call ended (``reply`` or ``error``), beside the record it replayed."""

    record: CallRecord
    reply: bytes | None
    error: SandbusError | None

    @property
    def reproduced(self) -> bool:
        """Whether it ended as the recorded call did: the same reply bytes, or an error of the same code
        and message."""
        recorded = self.record.recorded_error()
        if recorded is None or self.error is None:
            return recorded is None and self.error is None and self.reply == self.record.recorded_reply()
        return (recorded.code, recorded.message) == (self.error.code, self.error.message)


def replay(record: CallRecord, module: Path | None = None, *, debug: bool = False) -> ReplayOutcome:
    """Run ``record``'s call again from its record (``debug``: compiled with debug info, for gdb).

    Raises:
        SandboxError: the record names no module and none is given, it is truncated, or its limits or
            grants are not valid here.
        SecurityViolationError: the module is not the recorded one (sha256).
        ReplayDivergenceError: is *returned* as the outcome's error, like any error of the call.
    """
    if record.truncated:
        raise SandboxError("this record is truncated (its host calls outgrew the record's size bound): it cannot "
                           "be replayed", plugin=record.plugin)
    path = module if module is not None else Path(record.module) if record.module else None
    if path is None:
        raise SandboxError("the record does not say where its module is: name the .wasm file (--module)",
                           plugin=record.plugin)
    caps = record.capabilities
    try:
        limits = Limits.model_validate({**record.limits, "debug_info": debug, "isolation": "pooled"})
        capabilities = Capabilities(clock=caps.get("clock") is True, random=caps.get("random") is True,
                                    env=caps.get("env") or {}, env_unset=frozenset(caps.get("env_unset") or ()),
                                    extra=frozenset(caps.get("extra") or ()))
    except (ValidationError, TypeError) as e:
        raise SandboxError(f"invalid call record: its limits or grants: {e}", plugin=record.plugin) from e
    with Sandbox(path, name=record.plugin, limits=limits, capabilities=capabilities, config=record.config,
                 replay=record) as sandbox:
        try:
            reply = sandbox.call_detailed(record.function, record.input).reply
        except SandbusError as e:
            return ReplayOutcome(record, None, e)
    return ReplayOutcome(record, reply, None)
