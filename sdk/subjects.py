"""Subject names: the wire protocol's addressing (docs/protocol.md).

    sandbus.req.<plugin>.<function>   request/reply, queue group "sandbus.<plugin>" (load-balanced over nodes)
    sandbus.msg.<plugin>              direct PluginMessage, same queue group
    sandbus.topic.<topic...>          broadcast; each subscribing plugin gets one copy (queue group per plugin)
    sandbus.dlq.<plugin>              dead letters of durable topic deliveries
    sandbus.audit.<node>              audit events (captured by a JetStream stream)
    $SRV.PING|INFO|STATS[.sandbus-node]  node discovery (NATS micro)
    sandbus.node.<node>.<verb>        node control (list, load, unload, reload, stats)
"""

from __future__ import annotations

import re

__all__ = [
    "AUDIT_PREFIX",
    "DLQ_PREFIX",
    "MSG_PREFIX",
    "NODE_SERVICE",
    "REQ_PREFIX",
    "TOPIC_PREFIX",
    "audit_subject",
    "check_token",
    "check_topic",
    "control_subject",
    "dlq_subject",
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
NODE_SERVICE = "sandbus-node"

_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_token(value: str, what: str) -> str:
    """A single subject token: no dots, spaces or wildcards."""
    if not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r} must be letters, digits, '_' or '-' (one subject token)")
    return value


def check_topic(topic: str, *, wildcards: bool = False) -> str:
    """A dotted topic such as ``orders.created``; ``*`` and a final ``>`` only when ``wildcards``."""
    tokens = topic.split(".")
    for i, tok in enumerate(tokens):
        if wildcards and (tok == "*" or (tok == ">" and i == len(tokens) - 1)):
            continue
        check_token(tok, f"topic token in {topic!r}:")
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


def control_subject(node: str, verb: str) -> str:
    return f"sandbus.node.{check_token(node, 'node id')}.{check_token(verb, 'verb')}"


def plugin_queue(plugin: str) -> str:
    """The queue group every node serving ``plugin`` joins, so each message goes to one of them."""
    return f"sandbus.{check_token(plugin, 'plugin')}"
