"""The dashboard's HTTP surface against a real node: what it serves, whom it answers, what control demands."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from sandbus.sdk.client import Client
from tests.dashboard.conftest import BEFORE, INTERVAL, NODE, Stack
from tests.dashboard.stack import wait_for

pytestmark = pytest.mark.slow

#: the header the page sends with a debug request
PAGE = {"X-Sandbus-Dashboard": "1"}
#: how long the load test counts a node's control requests
WINDOW_S = 3.0


def _http(base: str, method: str, path: str, *, body: bytes | None = None, headers: dict[str, str] | None = None,
          host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True)
        conn.putheader("Host", host if host is not None else parts.netloc)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _state(base: str) -> dict[str, Any]:
    status, _, body = _http(base, "GET", "/api/state")
    assert status == 200
    value: dict[str, Any] = json.loads(body)
    return value


def _plugin(state: dict[str, Any], name: str) -> dict[str, Any]:
    node = next(n for n in state["nodes"] if n["node_id"] == NODE)
    return next(p for p in node["plugins"] if p["name"] == name)


def test_state_shows_the_node_and_its_plugins(stack: Stack) -> None:
    state = _state(stack.read_only.url)
    assert [n["node_id"] for n in state["nodes"]] == [NODE]
    names = {p["name"] for p in state["nodes"][0]["plugins"]}
    assert {"echo", "text_processor", "shouter", "evil"} <= names
    assert state["info"] == {**state["info"], "control": False, "jaeger_url": "http://jaeger.example:16686"}
    # the audit trail starts with what the stream kept from before the dashboard started
    assert state["info"]["audit_source"] == "stream"
    wait_for(lambda: any(e["kind"] == "request.refused" and e["node"] == NODE and BEFORE in e["message"]
                      for e in _state(stack.read_only.url)["audit"]),
             "the refusal from before, from the stream", timeout=5)


def test_a_request_changes_the_stats_shown(stack: Stack) -> None:
    before = _plugin(_state(stack.read_only.url), "echo")["executions"]

    async def calls(c: Client) -> None:
        for i in range(3):
            assert await c.request("echo", "handle_request", {"i": i}) == {"i": i}

    stack.call(calls)
    wait_for(lambda: _plugin(_state(stack.read_only.url), "echo")["executions"] == before + 3,
          "three more executions of echo", timeout=10)


def test_the_page_and_its_headers(stack: Stack) -> None:
    status, headers, body = _http(stack.read_only.url, "GET", "/")
    assert status == 200
    assert b'<script src="/static/app.js"' in body
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'self'" in csp
    assert "connect-src 'self'" in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    for asset in ("/static/app.js", "/static/style.css"):
        assert _http(stack.read_only.url, "GET", asset)[0] == 200
    assert _http(stack.read_only.url, "GET", "/static/../server.py")[0] == 404
    assert _http(stack.read_only.url, "GET", "/static/index.htm")[0] == 404
    # nothing in the page refers to another host: it works offline
    app_js = _http(stack.read_only.url, "GET", "/static/app.js")[2]
    for text in (body, app_js):
        assert b"http://" not in text.replace(b"https?:\\/\\/", b"")
        assert b"https://" not in text
    assert b"innerHTML" not in app_js
    assert b"insertAdjacentHTML" not in app_js
    assert b"document.write" not in app_js


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "localhost.evil.example:{port}",
                                  "127.0.0.1:1", "", "[::1:{port}"])
def test_a_foreign_host_header_is_refused(stack: Stack, host: str) -> None:
    """DNS rebinding: a page of another site that resolved its name to 127.0.0.1 still sends its name."""
    port = urlsplit(stack.read_only.url).port
    for path in ("/", "/api/state", "/api/events"):
        status, _, body = _http(stack.read_only.url, "GET", path, host=host.format(port=port))
        assert status == 421, (host, path)
        assert orjson.loads(body)["error"]["code"] == "dashboard.wrong_host"


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "127.0.0.1"])
def test_the_loopback_names_are_accepted(stack: Stack, host: str) -> None:
    port = urlsplit(stack.read_only.url).port
    assert _http(stack.read_only.url, "GET", "/api/state", host=host.format(port=port))[0] == 200


def _control(stack: Stack, body: Any, *, token: str | None = "", origin: str | None = "",
             base: str | None = None, content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
    base = base or stack.control.url
    headers = {"Content-Type": content_type}
    if origin is not None:
        headers["Origin"] = origin or base.rstrip("/")
    if token is not None:
        headers["X-Sandbus-Token"] = token or (stack.control.token or "")
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    status, _, raw = _http(base, "POST", "/api/control", body=data, headers=headers)
    return status, json.loads(raw) if raw.startswith(b"{") else {}


def _reloads(stack: Stack, plugin: str) -> int:
    async def stats(c: Client) -> Any:
        return await c.control(NODE, "stats")

    view = stack.call(stats)
    return int(next(p for p in view["plugins"] if p["name"] == plugin)["reloads"])


def test_read_only_refuses_control(stack: Stack) -> None:
    before = _reloads(stack, "echo")
    status, body = _control(stack, {"verb": "reload", "node": NODE, "plugin": "echo"}, base=stack.read_only.url,
                            origin=stack.read_only.url.rstrip("/"))
    assert status == 403
    assert body["error"]["code"] == "dashboard.read_only"
    assert _reloads(stack, "echo") == before


@pytest.mark.parametrize(("change", "status", "code"), [
    ({"token": None}, 403, "dashboard.bad_token"),
    ({"token": "x" * 43}, 403, "dashboard.bad_token"),
    ({"token": "é"}, 403, "dashboard.bad_token"),
    ({"origin": None}, 403, "dashboard.bad_origin"),
    ({"origin": "http://evil.example"}, 403, "dashboard.bad_origin"),
    ({"origin": "null"}, 403, "dashboard.bad_origin"),
    ({"content_type": "text/plain"}, 415, "request.invalid"),
    ({"body": b"x" * 5000}, 413, None),
    ({"body": b"[1, 2]"}, 400, "request.invalid"),
    ({"body": b"{nope"}, 400, "request.invalid"),
    ({"body": {"verb": "load", "node": NODE, "plugin": "echo"}}, 400, "request.invalid"),
    ({"body": {"verb": "reload", "node": "a.b", "plugin": "echo"}}, 400, "request.invalid"),
    ({"body": {"verb": "reload", "node": NODE, "plugin": "echo", "force": True}}, 400, "request.invalid"),
])
def test_control_refuses_what_lacks_token_origin_or_shape(stack: Stack, change: dict[str, Any], status: int,
                                                          code: str | None) -> None:
    before = _reloads(stack, "echo")
    body = change.pop("body", {"verb": "reload", "node": NODE, "plugin": "echo"})
    got_status, got = _control(stack, body, **change)
    assert got_status == status
    if code is not None:
        assert got["error"]["code"] == code
    assert _reloads(stack, "echo") == before


def test_control_with_the_token_reloads_and_is_logged_with_who(stack: Stack) -> None:
    before = _reloads(stack, "echo")
    status, body = _control(stack, {"verb": "reload", "node": NODE, "plugin": "echo"})
    assert status == 200
    assert body["ok"] is True
    assert _reloads(stack, "echo") == before + 1
    wait_for(lambda: "dashboard control: reload echo on node dash-n1 by 127.0.0.1" in stack.control.output(),
          "the control action in the dashboard's log", timeout=5)
    wait_for(lambda: any(e["kind"] == "dashboard.control" and "reload of echo" in e["message"]
                      for e in _state(stack.control.url)["audit"]), "the control action in the audit view", timeout=5)
    # a plugin the dashboard does not show is not asked for
    status, body = _control(stack, {"verb": "reload", "node": NODE, "plugin": "nosuch"})
    assert status == 404
    assert body["error"]["code"] == "dashboard.not_shown"


def test_debug_state_on_demand(stack: Stack) -> None:
    status, _, raw = _http(stack.read_only.url, "GET", f"/api/debug?node={NODE}&plugin=echo", headers=PAGE)
    assert status == 200, raw
    state = json.loads(raw)
    assert state["plugin"] == "echo"
    assert state["node_id"] == NODE
    assert state["status"] == "loaded"
    status, _, raw = _http(stack.read_only.url, "GET", f"/api/debug?node={NODE}&plugin=nosuch", headers=PAGE)
    assert status == 404
    assert json.loads(raw)["error"]["code"] == "dashboard.not_shown"
    status, _, raw = _http(stack.read_only.url, "GET", "/api/debug?node=a.b&plugin=echo", headers=PAGE)
    assert status == 400


def test_hostile_bus_messages_are_refused_not_shown(stack: Stack) -> None:
    """Anyone allowed to publish on the log and audit subjects decides what arrives: only well-formed,
    bounded lines reach the page."""
    marker = f"marker-{time.monotonic_ns()}"

    def line(**over: Any) -> bytes:
        return orjson.dumps({"ts": "2026-12-03T08:00:00.000000Z", "node": NODE, "plugin": "shouter",
                             "version": "1.0.0", "level": "info", "stream": None, "message": marker,
                             "trace_id": None, "seq": 1, "dropped": 0, **over})

    async def publish(c: Client) -> None:
        subject = f"sandbus.log.{NODE}.shouter"
        for data in (b"not json", b"[1]", line(level="loud"), line(node="other"), line(message=7),
                     line(message=marker + "x" * 40_000), orjson.dumps({"nested": [[[[1]]]]})):
            await c.nc.publish(subject, data)
        await c.nc.publish(f"sandbus.log.{NODE}", line())  # not a plugin's subject
        await c.nc.publish(f"sandbus.audit.{NODE}", b'{"kind": "x"}')
        await c.nc.publish(subject, line(message=marker + " ok", trace_id="AB" * 16))
        await c.nc.flush()

    stack.call(publish)
    # one publisher's messages arrive in order: once the last (well-formed) one is shown, the rest were judged
    shown = wait_for(lambda: [entry for entry in _state(stack.read_only.url)["logs"] if marker in entry["message"]],
                  "the one well-formed line", timeout=10)
    assert [entry["message"] for entry in shown] == [marker + " ok"]
    refused = _state(stack.read_only.url)["refused"]
    assert refused["logs"] >= 8  # counted (the other tests' publishers may add theirs)
    assert refused["audit"] >= 1
    assert shown[0]["trace_id"] is None  # not 32 lowercase hex: no link built from it


def test_event_stream_starts_with_a_snapshot_then_follows(stack: Stack) -> None:
    parts = urlsplit(stack.read_only.url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("GET", "/api/events")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/event-stream")
        events: list[str] = []
        while len(events) < 2:  # the snapshot, then the next poll's nodes
            raw = response.readline().decode()
            if raw.startswith("event: "):
                events.append(raw[7:].strip())
        assert events == ["snapshot", "nodes"]
    finally:
        conn.close()


def test_the_load_on_the_node_does_not_grow_with_the_pages(stack: Stack) -> None:
    """Eight open event streams and eight pages asking for the same debug state: the node still gets one
    ``stats`` per interval and at most one ``debug`` per interval."""
    parts = urlsplit(stack.read_only.url)
    streams = [http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10) for _ in range(8)]
    try:
        for conn in streams:
            conn.request("GET", "/api/events")
            assert conn.getresponse().status == 200

        async def count(c: Client) -> Counter[tuple[str, str]]:
            # by verb and by the asking connection (its reply inbox): both dashboards of the stack poll the node
            seen: Counter[tuple[str, str]] = Counter()

            async def on(msg: Any) -> None:
                seen[msg.subject.rsplit(".", 1)[1], ".".join(msg.reply.split(".")[:2])] += 1

            await c.nc.subscribe(f"sandbus.node.{NODE}.>", cb=on)
            await c.nc.flush()
            loop = asyncio.get_running_loop()
            end = loop.time() + WINDOW_S
            while loop.time() < end:  # eight pages with the debug view open, asking as fast as they can
                await asyncio.gather(*(asyncio.to_thread(_http, stack.read_only.url, "GET",
                                                         f"/api/debug?node={NODE}&plugin=echo", headers=PAGE)
                                   for _ in range(8)))
            return seen

        seen = stack.call(count)
    finally:
        for conn in streams:
            conn.close()
    per_window = WINDOW_S / float(INTERVAL)
    stats = [n for (verb, _), n in seen.items() if verb == "stats"]
    debug = [n for (verb, _), n in seen.items() if verb == "debug"]
    assert len(stats) == 2, seen  # the two dashboards
    assert max(stats) <= per_window + 1, seen
    assert len(debug) == 1, seen  # the read-only one, whose pages asked
    assert 1 <= debug[0] <= per_window + 1, seen


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
def test_another_sites_page_cannot_use_the_api(stack: Stack, site: str) -> None:
    """Another site's page can make the browser send requests here blind: none reaches the API (a link may still
    open the page itself)."""
    fetch = {"Sec-Fetch-Site": site}
    for path in ("/api/state", "/api/events", f"/api/debug?node={NODE}&plugin=echo", "/static/app.js"):
        status, _, body = _http(stack.read_only.url, "GET", path, headers={**fetch, **PAGE})
        assert status == 403, path
        assert json.loads(body)["error"]["code"] == "dashboard.cross_site"
    status, _, _ = _http(stack.control.url, "POST", "/api/control", body=b"{}",
                         headers={**fetch, "Origin": stack.control.url.rstrip("/"), "Content-Type": "application/json",
                                  "X-Sandbus-Token": stack.control.token or ""})
    assert status == 403
    assert _http(stack.read_only.url, "GET", "/", headers={"Sec-Fetch-Site": site, "Sec-Fetch-Mode": "navigate"})[0] \
        == 200
    # a debug request without the page's header is refused whatever the browser says
    assert _http(stack.read_only.url, "GET", f"/api/debug?node={NODE}&plugin=echo")[0] == 403


def test_the_browsers_own_icon_request_is_answered_without_content(stack: Stack) -> None:
    """A browser asks for /favicon.ico by itself: answered 204, not a 404 error in the page's console."""
    status, _, body = _http(stack.read_only.url, "GET", "/favicon.ico")
    assert (status, body) == (204, b"")
