"""Where a plugin's module and manifest are, given what a test names: a ``.wasm``, a plugin project
(built first, when stale) or a directory holding one plugin."""

from __future__ import annotations

from pathlib import Path

from sandbus.sdk.errors import PluginNotFoundError

__all__ = ["locate_plugin"]


def locate_plugin(plugin: str | Path, *, build: bool = True) -> tuple[Path, Path | None]:
    """``(wasm, manifest or None)`` for ``plugin``.

    Parameters:
        plugin: ``x.wasm`` (its manifest is ``x.toml`` beside it, if there), a project directory
            (``sandbus new``'s layout: the module is ``build/NAME.wasm``), or a directory with exactly
            one ``.wasm``.
        build: build a project whose module is missing or older than its sources (as
            ``sandbus build`` would); otherwise a missing module is an error saying to build it.

    Raises:
        PluginNotFoundError: nothing loadable at ``plugin``.
        sandbus.host.authoring.BuildError: building the project failed (the compiler output is in it).
    """
    path = Path(plugin)
    if path.is_dir():
        from sandbus.host.authoring import AuthoringError, build_project, detect_project

        try:
            project = detect_project(path)
        except AuthoringError:
            project = None
        if project is not None:
            if build:
                build_project(project.root)
            elif not project.wasm.exists():
                raise PluginNotFoundError(f"{project.wasm} does not exist: run `sandbus build {path}` first",
                                          plugin=project.name, path=str(project.wasm))
            return project.wasm, project.build_dir / project.manifest.name
        wasms = sorted(path.glob("*.wasm"))
        if len(wasms) != 1:
            raise PluginNotFoundError(
                f"{path} is neither a plugin project nor a directory holding exactly one .wasm "
                f"(it holds {len(wasms)})", path=str(path))
        path = wasms[0]
    if not path.exists():
        raise PluginNotFoundError(f"no plugin file at {path}", plugin=path.stem, path=str(path))
    manifest = path.with_suffix(".toml")
    return path, manifest if manifest.exists() else None
