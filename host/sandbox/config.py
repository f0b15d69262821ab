"""Limits and capabilities a sandbox enforces. Plain pydantic models: the manifest
and the operator policy both resolve into these."""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ISOLATION_MODES", "MAX_NAME_PATTERNS", "MAX_WASM_STACK", "MIB", "Capabilities", "DirGrant", "Isolation", "Limits",
    "check_name_pattern", "is_pattern", "show_patterns",
]

MIB = 1024 * 1024
#: Most file-name patterns of one grant (read and write each). The host matches every name a guest reaches
#: (and every entry of a listing) against them, inside a WASI call no timeout interrupts: their number is
#: bounded so that one call stays cheap.
MAX_NAME_PATTERNS = 128

#: How calls of one plugin share instances: "pooled" (warm instances serve call after call) or "per-call"
#: (a fresh instance for every call, discarded after it: nothing of one call reaches the next).
Isolation = Literal["pooled", "per-call"]
#: The modes, weakest isolation first.
ISOLATION_MODES: tuple[Isolation, ...] = ("pooled", "per-call")


#: What a 32-bit guest can address (a linear memory's largest size); no size a guest sees or produces is
#: larger. Every limit is bounded, so that a value from a policy, a manifest or the API never reaches
#: wasmtime (which panics, aborting the process, on some) or the compiled helpers (which take 64 bits).
_WASM32 = 4096 * MIB
#: The largest wasm stack wasmtime takes: its async stack size (2 MiB), which a larger ``max_wasm_stack``
#: may not exceed (the engine constructor panics otherwise).
MAX_WASM_STACK = 2 * MIB


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
        max_open_files: files and directories one instance may have opened at once (its preopens and
            stdio not counted). Each is a host descriptor: a guest that opened files without end would
            take the node's last one, its sockets included (host/sandbox/fsguard.py, which also bounds
            all instances of the process together to half its soft ``RLIMIT_NOFILE``).
        isolation: "pooled" (default): up to ``max_instances`` warm instances serve call after call, and
            what a call leaves in memory or globals is there for the next caller. "per-call": every call
            gets a fresh instance from a pooling allocator (copy-on-write memory image), discarded when the
            call ends; ``_initialize`` and ``sandbus_init`` run on each, ``sandbus_shutdown`` never;
            ``max_instances`` still bounds calls at once (host/sandbox/percall.py). An Extism plugin gets a
            fresh kernel and plugin per call, built like a pooled instance (docs/extism.md).
        max_var_bytes: what an Extism plugin's variables (``var_set``) may hold in all, keys and values,
            per instance (docs/extism.md); a ``var_set`` beyond it fails the call.
        debug_info: compile with debug info for a native debugger (gdb, lldb): the guest's DWARF is kept
            and its code registered with the debugger, unoptimised (host/sandbox/engine.py). Not a limit
            but the operator's choice (``sandbus run --debug``, a node policy's ``[debug] plugins``; a
            manifest cannot ask for it): calls run slower and compiled code is larger.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory_bytes: int = Field(default=64 * MIB, gt=0, le=_WASM32)
    fuel: int | None = Field(default=1_000_000_000, gt=0, le=2**63 - 1)  # wasmtime counts fuel in an i64
    timeout_s: float = Field(default=5.0, gt=0, le=1e9, allow_inf_nan=False)  # epoch ticks fit a u64
    max_input_bytes: int = Field(default=1 * MIB, gt=0, le=_WASM32)
    max_output_bytes: int = Field(default=1 * MIB, gt=0, le=_WASM32)
    stack_bytes: int = Field(default=512 * 1024, ge=64 * 1024, le=MAX_WASM_STACK)
    max_instances: int = Field(default=4, gt=0, le=65536)
    log_bytes: int = Field(default=64 * 1024, ge=0, le=_WASM32)
    table_elements: int = Field(default=100_000, gt=0, le=_WASM32 - 1)
    max_module_bytes: int = Field(default=64 * MIB, gt=0, le=_WASM32)
    max_functions: int = Field(default=50_000, gt=0, le=_WASM32)
    compile_timeout_s: float = Field(default=120.0, gt=0, le=1e9, allow_inf_nan=False)
    compile_memory_bytes: int = Field(default=2048 * MIB, ge=256 * MIB, le=1 << 48)
    max_open_files: int = Field(default=256, gt=0, le=65536)
    isolation: Isolation = "pooled"
    max_var_bytes: int = Field(default=1 * MIB, ge=0, le=_WASM32)
    debug_info: bool = False


def check_name_pattern(pattern: str) -> str:
    """Validate one file-name glob of a grant (``*.txt``, ``report-??.csv``, ``[ab]*.bin``) and return it.

    A pattern is one path component: ``fnmatch`` syntax (``*``, ``?``, ``[...]``, ``[!...]``; case
    sensitive) with no ``/``, not ``.`` or ``..``, no NUL or control characters, at most 255 bytes (what a
    file name may be). As in a shell glob, a name starting with ``.`` matches only a pattern starting with
    ``.`` (``*`` does not reach ``.env``).

    Raises:
        ValueError: saying what is wrong.
    """
    if not pattern or "/" in pattern or "\\" in pattern or pattern in (".", ".."):
        raise ValueError(f"a file-name pattern is one path component like '*.txt', found {pattern!r}")
    if not pattern.isprintable() or len(pattern.encode()) > 255:
        raise ValueError(f"a file-name pattern must be printable and at most 255 bytes, found {pattern[:40]!r}")
    return pattern


def show_patterns(patterns: tuple[str, ...], most: int = 8) -> str:
    """``patterns`` for a message or a log line: the first ``most`` of them and how many more there are
    (a refusal is logged and audited for every denied operation; it need not carry all of them)."""
    shown = ", ".join(patterns[:most])
    return shown + (f" and {len(patterns) - most} more" if len(patterns) > most else "")


def is_pattern(name: str) -> bool:
    """Whether a path component holds glob characters (``*``, ``?`` or ``[``)."""
    return any(c in name for c in "*?[")


class DirGrant(BaseModel):
    """A host directory made visible to the guest at ``guest`` (default: the same path).

    ``host`` is resolved (symlinks followed) when the grant is made. A sandbox opens it once, with
    no symlink in any component, and gives every instance that directory, not its name
    (host/sandbox/grants.py): nothing a guest does to the tree changes what a later instance reaches.

    Parameters:
        host: the directory on the host.
        guest: where the guest sees it (default: the host path).
        writable: whether the guest may change what it reaches (subject to ``write_patterns``).
        patterns: file-name globs (``*.txt``; see :func:`check_name_pattern`, at most
            :data:`MAX_NAME_PATTERNS`): when given, the guest reads only the directory itself (listing
            it shows only the names it may reach) and the files directly in it whose name matches one
            of these or of ``write_patterns`` -- nothing in subdirectories. Empty: the whole tree is
            readable.
        write_patterns: of a writable grant, file-name globs of the files directly in it the guest may
            change (create, write, rename, link, remove); nothing else is writable. Empty: all it
            reaches is writable.

    A grant with patterns is enforced by the host's check of every file operation, which core modules
    have (host/sandbox/fsguard.py) and components do not: a component given one is refused at load.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: Path
    guest: str = ""
    writable: bool = False
    patterns: tuple[str, ...] = ()
    write_patterns: tuple[str, ...] = ()

    @field_validator("host")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @field_validator("patterns", "write_patterns")
    @classmethod
    def _patterns(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) > MAX_NAME_PATTERNS:
            raise ValueError(f"at most {MAX_NAME_PATTERNS} file-name patterns a grant, found {len(v)}")
        return tuple(dict.fromkeys(check_name_pattern(p) for p in v))

    @model_validator(mode="after")
    def _write_patterns_need_writable(self) -> DirGrant:
        if self.write_patterns and not self.writable:
            raise ValueError("write_patterns need a writable grant")
        return self

    @property
    def filtered(self) -> bool:
        """Whether file names decide what the guest reaches (:attr:`patterns` or :attr:`write_patterns`)."""
        return bool(self.patterns or self.write_patterns)

    def reaches(self, name: str, *, write: bool) -> bool:
        """Whether a file named ``name`` directly in this directory may be reached for this access."""
        if write:
            if not self.writable:
                return False
            if self.write_patterns:
                return _matches(name, self.write_patterns)
            return not self.patterns or _matches(name, self.patterns)
        return not self.patterns or _matches(name, self.patterns) or _matches(name, self.write_patterns)

    def guest_path(self) -> str:
        g = self.guest or self.host.as_posix()
        return str(PurePosixPath("/") / g)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    hidden, visible = _matcher(patterns)
    matcher = hidden if name.startswith(".") else visible
    return matcher is not None and matcher.match(name) is not None


@functools.lru_cache(maxsize=1024)
def _matcher(patterns: tuple[str, ...]) -> tuple[re.Pattern[str] | None, re.Pattern[str] | None]:
    """One compiled expression for the patterns that may match a name starting with '.' (those starting
    with '.', as in a shell glob), one for any other name: each name is matched once, not once a pattern."""

    def either(chosen: list[str]) -> re.Pattern[str] | None:
        return re.compile("|".join(fnmatch.translate(p) for p in chosen)) if chosen else None

    return either([p for p in patterns if p.startswith(".")]), either(list(patterns))


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
