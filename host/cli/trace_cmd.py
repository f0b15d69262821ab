"""``sandbus trace``: one request traced end to end, whatever the nodes' sampling, shown as a span tree."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

import typer

from sandbus.host.cli.bus import FunctionArg, PluginArg, RequestArg, TimeoutOpt, bus_call, check_target, decode_reply
from sandbus.host.cli.connect import Connection, with_connection
from sandbus.host.cli.main import read_json_arg
from sandbus.host.cli.output import markup_safe, terminal_json

if TYPE_CHECKING:
    from sandbus.sdk.client import Client

__all__ = ["MAX_JAEGER_URL", "MAX_SPANS", "MAX_TREE_DEPTH", "jaeger_base", "register", "trace_cmd"]


#: the longest Jaeger URL taken (a link is printed, never fetched)
MAX_JAEGER_URL = 2048


def jaeger_base(value: str | None) -> str | None:
    """Option callback: the Jaeger UI's base URL, checked (http or https, a host, no query, fragment or
    credentials, no spaces or control characters), without its trailing slash."""
    if value is None or value == "":
        return None
    if len(value) > MAX_JAEGER_URL or any(c.isspace() or not c.isprintable() for c in value):
        raise typer.BadParameter("not a URL: too long, or it holds spaces or control characters")
    try:
        url = urlsplit(value)
        url.port  # noqa: B018 -- raises ValueError for a port that is not a number in range
    except ValueError as e:
        raise typer.BadParameter(f"not a URL: {e}") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise typer.BadParameter(f"expected an http:// or https:// URL with a host, found {value!r}")
    if url.query or url.fragment or url.username is not None or url.password is not None:
        raise typer.BadParameter("the Jaeger URL takes no query, fragment or credentials")
    return value.rstrip("/")


JaegerOpt = Annotated[str | None, typer.Option(
    "--jaeger", envvar="SANDBUS_JAEGER_URL", callback=jaeger_base, metavar="<url>",
    help="Jaeger UI URL (e.g. http://127.0.0.1:16686): print the trace's full link.")]


@with_connection
def trace_cmd(
    plugin: PluginArg,
    function: FunctionArg = "handle_request",
    payload: RequestArg = "{}",
    timeout: TimeoutOpt = 5.0,
    jaeger: JaegerOpt = None,
    *,
    conn: Connection,
) -> None:
    """Send one traced request; print its trace id and the spans of the client and the serving node."""
    check_target(plugin, function, "trace")
    from rich.tree import Tree

    from sandbus.host.cli.client_otel import SERVICE_NAME
    from sandbus.host.telemetry.client_export import client_tracer_provider
    from sandbus.host.telemetry.otel import SpanCollector

    data = read_json_arg(payload, "payload")
    # The same provider client_run's export (with OTEL_* set) adds its exporter to.
    provider = client_tracer_provider(SERVICE_NAME)
    collector = SpanCollector()
    provider.add_span_processor(collector)

    async def go(c: Client) -> tuple[int, bytes, dict[str, str], list[dict[str, Any]]]:
        with provider.get_tracer("sandbus.cli").start_as_current_span(f"sandbus trace {plugin}.{function}") as root:
            trace_id = root.get_span_context().trace_id
            collector.watch(trace_id)
            reply, headers, spans = await c.trace_request(plugin, function, data, timeout=timeout)
        return trace_id, reply, headers, spans

    trace_id, reply, headers, node_spans = bus_call(go, conn)
    client_spans = collector.take(trace_id)
    for s in client_spans:  # this process is the client: named by its service, not its random instance id
        s["service"] = provider.resource.attributes.get("service.name", SERVICE_NAME)
    spans = client_spans + _valid_spans(node_spans)
    link = f"Jaeger: {jaeger}/trace/{trace_id:032x}" if jaeger else "pass --jaeger URL for a link to it in Jaeger"
    typer.echo(f"trace id {trace_id:032x}  ({link})")
    by_parent: dict[str | None, list[dict[str, Any]]] = {}
    ids = {s["span_id"] for s in spans}
    for s in spans:
        by_parent.setdefault(s["parent_id"] if s["parent_id"] in ids else None, []).append(s)
    tree = Tree("spans")
    # Walked without recursion, each span once and at most MAX_TREE_DEPTH deep: the nodes' spans may
    # name any parent (themselves, a cycle, a chain thousands long).
    shown: set[str] = set()
    stack: list[tuple[Tree, str | None, int]] = [(tree, None, 0)]
    while stack:
        node, parent, depth = stack.pop()
        for s in reversed(by_parent.get(parent, [])):
            if s["span_id"] in shown or depth >= MAX_TREE_DEPTH:
                continue
            shown.add(s["span_id"])
            stack.append((node.add(_span_label(s)), s["span_id"], depth + 1))
    from rich.console import Console  # only here: `sandbus --help` registers this command

    Console(stderr=True).print(tree)
    decode_reply(reply)
    sys.stdout.buffer.write(terminal_json(reply) + b"\n")
    if "Sandbus-Error-Code" in headers:
        raise typer.Exit(1)


#: Most spans of a node shown by ``sandbus trace``, and the deepest nesting of the tree.
MAX_SPANS = 1000
MAX_TREE_DEPTH = 64


def _valid_spans(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The spans a node sent that have the shape ``sandbus trace`` shows, at most :data:`MAX_SPANS`;
    anything else (a hostile or broken node) is left out, never a crash."""
    valid: list[dict[str, Any]] = []
    for s in spans[:MAX_SPANS]:
        if (isinstance(s.get("span_id"), str) and isinstance(s.get("parent_id"), str | None)
                and isinstance(s.get("duration_ms"), int | float) and isinstance(s.get("attributes", {}), dict)
                and isinstance(s.get("events", []), list)):
            valid.append({"span_id": s["span_id"], "parent_id": s["parent_id"], "name": s.get("name", "?"),
                          "service": s.get("service", "?"), "duration_ms": s["duration_ms"],
                          "attributes": s.get("attributes", {}), "events": s.get("events", [])})
    return valid


def _span_label(s: dict[str, Any]) -> str:
    """One line of the span tree. Names, attributes and events come from the nodes: escaped before they
    meet markup, and cut to a line's worth."""
    attrs = {str(k): v for k, v in s["attributes"].items() if str(k).startswith(("sandbus.", "error."))}
    label = (f"[bold]{markup_safe(_cut(s['name']))}[/] {s['duration_ms']:.3f} ms  "
             f"[dim]{markup_safe(_cut(s['service']))}[/]")
    if attrs:
        label += "  " + " ".join(markup_safe(_cut(f"{k.removeprefix('sandbus.')}={v}")) for k, v in attrs.items())
    if s["events"]:
        label += "  [yellow]" + markup_safe(_cut(", ".join(map(str, s["events"])))) + "[/]"
    return label


def _cut(value: object, limit: int = 200) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def register(app: typer.Typer) -> None:
    app.command("trace")(trace_cmd)
