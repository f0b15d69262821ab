"""Listing and following a KV bucket: the end-of-values marker comes after every current value, never before."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig

from sandbus.host.cluster.kvwatch import BucketWatch, current_values


async def _bucket(nc: NATS, name: str, keys: int) -> None:
    js = nc.jetstream()
    kv = await js.create_key_value(KeyValueConfig(bucket=name, history=1))
    for i in range(keys):
        await kv.put(f"k{i}", b"%d" % i)
    await kv.put("k0", b"changed")
    await kv.put("gone", b"x")
    await kv.delete("gone")


async def test_a_listing_always_has_every_current_value(nc: NATS) -> None:
    """Fifty keys, listed thirty times: every listing has all fifty, with their latest values, and no
    deleted key (nats-py's own watcher can end a listing before its first value arrives)."""
    await _bucket(nc, "watch-list", 50)
    for _ in range(30):
        values = {e.key: e.value for e in await current_values(nc.jetstream(), "watch-list")}
        assert len(values) == 50
        assert values["k0"] == b"changed"
        assert values["k49"] == b"49"
        assert "gone" not in values


async def test_an_empty_bucket_lists_nothing_at_once(nc: NATS) -> None:
    js = nc.jetstream()
    await js.create_key_value(KeyValueConfig(bucket="watch-empty", history=1))
    assert await asyncio.wait_for(current_values(js, "watch-empty"), 5) == []


async def test_a_watch_marks_the_end_of_the_current_values_then_follows_changes(nc: NATS) -> None:
    await _bucket(nc, "watch-follow", 20)
    js = nc.jetstream()
    kv = await js.key_value("watch-follow")
    async with BucketWatch(js, "watch-follow") as watch:
        seen: list[str | None] = []
        it = aiter(watch)
        while True:
            entry = await asyncio.wait_for(anext(it), 5)
            seen.append(None if entry is None else entry.key)
            if entry is None:
                break
        assert seen[-1] is None
        assert sorted(k for k in seen if k is not None) == sorted(
            [f"k{i}" for i in range(20)] + ["gone"])
        await kv.put("k3", b"new")
        await kv.delete("k4")
        later = [await asyncio.wait_for(anext(it), 5) for _ in range(2)]
    assert [(e.key, e.value, e.operation) for e in later if e is not None] == [
        ("k3", b"new", None), ("k4", b"", "DEL")]
