"""A cheap look at a wasm binary's section headers, before anything compiles it.

Compiling is where a crafted module costs the host: a valid 12 MB module of a million tiny functions
compiled for minutes in ~6 GB. What drives that cost (bytes, functions, sections) is written in the
section headers, so we read just those -- no function body is decoded -- and refuse a module over its
bounds before wasmtime sees it. A component is walked into the core modules it embeds, so a component
cannot hide a module that a core module could not be. The scan costs microseconds per section and
is itself bounded (section count, nesting depth).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MalformedWasm", "WasmFacts", "scan_wasm"]

_MAGIC = b"\0asm"
_CORE_VERSION = b"\x01\x00\x00\x00"
_COMPONENT_VERSION = b"\x0d\x00\x01\x00"
#: Core section ids.
_CUSTOM, _FUNCTION, _MEMORY = 0, 3, 5
_DEBUG_INFO = b".debug_info"
#: Component section ids that hold a core module / a nested component.
_CORE_MODULE, _COMPONENT = 1, 4
#: More nesting than any toolchain emits; bounds the recursion.
MAX_DEPTH = 8


class MalformedWasm(ValueError):
    """The section framing is broken: not a module wasmtime would accept either."""


@dataclass
class WasmFacts:
    """What the headers say. ``functions`` counts defined (compiled) functions over every embedded
    core module; ``memory64`` / ``shared_memory`` are set when a defined memory declares them;
    ``debug_info`` when a core module carries DWARF (a ``.debug_info`` custom section)."""

    size: int = 0
    component: bool = False
    modules: int = 0
    functions: int = 0
    sections: int = 0
    memory64: bool = False
    shared_memory: bool = False
    debug_info: bool = False


def _leb_u32(data: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 28:
            raise MalformedWasm(f"bad LEB128 number at offset {pos}")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def scan_wasm(wasm: bytes, *, max_sections: int = 100_000) -> WasmFacts:
    """The facts of ``wasm`` (a core module or a component); :class:`MalformedWasm` if the framing is
    broken or it has more than ``max_sections`` sections in all."""
    facts = WasmFacts(size=len(wasm))
    view = memoryview(wasm)
    facts.component = bytes(view[4:8]) == _COMPONENT_VERSION
    _scan(view, 0, len(wasm), facts, 0, max_sections)
    return facts


def _scan(data: memoryview, start: int, end: int, facts: WasmFacts, depth: int, max_sections: int) -> None:
    if depth > MAX_DEPTH:
        raise MalformedWasm(f"components nested deeper than {MAX_DEPTH}")
    if end - start < 8 or bytes(data[start:start + 4]) != _MAGIC:
        raise MalformedWasm("no \\0asm header")
    version = bytes(data[start + 4:start + 8])
    if version not in (_CORE_VERSION, _COMPONENT_VERSION):
        raise MalformedWasm(f"unknown binary version {version.hex()}")
    component = version == _COMPONENT_VERSION
    if not component:
        facts.modules += 1
    pos = start + 8
    while pos < end:
        facts.sections += 1
        if facts.sections > max_sections:
            raise MalformedWasm(f"more than {max_sections} sections")
        section = data[pos]
        size, body = _leb_u32(data, pos + 1, end)
        stop = body + size
        if stop > end:
            raise MalformedWasm(f"section {section} at offset {pos} runs past the end")
        if component:
            if section in (_CORE_MODULE, _COMPONENT):
                _scan(data, body, stop, facts, depth + 1, max_sections)
        elif section == _FUNCTION:
            facts.functions += _leb_u32(data, body, stop)[0]
        elif section == _MEMORY:
            _memories(data, body, stop, facts)
        elif section == _CUSTOM and not facts.debug_info:
            length, name = _leb_u32(data, body, stop)
            facts.debug_info = bytes(data[name:min(name + length, stop)]) == _DEBUG_INFO
        pos = stop


def _memories(data: memoryview, pos: int, end: int, facts: WasmFacts) -> None:
    count, pos = _leb_u32(data, pos, end)
    for _ in range(min(count, 100)):  # a valid module without multi-memory has one
        if pos >= end:
            raise MalformedWasm("memory section runs past its end")
        flags = data[pos]
        facts.shared_memory |= bool(flags & 0x02)
        facts.memory64 |= bool(flags & 0x04)
        if flags & 0x04:
            return  # 64-bit limits are u64 LEBs; nothing further is needed from them
        pos += 1
        _, pos = _leb_u32(data, pos, end)  # minimum
        if flags & 0x01:
            _, pos = _leb_u32(data, pos, end)  # maximum
        if flags & 0x08:
            _, pos = _leb_u32(data, pos, end)  # custom page size (log2)
