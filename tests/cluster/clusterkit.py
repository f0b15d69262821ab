"""Helpers for end-to-end cluster tests: `sandbus node --cluster` processes, the CLI as a subprocess, the
cluster's buckets read directly, a request loop that measures outages, the audit trail, versioned plugins.

Everything here talks to real processes: nodes and servers are stopped by PID, every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import wasmtime
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError, NotFoundError

from sandbus.host.cluster.reports import HEARTBEAT_S, LIVE_S
from sandbus.sdk.client import Client
from sandbus.sdk.errors import SandbusError
from tests.bus.conftest import NodeProcess
from tests.conftest import ABI_PRELUDE

ROOT = Path(__file__).resolve().parents[2]

#: the buckets of the cluster (DESIGN: host/cluster/names.py); read here as any other client would
REGISTRY_BUCKET = "sandbus-registry"
ARTIFACTS_BUCKET = "sandbus-artifacts"
DEPLOYS_BUCKET = "sandbus-deploys"
NODES_BUCKET = "sandbus-nodes"

#: The documented failover bound (docs/cluster.md, "Failover"): a node killed outright stops being live
#: after LIVE_S without a report; the next reconcile turn (at most a heartbeat later) places its share
#: elsewhere; to that, add the time the new node takes to fetch and load the plugin.
FAILOVER_BOUND_S = LIVE_S + HEARTBEAT_S
#: What fetching and loading a small plugin may take on a busy 2-core test machine.
LOAD_ALLOWANCE_S = 3.0


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child: ours without any NATS_* / SANDBUS_NATS* a developer may have set (they
    would point the child elsewhere), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "SANDBUS_NATS"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


# --- node processes -------------------------------------------------------------------------------------------

class ClusterNode(NodeProcess):
    """A ``sandbus node --cluster`` child process, stopped by PID.

    Parameters:
        node_id: the node's id (also its key in ``sandbus-nodes``).
        url: the NATS server(s), comma-separated.
        policy: the operator policy file (it lists the trusted publishers).
        log: where the node's output goes.
        labels: ``k=v`` labels.
        extra: more command-line arguments.
        env: more environment (e.g. ``SANDBUS_NATS_PASSWORD``).
    """

    def __init__(self, node_id: str, url: str, policy: Path, log: Path, *, labels: tuple[str, ...] = (),
                 extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.url = url
        args = [sys.executable, "-m", "sandbus", "node", "--cluster", "--nats", url, "--node-id", node_id,
                "--policy", str(policy), "--no-watch", "--no-context",
                "--data-dir", str(log.parent / f"{node_id}-data"), *extra]
        for label in labels:
            args += ["--label", label]
        self._spawn(node_id, log, args, clean_env(**(env or {})))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


def start_nodes(count: int, url: str, policy: Path, logs: Path, *, prefix: str = "n",
                labels: Callable[[int], tuple[str, ...]] = lambda i: (), extra: tuple[str, ...] = (),
                env: dict[str, str] | None = None) -> list[ClusterNode]:
    """``count`` cluster nodes ``<prefix>1..`` started together (they start in parallel) and ready."""
    nodes = [ClusterNode(f"{prefix}{i + 1}", url, policy, logs / f"{prefix}{i + 1}.log", labels=labels(i),
                         extra=extra, env=env)
             for i in range(count)]
    try:
        for node in nodes:
            node.wait_ready()
    except BaseException:
        stop_all(nodes)
        raise
    return nodes


def stop_all(nodes: list[ClusterNode]) -> None:
    """Stop every node by PID (one that already exited only has its log closed)."""
    for node in nodes:
        node.terminate()


# --- the command line --------------------------------------------------------------------------------------------

@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err

    def json(self) -> Any:
        return orjson.loads(self.out)


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60.0) -> CliResult:
    """Run ``sandbus ARGS`` (at most ``timeout`` s, then killed): exit code, stdout, stderr."""
    proc = subprocess.run([sys.executable, "-m", "sandbus", *args], cwd=cwd or ROOT, env=clean_env(**(env or {})),
                          capture_output=True, timeout=timeout, check=False)
    return CliResult(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


async def acli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout: float = 60.0) -> CliResult:
    """:func:`cli` without blocking the event loop (a request loop keeps running meanwhile)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "sandbus", *args, cwd=cwd or ROOT,
                                                env=clean_env(**(env or {})), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def ok(result: CliResult) -> CliResult:
    """``result``, asserting the command succeeded (its output in the failure message)."""
    assert result.code == 0, f"exit {result.code}: {result.text[-3000:]}"
    return result


# --- waiting ---------------------------------------------------------------------------------------------------

async def until(condition: Callable[[], Awaitable[Any]] | Callable[[], Any], timeout: float, what: str, *,
                interval: float = 0.05) -> Any:
    """Poll ``condition()`` (awaited if it is a coroutine function) until it returns something true, which is
    returned; at most ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while True:
        last = condition()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval)  # the condition lives in other processes: poll it, bounded


async def connect(url: str, **kwargs: Any) -> NATS:
    nc = NATS()
    await nc.connect(servers=url.split(","), allow_reconnect=True, max_reconnect_attempts=-1,
                     reconnect_time_wait=1, **kwargs)
    return nc


# --- the cluster's state, read from its buckets -----------------------------------------------------------------

async def kv_entries(nc: NATS, bucket: str) -> dict[str, Any]:
    """Every key of ``bucket`` with its JSON value (``{}`` when the bucket or its keys do not exist yet).

    Raises:
        nats.errors.TimeoutError: JetStream did not answer (pollers catch it: :func:`polled`).
    """
    js = nc.jetstream()
    try:
        kv = await js.key_value(bucket)
        keys = await kv.keys()
    except (BucketNotFoundError, NoKeysError, NotFoundError):
        return {}
    out: dict[str, Any] = {}
    for key in keys:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:  # deleted meanwhile
            continue
        if entry.value:
            out[key] = orjson.loads(entry.value)
    return out


async def reports(nc: NATS) -> dict[str, dict[str, Any]]:
    """The nodes' reports (``sandbus-nodes``), by node id."""
    return await kv_entries(nc, NODES_BUCKET)


async def polled(read: Awaitable[Any]) -> Any:
    """``await read`` for a poller: None when JetStream did not answer this time (a cluster electing a
    leader answers later), so the poll goes on instead of failing."""
    try:
        return await read
    except NatsTimeoutError:
        return None


def plugin_states(all_reports: dict[str, dict[str, Any]], plugin: str,
                  nodes: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{node: {"version", "state", "reason", ...}}`` for ``plugin`` in the reports of ``nodes`` (all)."""
    out = {}
    for node, report in all_reports.items():
        if nodes is not None and node not in nodes:
            continue
        state = (report.get("plugins") or {}).get(plugin)
        if isinstance(state, dict):
            out[node] = state
    return out


def serving(all_reports: dict[str, dict[str, Any]], plugin: str, version: str | None = None,
            nodes: set[str] | None = None) -> set[str]:
    """The nodes among ``nodes`` whose report says they serve ``plugin`` (at ``version``)."""
    return {n for n, s in plugin_states(all_reports, plugin, nodes).items()
            if s.get("state") == "serving" and (version is None or s.get("version") == version)}


async def wait_serving(nc: NATS, plugin: str, count: int, *, version: str | None = None,
                       nodes: set[str] | None = None, timeout: float = 30.0) -> set[str]:
    """Wait until exactly ``count`` of ``nodes`` report ``plugin`` (``version``) serving; those nodes."""
    async def check() -> set[str] | None:
        current = await polled(reports(nc))
        if current is None:
            return None
        found = serving(current, plugin, version, nodes)
        return found if len(found) == count else None

    result: set[str] = await until(check, timeout, f"{count} nodes serving {plugin} {version or ''}")
    return result


async def answering_nodes(client: Client, plugin: str, payload: Any = None, *, requests: int = 60,
                          timeout: float = 2.0) -> tuple[set[str], list[Any]]:
    """Send ``requests`` requests to ``plugin``; the set of nodes that answered, and the decoded replies."""
    replies = await asyncio.gather(*(client.request_detailed(plugin, "handle_request", payload, timeout=timeout)
                                     for _ in range(requests)))
    return {r.node for r in replies if r.node}, [r.json() for r in replies]


# --- a request loop that measures outages ------------------------------------------------------------------------

@dataclass
class Outcome:
    sent: float
    done: float
    ok: bool
    detail: str  # the reply's version (or body), or the error's type and message
    node: str | None = None


@dataclass
class RequestLoop:
    """Requests to ``plugin`` one after another (``interval`` s apart) while it runs; every outcome kept.

    ``failures`` are requests that did not get a successful reply (whatever the reason); ``longest_gap``
    is the longest time between two successful replies (start of the loop and its stop included), which
    is the outage a caller saw; ``failure_window`` is from the first failed request's send to the last
    failed one's end.
    """

    client: Client
    plugin: str
    payload: Any = None
    interval: float = 0.01
    timeout: float = 1.0
    outcomes: list[Outcome] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = 0.0
    stopped: float = 0.0

    async def __aenter__(self) -> RequestLoop:
        self.started = time.monotonic()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task
        self.stopped = time.monotonic()

    async def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                reply = await self.client.request_detailed(self.plugin, "handle_request", self.payload,
                                                           timeout=self.timeout)
                body = reply.json()
                detail = body.get("version", "") if isinstance(body, dict) else repr(body)[:80]
                self.outcomes.append(Outcome(sent, time.monotonic(), True, str(detail), reply.node))
            except SandbusError as e:
                self.outcomes.append(Outcome(sent, time.monotonic(), False, f"{type(e).__name__}: {e}"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)

    async def wait_successes(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` more requests have succeeded than when called."""
        target = self.successes + count
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.successes < target:
            if loop.time() > deadline:
                raise AssertionError(f"no {count} successful requests in {timeout} s: {self.summary()}")
            await asyncio.sleep(0.02)  # the loop's own task appends outcomes

    @property
    def successes(self) -> int:
        return sum(o.ok for o in self.outcomes)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def longest_gap(self) -> float:
        marks = [self.started] + [o.done for o in self.outcomes if o.ok] + [self.stopped or time.monotonic()]
        return max(b - a for a, b in itertools.pairwise(marks))

    @property
    def failure_window(self) -> float:
        failed = self.failures
        return failed[-1].done - failed[0].sent if failed else 0.0

    def details(self) -> list[str]:
        """The successful replies' versions in order, repeats folded: e.g. ``["1.0.0", "1.1.0"]``."""
        out: list[str] = []
        for o in self.outcomes:
            if o.ok and (not out or out[-1] != o.detail):
                out.append(o.detail)
        return out

    def summary(self) -> str:
        errors = sorted({o.detail for o in self.failures})[:5]
        return (f"{len(self.outcomes)} requests, {len(self.failures)} failed, longest gap {self.longest_gap:.2f} s, "
                f"versions {self.details()[:10]}, errors {errors}")


# --- the audit trail -------------------------------------------------------------------------------------------

class AuditWatch:
    """Every audit event published on ``sandbus.audit.>`` while subscribed, with the node it came from."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._sub: Any = None

    async def start(self, nc: NATS) -> AuditWatch:
        async def on_event(msg: Msg) -> None:
            try:
                event = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                return
            if isinstance(event, dict):
                self.events.append((msg.subject.split(".", 2)[-1], event))

        self._sub = await nc.subscribe("sandbus.audit.>", cb=on_event)
        await nc.flush()
        return self

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    def matching(self, kind: str, plugin: str | None = None, text: str | None = None) -> dict[str, dict[str, Any]]:
        """The last event per node whose kind starts with ``kind`` (about ``plugin``, mentioning ``text``)."""
        out = {}
        for node, e in self.events:
            if not str(e.get("kind", "")).startswith(kind):
                continue
            if plugin is not None and e.get("plugin") != plugin:
                continue
            if text is not None and text not in orjson.dumps(e).decode():
                continue
            out[node] = e
        return out

    async def wait(self, kind: str, nodes: set[str], *, plugin: str | None = None, text: str | None = None,
                   timeout: float = 15.0) -> dict[str, dict[str, Any]]:
        """Wait until each of ``nodes`` has published a matching event; those events by node."""
        async def check() -> dict[str, dict[str, Any]] | None:
            found = self.matching(kind, plugin, text)
            return found if nodes <= set(found) else None

        result: dict[str, dict[str, Any]] = await until(
            check, timeout, f"{kind} audit events from {sorted(nodes)}; got "
                            f"{sorted({(n, e.get('kind')) for n, e in self.events})[-20:]}")
        return result


# --- plugins in several versions ---------------------------------------------------------------------------------

MANIFEST = """[plugin]
name = "{name}"
version = "{version}"
description = "{description}"
author = "tests"
license = "Apache-2.0"
min_runtime_version = "0.1.0"

[capabilities]
required = ["compute"]

[resources]
timeout_seconds = 2
max_instances = 4

[metadata]
tags = ["cluster-test", "versioned"]
"""


def versioned_wasm(version: str, *, broken: str | None = None) -> bytes:
    """A plugin whose ``handle_request`` answers ``{"version": "<version>"}`` whatever it is sent.

    ``broken="init"``: its ``sandbus_init`` traps, so every load fails; ``broken="health"``: its
    ``sandbus_health`` reports failure.
    """
    body = orjson.dumps({"version": version})
    escaped = "".join(f"\\{b:02x}" for b in body)
    extra = ""
    if broken == "init":
        extra = '  (func (export "sandbus_init") (param i32 i32) (result i32) unreachable)\n'
    elif broken == "health":
        extra = '  (func (export "sandbus_health") (result i32) (i32.const 1))\n'
    elif broken is not None:
        raise ValueError(broken)
    wat = (f"(module\n{ABI_PRELUDE}"
           f'  (data (i32.const 16) "{escaped}")\n'
           f'  (func (export "handle_request") (param i32 i32) (result i64)\n'
           f"    (i64.or (i64.shl (i64.const 16) (i64.const 32)) (i64.const {len(body)})))\n"
           f"{extra})")
    return bytes(wasmtime.wat2wasm(wat))


def with_custom_section(wasm: bytes, size: int, name: str = "sandbus.padding") -> bytes:
    """``wasm`` with a custom section of ``size`` filler bytes appended: still a valid module, ``size`` bigger."""
    def leb(n: int) -> bytes:
        out = bytearray()
        while True:
            byte = n & 0x7F
            n >>= 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)

    label = name.encode()
    payload = leb(len(label)) + label + bytes(range(256)) * (size // 256) + b"\0" * (size % 256)
    return wasm + b"\x00" + leb(len(payload)) + payload


def plugin_dir(base: Path, name: str, version: str, wasm: bytes, *, description: str = "a versioned test plugin",
               manifest: str | None = None) -> Path:
    """``base/<name>-<version>/`` holding ``<name>.wasm`` and ``<name>.toml`` (what ``sandbus push`` takes)."""
    d = base / f"{name}-{version}"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.wasm").write_bytes(wasm)
    text = manifest if manifest is not None else MANIFEST
    (d / f"{name}.toml").write_text(text.format(name=name, version=version, description=description))
    return d
