"""``sandbus keygen / push / search / pull / install`` against a real JetStream server: output, exit codes, and
refusals that happen before anything connects or is written."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import nacl.signing
import nkeys  # type: ignore[import-untyped]
import orjson
import pytest
from nats.aio.client import Client as NATS

from sandbus.bus.server import NatsServer
from sandbus.host.cluster.names import ARTIFACTS_BUCKET
from tests.cluster.conftest import Run, manifest_of, run_nats

ROOT = Path(__file__).resolve().parents[2]


def test_keygen_writes_a_private_seed_prints_its_key_and_never_overwrites(tmp_path: Path, sandbus: Run) -> None:
    seed = tmp_path / "me.nk"
    code, out, _ = sandbus("keygen", "-o", str(seed))
    assert code == 0
    assert stat.S_IMODE(os.stat(seed).st_mode) == 0o600
    public = (tmp_path / "me.nk.pub").read_text().strip()
    assert out.splitlines()[-1] == public
    before = seed.read_bytes()
    code, _, err = sandbus("keygen", "-o", str(seed))
    assert code == 2
    assert "exists already" in err
    assert seed.read_bytes() == before


def test_push_search_pull_install(url: str, key: Path, tmp_path: Path, plugins_dir: Path, sandbus: Run) -> None:
    public = (tmp_path / "pub.nk.pub").read_text().strip()
    code, out, err = sandbus("push", str(plugins_dir / "echo.wasm"), "--key", str(key), "-s", url)
    assert code == 0, err
    digest = hashlib.sha256((plugins_dir / "echo.wasm").read_bytes()).hexdigest()
    assert out.startswith(f"pushed echo@1.0.0 (sha256 {digest}, 433 bytes) as {public}")
    one = tmp_path / "one"
    one.mkdir()
    for ext in ("wasm", "toml"):
        shutil.copy(plugins_dir / f"text_processor.{ext}", one / f"text_processor.{ext}")
    assert sandbus("push", str(one), "--key", str(key), "-s", url)[0] == 0  # a directory holding one plugin

    code, out, _ = sandbus("search", "-s", url)
    assert code == 0
    assert "echo" in out
    assert "text_processor" in out
    assert public[:6] in out
    code, out, _ = sandbus("search", "TEXT", "--json", "-s", url)
    assert [p["name"] for p in orjson.loads(out)] == ["text_processor"]

    code, out, err = sandbus("pull", "echo@^1", "-o", str(tmp_path / "vendor"), "-s", url)
    assert code == 0, err
    assert out.startswith("pulled echo@1.0.0")
    assert (tmp_path / "vendor" / "echo.wasm").read_bytes() == (plugins_dir / "echo.wasm").read_bytes()
    assert (tmp_path / "vendor" / "echo.toml").read_bytes() == (plugins_dir / "echo.toml").read_bytes()

    code, out, err = sandbus("install", "text_processor", "--plugins", str(tmp_path / "plugins"), "--trust", public,
                             "-s", url)
    assert code == 0, err
    assert "installed text_processor@1.0.0" in out
    assert sorted(p.name for p in (tmp_path / "plugins").iterdir()) == ["text_processor.toml", "text_processor.wasm"]


def test_push_refusals(url: str, key: Path, tmp_path: Path, plugins_dir: Path, sandbus: Run) -> None:
    echo = str(plugins_dir / "echo.wasm")
    assert sandbus("push", echo, "--key", str(key), "-s", url)[0] == 0
    code, _, err = sandbus("push", echo, "--key", str(key), "-s", url)
    assert code == 2
    assert "already published" in err

    build = tmp_path / "build"
    build.mkdir()
    shutil.copy(plugins_dir / "echo.wasm", build / "echo.wasm")
    (build / "echo.toml").write_bytes(manifest_of(plugins_dir, "echo", version="1.1.0+git.abc"))
    code, _, err = sandbus("push", str(build), "--key", str(key), "-s", url)
    assert code == 2
    assert "build metadata" in err

    (build / "echo.toml").write_bytes(manifest_of(plugins_dir, "echo", name="other", version="1.1.0"))
    code, _, err = sandbus("push", str(build), "--key", str(key), "-s", url)
    assert code == 2
    assert "does not match the file" in err

    (tmp_path / "garbage.nk").write_text("SAnot-a-seed")
    user_seed = tmp_path / "user.nk"
    user_seed.write_bytes(nkeys.encode_seed(bytes(nacl.signing.SigningKey.generate()), nkeys.PREFIX_BYTE_USER))
    for seed, needle in ((tmp_path / "garbage.nk", "not an nkeys seed"), (user_seed, "a user key"),
                         (tmp_path, "not a regular file"), (tmp_path / "missing.nk", "cannot read"),
                         (Path(str(key) + ".pub"), "not an nkeys seed")):
        code, _, err = sandbus("push", echo, "--key", str(seed), "-s", url)
        assert code == 2, (seed, err)
        assert needle in err, (seed, err)

    code, _, err = sandbus("push", str(plugins_dir), "--key", str(key), "-s", url)
    assert code == 2
    assert "exactly one plugin" in err


@pytest.mark.parametrize("ref", ["../etc", "echo/../../x", "echo.*", "echo.>", ">", "echo@^1;rm", "Echo"])
def test_a_reference_that_is_not_a_name_is_refused_before_connecting(ref: str, tmp_path: Path, sandbus: Run) -> None:
    # the server does not exist: a usage error (2), not "NATS unreachable" (5), shows nothing connected
    code, _, err = sandbus("pull", ref, "-o", str(tmp_path / "out"), "-s", "nats://127.0.0.1:1")
    assert code == 2, err
    assert "not a plugin name" in err or "not a version range" in err
    assert not (tmp_path / "out").exists()


def test_unknown_plugins_and_ranges_say_what_exists(url: str, key: Path, tmp_path: Path, plugins_dir: Path,
                                                    sandbus: Run) -> None:
    assert sandbus("push", str(plugins_dir / "echo.wasm"), "--key", str(key), "-s", url)[0] == 0
    code, _, err = sandbus("pull", "greeter", "-o", str(tmp_path), "-s", url)
    assert code == 2
    assert "no such plugin" in err
    code, _, err = sandbus("install", "echo@^2", "--plugins", str(tmp_path / "p"), "-s", url)
    assert code == 2
    assert "no version matches '^2'; the registry has 1.0.0" in err


def test_a_tampered_or_untrusted_artifact_exits_4_and_writes_nothing(url: str, key: Path, tmp_path: Path,
                                                                       plugins_dir: Path, sandbus: Run) -> None:
    assert sandbus("push", str(plugins_dir / "echo.wasm"), "--key", str(key), "-s", url)[0] == 0
    other = tmp_path / "other.nk"
    assert sandbus("keygen", "-o", str(other))[0] == 0
    out = tmp_path / "out"
    code, _, err = sandbus("pull", "echo", "-o", str(out), "--trust", f"{other}.pub", "-s", url)
    assert code == 4
    assert "not a trusted publisher" in err
    policy = tmp_path / "policy.toml"
    policy.write_text("[capabilities]\nallowed = [\"compute\"]\n")
    code, _, err = sandbus("pull", "echo", "-o", str(out), "--policy", str(policy), "-s", url)
    assert code == 4
    assert "no trusted publishers" in err
    assert not out.exists() or not list(out.iterdir())
    policy.write_text(f'[registry]\ntrusted_publishers = ["{Path(f"{key}.pub").read_text().strip()}"]\n')
    assert sandbus("pull", "echo", "-o", str(out), "--policy", str(policy), "-s", url)[0] == 0

    async def tamper(nc: NATS) -> None:
        obs = await nc.jetstream().object_store(ARTIFACTS_BUCKET)
        await obs.put("echo/1.0.0.wasm", b"\0asm" + b"\1" * 429)

    run_nats(url, tamper)
    code, _, err = sandbus("install", "echo", "--plugins", str(tmp_path / "p"), "-s", url)
    assert code == 4
    assert "sha256" in err
    assert not list((tmp_path / "p").iterdir())


def test_a_server_without_jetstream_is_one_line_and_exit_5(tmp_path: Path, sandbus: Run) -> None:
    server = NatsServer(jetstream=False).start()
    try:
        code, _, err = sandbus("search", "-s", server.url)
    finally:
        server.stop()
    assert code == 5
    assert "JetStream is not enabled" in err
    assert len(err.strip().splitlines()) == 1


def test_the_installed_command_runs_search(url: str, key: Path, plugins_dir: Path, sandbus: Run) -> None:
    assert sandbus("push", str(plugins_dir / "echo.wasm"), "--key", str(key), "-s", url)[0] == 0
    done = subprocess.run([sys.executable, "-m", "sandbus", "search", "echo", "--json", "-s", url], cwd=ROOT,
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert [p["versions"] for p in orjson.loads(done.stdout)] == [["1.0.0"]]
