"""One deadline per call, shared by everything the call waits for.

A call's wall-clock limit is enforced inside wasm by epoch interruption, which cannot stop a host
function that waits (an HTTP response, a reply, a JetStream ack): the guest is only interrupted once
the host function returns. So the call records when it must end (:func:`start`, at the start of every
call and of ``sandbus_init`` / ``sandbus_health`` / ``sandbus_shutdown``; the same moment its epoch
deadline is set for), and each waiting host function asks :func:`remaining` for what is left: it uses that as its
*total* budget -- not per socket operation, not per retry -- and is refused at once when nothing is
left, with the same :class:`~sandbus.sdk.errors.ExecutionTimeoutError` (and ``limit.timeout`` audit event) the
call itself would have ended with.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sandbus.sdk.errors import ExecutionTimeoutError

if TYPE_CHECKING:
    from sandbus.host.sandbox.instance import CallContext

__all__ = ["expired", "remaining", "start"]


def start(ctx: CallContext, budget_s: float | None = None) -> None:
    """Begin a call: it must end within its plugin's timeout from now, or within ``budget_s`` when that
    is shorter -- what is left of the caller's own deadline (a call that waited for an instance has
    less than a whole timeout left), or the inline budget of a call run on the event loop."""
    span = ctx.limits.timeout_s if budget_s is None else min(ctx.limits.timeout_s, budget_s)
    ctx.deadline = time.monotonic() + span


def remaining(ctx: CallContext, what: str) -> float:
    """Seconds left of the current call's deadline for ``what`` (a host function's operation).

    Before the instance's first call (a host function reached from a start function, during
    instantiation), the budget is a whole timeout from now.

    Raises:
        ExecutionTimeoutError: the deadline has passed; ``what`` must not start.
    """
    deadline = ctx.deadline
    if deadline is None:
        return ctx.limits.timeout_s
    left = deadline - time.monotonic()
    if left <= 0:
        raise ExecutionTimeoutError(
            f"{what} not started: the call's {ctx.limits.timeout_s:g} s timeout has passed",
            plugin=ctx.plugin, limit=ctx.limits.timeout_s)
    return left


def expired(ctx: CallContext, what: str, waited: float) -> ExecutionTimeoutError:
    """The error for ``what`` stopped after ``waited`` seconds because the call's deadline came."""
    return ExecutionTimeoutError(
        f"{what} stopped after {waited:.3g} s: the call's {ctx.limits.timeout_s:g} s timeout ran out",
        plugin=ctx.plugin, limit=ctx.limits.timeout_s)
