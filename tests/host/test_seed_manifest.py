"""The design's own example manifest (tests/host/fixtures/seed_manifest.toml, verbatim) loads as written:
every section and key is understood, and only its two honest checks fail -- its ``[dependencies]`` name Rust
crates (no such plugins here) and its ``min_runtime_version = "0.3.0"`` is above this runtime's version."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbus.host.lifecycle import PluginManager
from sandbus.host.lifecycle.deps import load_order
from sandbus.host.lifecycle.loader import RUNTIME_VERSION
from sandbus.host.lifecycle.manifest import parse_manifest
from sandbus.host.lifecycle.policy import Policy, load_policy, resolve
from sandbus.host.sandbox.config import DirGrant
from sandbus.sdk.errors import DependencyError, ManifestError, ResourceLimitError, SecurityViolationError
from tests.conftest import AuditLog

SEED = Path(__file__).resolve().parent / "fixtures" / "seed_manifest.toml"
SANDBUS = Path(sys.executable).parent / "sandbus"
#: What the seed's two checks become when they hold: this runtime's version, and a plugin that is present.
HOLDING = {
    'min_runtime_version = "0.3.0"': f'min_runtime_version = "{RUNTIME_VERSION}"',
    'serde = "1.0"\nserde_json = "1.0"\nregex = "1.0"': 'tokenizer = "1.0"',
}


def seed_text(*, holding: bool = False) -> str:
    text = SEED.read_text(encoding="utf-8")
    for old, new in HOLDING.items() if holding else ():
        assert old in text
        text = text.replace(old, new)
    return text


#: An operator policy that allows everything the seed asks for (its 60 s timeout is above the default ceiling).
POLICY = """
[capabilities]
allowed = ["compute", "filesystem", "environment", "network", "storage"]
[filesystem]
readable = ["{root}"]
writable = ["{root}"]
[network]
allowed_hosts = ["api.nlp-service.com", "cdn.models.com"]
[environment]
allowed_vars = ["NLP_API_KEY", "MODEL_CACHE_DIR"]
[limits]
timeout_seconds = 60.0
"""


@pytest.fixture
def node(tmp_path: Path, c_guest: Callable[[str], Path]) -> tuple[Path, Path, Policy]:
    """A plugin directory with text_processor.wasm (the raw-WASI test guest) and the tokenizer plugin the
    holding variant depends on; the plugin's data directories; the policy."""
    plugins, root = tmp_path / "plugins", tmp_path / "data"
    plugins.mkdir()
    data = root / "text_processor"
    for sub in ("data", "models", "output", "cache"):
        (data / sub).mkdir(parents=True)
    (data / "data" / "a.txt").write_text("alpha")
    (data / "data" / "secret.key").write_text("KEY")
    shutil.copy(c_guest("fs_raw"), plugins / "text_processor.wasm")
    shutil.copy(c_guest("fs_raw"), plugins / "tokenizer.wasm")
    (plugins / "tokenizer.toml").write_text('[plugin]\nname = "tokenizer"\nversion = "1.0.3"\n')
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(POLICY.format(root=root))
    return plugins, root, load_policy(policy_file)


@pytest.fixture
def manager(node: tuple[Path, Path, Policy], audit: AuditLog) -> Iterator[PluginManager]:
    plugins, root, policy = node
    m = PluginManager(plugins, policy=policy, data_root=root, on_audit=audit,
                      host_env={"NLP_API_KEY": "k", "MODEL_CACHE_DIR": "/cache"})
    yield m
    m.close()


def test_seed_is_understood_key_by_key() -> None:
    """Parsed as written: no section or key unknown, each with its meaning."""
    m = parse_manifest(seed_text(), expected_name="text_processor")
    assert m.plugin.repository == "https://github.com/example/text-processor-plugin"
    assert m.plugin.documentation == "https://docs.example.com/plugins/text-processor"
    assert m.plugin.min_runtime_version == "0.3.0"
    # read_files / environment_vars without their capabilities: asked for as optional
    assert m.capabilities.required == ("compute",)
    assert m.capabilities.optional == ("network", "storage", "filesystem", "environment")
    assert m.permissions.read_files == ("data/*.txt", "models/*.bin")
    assert m.permissions.write_files == ("output/*.json", "cache/*.tmp")
    assert (m.resources.memory_mb, m.resources.timeout_seconds, m.resources.max_fuel) == (128, 60.0, 50_000_000)
    assert m.resources.max_open_files == 20
    assert sorted(m.dependencies) == ["regex", "serde", "serde_json"]
    assert (m.build.optimize, m.build.target, m.build.features) == (True, "wasm32-wasi", ("simd",))
    assert (m.metadata.category, m.metadata.tags) == ("text-processing", ("nlp", "text", "processing"))


def test_seed_has_exactly_its_two_honest_problems(node: tuple[Path, Path, Policy]) -> None:
    """Of every check a node makes -- manifest, runtime version, dependencies, policy -- exactly two fail."""
    _, root, policy = node
    m = parse_manifest(seed_text(), expected_name="text_processor")
    problems: list[str] = []
    if not m.runtime_compatible(RUNTIME_VERSION):
        problems.append("min_runtime_version")
    refused = load_order({m.name: m}).refused.get(m.name)
    if refused is not None:
        problems.append("dependencies")
        assert "no plugin 'regex' is available" in refused.message  # the first of the three crates
    grant = resolve(m, policy, data_root=root / m.name, host_env={})
    assert problems == ["min_runtime_version", "dependencies"]
    assert grant.limits.max_open_files == 20
    by_guest = {d.guest: d for d in grant.capabilities.dirs}
    assert by_guest["/data"] == DirGrant(host=root / m.name / "data", guest="/data", patterns=("*.txt",))
    assert by_guest["/output"] == DirGrant(host=root / m.name / "output", guest="/output", writable=True,
                                           patterns=("*.json",), write_patterns=("*.json",))


def test_seed_as_written_is_refused_for_its_runtime_version_then_its_dependencies(
        node: tuple[Path, Path, Policy], manager: PluginManager) -> None:
    """A node reports the two problems one at a time, each as the typed error that says what to fix."""
    plugins, _, _ = node
    (plugins / "text_processor.toml").write_text(seed_text())
    with pytest.raises(ManifestError, match=r"requires sandbus runtime >= 0\.3\.0, this runtime is 0\.1\.0") as info:
        manager.load("text_processor")
    assert info.value.key == "plugin.min_runtime_version"
    (plugins / "text_processor.toml").write_text(seed_text().replace('"0.3.0"', f'"{RUNTIME_VERSION}"'))
    with pytest.raises(DependencyError, match="no plugin 'regex' is available"):
        manager.load("text_processor")


def test_seed_loads_when_its_two_checks_hold(node: tuple[Path, Path, Policy], manager: PluginManager,
                                            audit: AuditLog) -> None:
    """With this runtime's version and a dependency that is present, it loads, shows every field, and what it
    asks for is what it gets: `data/*.txt` reads data/a.txt and not data/secret.key, and max_open_files = 20."""
    plugins, _, _ = node
    (plugins / "text_processor.toml").write_text(seed_text(holding=True))
    report = manager.discover_and_load()
    assert report.failed == {}
    assert report.loaded == ("tokenizer", "text_processor")
    info = manager.info("text_processor")
    assert (info.version, info.author, info.license) == ("1.2.0", "Example Corp", "MIT")
    assert info.repository == "https://github.com/example/text-processor-plugin"
    assert info.documentation == "https://docs.example.com/plugins/text-processor"
    assert (info.category, info.tags) == ("text-processing", ("nlp", "text", "processing"))
    assert info.max_open_files == 20
    assert manager.grant("text_processor").granted == {"compute", "network", "storage", "filesystem", "environment"}
    # preopens: 3 the decoy "/", then write_files' directories (output, cache), then read_files' (data, models)
    assert manager.execute_json("text_processor", "fs", "open|6|0|0|2|0|a.txt").endswith("data=alpha")
    with pytest.raises(SecurityViolationError, match="matches none of the patterns granted in /data"):
        manager.execute_json("text_processor", "fs", "open|6|0|0|2|0|secret.key")
    assert manager.execute_json("text_processor", "fs", "openmany|6|20") == "e=0 fd=27"
    with pytest.raises(ResourceLimitError, match="already has 20 files open"):
        manager.execute_json("text_processor", "fs", "openmany|6|1")
    assert audit.kinds().count("security.fs_denied") == 1


def test_seed_fields_in_inspect(node: tuple[Path, Path, Policy]) -> None:
    """`sandbus inspect` shows every section of the manifest beside the module, and says when this runtime is
    too old for it."""
    plugins, _, _ = node
    manifest = plugins / "text_processor.toml"
    manifest.write_text(seed_text(holding=True))
    wasm = str(plugins / "text_processor.wasm")
    run = subprocess.run([str(SANDBUS), "inspect", wasm, "--json"], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL, env={**os.environ, "NO_COLOR": "1"})
    report = json.loads(run.stdout)
    details = report["manifest"]["details"]
    assert report["manifest"]["valid"] is True
    assert details["plugin"]["repository"] == "https://github.com/example/text-processor-plugin"
    assert details["plugin"]["documentation"] == "https://docs.example.com/plugins/text-processor"
    assert details["resources"]["max_open_files"] == 20
    assert details["build"] == {"optimize": True, "target": "wasm32-wasi", "features": ["simd"]}
    assert details["permissions"]["read_files"] == ["data/*.txt", "models/*.bin"]
    assert details["dependencies"] == {"tokenizer": {"version": "1.0", "optional": False}}
    assert details["metadata"]["tags"] == ["nlp", "text", "processing"]
    assert "config" not in details
    text = subprocess.run([str(SANDBUS), "inspect", wasm], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"}).stdout
    for needle in ("plugin.repository", "https://github.com/example/text-processor-plugin", "plugin.documentation",
                   "resources.max_open_files", "build.features", "simd", "permissions.write_files",
                   "output/*.json, cache/*.tmp", "dependencies.tokenizer", "metadata.category"):
        assert needle in text, needle
    manifest.write_text(seed_text())  # as written: this runtime is too old for it
    run = subprocess.run([str(SANDBUS), "inspect", wasm, "--json"], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 1
    checked = json.loads(run.stdout)["manifest"]
    assert checked["valid"] is False
    assert "requires sandbus runtime >= 0.3.0" in checked["error"]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("repository", '"javascript:alert(1)"', "must be an http(s) URL"),
    ("repository", '"file:///etc/passwd"', "must be an http(s) URL"),
    ("documentation", '"https://"', "must be an http(s) URL"),
    ("documentation", '"https://user:pw@example.com/"', "must not carry a user name or password"),
    ("repository", '"https://example.com/\\u001b[2J"', "without spaces or control characters"),
    ("repository", '"https://example.com/ x"', "without spaces or control characters"),
    ("repository", f'"https://example.com/{"a" * 2100}"', "at most 2048 characters"),
    ("documentation", "42", "expected a string"),
])
def test_hostile_links_are_refused_naming_the_key(key: str, value: str, message: str) -> None:
    text = seed_text(holding=True).replace(f"{key} = ", f"{key} = {value}\n_old_{key} = ", 1)
    text = "\n".join(line for line in text.splitlines() if not line.startswith(f"_old_{key}"))
    with pytest.raises(ManifestError, match=re.escape(message)) as info:
        parse_manifest(text)
    assert info.value.key == f"plugin.{key}"


@pytest.mark.parametrize(("section", "message", "key"), [
    ("[resources]\nmax_open_files = 0\n", "greater than 0", "resources.max_open_files"),
    ("[resources]\nmax_open_files = 100000\n", "less than or equal to 65536", "resources.max_open_files"),
    ("[resources]\nmax_open_files = 2.5\n", "expected an integer", "resources.max_open_files"),
    ("[build]\ntarget = \"wasm64\"\n", "unknown build target", "build.target"),
    ("[build]\nfeatures = [\"simdd\"]\n", "did you mean 'simd'?", "build.features"),
    ("[build]\ncommand = \"make\"\n", "unknown key 'command' in [build]", "build.command"),
    ("[capabilities]\nrequired = [\"filesystem\"]\n[permissions]\nread_files = [\"*.txt\"]\n",
     "a glob names files in a directory", "permissions.read_files"),
    ("[capabilities]\nrequired = [\"filesystem\"]\n[permissions]\nread_files = [\"d*/x.txt\"]\n",
     "may only be in the last component", "permissions.read_files"),
    ("[capabilities]\nrequired = [\"filesystem\"]\n[permissions]\nwrite_files = [\"data/**\"]\n",
     "'**' (any depth) is not supported", "permissions.write_files"),
    ("[capabilities]\nrequired = [\"filesystem\"]\n[permissions]\nread_files = [\"data/../*.txt\"]\n",
     "contains a '..' component", "permissions.read_files"),
    ("[metadata]\ntags = [\"" + "t" * 65 + "\"]\n", "at most 64 characters", "metadata.tags"),
])
def test_new_keys_are_bounded(section: str, message: str, key: str) -> None:
    with pytest.raises(ManifestError, match=re.escape(message)) as info:
        parse_manifest('[plugin]\nname = "x"\nversion = "1.0.0"\n' + section)
    assert info.value.key == key


def test_max_open_files_above_the_policy_ceiling_is_refused(tmp_path: Path) -> None:
    m = parse_manifest('[plugin]\nname = "x"\nversion = "1.0.0"\n[resources]\nmax_open_files = 2000\n')
    with pytest.raises(SecurityViolationError, match=r"max_open_files = 2000, above the ceiling of 1024"):
        resolve(m, Policy.default(), data_root=tmp_path, host_env={})
    silent = parse_manifest('[plugin]\nname = "x"\nversion = "1.0.0"\n')
    assert resolve(silent, Policy.default(), data_root=tmp_path, host_env={}).limits.max_open_files == 256
    lowered = Policy.model_validate({"limits": {"max_open_files": 64}})
    assert lowered.defaults.max_open_files == 64  # an unstated default never exceeds a stated ceiling
    assert resolve(silent, lowered, data_root=tmp_path, host_env={}).limits.max_open_files == 64


def test_globs_of_one_directory_make_one_grant(tmp_path: Path) -> None:
    """read `d/*.txt` + write `d/*.json`: one grant, both readable, only *.json writable; a whole-directory
    entry beats the globs for its access."""
    (tmp_path / "d").mkdir()
    policy = Policy.model_validate({"capabilities": {"allowed": ["compute", "filesystem"]},
                                    "filesystem": {"writable": [str(tmp_path)]}})

    def dirs(perms: str) -> tuple[DirGrant, ...]:
        m = parse_manifest('[plugin]\nname = "x"\nversion = "1.0.0"\n[permissions]\n' + perms)
        return resolve(m, policy, data_root=tmp_path, host_env={}).capabilities.dirs

    both = dirs('read_files = ["d/*.txt"]\nwrite_files = ["d/*.json"]\n')
    assert both == (DirGrant(host=tmp_path / "d", guest="/d", writable=True, patterns=("*.txt", "*.json"),
                             write_patterns=("*.json",)),)
    assert both[0].reaches("a.txt", write=False)
    assert not both[0].reaches("a.txt", write=True)
    assert both[0].reaches("a.json", write=True)
    assert not both[0].reaches("a.key", write=False)
    whole_read = dirs('read_files = ["d"]\nwrite_files = ["d/*.json"]\n')[0]
    assert (whole_read.patterns, whole_read.write_patterns) == ((), ("*.json",))
    assert whole_read.reaches("anything", write=False)
    assert not whole_read.reaches("anything", write=True)
    whole_write = dirs('read_files = ["d/*.txt"]\nwrite_files = ["d"]\n')[0]
    assert not whole_write.filtered
