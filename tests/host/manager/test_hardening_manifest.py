"""Validators take whole strings only, and a manifest a node cannot serve is refused by the same rule
everywhere: by ``sandbus plugins check``, at node start and when dropped into a running node."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbus.bus.server import NatsServer
from sandbus.host.authoring import AuthoringError
from sandbus.host.authoring.project import check_project_name
from sandbus.host.lifecycle.manifest import (
    MAX_TOML_BYTES,
    check_env_name,
    check_request_pattern,
    check_subject,
    parse_host,
    parse_manifest,
)
from sandbus.host.lifecycle.policy import load_policy
from sandbus.sdk.client import Client
from sandbus.sdk.errors import InvalidModuleError, ManifestError, PolicyError
from sandbus.sdk.subjects import (
    audit_subject,
    check_token,
    check_topic,
    control_subject,
    dlq_subject,
    msg_subject,
    plugin_queue,
    request_subject,
    topic_subject,
)
from tests.bus.conftest import NodeProcess
from tests.host.manager.factory import wait_until

SANDBUS = Path(sys.executable).parent / "sandbus"

HEADER = '[plugin]\nname = "probe"\nversion = "1.0.0"\n'

# (what, manifest text with {v} where the value goes, the valid value). Each must accept the value and
# refuse it with a trailing newline (TOML's "\n" escape puts a real newline into the string).
MANIFEST_CASES = [
    ("plugin name", '[plugin]\nname = "{v}"\nversion = "1.0.0"\n', "probe"),
    ("version", '[plugin]\nname = "probe"\nversion = "{v}"\n', "1.0.0"),
    ("min_runtime_version", HEADER + 'min_runtime_version = "{v}"\n', "0.1.0"),
    ("sha256", HEADER + 'sha256 = "{v}"\n', "a" * 64),
    ("dependency name", HEADER + '[dependencies]\n"{v}" = "^1.0"\n', "pricing"),
    ("dependency range", HEADER + '[dependencies]\npricing = "{v}"\n', "^1.0"),
    ("environment variable", HEADER + '[capabilities]\nrequired = ["environment"]\n'
     '[permissions]\nenvironment_vars = ["{v}"]\n', "API_URL"),
    ("network host", HEADER + '[capabilities]\nrequired = ["network"]\n[permissions]\nnetwork_hosts = ["{v}"]\n',
     "example.com"),
    ("network host:port", HEADER + '[capabilities]\nrequired = ["network"]\n'
     '[permissions]\nnetwork_hosts = ["{v}"]\n', "example.com:443"),
    ("publish topic", HEADER + '[capabilities]\nrequired = ["messaging"]\n'
     '[permissions]\npublish_topics = ["{v}"]\n', "orders.*"),
    ("request plugin", HEADER + '[capabilities]\nrequired = ["messaging"]\n'
     '[permissions]\nrequest_plugins = ["{v}"]\n', "pricing"),
    ("request function", HEADER + '[capabilities]\nrequired = ["messaging"]\n'
     '[permissions]\nrequest_plugins = ["{v}"]\n', "pricing.quote"),
    ("read directory", HEADER + '[capabilities]\nrequired = ["filesystem"]\n[permissions]\nread_files = ["{v}"]\n',
     "data"),
    ("subscription topic", HEADER + '[subscriptions]\ntopics = ["{v}"]\n', "orders.>"),
]


@pytest.mark.parametrize(("what", "template", "valid"), MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
@pytest.mark.parametrize("suffix", ["\\n", "\\r\\n", "\\u0000", "\\u001b[2J"])
def test_f08_manifest_validators_refuse_a_trailing_newline(what: str, template: str, valid: str,
                                                           suffix: str) -> None:
    parse_manifest(template.format(v=valid))  # the value itself is fine
    with pytest.raises(ManifestError):
        parse_manifest(template.format(v=valid + suffix))


def _refuses(check: Callable[[str], object], valid: str) -> None:
    check(valid)
    for bad in (valid + "\n", valid + "\r\n", "\n" + valid, valid + "\x00"):
        with pytest.raises(ValueError, match=r"must|expected|found|contains|control"):
            check(bad)


@pytest.mark.parametrize(
    ("check", "valid"),
    [
        (lambda v: check_token(v, "plugin"), "echo"),
        (check_topic, "orders.created"),
        (lambda v: check_topic(v, wildcards=True), "orders.*"),
        (topic_subject, "orders.created"),
        (lambda v: request_subject(v, "handle_request"), "echo"),
        (lambda v: request_subject("echo", v), "handle_request"),
        (msg_subject, "echo"),
        (dlq_subject, "echo"),
        (plugin_queue, "echo"),
        (audit_subject, "node-1"),
        (lambda v: control_subject(v, "list"), "node-1"),
        (lambda v: control_subject("node-1", v), "list"),
        (check_subject, "orders.>"),
        (check_request_pattern, "pricing.quote"),
        (check_env_name, "API_URL"),
        (parse_host, "example.com:8080"),
        (lambda v: parse_host(v, allow_wildcard=True), "*.example.com"),
    ],
    ids=["token", "topic", "topic-pattern", "topic-subject", "request-plugin", "request-function", "msg",
         "dlq", "queue", "audit", "control-node", "control-verb", "manifest-subject", "request-pattern", "env",
         "host", "host-wildcard"],
)
def test_f08_sdk_and_host_validators_take_whole_strings_only(check: Callable[[str], object], valid: str) -> None:
    _refuses(check, valid)


def test_f08_project_name_refuses_a_trailing_newline() -> None:
    check_project_name("echo")
    with pytest.raises(AuthoringError):
        check_project_name("echo\n")


@pytest.mark.parametrize("port", ["٨٠", "８０", "²", "0080000"])
def test_f08_ports_are_ascii_digits(port: str) -> None:
    with pytest.raises(ValueError, match="port"):
        parse_host(f"example.com:{port}")


@pytest.mark.parametrize(
    "section",
    [
        '[environment]\nallowed_vars = ["HOME\\n"]\n',
        '[network]\nallowed_hosts = ["example.com\\n"]\n',
        '[messaging]\npublish_topics = ["orders.x\\n"]\n',
        '[messaging]\nrequest_plugins = ["pricing\\n"]\n',
    ],
)
def test_f08_policy_validators_refuse_a_trailing_newline(tmp_path: Path, section: str) -> None:
    good = tmp_path / "good.toml"
    good.write_text(section.replace("\\n", ""), encoding="utf-8")
    load_policy(good)
    bad = tmp_path / "bad.toml"
    bad.write_text(section, encoding="utf-8")
    with pytest.raises(PolicyError):
        load_policy(bad)


def test_f08_oversized_manifest_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    from sandbus.host.lifecycle.manifest import load_manifest

    path = tmp_path / "probe.toml"
    path.write_bytes(HEADER.encode() + b"#" * (MAX_TOML_BYTES + 10) + b"\n")
    with pytest.raises(ManifestError, match="larger than"):
        load_manifest(path)


def test_f12_plugin_files_are_read_within_their_caps(tmp_path: Path) -> None:
    """A module or manifest far above its cap (sparse files: no disk used) is refused, never read whole."""
    from sandbus.host.lifecycle.loader import parse_files, read_plugin_files

    with (tmp_path / "big.wasm").open("wb") as f:
        f.truncate(1 << 30)
    (tmp_path / "big.toml").write_text(HEADER.replace("probe", "big"), encoding="utf-8")
    with pytest.raises(InvalidModuleError, match="larger than 1048576 bytes"):
        read_plugin_files(tmp_path, "big", max_module_bytes=1 << 20)
    (tmp_path / "big.wasm").write_bytes(b"\0asm\1\0\0\0")
    with (tmp_path / "big.toml").open("ab") as f:
        f.truncate(1 << 30)
    files = read_plugin_files(tmp_path, "big")
    assert files.manifest is not None
    assert len(files.manifest) == MAX_TOML_BYTES + 1
    with pytest.raises(ManifestError, match="larger than"):
        parse_files(files)


# --------------------------------------------------------------------------------------------------
# Finding 22: one topic rule, shared by `plugins check` and the node
# --------------------------------------------------------------------------------------------------

BAD_TOPICS = ["ordérs.x", "$JS.API.>", "$SYS.>", "orders.x\n", "a b", "orders..x", "ord*rs", ">.x", "orders.",
              "x" * 1025, "ok.\x1b"]
GOOD_TOPICS = ["orders.*", "orders.>", ">", "a-b_c.D9", "orders.created"]


@pytest.mark.parametrize("topic", BAD_TOPICS + GOOD_TOPICS)
def test_f22_manifest_and_node_share_one_topic_rule(topic: str) -> None:
    def accepted(check: Callable[[str], object]) -> bool:
        try:
            check(topic)
        except ValueError:
            return False
        return True

    by_manifest = accepted(lambda t: parse_manifest(HEADER + f"[subscriptions]\ntopics = [{json.dumps(t)}]\n"))
    by_node = accepted(lambda t: topic_subject(t, wildcards=True))  # what the node subscribes with
    assert by_manifest == by_node == (topic in GOOD_TOPICS)


def _bad_manifest(name: str, topic: str) -> str:
    return (f'[plugin]\nname = "{name}"\nversion = "1.0.0"\n[capabilities]\nrequired = ["compute"]\n'
            f"[subscriptions]\ntopics = [{json.dumps(topic)}]\n")


@pytest.fixture
def f22_dir(tmp_path: Path, plugins_dir: Path) -> Path:
    """echo (valid) and bad_utf (a non-ASCII topic token), with a policy beside the directory."""
    d = tmp_path / "plugins"
    d.mkdir()
    for ext in ("wasm", "toml"):
        shutil.copy(plugins_dir / f"echo.{ext}", d / f"echo.{ext}")
    shutil.copy(plugins_dir / "echo.wasm", d / "bad_utf.wasm")
    (d / "bad_utf.toml").write_text(_bad_manifest("bad_utf", "ordérs.x"), encoding="utf-8")
    (tmp_path / "policy.toml").write_text('[capabilities]\nallowed = ["compute"]\n', encoding="utf-8")
    return d


def test_f22_plugins_check_refuses_what_a_node_cannot_subscribe(f22_dir: Path) -> None:
    shutil.copy(f22_dir / "echo.wasm", f22_dir / "bad_sys.wasm")
    (f22_dir / "bad_sys.toml").write_text(_bad_manifest("bad_sys", "$JS.API.>"), encoding="utf-8")
    r = subprocess.run([str(SANDBUS), "plugins", "check", str(f22_dir), "--json"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1, (r.stdout, r.stderr)
    infos = {i["name"]: i for i in json.loads(r.stdout)}
    assert infos["echo"]["status"] == "loaded"
    for name, token in (("bad_utf", "'ordérs'"), ("bad_sys", "'$JS'")):
        assert infos[name]["status"] == "failed"
        assert infos[name]["last_error_code"] == "manifest.invalid"
        assert token in infos[name]["last_error"]
        assert "subscriptions.topics" in infos[name]["last_error"]


def _listing(url: str, node_id: str) -> dict[str, dict[str, object]]:
    async def go() -> dict[str, dict[str, object]]:
        async with await Client.connect(url) as c:
            view = await c.control(node_id, "list", timeout=5)
            return {p["name"]: p for p in view["plugins"]}

    return asyncio.run(go())


def _echo(url: str) -> object:
    async def go() -> object:
        async with await Client.connect(url) as c:
            return await c.request("echo", "handle_request", {"n": 1}, timeout=5)

    return asyncio.run(go())


def test_f22_node_starts_serves_the_valid_and_refuses_a_bad_plugin_alone(f22_dir: Path, tmp_path: Path) -> None:
    """At start (bad_utf is there) and when a bad plugin is dropped into the running node (bad_sys)."""
    server = NatsServer(jetstream=True).start()
    node = NodeProcess("f22", f22_dir, server.url, tmp_path / "f22.log", "--watch")
    try:
        node.wait_ready()
        listing = _listing(server.url, "f22")
        assert listing["echo"]["status"] == "loaded"
        assert listing["bad_utf"]["status"] == "failed"
        assert "'ordérs'" in str(listing["bad_utf"]["last_error"])
        assert _echo(server.url) is not None

        # Hot drop: the manifest first, then the module, each replaced atomically as a deploy would.
        for name, data in (("bad_sys.toml", _bad_manifest("bad_sys", "$JS.API.>").encode()),
                           ("bad_sys.wasm", (f22_dir / "echo.wasm").read_bytes())):
            tmp = f22_dir / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, f22_dir / name)
        wait_until(lambda: _listing(server.url, "f22").get("bad_sys", {}).get("status") == "failed", timeout=20,
                   what="the dropped plugin to be refused")
        listing = _listing(server.url, "f22")
        assert "'$JS'" in str(listing["bad_sys"]["last_error"])
        assert listing["echo"]["status"] == "loaded"
        assert _echo(server.url) is not None  # still serving
        assert node.proc.poll() is None
    finally:
        code = node.terminate()
        server.stop()
    log = (tmp_path / "f22.log").read_text(errors="replace")
    for name in ("bad_utf", "bad_sys"):  # each refusal audited
        assert f"sandbus.audit: lifecycle.load_failed {name}: cannot load:" in log, log
    assert "Task exception was never retrieved" not in log
    assert "Traceback" not in log
    assert code == 0, log


# --------------------------------------------------------------------------------------------------
# Finding 12 (siblings): TOML bombs, files that are not files, links out of the directory, names that
# are not text
# --------------------------------------------------------------------------------------------------

_BOMB_KEYS = "".join(f"k{i}" + ".a" * 30 + " = 1\n" for i in range(14000))  # ~1 MiB of 31-part keys

TOML_BOMBS = {
    "one long dotted key": "[config]\n" + "a" + ".a" * 5_000 + " = 1\n",  # 20,000 parts: 6 s, 1.5 GB
    "quoted dotted key": "[config]\n" + '"a"' + ' . "a"' * 100 + " = 1\n",
    "deep table header": "[config" + ".a" * 100 + "]\n",
    "many long dotted keys": "[config]\n" + _BOMB_KEYS,  # 2 s / 210 MiB before
    "deep arrays": "[config]\nx = " + "[" * 5000 + "]" * 5000 + "\n",  # RecursionError before
    "deep inline tables": "[config]\nx = " + "{a=" * 5000 + "1" + "}" * 5000 + "\n",
    "arrays behind a multi-line string": "[config]\nx = ['''a'''', " + "[" * 5000 + "]" * 5000 + "]\n",
    "nesting through keys and tables": "[config" + ".a" * 31 + "]\nx = " + ("{" + "b." * 30 + "c=") * 31
    + "1" + "}" * 31 + "\n",
}


@pytest.mark.parametrize("bomb", list(TOML_BOMBS), ids=list(TOML_BOMBS))
def test_f12_toml_bombs_are_refused_before_parsing(bomb: str, tmp_path: Path) -> None:
    import time

    text = HEADER + TOML_BOMBS[bomb]
    assert len(text.encode()) <= MAX_TOML_BYTES
    start = time.monotonic()
    with pytest.raises(ManifestError, match="not valid TOML"):
        parse_manifest(text)
    path = tmp_path / "probe.toml"  # the file path (node, `plugins check`) and the policy share the rule
    path.write_text(text, encoding="utf-8")
    from sandbus.host.lifecycle.manifest import load_manifest

    with pytest.raises(ManifestError, match="not valid TOML"):
        load_manifest(path)
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(path)
    assert time.monotonic() - start < 2.0


def test_f12_toml_bounds_leave_real_manifests_alone() -> None:
    """Dots and brackets inside strings and comments, floats, and a few levels of tables are data."""
    dotted = ".".join(["a"] * 40)
    manifest = parse_manifest(
        HEADER + f'# {dotted} [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n[config]\nfloats = [1.5, 2.5, 3.5]\n'
        f'url = "{dotted}"\nraw = \'{dotted}[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\'\n'
        f'text = """\n{dotted}\n{"{" * 40}"""\nlit = \'\'\'{dotted}\'\'\'\'\nx.y.z = {{ a = [[1, 2], [3]] }}\n')
    assert manifest.config["url"] == dotted
    assert manifest.config["x"] == {"y": {"z": {"a": [[1, 2], [3]]}}}
    assert manifest.config["lit"] == dotted + "'"


def _in_thread(fn: Callable[[], object], timeout: float = 10.0) -> object:
    """``fn()`` on a daemon thread: a regression that blocks (a FIFO) fails the test instead of hanging it."""
    import threading

    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} still blocked after {timeout} s"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


@pytest.mark.parametrize("which", ["wasm", "toml"])
@pytest.mark.parametrize("kind", ["fifo", "directory", "/dev/zero", "/dev/stdin"])
def test_f12_plugin_files_must_be_regular_files(tmp_path: Path, which: str, kind: str) -> None:
    """A FIFO named x.wasm blocked open() forever (the node never started; `plugins check` hung)."""
    from sandbus.host.lifecycle.loader import read_plugin_files
    from sandbus.sdk.errors import SandboxError

    (tmp_path / "x.wasm").write_bytes(b"\0asm\1\0\0\0")
    (tmp_path / "x.toml").write_text(HEADER.replace("probe", "x"), encoding="utf-8")
    target = tmp_path / f"x.{which}"
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    else:
        os.symlink(kind, target)
    with pytest.raises(SandboxError, match="not a regular file"):
        _in_thread(lambda: read_plugin_files(tmp_path, "x"))


def test_f12_fifo_in_plugin_dir_does_not_stop_the_node_loading(pdir: Path, make_manager: Callable[..., object],
                                                               audit: object) -> None:
    from sandbus.host.lifecycle import PluginManager
    from tests.host.manager.factory import write_plugin

    write_plugin(pdir, "good")
    write_plugin(pdir, "blocked")
    (pdir / "blocked.wasm").unlink()
    os.mkfifo(pdir / "blocked.wasm")
    manager = make_manager(pdir)
    assert isinstance(manager, PluginManager)
    report = _in_thread(manager.discover_and_load)
    assert report.loaded == ("good",)  # type: ignore[attr-defined]
    assert "not a regular file" in report.failed["blocked"]  # type: ignore[attr-defined]
    assert manager.execute_json("good", "handle_request", {}) == {"reply": "good-1.0.0"}
    _in_thread(lambda: manager.sync("blocked"))  # what the watcher calls on a change: returns too


def test_f12_symlinks_are_followed_only_inside_the_plugin_directory(
        tmp_path: Path, pdir: Path, make_manager: Callable[..., object], audit: list[object]) -> None:
    """A link is followed when it ends inside the directory (Kubernetes volumes: files are links into
    ``..data/``); a link to a file anywhere else is refused as a security violation, and audited."""
    from sandbus.host.lifecycle import PluginManager
    from tests.host.manager.factory import write_plugin

    data = pdir / "..data"
    data.mkdir()
    write_plugin(data, "inside")
    for ext in ("wasm", "toml"):
        (pdir / f"inside.{ext}").symlink_to(f"..data/inside.{ext}")
    outside = tmp_path / "outside"
    outside.mkdir()
    write_plugin(outside, "wasm_out")
    write_plugin(outside, "toml_out")
    (pdir / "wasm_out.wasm").symlink_to(outside / "wasm_out.wasm")
    (pdir / "wasm_out.toml").write_bytes((outside / "wasm_out.toml").read_bytes())
    (pdir / "toml_out.toml").symlink_to(outside / "toml_out.toml")  # e.g. a secret that parses as TOML
    (pdir / "toml_out.wasm").write_bytes((outside / "toml_out.wasm").read_bytes())
    (pdir / "hop.wasm").symlink_to("..data/../../outside/wasm_out.wasm")  # through a dir inside, out again
    (pdir / "hop.toml").write_bytes((outside / "wasm_out.toml").read_bytes().replace(b"wasm_out", b"hop"))
    manager = make_manager(pdir)
    assert isinstance(manager, PluginManager)
    report = manager.discover_and_load()
    assert report.loaded == ("inside",)
    assert manager.execute_json("inside", "handle_request", {}) == {"reply": "inside-1.0.0"}
    infos = {i.name: i for i in manager.list_plugins()}
    for name in ("wasm_out", "toml_out", "hop"):
        assert infos[name].last_error_code == "security.violation", infos[name]
        assert "outside the plugin directory" in str(infos[name].last_error)
    refused = {e.plugin for e in audit if e.kind == "lifecycle.load_failed"}  # type: ignore[attr-defined]
    assert refused == {"wasm_out", "toml_out", "hop"}


def test_f12_file_names_that_are_not_utf8_are_skipped(tmp_path: Path, plugins_dir: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """``\\xff.toml`` became a plugin named '\\udcff' that no JSON listing could encode: `plugins check
    --json` died with a traceback, and a node's `list` reply could not be written."""
    from sandbus.host.lifecycle import scan_directory
    from sandbus.host.lifecycle.loader import check_plugin_name
    from sandbus.sdk.errors import PluginNotFoundError

    d = tmp_path / "plugins"
    d.mkdir()
    for ext in ("wasm", "toml"):
        shutil.copy(plugins_dir / f"echo.{ext}", d / f"echo.{ext}")
    with open(os.path.join(os.fsencode(d), b"\xff.toml"), "wb") as f:
        f.write(b"[plugin]\n")
    assert scan_directory(d) == ["echo"]
    assert "skipping \\xff.toml: a plugin file name must be UTF-8" in caplog.text  # reported, escaped
    with pytest.raises(PluginNotFoundError):
        check_plugin_name(os.fsdecode(b"\xff"))
    r = subprocess.run([str(SANDBUS), "plugins", "check", str(d), "--json"], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert b"Traceback" not in r.stderr
    assert [i["name"] for i in json.loads(r.stdout)] == ["echo"]


@pytest.mark.parametrize("requirement", ["1 - ^", "^ - 1", "1 - 2=", "7 ^ <~-25= - 756=7*"])
def test_f22_odd_version_ranges_are_manifest_errors_not_crashes(requirement: str, pdir: Path,
                                                                make_manager: Callable[..., object]) -> None:
    """semantic_version raised AttributeError on these ranges: out of parse_manifest, and out of a node's
    discover_and_load (which only catches sandbus errors), so one manifest stopped the node starting."""
    from sandbus.host.lifecycle import PluginManager
    from tests.host.manager.factory import write_plugin

    with pytest.raises(ManifestError, match="npm-style version requirement"):
        parse_manifest(HEADER + f'[dependencies]\npricing = "{requirement}"\n')
    write_plugin(pdir, "good")
    write_plugin(pdir, "odd", extra=f'[dependencies]\ngood = "{requirement}"\n')
    manager = make_manager(pdir)
    assert isinstance(manager, PluginManager)
    report = manager.discover_and_load()
    assert report.loaded == ("good",)
    assert "npm-style version requirement" in report.failed["odd"]


@pytest.mark.parametrize("path", ["../x", "a/../../x", "/etc", "\\\\etc", "a\\\\..\\\\..\\\\x", "C:/x", "a\\u0000b",
                                  "a\\u001b[2J", "a\\u0085b", "x" * 256, "a/" * 600])
def test_f12_grant_paths_stay_relative_and_bounded(path: str) -> None:
    section = '[capabilities]\nrequired = ["filesystem"]\n[permissions]\nread_files = ["{p}"]\n'
    parse_manifest(HEADER + section.format(p="data/~/x"))  # '~' is a plain name: nothing expands it
    with pytest.raises(ManifestError, match="read_files"):
        parse_manifest(HEADER + section.format(p=path))


@pytest.mark.parametrize("text", ['x = "' + '\\"' * 65536, "x = '''" + "'" * 131072, '"' * 131072, "[]" * 65536,
                                  '"a".' * 2000, 'x = """' + '\\"' * 65536],
                         ids=["open string of escaped quotes", "open literal", "quotes", "brackets", "quoted keys",
                              "open multi-line string"])
def test_f12_toml_shape_check_is_linear(text: str) -> None:
    """The check that guards tomllib must not be the bomb: an open string of ``\\"`` was rescanned from
    every quote in it (minutes for 1 MiB)."""
    import time

    from sandbus.host.lifecycle.manifest import check_toml_shape

    start = time.monotonic()
    with contextlib.suppress(ValueError):
        check_toml_shape(text)
    assert time.monotonic() - start < 0.5
