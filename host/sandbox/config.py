"""Limits and capabilities a sandbox enforces. Plain pydantic models: the manifest
and the operator policy both resolve into these."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["Capabilities", "DirGrant", "Limits", "MIB"]

MIB = 1024 * 1024


class Limits(BaseModel):
    """Hard limits for one plugin. Every one is enforced by the sandbox.

    Parameters:
        memory_bytes: linear memory ceiling of one instance (store limit; ``memory.grow`` fails above it).
        fuel: wasm fuel per call (roughly one unit per instruction). ``None`` turns metering off: tight
            guest loops run up to ~1.8x faster (bench/bench_sandbox.py), and only the wall-clock
            timeout bounds a call.
        timeout_s: wall-clock budget per call (epoch interruption).
        max_input_bytes / max_output_bytes: request and reply size caps.
        stack_bytes: wasm stack; deep recursion traps as a stack-limit error.
        max_instances: warm instances kept per plugin = calls that may run at once.
        log_bytes: captured stdout/stderr/log kept per call; the rest is dropped and counted.
        table_elements: cap on wasm table growth.
        max_module_bytes / max_functions: the largest binary, and the most defined functions (summed
            over the core modules of a component), accepted for compiling. Read from the section headers
            before anything compiles: compile time and memory grow with both (~30 us and ~6 KB per tiny
            function here). The defaults take a componentize-py guest (19 MB, ~13,400 functions) with room.
        compile_timeout_s / compile_memory_bytes: a binary of 256 KiB or more, or of more than 4,096
            functions, is compiled in a child process under this wall-clock time and address-space
            limit (a small module of pathological code can still need seconds and a gigabyte); cached
            compiled code is reused without either.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory_bytes: int = Field(default=64 * MIB, gt=0)
    fuel: int | None = Field(default=1_000_000_000, gt=0)
    timeout_s: float = Field(default=5.0, gt=0)
    max_input_bytes: int = Field(default=1 * MIB, gt=0)
    max_output_bytes: int = Field(default=1 * MIB, gt=0)
    stack_bytes: int = Field(default=512 * 1024, ge=64 * 1024)
    max_instances: int = Field(default=4, gt=0)
    log_bytes: int = Field(default=64 * 1024, ge=0)
    table_elements: int = Field(default=100_000, gt=0)
    max_module_bytes: int = Field(default=64 * MIB, gt=0)
    max_functions: int = Field(default=50_000, gt=0)
    compile_timeout_s: float = Field(default=120.0, gt=0)
    compile_memory_bytes: int = Field(default=2048 * MIB, ge=256 * MIB)


class DirGrant(BaseModel):
    """A host directory made visible to the guest at ``guest`` (default: the same path).

    ``host`` is resolved (symlinks followed) when the grant is made. A sandbox opens it once, with
    no symlink in any component, and gives every instance that directory, not its name
    (host/sandbox/grants.py): nothing a guest does to the tree changes what a later instance reaches.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: Path
    guest: str = ""
    writable: bool = False

    @field_validator("host")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    def guest_path(self) -> str:
        g = self.guest or self.host.as_posix()
        return str(PurePosixPath("/") / g)


class Capabilities(BaseModel):
    """What a plugin may touch besides computing. Everything is denied unless listed.

    Parameters:
        dirs: directories preopened through WASI, read-only unless ``writable``.
        env: environment variables the guest sees (names and values); nothing of the host leaks otherwise.
        env_unset: granted variable names the host does not set.
        clock: wall/monotonic clocks (WASI ``clock_time_get`` and ``time_now_ms``).
        random: WASI ``random_get``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dirs: tuple[DirGrant, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    #: Names granted although the host does not set them: ``env_get`` answers "unset" (-1) for
    #: these instead of a security violation.
    env_unset: frozenset[str] = frozenset()
    clock: bool = False
    random: bool = False
    #: Further granted capability names, checked by host functions (e.g. "messaging", "storage", "network").
    extra: frozenset[str] = frozenset()

    def allows(self, capability: str) -> bool:
        """Whether ``capability`` (a manifest capability name) is granted."""
        builtin = {
            "compute": True,
            "clock": self.clock,
            "random": self.random,
            "filesystem": bool(self.dirs),
            "environment": bool(self.env),
        }
        return builtin.get(capability, capability in self.extra)

    @classmethod
    def env_from_host(cls, names: list[str]) -> dict[str, str]:
        """Values of the named host variables (absent ones are skipped)."""
        return {n: os.environ[n] for n in names if n in os.environ}
