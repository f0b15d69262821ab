"""Placement is pure: the same inputs give the same nodes everywhere, and a join or leave moves little."""

from __future__ import annotations

import random

from sandbus.host.cluster.placement import Candidate, labels_match, place, score
from sandbus.host.cluster.reports import Membership, NodeReport

NODES = [f"node-{i}" for i in range(10)]
PLUGINS = [f"plugin{i}" for i in range(200)]


def _cands(nodes: list[str]) -> list[Candidate]:
    return [Candidate(n) for n in nodes]


def test_every_order_of_the_inputs_gives_the_same_nodes() -> None:
    rng = random.Random(7)
    for plugin in PLUGINS[:50]:
        expected = place(plugin, "1.0.0", 3, {}, _cands(NODES))
        shuffled = NODES[:]
        rng.shuffle(shuffled)
        assert place(plugin, "1.0.0", 3, {}, _cands(shuffled)) == expected
        assert len(expected) == 3
        assert len(set(expected)) == 3


def test_the_highest_scores_are_chosen() -> None:
    chosen = place("echo", "1.0.0", 2, {}, _cands(NODES))
    best = sorted(NODES, key=lambda n: score("echo", n), reverse=True)[:2]
    assert chosen == best


def test_a_node_leaving_moves_only_its_own_share() -> None:
    moved = 0
    for plugin in PLUGINS:
        before = place(plugin, "1", 3, {}, _cands(NODES))
        gone = before[0]
        after = place(plugin, "1", 3, {}, _cands([n for n in NODES if n != gone]))
        assert set(before) - {gone} <= set(after)  # the others keep what they had
        assert len(after) == 3
        moved += len(set(after) - set(before))
    assert moved == len(PLUGINS)  # exactly one new node per deploy: the one that replaces the leaver


def test_a_node_joining_takes_only_what_it_outscores() -> None:
    changed = 0
    for plugin in PLUGINS:
        before = place(plugin, "1", 2, {}, _cands(NODES))
        after = place(plugin, "1", 2, {}, _cands([*NODES, "newcomer"]))
        if after != before:
            changed += 1
            assert "newcomer" in after
            assert len(set(before) - set(after)) == 1
    # the newcomer should get about 2/11 of the deploys; far from all of them
    assert 0 < changed < len(PLUGINS) // 2


def test_labels_select_nodes() -> None:
    cands = [Candidate("a", {"region": "eu", "disk": "ssd"}), Candidate("b", {"region": "us"}),
             Candidate("c", {"region": "eu"})]
    assert sorted(place("p", "1", None, {"region": "eu"}, cands)) == ["a", "c"]
    assert place("p", "1", None, {"region": "eu", "disk": "ssd"}, cands) == ["a"]
    assert place("p", "1", 5, {"region": "mars"}, cands) == []
    assert labels_match({}, {})
    assert not labels_match({"a": "1"}, {})


def test_replicas_zero_none_and_more_than_nodes() -> None:
    cands = _cands(NODES[:3])
    assert place("p", "1", 0, {}, cands) == []
    assert sorted(place("p", "1", None, {}, cands)) == sorted(NODES[:3])
    assert sorted(place("p", "1", 10, {}, cands)) == sorted(NODES[:3])


def test_a_node_that_failed_the_version_is_passed_over_for_that_version_only() -> None:
    cands = _cands(NODES[:3])
    first = place("p", "2.0.0", 1, {}, cands)[0]
    marked = [Candidate(c.node, excluded=("2.0.0",) if c.node == first else ()) for c in cands]
    assert first not in place("p", "2.0.0", 1, {}, marked)
    assert place("p", "1.0.0", 1, {}, marked) == [first]


def test_after_the_readers_own_outage_the_nodes_it_knew_stay_live_for_a_window() -> None:
    """A server restart cuts every node off at once. The node whose watch comes back first must not find
    the others dead (their reports could not arrive either) and take their deploys: the nodes live when it
    last heard from the bus stay live for ``live_s`` from its return; a node already dead before stays dead."""
    m = Membership(3.0, own="n1")
    for node, at in (("n1", 100.0), ("n2", 99.5), ("dead", 90.0)):
        m.observe(NodeReport(node, {}, {}), arriving=True, now=at)
    assert set(m.live(now=110.0)) == set()  # ten seconds without a report: everyone looks gone
    m.resume(last_heard=100.0, now=110.0)
    assert set(m.live(now=110.0)) == {"n1", "n2"}
    assert set(m.live(now=112.5)) == {"n1", "n2"}
    assert set(m.live(now=113.5)) == set()  # still silent live_s after the return: gone
