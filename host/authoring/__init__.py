"""Tools for plugin authors: scaffold a project (``sandbus new``), build it (``sandbus build``),
inspect a module (``sandbus inspect``). The CLI is :mod:`sandbus.host.cli.author`; the guide is docs/guide.md."""

from sandbus.host.authoring.build import APT_C_TOOLCHAIN, BuildResult, Progress, build_project, is_stale
from sandbus.host.authoring.errors import AuthoringError, BuildError, ToolchainMissingError
from sandbus.host.authoring.inspector import ExportInfo, ImportInfo, ManifestCheck, WasmReport, inspect_wasm
from sandbus.host.authoring.project import (
    BUILD_DIR,
    Language,
    Project,
    check_project_name,
    detect_project,
    guest_sdk_dir,
)
from sandbus.host.authoring.scaffold import scaffold

__all__ = [
    "APT_C_TOOLCHAIN",
    "AuthoringError",
    "BUILD_DIR",
    "BuildError",
    "BuildResult",
    "ExportInfo",
    "ImportInfo",
    "Language",
    "ManifestCheck",
    "Progress",
    "Project",
    "ToolchainMissingError",
    "WasmReport",
    "build_project",
    "check_project_name",
    "detect_project",
    "guest_sdk_dir",
    "inspect_wasm",
    "is_stale",
    "scaffold",
]
