"""The cluster's JetStream buckets, bound or created on first use by whoever needs them.

Every ``ensure_*`` helper is idempotent and safe to race: it binds the bucket when it exists, else creates
it, and when another process created it in between (the create is refused), binds that one. A bucket that
exists is taken as it is: its settings are whoever created it first's -- except a registry bucket whose
contents expire (``max_age``), which is refused: published versions must not vanish.

Replicas: ``min(3, servers the connection knows of)`` -- the server connected to plus the other cluster
members its INFO advertises (``connect_urls``): 1 on a single server, 3 on the 3-server test cluster; one
fewer at a time when the server says it cannot keep that many. A caller may say otherwise (then exactly).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from sandbus.host.cluster.entry import MAX_ENTRY_BYTES
from sandbus.host.cluster.names import (
    ARTIFACTS_BUCKET,
    DEPLOYS_BUCKET,
    DEPLOYS_HISTORY,
    NODES_BUCKET,
    NODES_HISTORY,
    NODES_MAX_AGE_S,
    REGISTRY_BUCKET,
    REGISTRY_HISTORY,
)
from sandbus.sdk.errors import BusError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from nats.aio.client import Client as NatsClient
    from nats.js.client import JetStreamContext
    from nats.js.kv import KeyValue
    from nats.js.object_store import ObjectStore

__all__ = ["MAX_REPLICAS", "default_replicas", "ensure_deploys", "ensure_nodes", "ensure_registry",
           "jetstream_error"]

#: The most replicas JetStream keeps of a stream.
MAX_REPLICAS = 3
#: Largest value of the deploys and nodes buckets (a deploy or a node report is a few hundred bytes; a node's
#: report lists its plugins).
MAX_STATE_VALUE_BYTES = 256 * 1024

T = TypeVar("T")


def default_replicas(nc: NatsClient) -> int:
    """``min(3, servers known)``: the connected server and the other members its INFO lists."""
    info: dict[str, Any] = getattr(nc, "_server_info", None) or {}
    urls = info.get("connect_urls") if isinstance(info, dict) else None
    known: set[str] = set()
    if isinstance(urls, list):
        known = {u for u in urls[:64] if isinstance(u, str)}
    current = getattr(nc, "connected_url", None)
    if current is not None:
        known.add(f"{current.hostname}:{current.port}")
    # connect_urls may or may not list the server we are connected to; count each host:port once.
    normal = {u if "//" not in u else f"{urlsplit(u).hostname}:{urlsplit(u).port}" for u in known}
    return max(1, min(MAX_REPLICAS, len(normal)))


def jetstream_error(e: BaseException, what: str) -> BusError:
    """A NATS/JetStream failure as the one line a user reads."""
    import nats.errors
    import nats.js.errors

    description = getattr(e, "description", None) if isinstance(e, nats.js.errors.APIError) else None
    if isinstance(description, str) and description.strip():
        # the server said why (a bucket's limits: "maximum bytes exceeded", "message size exceeds maximum
        # allowed"...): a 503 with a reason is not a missing JetStream
        return BusError(f"{what}: JetStream refused it: {description.strip()[:300]}",
                        err_code=getattr(e, "err_code", None))
    if isinstance(e, nats.errors.NoRespondersError | nats.js.errors.ServiceUnavailableError):
        return BusError(f"{what}: JetStream is not enabled on this NATS server (start it with -js, or use "
                        "`sandbus node`'s embedded server)")
    if isinstance(e, nats.js.errors.NoStreamResponseError):
        return BusError(f"{what}: no JetStream stream took the message (its bucket was deleted meanwhile?)")
    if isinstance(e, nats.errors.TimeoutError | TimeoutError):
        return BusError(f"{what}: JetStream did not answer in time")
    text = str(e).strip() or type(e).__name__
    return BusError(f"{what}: {text[:300]}")


def _too_many_replicas(e: Exception) -> bool:
    text = str(e).lower()
    return "replica" in text or "insufficient resources" in text


async def _bind_or_create(bind: Callable[[], Awaitable[T]], create: Callable[[int], Awaitable[T]], what: str,
                          replicas: int | None, nc: NatsClient) -> T:
    """Bind the bucket, else create it with ``replicas`` (None: :func:`default_replicas`, lowered one by one
    while the server says it cannot keep that many, since servers advertising several addresses each make
    the count an upper bound)."""
    import nats.js.errors

    n = replicas if replicas is not None else default_replicas(nc)
    try:
        try:
            return await bind()
        except nats.js.errors.BucketNotFoundError:
            pass
        while True:
            try:
                return await create(n)
            except nats.js.errors.APIError as e:
                if replicas is None and n > 1 and _too_many_replicas(e):
                    n -= 1
                    continue
                if isinstance(e, nats.js.errors.BadRequestError):  # created by another process meanwhile
                    return await bind()
                raise
    except BusError:
        raise
    except Exception as e:
        raise jetstream_error(e, f"cannot open the {what} bucket") from e


async def ensure_registry(js: JetStreamContext, replicas: int | None = None) -> tuple[KeyValue, ObjectStore]:
    """The registry's index (KV ``sandbus-registry``) and artifacts (object store ``sandbus-artifacts``).

    Raises:
        BusError: JetStream is not enabled, or refused.
    """
    from nats.js.api import KeyValueConfig, ObjectStoreConfig

    kv = await _bind_or_create(
        lambda: js.key_value(REGISTRY_BUCKET),
        lambda n: js.create_key_value(KeyValueConfig(
            bucket=REGISTRY_BUCKET, history=REGISTRY_HISTORY, replicas=n, max_value_size=MAX_ENTRY_BYTES,
            description="sandbus plugin registry: one signed entry per name.version")),
        REGISTRY_BUCKET, replicas, js._nc)
    await _check_lasting(js, f"KV_{REGISTRY_BUCKET}", "entries", f"nats kv rm {REGISTRY_BUCKET}")
    objects = await _bind_or_create(
        lambda: js.object_store(ARTIFACTS_BUCKET),
        lambda n: js.create_object_store(ARTIFACTS_BUCKET, ObjectStoreConfig(
            replicas=n, description="sandbus plugin modules: <name>/<version>.wasm")),
        ARTIFACTS_BUCKET, replicas, js._nc)
    await _check_lasting(js, f"OBJ_{ARTIFACTS_BUCKET}", "modules", f"nats object rm {ARTIFACTS_BUCKET}")
    return kv, objects


async def _check_lasting(js: JetStreamContext, stream: str, kind: str, remove: str) -> None:
    """Refuse a registry bucket someone created with an age limit: its published versions would vanish
    without a word (and a version gone can be pushed again, other bytes under an old version).

    Raises:
        BusError: the bucket's stream has a ``max_age``.
    """
    try:
        info = await js.stream_info(stream)
    except Exception as e:
        raise jetstream_error(e, f"cannot read the settings of {stream}") from e
    max_age = info.config.max_age
    if max_age:
        bucket = stream.split("_", 1)[1]
        raise BusError(f"the bucket {bucket} exists with its {kind} expiring after {max_age:g} s: a registry keeps "
                       f"every published version; remove it ({remove}) and push again, or recreate it without an age "
                       "limit", bucket=bucket, max_age=max_age)


async def ensure_deploys(js: JetStreamContext, replicas: int | None = None) -> KeyValue:
    """The desired state (KV ``sandbus-deploys``, history 5).

    Raises:
        BusError: JetStream is not enabled, or refused.
    """
    return await _ensure_state(js, DEPLOYS_BUCKET, replicas, history=DEPLOYS_HISTORY,
                               description="sandbus deploys: desired state per plugin")


async def ensure_nodes(js: JetStreamContext, replicas: int | None = None) -> KeyValue:
    """The node reports (KV ``sandbus-nodes``, history 1, entries expire after 30 s).

    Raises:
        BusError: JetStream is not enabled, or refused.
    """
    return await _ensure_state(js, NODES_BUCKET, replicas, history=NODES_HISTORY, ttl=NODES_MAX_AGE_S,
                               description="sandbus nodes: liveness and actual state")


async def _ensure_state(js: JetStreamContext, bucket: str, replicas: int | None, **config: Any) -> KeyValue:
    """A KV bucket of the cluster's state (values up to :data:`MAX_STATE_VALUE_BYTES`), bound or created."""
    from nats.js.api import KeyValueConfig

    return await _bind_or_create(
        lambda: js.key_value(bucket),
        lambda n: js.create_key_value(KeyValueConfig(bucket=bucket, replicas=n, max_value_size=MAX_STATE_VALUE_BYTES,
                                                     **config)),
        bucket, replicas, js._nc)
