"""The page in a real headless Chromium, after real traffic through a real node: what a user sees."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson
import pytest
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from sandbus.sdk.client import Client
from sandbus.sdk.errors import SandbusError
from tests.dashboard.conftest import JAEGER, NODE, Stack
from tests.dashboard.stack import XSS_DESCRIPTION, XSS_LOG

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

pytestmark = pytest.mark.slow

WAIT_S = 15


def _open(browser: WebDriver, url: str) -> None:
    browser.get(url)
    _until(browser, lambda b: b.find_element(By.ID, "conn").text == "live", "the live event stream")
    _until(browser, lambda b: b.find_elements(By.CSS_SELECTOR, f'#plugin-rows tr[data-node="{NODE}"]'),
           "the node's plugins")


def _until(browser: WebDriver, condition: Any, what: str) -> Any:
    try:
        # the page re-renders its tables on every poll: an element found a moment ago may be gone
        return WebDriverWait(browser, WAIT_S, poll_frequency=0.05,
                             ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
                             ).until(condition)
    except Exception as e:
        raise AssertionError(f"the page did not show {what} within {WAIT_S} s") from e


def _row(browser: WebDriver, plugin: str) -> WebElement:
    return browser.find_element(By.CSS_SELECTOR, f'#plugin-rows tr[data-node="{NODE}"][data-plugin="{plugin}"]')


def _cell(browser: WebDriver, plugin: str, cls: str) -> str:
    """A cell's text, read in one step inside the page (the table may be re-rendered between two steps)."""
    text = browser.execute_script(
        "const td = document.querySelector(arguments[0]); return td === null ? null : td.textContent;",
        f'#plugin-rows tr[data-node="{NODE}"][data-plugin="{plugin}"] td.{cls}')
    if text is None:
        raise NoSuchElementException(f"no {cls} cell for {plugin}")
    return str(text)


def _click(browser: WebDriver, find: Any) -> None:
    """Click what ``find`` finds, finding it again if a re-render replaced it first."""
    def clicked(b: WebDriver) -> bool:
        find(b).click()
        return True

    _until(browser, clicked, "the element to click")


def _pwned(browser: WebDriver) -> Any:
    return browser.execute_script("return window.__pwned === undefined ? null : window.__pwned;")


def test_stats_change_after_requests(stack: Stack, browser: WebDriver) -> None:
    _open(browser, stack.read_only.url)
    before = int(_cell(browser, "echo", "executions"))

    async def calls(c: Client) -> None:
        for i in range(4):
            await c.request("echo", "handle_request", {"i": i})

    stack.call(calls)
    _until(browser, lambda b: _cell(b, "echo", "executions") == str(before + 4), "four more calls of echo")
    assert _cell(browser, "echo", "p50") != "–"


def test_an_audit_event_appears(stack: Stack, browser: WebDriver) -> None:
    _open(browser, stack.read_only.url)
    function = f"nosuch_{time.monotonic_ns()}"

    async def refused(c: Client) -> None:
        with pytest.raises(SandbusError):
            await c.request("echo", function, {})

    stack.call(refused)
    row = _until(browser, lambda b: next((r for r in b.find_elements(By.CSS_SELECTOR, "#audit-rows tr")
                                          if function in r.text), None), "the refusal in the audit trail")
    assert "request.refused" in row.text
    assert NODE in row.text


def test_a_log_line_appears_with_its_trace_link_and_stays_text(stack: Stack, browser: WebDriver) -> None:
    """A line as a node publishes it (the documented format), from a publisher on the bus: shown as text, its
    trace id a link to Jaeger."""
    _open(browser, stack.read_only.url)
    trace = "0af7651916cd43dd8448eb211c80319c"
    line = {"ts": "2026-12-03T08:00:00.123456Z", "node": NODE, "plugin": "shouter", "version": "1.0.0",
            "level": "error", "stream": None, "message": XSS_LOG, "trace_id": trace, "seq": 1, "dropped": 0}

    async def publish(c: Client) -> None:
        await c.nc.publish(f"sandbus.log.{NODE}.shouter", orjson.dumps(line))
        await c.nc.flush()

    stack.call(publish)
    row = _until(browser, lambda b: next((r for r in b.find_elements(By.CSS_SELECTOR, "#log-rows tr")
                                          if trace[:12] in r.text), None), "the log line")
    assert row.find_element(By.CSS_SELECTOR, "td.message").text == XSS_LOG
    link = row.find_element(By.CSS_SELECTOR, "a.trace")
    assert link.get_attribute("href") == f"{JAEGER}/trace/{trace}"
    assert not browser.find_elements(By.CSS_SELECTOR, "#logs img, #logs script")
    assert _pwned(browser) is None


def test_a_plugins_own_log_line_appears_and_filters(stack: Stack, browser: WebDriver) -> None:
    """The node publishes what the guest logs (here: the request it was sent, hostile markup included)."""
    _open(browser, stack.read_only.url)
    marker = f"m{time.monotonic_ns()}"
    payload = "<script>window.__pwned=5</script><img src=z onerror=window.__pwned=6>"  # no quote: JSON keeps it

    async def call(c: Client) -> None:
        await c.request("shouter", "handle_request", {"say": marker + payload})

    stack.call(call)
    row = _until(browser, lambda b: next((r for r in b.find_elements(By.CSS_SELECTOR, "#log-rows tr")
                                          if marker in r.text), None), "the plugin's own log line")
    assert row.find_element(By.CSS_SELECTOR, "td.message").text == orjson.dumps({"say": marker + payload}).decode()
    assert row.get_attribute("data-level") == "warning"
    assert not browser.find_elements(By.CSS_SELECTOR, "#logs img, #logs script")
    assert _pwned(browser) is None
    # filtered by level: a warning is hidden at "error", shown again at "warning and up"
    Select(browser.find_element(By.ID, "log-level")).select_by_value("error")
    _until(browser, lambda b: not [r for r in b.find_elements(By.CSS_SELECTOR, "#log-rows tr") if marker in r.text],
           "the warning hidden")
    Select(browser.find_element(By.ID, "log-level")).select_by_value("warning")
    Select(browser.find_element(By.ID, "log-plugin")).select_by_value("echo")
    _until(browser, lambda b: not [r for r in b.find_elements(By.CSS_SELECTOR, "#log-rows tr") if marker in r.text],
           "the line hidden by the plugin filter")
    Select(browser.find_element(By.ID, "log-plugin")).select_by_value("shouter")
    _until(browser, lambda b: [r for r in b.find_elements(By.CSS_SELECTOR, "#log-rows tr") if marker in r.text],
           "the line shown for its plugin")


def test_a_traced_requests_log_line_links_to_its_trace(stack: Stack, browser: WebDriver) -> None:
    """A request that arrives with a W3C trace context: the plugin's log line names the trace, and the page
    links it to Jaeger."""
    _open(browser, stack.read_only.url)
    trace = f"{time.monotonic_ns():032x}"[-32:]

    async def traced(c: Client) -> None:
        reply = await c.nc.request("sandbus.req.shouter.handle_request", orjson.dumps({"traced": trace}), timeout=5,
                                   headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01",
                                            "Content-Type": "application/json"})
        assert orjson.loads(reply.data) == {"traced": trace}

    stack.call(traced)
    row = _until(browser, lambda b: next((r for r in b.find_elements(By.CSS_SELECTOR, "#log-rows tr")
                                          if trace in r.find_element(By.CSS_SELECTOR, "td.message").text), None),
                 "the traced call's log line")
    assert row.find_element(By.CSS_SELECTOR, "a.trace").get_attribute("href") == f"{JAEGER}/trace/{trace}"


def test_a_hostile_manifest_description_stays_text(stack: Stack, browser: WebDriver) -> None:
    _open(browser, stack.read_only.url)
    assert _cell(browser, "evil", "description") == XSS_DESCRIPTION
    assert not browser.find_elements(By.CSS_SELECTOR, "#plugins img, #plugins script")
    assert _pwned(browser) is None


def test_read_only_has_no_control(stack: Stack, browser: WebDriver) -> None:
    _open(browser, stack.read_only.url)
    assert browser.find_element(By.ID, "mode").text == "read-only"
    assert not browser.find_elements(By.CSS_SELECTOR, "button.reload, button.unload")
    # a token in the URL changes nothing when the dashboard was not started with --allow-control
    _open(browser, stack.read_only.url + "#token=" + "a" * 43)
    assert not browser.find_elements(By.CSS_SELECTOR, "button.reload, button.unload")


def test_control_needs_the_token_url(stack: Stack, browser: WebDriver) -> None:
    _open(browser, stack.control.url)
    browser.execute_script("sessionStorage.clear();")  # a token this tab was given earlier is forgotten
    _open(browser, stack.control.url)
    assert browser.find_element(By.ID, "mode").text == "control needs the token URL"
    assert not browser.find_elements(By.CSS_SELECTOR, "button.reload")


def _reloads(stack: Stack) -> int:
    async def stats(c: Client) -> Any:
        return await c.control(NODE, "stats")

    return int(next(p for p in stack.call(stats)["plugins"] if p["name"] == "echo")["reloads"])


def test_reload_with_the_token(stack: Stack, browser: WebDriver) -> None:
    assert stack.control.token
    _open(browser, f"{stack.control.url}#token={stack.control.token}")
    assert "#token" not in browser.current_url  # taken out of the address bar
    assert browser.find_element(By.ID, "mode").text == "control allowed"
    before = _reloads(stack)
    _click(browser, lambda b: _row(b, "echo").find_element(By.CSS_SELECTOR, "button.reload"))
    _until(browser, lambda b: b.find_element(By.ID, "control-message").text == f"reload of echo on {NODE}: done",
           "the reload done")
    assert _reloads(stack) == before + 1
    _until(browser, lambda b: next((r for r in b.find_elements(By.CSS_SELECTOR, "#audit-rows tr")
                                    if "dashboard.control" in r.text and "reload of echo" in r.text), None),
           "the control action in the audit trail")


def test_opening_a_plugin_shows_its_debug_state(stack: Stack, browser: WebDriver) -> None:
    _open(browser, stack.read_only.url)

    async def call(c: Client) -> None:
        await c.request("echo", "handle_request", {"x": 1})

    stack.call(call)
    _click(browser, lambda b: _row(b, "echo"))
    _until(browser, lambda b: b.find_element(By.ID, "debug-section").is_displayed(), "the debug section")
    assert browser.find_element(By.ID, "debug-title").text == f"echo on {NODE}"
    _until(browser, lambda b: b.find_elements(By.CSS_SELECTOR, '#debug-facts td[data-key="status"]')
           and b.find_element(By.CSS_SELECTOR, '#debug-facts td[data-key="status"]').text == "loaded",
           "the plugin's status in its debug state")
    _until(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#debug-instances tbody tr"), "its instances")
    assert browser.find_elements(By.CSS_SELECTOR, "#debug-latency .bar")
    browser.find_element(By.ID, "debug-close").click()
    assert not browser.find_element(By.ID, "debug-section").is_displayed()


def test_deploys_and_node_reports_are_shown(stack: Stack, browser: WebDriver) -> None:
    """What ``sandbus deploy`` writes to the cluster's bucket, and what cluster nodes report, as the page shows
    it; a value in the bucket that is not a deploy is counted, not shown."""
    from sandbus.host.cluster.deploys import Deploy, DeployStore
    from sandbus.host.cluster.reports import NodeReport, PluginReport, ReportStore

    async def deploy(c: Client) -> None:
        js = c.nc.jetstream()
        store = await DeployStore.open(js)
        revision = await store.put(Deploy(plugin="echo", range="^1.0", version="1.0.0", replicas=2,
                                          labels={"zone": "a"}))
        await (await ReportStore.open(js)).put(NodeReport(node=NODE, plugins={
            "echo": PluginReport(version="1.0.0", state="serving", deploy_revision=revision)}))
        await store.kv.put("evil", b'{"plugin": "<img src=x onerror=window.__pwned=7>"}')

    stack.call(deploy)
    _open(browser, stack.read_only.url)
    row = _until(browser, lambda b: b.find_element(By.CSS_SELECTOR, '#deploy-rows tr[data-plugin="echo"]'),
                 "the deploy")
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert cells == ["echo", "1.0.0", "^1.0", "", "2", "zone=a", cells[6], f"{NODE}: serving 1.0.0"]
    assert browser.find_element(By.ID, "deploy-note").text == "(1 entry in the bucket is not a valid deploy)"
    assert not browser.find_elements(By.CSS_SELECTOR, "#deploys img")
    assert _pwned(browser) is None


#: what a hostile node (anyone on the account may answer the discovery) puts in every field the page shows
FAKE = "fake-node"
XSS = '<img src=x onerror="window.__pwned=8"><script>window.__pwned=9</script>'


def _fake_node_replies() -> tuple[dict[str, Any], dict[str, Any]]:
    plugin = {"name": "trap", "version": XSS, "status": XSS, "description": XSS, "last_error": XSS,
              "last_error_code": XSS, "executions": "1e9", "errors": -5, "p50_ms": XSS, "functions": [XSS],
              "memory_bytes": 2**64 - 1, "junk": [[[[[[[[[[[1]]]]]]]]]]]}
    stats = {"node_id": FAKE, "version": XSS, "durable_topics": XSS, "spans_dropped": XSS,
             "plugins": [plugin, {"name": XSS}, {"name": "a.b"}], "padding": "x" * 600_000}
    event = {"at": XSS, "code": XSS, "message": XSS, "function": XSS}
    debug = {"node_id": FAKE, "plugin": "trap", "status": XSS, "version": XSS, "kind": XSS, "isolation": XSS,
             "sha256": XSS, "last_loaded": XSS, "reloads": XSS, "in_flight": [XSS], "queue_depth": {"x": XSS},
             "limits": {XSS: XSS, "__proto__": XSS, "constructor": XSS}, "counters": {XSS: XSS},
             "instances": [{"id": XSS, "memory_bytes": XSS, "busy": XSS, "calls": XSS}],
             "latency_ms": {"bounds": [XSS], "counts": [XSS, 1e308]}, "fuel": {"bounds": XSS, "counts": XSS},
             "recent_errors": [event] * 40, "recent_logs": [{"ts": XSS, "level": XSS, "message": XSS}],
             "recent_audit": [{"timestamp": XSS, "level": XSS, "kind": XSS, "message": XSS}]}
    return stats, debug


def test_a_hostile_node_shows_as_text_and_its_row_leaves_with_it(stack: Stack, browser: WebDriver) -> None:
    """A responder on the bus answers the discovery, ``stats`` and ``debug`` with markup in every field, lying
    types, a 600 KB padding and nesting, and publishes an audit event of the same: the page shows the markup as
    text, runs none of it, and keeps working; when the responder goes, its row goes."""
    import asyncio
    import threading

    stats, debug = _fake_node_replies()
    stop = threading.Event()
    ready = threading.Event()

    async def fake() -> None:
        async with await Client.connect(stack.url) as c:
            def answer(body: Any) -> Any:
                data = orjson.dumps(body)

                async def reply(msg: Any) -> None:
                    await c.nc.publish(msg.reply, data)

                return reply

            subs = [await c.nc.subscribe("$SRV.PING.sandbus-node", cb=answer({"metadata": {"node_id": FAKE}})),
                    await c.nc.subscribe(f"sandbus.node.{FAKE}.stats", cb=answer(stats)),
                    await c.nc.subscribe(f"sandbus.node.{FAKE}.debug", cb=answer(debug))]
            await c.nc.publish(f"sandbus.audit.{FAKE}", orjson.dumps(
                {"kind": XSS, "level": XSS, "plugin": XSS, "message": "fake-audit " + XSS, "timestamp": 1.5,
                 "details": {"trace_id": XSS, XSS: XSS}}))
            await c.nc.flush()
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)  # serving until the test is done with it
            for sub in subs:
                await sub.unsubscribe()

    thread = threading.Thread(target=asyncio.run, args=(fake(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        _open(browser, stack.read_only.url)
        row = f'#plugin-rows tr[data-node="{FAKE}"][data-plugin="trap"]'
        _until(browser, lambda b: b.find_elements(By.CSS_SELECTOR, row), "the hostile node's plugin")
        _until(browser, lambda b: b.execute_script(
            "const r = document.querySelector(arguments[0]); return r !== null && r.textContent.includes(arguments[1])",
            row, XSS), "the markup shown as text in the row")
        _until(browser, lambda b: next((r for r in b.find_elements(By.CSS_SELECTOR, "#audit-rows tr")
                                        if "fake-audit" in r.text), None), "the hostile audit event")
        _click(browser, lambda b: b.find_element(By.CSS_SELECTOR, row))
        _until(browser, lambda b: b.find_element(By.CSS_SELECTOR, '#debug-facts td[data-key="status"]').text == XSS,
               "the hostile debug state, as text")
        _until(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#debug-errors tbody tr"), "its recent errors")
        assert not browser.find_elements(By.CSS_SELECTOR, "main img, main script")
        assert _pwned(browser) is None
        assert browser.find_element(By.ID, "conn").text == "live"
        browser.find_element(By.ID, "debug-close").click()
    finally:
        stop.set()
        thread.join(10)
    _until(browser, lambda b: not b.find_elements(By.CSS_SELECTOR, f'#node-rows tr[data-node="{FAKE}"]'),
           "the hostile node's row gone with it")
    assert _pwned(browser) is None
