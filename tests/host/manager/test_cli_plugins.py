"""`sandbus plugins check DIR`: a table of every plugin with its reason, and the exit code that gates a deploy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.host.manager.factory import plugin_manifest, write_plugin

SANDBUS = Path(sys.executable).parent / "sandbus"


def check(*args: str) -> subprocess.CompletedProcess[str]:
    assert SANDBUS.exists(), "the sandbus console script is not installed (pip install -e .)"
    return subprocess.run([str(SANDBUS), "plugins", "check", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "250"})


def test_all_valid_exits_0(plugins_dir: Path, pdir: Path) -> None:
    for f in plugins_dir.iterdir():
        shutil.copy(f, pdir / f.name)
    r = check(str(pdir), "--policy", str(plugins_dir.parent / "policy.toml"))  # the examples' policy
    assert r.returncode == 0, r.stdout + r.stderr
    assert "echo" in r.stdout
    assert "text_processor" in r.stdout
    assert f"{len(list(plugins_dir.glob('*.wasm')))} valid, 0 invalid" in r.stdout


def test_invalid_plugins_are_listed_with_reasons_and_exit_1(pdir: Path) -> None:
    write_plugin(pdir, "good")
    (pdir / "nomanifest.wasm").write_bytes(b"\0asm\1\0\0\0")
    (pdir / "badname.toml").write_text(plugin_manifest("other"))
    (pdir / "badname.wasm").write_bytes(b"\0asm\1\0\0\0")
    write_plugin(pdir, "needy", deps={"ghost": "^1"})
    r = check(str(pdir))
    assert r.returncode == 1, r.stdout + r.stderr
    lines = {line.split("│")[1].strip(): line for line in r.stdout.splitlines() if line.startswith("│")}
    assert "valid" in lines["good"]
    assert "manifest missing" in lines["nomanifest"]
    assert "plugin name 'other' does not match the file" in lines["badname"]
    assert "requires 'ghost' ^1, but no plugin 'ghost' is available" in lines["needy"]
    assert "1 valid, 3 invalid" in r.stdout


def test_policy_refusal_and_json_output(pdir: Path, tmp_path: Path) -> None:
    write_plugin(pdir, "netty", extra='[capabilities]\nrequired = ["network"]')
    policy = tmp_path / "policy.toml"
    policy.write_text('[capabilities]\nallowed = ["compute", "network"]\n')
    assert check(str(pdir), "--policy", str(policy)).returncode == 0
    r = check(str(pdir), "--json")
    assert r.returncode == 1
    (info,) = json.loads(r.stdout)
    assert info["name"] == "netty"
    assert info["status"] == "failed"
    assert info["last_error_code"] == "security.violation"


def test_bad_usage_exits_2(pdir: Path, tmp_path: Path) -> None:
    r = check(str(tmp_path / "nowhere"))
    assert r.returncode == 2
    assert "is not a directory" in r.stderr
    bad_policy = tmp_path / "policy.toml"
    bad_policy.write_text("[capabilities]\nalowed = []\n")
    r = check(str(pdir), "--policy", str(bad_policy))
    assert r.returncode == 2
    assert "did you mean 'allowed'" in r.stderr


def test_empty_directory(pdir: Path) -> None:
    r = check(str(pdir))
    assert r.returncode == 0
    assert "no plugins" in r.stdout
