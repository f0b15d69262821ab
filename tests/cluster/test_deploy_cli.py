"""``sandbus deploy / status / undeploy`` (and ``node --cluster``'s options) against a real JetStream server:
bad input is one line and exit 2, and nothing is stored; a deploy with no node to run it is reported, not looped."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import orjson
import pytest
from nats.aio.client import Client as NATS

from sandbus.bus.server import NatsServer
from sandbus.host.cluster.keys import PublisherKey, keygen
from sandbus.host.cluster.names import DEPLOYS_BUCKET, NODES_BUCKET
from tests.cluster.conftest import PushFn, Run


def _nats(url: str, action: Callable[[NATS], Awaitable[object]]) -> object:
    async def go() -> object:
        nc = await nats.connect(url)
        try:
            return await action(nc)
        finally:
            await nc.close()

    return asyncio.run(go())


@pytest.fixture
def url(js_server: NatsServer, push: PushFn) -> str:
    """The shared server's URL: echo@1.0.0 and echo@1.1.0 in the registry, no deploys, no node reports."""

    async def prepare(nc: NATS) -> None:
        js = nc.jetstream()
        for bucket in (DEPLOYS_BUCKET, NODES_BUCKET):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_key_value(bucket)

    _nats(js_server.url, prepare)
    return js_server.url


@pytest.fixture
async def pushed(push: PushFn) -> None:
    await push("echo", "1.0.0")
    await push("echo", "1.1.0")


def _deploy_keys(url: str) -> list[str]:
    async def keys(nc: NATS) -> list[str]:
        try:
            kv = await nc.jetstream().key_value(DEPLOYS_BUCKET)
            return list(await kv.keys())
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.NoKeysError):
            return []

    result = _nats(url, keys)
    assert isinstance(result, list)
    return result


@pytest.mark.parametrize(("ref", "extra", "said"), [
    ("ghost", (), "'ghost'"),
    ("echo@9.9.9", (), "the registry has 1.0.0, 1.1.0"),
    ("echo@^5", (), "no version matches '^5'"),
    ("echo@", (), "is not a version range"),
    ("echo@>=1 <1", (), "no version matches"),
    ("../etc", (), "is not a plugin name"),
    ("echo.*", (), "is not a plugin name"),
    ("echo", ("--replicas", "-1"), "replicas must be a whole number from 0"),
    ("echo", ("--replicas", "2", "--every-node"), "--replicas and --every-node exclude each other"),
    ("echo", ("--label", "novalue"), "expected KEY=VALUE"),
    ("echo", ("--label", "a b=c"), "is not a label key"),
    ("echo", ("--label", "zone=eu west"), "is not a label value"),
    ("echo", ("--label", "zone=eu", "--label", "zone=us"), "given twice"),
])
def test_bad_input_is_one_line_exit_2_and_stores_nothing(sandbus: Run, url: str, pushed: None, ref: str,
                                                          extra: tuple[str, ...], said: str) -> None:
    code, out, err = sandbus("deploy", ref, *extra, "--nats", url, "--no-context")
    assert code == 2, (out, err)
    assert said in err
    assert err.count("\n") == 1
    assert err.startswith("sandbus: ")
    assert _deploy_keys(url) == []


def test_a_deploy_no_node_can_run_is_stored_and_reported_not_looped(sandbus: Run, url: str, pushed: None) -> None:
    code, out, err = sandbus("deploy", "echo@^1", "--replicas", "2", "--label", "region=mars", "--nats", url,
                             "--no-context")
    assert code == 0, err
    assert "deployed echo@1.1.0 (range ^1) to 2 node(s) on nodes with region=mars, revision" in out
    assert "note: no cluster node is live now" in out
    code, out, err = sandbus("status", "--nats", url, "--no-context")
    assert code == 0, err
    assert "echo  ^1 -> 1.1.0  replicas 0/0 (2 on region=mars)" in out
    assert "! no cluster node is live" in out
    code, out, _ = sandbus("status", "echo", "--json", "--nats", url, "--no-context")
    assert code == 0
    (item,) = orjson.loads(out)["deploys"]
    assert (item["version"], item["replicas"], item["labels"], item["actual"]) == ("1.1.0", 2, {"region": "mars"}, 0)
    # --wait says at once that no node can run it (exit 6), rather than waiting out its time
    code, out, err = sandbus("deploy", "echo@1.0.0", "--every-node", "--wait", "30", "--nats", url, "--no-context")
    assert code == 6
    assert "no live node can run echo: no cluster node is live" in err
    assert "previous version 1.1.0" not in out  # 1.1.0 never ran anywhere: nothing to roll back to
    code, out, _ = sandbus("undeploy", "echo", "--nats", url, "--no-context")
    assert code == 0
    assert _deploy_keys(url) == []
    code, _, err = sandbus("undeploy", "echo", "--nats", url, "--no-context")
    assert code == 2
    assert "no deploy of 'echo'" in err


def test_status_and_undeploy_refuse_a_name_that_is_not_a_plugin(sandbus: Run, url: str) -> None:
    for command in ("status", "undeploy"):
        code, _, err = sandbus(command, "../x", "--nats", url, "--no-context")
        assert code == 2
        assert "is not a plugin name" in err
    code, _, err = sandbus("status", "ghost", "--nats", url, "--no-context")
    assert code == 2
    assert "no deploy of 'ghost'" in err


@pytest.mark.parametrize(("args", "said"), [
    (("--cluster", "--workers", "2"), "--cluster runs one cluster member per node process"),
    (("--label", "zone=eu"), "--label labels a cluster node: add --cluster"),
    (("--cluster", "--label", "zone"), "expected KEY=VALUE"),
    (("--cluster", "--label", "-bad=x"), "is not a label key"),
])
def test_node_refuses_bad_cluster_options_before_starting(sandbus: Run, tmp_path: Path, args: tuple[str, ...],
                                                          said: str) -> None:
    code, _, err = sandbus("node", *args, "--nats", "nats://127.0.0.1:1", "--no-context",
                           "--data-dir", str(tmp_path))
    assert code == 2
    assert said in err
    assert err.count("\n") == 1


async def test_deploy_with_trust_never_picks_another_publishers_higher_version(
        sandbus: Run, url: str, pushed: None, push: PushFn, publisher: PublisherKey, tmp_path: Path) -> None:
    """Anyone may make a key and push echo@1.9.0. Without --trust the deploy targets it (every node that
    trusts only the real publisher would then refuse it), and says who it did not check; with --trust the
    real publisher's highest version is deployed."""
    await push("echo", "1.9.0", key=keygen(tmp_path / "other.nk"))
    code, out, err = await asyncio.to_thread(sandbus, "deploy", "echo", "--nats", url, "--no-context")
    assert code == 0, err
    assert "deployed echo@1.9.0" in out
    assert "not who signed it" in err
    code, out, err = await asyncio.to_thread(sandbus, "deploy", "echo", "--trust", publisher.public_key,
                                             "--nats", url, "--no-context")
    assert code == 0, err
    assert "deployed echo@1.1.0" in out
    assert "not who signed it" not in err
