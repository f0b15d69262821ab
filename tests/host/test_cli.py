"""`sandbus run`: output and exit codes, through the installed console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import wasmtime

# The console script installed beside the interpreter running the tests.
SANDBUS = Path(sys.executable).parent / "sandbus"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert SANDBUS.exists(), "the sandbus console script is not installed (pip install -e .)"
    return subprocess.run([str(SANDBUS), "run", *args], capture_output=True, text=True, input=stdin, timeout=60)


def test_success_prints_reply(plugins_dir: Path) -> None:
    r = run(str(plugins_dir / "text_processor.wasm"), "--input",
            '{"action":"process_data","data":{"input":"hello world"}}')
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == '{"success":true,"result":{"processed":{"input":"hello world"}},"error":null}'


def test_input_from_stdin(plugins_dir: Path) -> None:
    r = run(str(plugins_dir / "echo.wasm"), "--input", "-", stdin='{"from":"stdin"}')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"from": "stdin"}


def test_plugin_reported_error_exits_1(plugins_dir: Path) -> None:
    r = run(str(plugins_dir / "text_processor.wasm"), "--input", '{"action":"fly"}')
    assert r.returncode == 1
    assert json.loads(r.stdout)["error"] == "Unknown action: fly"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["missing.wasm"], "no plugin file"),
        (["{plugins}/echo.wasm", "--input", "{not json"], "not valid JSON"),
        (["{plugins}/echo.toml"], "not a valid WebAssembly module"),
        (["{plugins}/echo.wasm", "--allow-read", "/definitely/not/here"], "not a directory"),
        (["{plugins}/echo.wasm", "--bogus"], "No such option"),
    ],
)
def test_bad_usage_exits_2(plugins_dir: Path, args: list[str], needle: str) -> None:
    r = run(*[a.replace("{plugins}", str(plugins_dir)) for a in args])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr


def test_limit_exits_3_and_names_it(tmp_path: Path, wat: Callable[[str], bytes]) -> None:
    plugin = tmp_path / "adversary.wasm"
    plugin.write_bytes(wat("adversary"))
    r = run(str(plugin), "--function", "loop_forever", "--timeout", "0.1", "--fuel", str(10**15))
    assert r.returncode == 3
    assert "plugin 'adversary'" in r.stderr
    assert "0.1 s timeout" in r.stderr
    r = run(str(plugin), "--function", "loop_forever", "--fuel", "1000")
    assert r.returncode == 3
    assert "out of fuel" in r.stderr


def test_security_violation_exits_4(tmp_path: Path, wat: Callable[[str], bytes]) -> None:
    plugin = tmp_path / "adversary.wasm"
    plugin.write_bytes(wat("adversary"))
    r = run(str(plugin), "--function", "get_env")
    assert r.returncode == 4
    assert "'HOME' was not granted" in r.stderr


def test_trap_exits_1(tmp_path: Path, wat: Callable[[str], bytes]) -> None:
    plugin = tmp_path / "adversary.wasm"
    plugin.write_bytes(wat("adversary"))
    r = run(str(plugin), "--function", "trap")
    assert r.returncode == 1
    assert "unreachable" in r.stderr


def test_grants_from_the_command_line(tmp_path: Path, c_guest: Callable[[str], Path]) -> None:
    (tmp_path / "f.txt").write_text("hi")
    guest = str(c_guest("capabilities"))
    r = run(guest, "--function", "read_file", "--input", json.dumps(str(tmp_path / "f.txt")))
    assert r.returncode == 4
    r = run(guest, "--function", "read_file", "--input", json.dumps(str(tmp_path / "f.txt")),
            "--allow-read", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"content": "hi"}


def test_module_without_the_abi_exits_2(tmp_path: Path) -> None:
    p = tmp_path / "x.wasm"
    p.write_bytes(wasmtime.wat2wasm("(module)"))
    r = run(str(p))
    assert r.returncode == 2
    assert "does not export a memory" in r.stderr


def test_new_offers_exactly_the_languages_authoring_knows() -> None:
    """`sandbus new --lang` spells its choices out so that registering it imports no host module: they must
    stay the values of the Language enum the scaffolder takes."""
    import typing

    from sandbus.host.authoring import Language
    from sandbus.host.cli.author import LanguageName

    assert typing.get_args(LanguageName) == tuple(lang.value for lang in Language)
    r = subprocess.run([str(SANDBUS), "new", "x", "--lang", "cobol"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COLUMNS": "200"})  # the error box on one line
    assert r.returncode == 2
    assert "'cobol' is not one of 'c', 'assemblyscript', 'python', 'wat'" in r.stderr
