"""The dashboard's memory is bounded whatever arrives: listeners, their queues, history, batches; and what it
accepts from the bus and from a Host header is checked piece by piece."""

from __future__ import annotations

import orjson
import pytest

from sandbus.host.dashboard import validate
from sandbus.host.dashboard.hub import Hub, HubLimits, TooManyListeners
from sandbus.host.dashboard.security import FailureLimit, HostCheck, is_loopback, new_token, token_matches


def _line(i: int) -> dict[str, object]:
    return {"ts": "", "node": "n", "plugin": "p", "version": None, "level": "info", "stream": None,
            "message": f"line {i}", "trace_id": None, "seq": i, "dropped": 0}


def test_listeners_are_capped() -> None:
    hub = Hub(limits=HubLimits(max_listeners=2))
    first, _ = hub.listen(), hub.listen()
    with pytest.raises(TooManyListeners):
        hub.listen()
    hub.leave(first)
    hub.listen()
    assert hub.listener_count == 2


def test_a_listener_that_falls_behind_is_cut_off_not_buffered() -> None:
    hub = Hub(limits=HubLimits(listener_queue=4))
    slow, keeping_up = hub.listen(), hub.listen()
    for i in range(10):
        hub.add_log(_line(i))
        hub.flush()
        while not keeping_up.queue.empty():
            keeping_up.queue.get_nowait()
    assert slow.cut_off
    assert not keeping_up.cut_off
    assert slow.queue.get_nowait() is None
    assert slow.queue.empty()
    # its place is taken until its handler returns (its connection closed), not freed while it may hang
    assert hub.listener_count == 2
    hub.leave(slow)
    assert hub.listener_count == 1


def test_a_listener_is_cut_off_by_the_bytes_queued_not_only_their_count() -> None:
    """Batches of long lines are megabytes each: a page that does not read is cut off once its queue holds
    ``listener_bytes``, long before ``listener_queue`` events."""
    hub = Hub(limits=HubLimits(listener_queue=256, listener_bytes=64 * 1024))
    slow, keeping_up = hub.listen(), hub.listen()
    for _ in range(40):
        for i in range(8):
            hub.add_log({**_line(i), "message": "x" * 1000})
        hub.flush()
        while not keeping_up.queue.empty():
            keeping_up.take_nowait()
        if slow.cut_off:
            break
    assert slow.cut_off
    assert slow.queue.qsize() == 1
    assert keeping_up.queued_bytes == 0
    assert not keeping_up.cut_off
    assert hub.cut_offs == 1


def test_failure_limit_locks_then_slides() -> None:
    now = [0.0]
    limit = FailureLimit(max_failures=3, window_s=10.0, clock=lambda: now[0])
    assert [limit.fail() for _ in range(3)] == [True, True, True]
    assert limit.locked_for() == 10.0
    assert not limit.fail()
    assert not limit.fail()
    assert limit.suffix() == " (2 more not logged)"
    assert limit.suffix() == ""
    now[0] = 10.5
    assert limit.locked_for() == 0.0
    assert limit.fail()


def test_history_and_batches_are_bounded() -> None:
    hub = Hub(limits=HubLimits(log_history=5, audit_history=3, batch=4))
    listener = hub.listen()
    listener.queue.get_nowait()  # the snapshot
    for i in range(10):
        hub.add_log(_line(i))
    hub.flush()
    event = listener.queue.get_nowait()
    assert event is not None
    payload = orjson.loads(event.split(b"data: ", 1)[1])
    assert [line["seq"] for line in payload["lines"]] == [0, 1, 2, 3]
    assert payload["dropped"] == 6
    assert hub.dropped["logs"] == 6
    for _ in range(3):
        for i in range(4):
            hub.add_log(_line(i))
        hub.flush()
    assert len(hub.logs) == 5
    assert len(hub.snapshot()["logs"]) == 5


def test_log_lines_are_bounded_and_typed() -> None:
    good = {"ts": "2026-12-03T08:00:00.000000Z", "node": "n1", "plugin": "p", "version": "1.0.0", "level": "error",
            "stream": "stderr", "message": "m", "trace_id": "ab" * 16, "seq": 3, "dropped": 2}
    assert validate.log_line("sandbus.log.n1.p", orjson.dumps(good)) == good
    def parsed(**over: object) -> dict[str, object]:
        line = validate.log_line("sandbus.log.n1.p", orjson.dumps({**good, **over}))
        assert line is not None
        return line

    assert parsed(trace_id="0" * 32)["trace_id"] is None
    assert parsed(stream="<x>")["stream"] is None
    assert parsed(dropped=-5)["dropped"] == 0
    long = validate.log_line("sandbus.log.n1.p", orjson.dumps({**good, "message": "x" * 10_000}))
    assert long is not None
    assert len(long["message"]) == validate.TEXT_CHARS
    for subject, body in [("sandbus.log.n1", good), ("sandbus.log.n1.p.q", good), ("sandbus.log.n2.p", good),
                          ("sandbus.log.n1.p", {**good, "level": "trace"}),
                          ("sandbus.log.n1.p", {**good, "message": None})]:
        assert validate.log_line(subject, orjson.dumps(body)) is None
    assert validate.log_line("sandbus.log.n1.p", b"x" * (validate.MAX_LOG_BYTES + 1)) is None
    assert validate.log_line("sandbus.log.n1.p", b"[" * 2000) is None


def test_audit_events_are_bounded_and_typed() -> None:
    body = {"level": "warning", "kind": "limit.fuel", "plugin": "p", "message": "m", "timestamp": 1.5,
            "details": {"trace_id": "cd" * 16, "n": 1}, "count": 4}
    event = validate.audit_event("sandbus.audit.n1", orjson.dumps(body))
    assert event is not None
    assert (event["node"], event["trace_id"], event["count"], event["details"]) == \
        ("n1", "cd" * 16, 4, '{"trace_id":"cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd","n":1}')
    assert validate.audit_event("sandbus.audit.n1", orjson.dumps({**body, "timestamp": "now"})) is None
    assert validate.audit_event("sandbus.audit.n1.x", orjson.dumps(body)) is None
    deep = validate.audit_event("sandbus.audit.n1", b'{"level":"info","kind":"k","message":"m","timestamp":1,'
                                                    b'"details":{"a":' + b"[" * 500 + b"]" * 500 + b"}}")
    assert deep is not None
    assert deep["details"] == "{…}"


def test_a_node_view_keeps_only_known_typed_fields() -> None:
    view = validate.node_view({"node_id": "n1", "version": "0.1.0", "plugins": [
        {"name": "p", "executions": "many", "p50_ms": float("nan"), "description": 5, "functions": ["f", 3, "g"],
         "extra": "<script>"}, {"no": "name"}, "junk"]})
    assert view is not None
    assert [p["name"] for p in view["plugins"]] == ["p"]
    plugin = view["plugins"][0]
    assert plugin["executions"] is None
    assert plugin["p50_ms"] is None
    assert plugin["description"] is None
    assert plugin["functions"] == ["f", "g"]
    assert "extra" not in plugin
    assert validate.node_view({"plugins": []}) is None
    # ids and names the page would ask about must be subject tokens
    for bad in ("a.b", "*", ">", "$SYS", "x y", "", "n" * 200, 7):
        assert validate.node_view({"node_id": bad, "plugins": []}) is None
        assert validate.node_view({"node_id": "n1", "plugins": [{"name": bad}]}) == \
            {**validate.node_view({"node_id": "n1"}), "plugins": []}  # type: ignore[dict-item]


@pytest.mark.parametrize(("bound", "header", "allowed"), [
    ("127.0.0.1", "127.0.0.1:8470", True),
    ("127.0.0.1", "localhost:8470", True),
    ("127.0.0.1", "[::1]:8470", True),
    ("127.0.0.1", "127.0.0.1:8471", False),
    ("127.0.0.1", "attacker.example:8470", False),
    ("127.0.0.1", "127.0.0.1:8470:1", False),
    ("127.0.0.1", "127.0.0.1:+8470", False),
    ("0.0.0.0", "192.0.2.7:8470", True),
    ("0.0.0.0", "rebind.attacker.example:8470", False),
    ("0.0.0.0", "dash.internal:8470", True),  # named with --allow-host
    ("192.0.2.7", "192.0.2.7:8470", True),
    ("192.0.2.7", "localhost:8470", False),
    # DNS rebinding and its disguises
    ("127.0.0.1", "127.0.0.1.attacker.example:8470", False),
    ("127.0.0.1", "localhost.:8470", False),
    ("127.0.0.1", "LOCALHOST:8470", True),
    ("127.0.0.1", "[::1]", True),
    ("127.0.0.1", "[::1]:8471", False),
    ("127.0.0.1", "user@127.0.0.1:8470", False),
    ("127.0.0.1", "127.0.0.1%2eattacker.example:8470", False),
    ("127.0.0.1", "", False),
    ("0.0.0.0", "0x7f.1:8470", False),
    ("0.0.0.0", "localhost.attacker.example:8470", False),
])
def test_host_header_check(bound: str, header: str, allowed: bool) -> None:
    assert HostCheck(bound, 8470, frozenset({"dash.internal"})).allows(header) is allowed


def test_origin_and_token() -> None:
    check = HostCheck("127.0.0.1", 8470)
    assert check.origin_allowed("http://127.0.0.1:8470", "127.0.0.1:8470")
    assert not check.origin_allowed("http://localhost:8470", "127.0.0.1:8470")  # another origin for the browser
    assert not check.origin_allowed("https://127.0.0.1:8470", "127.0.0.1:8470")
    assert not check.origin_allowed("http://127.0.0.1:8470/x", "127.0.0.1:8470")
    token = new_token()
    assert len(token) >= 43
    assert token != new_token()
    assert token_matches(token, token)
    assert not token_matches(token[:-1], token)
    assert not token_matches(None, token)
    assert not token_matches("ü" * 43, token)
    assert is_loopback("127.0.0.2")
    assert is_loopback("::1")
    assert not is_loopback("0.0.0.0")
