"""Subject names: the wire protocol's addressing (docs/protocol.md).

    sandbus.req.<plugin>.<function>   request/reply, queue group "sandbus.<plugin>" (load-balanced over nodes)
    sandbus.msg.<plugin>              direct PluginMessage, same queue group
    sandbus.topic.<topic...>          broadcast; each subscribing plugin gets one copy (queue group per plugin)
    sandbus.dlq.<plugin>              dead letters of durable topic deliveries
    sandbus.audit.<node>              audit events (captured by a JetStream stream)
    sandbus.log.<node>.<plugin>       plugin log lines, one message per line (core NATS)
    $SRV.PING|INFO|STATS[.sandbus-node]  node discovery (NATS micro)
    sandbus.node.<node>.<verb>        node control (list, stats, load, unload, reload, debug)
"""

from __future__ import annotations

import re

__all__ = [
    "AUDIT_PREFIX",
    "DLQ_PREFIX",
    "LOG_PREFIX",
    "MAX_TOKEN_LENGTH",
    "MAX_TOPIC_LENGTH",
    "MSG_PREFIX",
    "NODE_SERVICE",
    "REQ_PREFIX",
    "TOPIC_PREFIX",
    "audit_subject",
    "check_token",
    "check_topic",
    "control_subject",
    "dlq_subject",
    "log_subject",
    "msg_subject",
    "plugin_queue",
    "request_subject",
    "topic_subject",
]

REQ_PREFIX = "sandbus.req"
MSG_PREFIX = "sandbus.msg"
TOPIC_PREFIX = "sandbus.topic"
DLQ_PREFIX = "sandbus.dlq"
AUDIT_PREFIX = "sandbus.audit"
LOG_PREFIX = "sandbus.log"
NODE_SERVICE = "sandbus-node"

#: One subject token: what a plugin name, function name, node id or topic token may be.
_TOKEN = re.compile(r"[A-Za-z0-9_\-]+")
#: Longest token and longest topic accepted. NATS itself has no limit short of its control line; these
#: keep every subject we build or accept far below it, and keep a log line or an error readable.
MAX_TOKEN_LENGTH = 255
MAX_TOPIC_LENGTH = 1024


def check_token(value: str, what: str) -> str:
    """A single subject token: ``[A-Za-z0-9_-]+``, at most :data:`MAX_TOKEN_LENGTH` characters.

    The whole string must match (a trailing newline is not "the end of the string"): a token ends up
    inside a NATS subject, where whitespace, ``.``, wildcards and ``$`` (the server's reserved
    ``$SYS``/``$JS``/``$SRV`` namespaces) would change what the subject means.

    Raises:
        ValueError: naming ``what`` and the value.
    """
    if not isinstance(value, str) or len(value) > MAX_TOKEN_LENGTH or not _TOKEN.fullmatch(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ValueError(f"{what} {shown} must be 1-{MAX_TOKEN_LENGTH} letters, digits, '_' or '-' "
                         "(one subject token)")
    return value


def check_topic(topic: str, *, wildcards: bool = False) -> str:
    """A dotted topic such as ``orders.created``, the one rule for every topic and topic pattern.

    Each token is a subject token (:func:`check_token`: ASCII letters, digits, ``_`` and ``-``), so a
    topic is printable ASCII with no whitespace, no empty token and no ``$`` anywhere: it can never
    reach the server's reserved subjects. With ``wildcards`` (subscriptions, ``publish_topics``),
    ``*`` may stand for one whole token and ``>`` for the rest, as the last token only. Manifests,
    the operator policy, the node and the client all call this, so what ``sandbus plugins check``
    accepts is exactly what a node can subscribe to.

    Raises:
        ValueError: saying which rule the topic breaks.
    """
    if not isinstance(topic, str) or not topic:
        raise ValueError("a topic may not be empty")
    shown = repr(topic) if len(repr(topic)) <= 80 else repr(topic)[:77] + "..."
    if len(topic) > MAX_TOPIC_LENGTH:
        raise ValueError(f"topic {shown} is longer than {MAX_TOPIC_LENGTH} characters")
    if any(c.isspace() or not c.isprintable() for c in topic):
        raise ValueError(f"topic {shown} contains whitespace or control characters")
    tokens = topic.split(".")
    last = len(tokens) - 1
    for i, tok in enumerate(tokens):
        if not tok:
            raise ValueError(f"topic {shown} has an empty token (leading, trailing or doubled '.')")
        if tok in ("*", ">"):
            if not wildcards:
                raise ValueError(f"topic {shown}: wildcards '*' and '>' are only allowed in subscriptions "
                                 "and permissions, not in a topic to publish to")
            if tok == ">" and i != last:
                raise ValueError(f"topic {shown}: '>' may only be the last token")
            continue
        if "*" in tok or ">" in tok:
            raise ValueError(f"topic {shown}: wildcards '*' and '>' must be whole tokens")
        check_token(tok, f"topic {shown}: token")
    return topic


def request_subject(plugin: str, function: str) -> str:
    return f"{REQ_PREFIX}.{check_token(plugin, 'plugin')}.{check_token(function, 'function')}"


def msg_subject(plugin: str) -> str:
    return f"{MSG_PREFIX}.{check_token(plugin, 'plugin')}"


def topic_subject(topic: str, *, wildcards: bool = False) -> str:
    return f"{TOPIC_PREFIX}.{check_topic(topic, wildcards=wildcards)}"


def dlq_subject(plugin: str) -> str:
    return f"{DLQ_PREFIX}.{check_token(plugin, 'plugin')}"


def audit_subject(node: str) -> str:
    return f"{AUDIT_PREFIX}.{check_token(node, 'node id')}"


def log_subject(node: str, plugin: str) -> str:
    """Where ``node`` publishes ``plugin``'s log lines; ``"*"`` for either follows every node or plugin."""
    node_token = node if node == "*" else check_token(node, "node id")
    plugin_token = plugin if plugin == "*" else check_token(plugin, "plugin")
    return f"{LOG_PREFIX}.{node_token}.{plugin_token}"


def control_subject(node: str, verb: str) -> str:
    return f"sandbus.node.{check_token(node, 'node id')}.{check_token(verb, 'verb')}"


def plugin_queue(plugin: str) -> str:
    """The queue group every node serving ``plugin`` joins, so each message goes to one of them."""
    return f"sandbus.{check_token(plugin, 'plugin')}"
