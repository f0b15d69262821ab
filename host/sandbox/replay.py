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
from typing import Any

from pydantic import ValidationError

from sandbus.host.sandbox.config import Capabilities, Limits
from sandbus.host.sandbox.record import CallRecord
from sandbus.host.sandbox.sandbox import Sandbox
from sandbus.sdk.errors import SandboxError, SandbusError

__all__ = ["LOAD_BOUNDS", "MAX_REPLAY_TIMEOUT_S", "ReplayOutcome", "replay"]


@dataclass
class ReplayOutcome:
    """How a replayed call ended (``reply`` or ``error``), beside the record it replayed."""

    record: CallRecord
    reply: bytes | None
    error: SandbusError | None
    #: The limits the replay ran under: the recorded ones, bounded as :func:`replay` says.
    limits: Limits | None = None

    @property
    def reproduced(self) -> bool:
        """Whether it ended as the recorded call did: the same reply bytes, or an error of the same code
        and message."""
        recorded = self.record.recorded_error()
        if recorded is None or self.error is None:
            return recorded is None and self.error is None and self.reply == self.record.recorded_reply()
        return (recorded.code, recorded.message) == (self.error.code, self.error.message)


#: Limits that protect the host while it loads a module, not the call's behaviour: a replay takes the
#: lower of the record's and this host's default, so that a record cannot raise them for a module that
#: came with it (a compile bomb let through by a record asking for a day of compiling and 256 TiB).
LOAD_BOUNDS = ("max_module_bytes", "max_functions", "compile_timeout_s", "compile_memory_bytes")

#: The longest a replay runs unless told otherwise, whatever its record's timeout says (a record is data
#: from elsewhere: one that asks for no fuel and a day's timeout would otherwise hold the terminal). A
#: recorded timeout below it is kept; ``sandbus replay --timeout`` replaces both (room to step in gdb).
MAX_REPLAY_TIMEOUT_S = 60.0


def replay(record: CallRecord, module: Path | None = None, *, debug: bool = False,
           timeout_s: float | None = None) -> ReplayOutcome:
    """Run ``record``'s call again from its record (``debug``: compiled with debug info, for gdb).

    The recorded limits apply (fuel and memory as recorded, so a call that ran out of fuel runs out again
    at the same instruction), except the timeout: ``timeout_s`` when given, else the recorded one up to
    :data:`MAX_REPLAY_TIMEOUT_S` (a timeout is not reproducible anyway: time is not fuel); and the load bounds
    (:data:`LOAD_BOUNDS`) at most this host's defaults.

    Raises:
        SandboxError: the record names no module and none is given, it is truncated, its limits or
            grants are not valid here, its input is larger than its limits allow, or the module has
            no such function.
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
    if module is None and path.suffix != ".wasm":
        # The record's word for a path is a file from elsewhere: it names a plugin module, nothing else
        # of this machine (its digest would refuse another file, but only after reading it).
        raise SandboxError(f"the record names {str(path)[:200]!r} as its module, not a .wasm file: name the module "
                           "(--module)", plugin=record.plugin, module=str(path)[:200])
    caps = record.capabilities
    try:
        limits = Limits.model_validate({**record.limits, "debug_info": debug, "isolation": "pooled"})
        capabilities = Capabilities(clock=caps.get("clock") is True, random=caps.get("random") is True,
                                    env=caps.get("env") or {}, env_unset=frozenset(caps.get("env_unset") or ()),
                                    extra=frozenset(caps.get("extra") or ()))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}"
                             for err in e.errors()[:5])
        raise SandboxError(f"invalid call record: its limits or grants: {problems}", plugin=record.plugin) from e
    except (TypeError, ValueError) as e:
        raise SandboxError(f"invalid call record: its limits or grants: {e}", plugin=record.plugin) from e
    defaults = Limits()
    bounded: dict[str, Any] = {key: min(getattr(limits, key), getattr(defaults, key)) for key in LOAD_BOUNDS}
    bounded["timeout_s"] = timeout_s if timeout_s is not None else min(limits.timeout_s, MAX_REPLAY_TIMEOUT_S)
    limits = Limits.model_validate({**limits.model_dump(), **bounded})
    if len(record.input) > limits.max_input_bytes:
        raise SandboxError(f"invalid call record: its input has {len(record.input)} bytes, its limits allow "
                           f"{limits.max_input_bytes}", plugin=record.plugin)
    with Sandbox(path, name=record.plugin, limits=limits, capabilities=capabilities, config=record.config,
                 replay=record) as sandbox:
        if record.function not in sandbox.functions:
            raise SandboxError(f"invalid call record: the module exports no function {record.function!r}",
                               plugin=record.plugin, function=record.function)
        try:
            reply = sandbox.call_detailed(record.function, record.input).reply
        except SandbusError as e:
            return ReplayOutcome(record, None, e, limits)
    return ReplayOutcome(record, reply, None, limits)
