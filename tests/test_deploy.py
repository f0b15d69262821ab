"""deploy/: the compose file, the Dockerfile, .dockerignore and the NATS config agree with each other and
with the repository. No Docker engine runs here, so these files are checked by reading them: every name
one of them uses must be defined where it points (services, volumes, stages, files, ports, extras).
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from sandbus.host.telemetry.config import metrics_configured, tracing_configured

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
CLUSTER_CONF = DEPLOY / "nats" / "cluster.conf"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = compose["services"]
    assert isinstance(services, dict)
    assert services
    return services


def _nats_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run nats-server with cluster.conf."""
    return {name: svc for name, svc in _services(compose).items() if str(svc.get("image", "")).startswith("nats:")}


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _volume_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each short-syntax mount."""
    mounts = []
    for spec in service.get("volumes", []):
        assert isinstance(spec, str), f"long-syntax volume not understood here: {spec!r}"
        source, target, *_ = spec.split(":")
        mounts.append((source, target))
    return mounts


def _host_ports(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host port, container port) of each published port."""
    out = []
    for spec in service.get("ports", []):
        parts = str(spec).split("/")[0].split(":")
        assert len(parts) in (2, 3), f"a published port names its host port: {spec!r}"
        out.append((parts[-2], parts[-1]))
    return out


def test_every_service_has_an_image_or_a_build(compose: dict[str, Any]) -> None:
    for name, svc in _services(compose).items():
        assert "image" in svc or "build" in svc, name
        build = svc.get("build")
        if build is not None:
            context = (DEPLOY / build["context"]).resolve()
            assert context == REPO, f"{name} builds from the repository root"
            assert (context / build["dockerfile"]).is_file(), name


def test_depends_on_names_services(compose: dict[str, Any]) -> None:
    services = _services(compose)
    for name, svc in services.items():
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on {dep}, which is not a service"
            assert dep != name


def test_volumes_are_declared_and_bind_mounts_exist(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in _services(compose).items():
        for source, _ in _volume_mounts(svc):
            if source.startswith((".", "/")):
                assert (DEPLOY / source).resolve().is_file(), f"{name} mounts {source}, which is not in the repo"
                assert (DEPLOY / source).resolve().is_relative_to(REPO)
            else:
                assert source in declared, f"{name} uses volume {source}, which is not declared"
                used.add(source)
    assert used == declared, "a declared volume nobody mounts"


def test_each_nats_server_keeps_its_jetstream_data_in_its_own_volume(compose: dict[str, Any]) -> None:
    nats = _nats_services(compose)
    assert len(nats) == 3
    volumes = []
    for name, svc in nats.items():
        store = _env(svc)["NATS_STORE"]
        named = [src for src, target in _volume_mounts(svc) if target == store and not src.startswith((".", "/"))]
        assert len(named) == 1, f"{name}: no named volume at its JetStream store {store}"
        volumes += named
    assert len(set(volumes)) == len(volumes), "two servers share one JetStream volume"


def test_host_ports_are_unique(compose: dict[str, Any]) -> None:
    host_ports = [host for svc in _services(compose).values() for host, _ in _host_ports(svc)]
    assert host_ports
    assert len(set(host_ports)) == len(host_ports), host_ports


def test_nats_cluster_routes_name_the_other_servers(compose: dict[str, Any]) -> None:
    nats = _nats_services(compose)
    conf = CLUSTER_CONF.read_text(encoding="utf-8")
    conf_vars = set(re.findall(r"\$([A-Z_0-9]+)", re.sub(r"#.*", "", conf)))
    assert {"NATS_NAME", "NATS_STORE", "NATS_ROUTE_1"} <= conf_vars
    names = set()
    for name, svc in nats.items():
        assert svc["command"] == ["-c", "/etc/nats/cluster.conf"]
        assert ("./nats/cluster.conf", "/etc/nats/cluster.conf") in _volume_mounts(svc)
        env = _env(svc)
        assert conf_vars <= set(env), f"{name} leaves {conf_vars - set(env)} of cluster.conf unset"
        names.add(env["NATS_NAME"])
        routes = [urlsplit(v) for k, v in env.items() if k.startswith("NATS_ROUTE_")]
        assert all(r.scheme == "nats-route" for r in routes)
        route_hosts = {r.hostname for r in routes}
        assert route_hosts <= set(nats), f"{name} routes to {route_hosts - set(nats)}, not NATS services"
        assert set(nats) - {name} <= route_hosts, f"{name} has no route to some other server"
        for route in routes:
            assert str(route.port) == _env(nats[str(route.hostname)])["NATS_CLUSTER_PORT"]
    assert len(names) == len(nats), "server names must be unique in a cluster"


def test_nodes_connect_to_the_nats_services(compose: dict[str, Any]) -> None:
    services = _services(compose)
    nats = _nats_services(compose)
    nodes = _nodes(compose)
    assert nodes
    for name, svc in nodes.items():
        command = svc["command"]
        urls = command[command.index("--nats") + 1].split(",")
        assert len(urls) == len(nats)
        for url in map(urlsplit, urls):
            assert url.scheme == "nats"
            assert url.hostname in nats, f"{name}: --nats names {url.hostname}, not a NATS service"
            assert str(url.port) == _env(nats[url.hostname])["NATS_PORT"]
            assert url.hostname in svc["depends_on"]
        assert set(svc["depends_on"]) <= set(services)


def _nodes(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from the repository: sandbus nodes."""
    return {name: svc for name, svc in _services(compose).items() if "build" in svc}


def _signal_endpoint(env: dict[str, str], signal: str) -> str:
    """Where the OpenTelemetry exporter posts ``signal`` under ``env``: the per-signal variable as it is,
    else the general one with ``/v1/<signal>`` appended (the OTLP exporter specification)."""
    specific = env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    if specific:
        return specific
    return env["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + f"/v1/{signal}"


def _published(service: dict[str, Any], container_port: int) -> bool:
    return str(container_port) in {container for _, container in _host_ports(service)}


def test_nodes_send_traces_to_jaeger(compose: dict[str, Any]) -> None:
    services = _services(compose)
    for name, svc in _nodes(compose).items():
        env = _env(svc)
        assert tracing_configured(env), f"{name} does not trace"
        # http/protobuf (the default protocol) is Jaeger's OTLP HTTP port
        assert env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL",
                                                                     "http/protobuf")) == "http/protobuf"
        endpoint = urlsplit(_signal_endpoint(env, "traces"))
        assert endpoint.hostname in services, f"{name} exports spans to {endpoint.hostname}, not a service"
        assert endpoint.hostname in svc["depends_on"]
        assert (endpoint.port, endpoint.path) == (4318, "/v1/traces")
        jaeger = services[str(endpoint.hostname)]
        assert str(jaeger["image"]).startswith("jaegertracing/")
        assert _env(jaeger)["COLLECTOR_OTLP_ENABLED"] == "true"
        assert _published(jaeger, 4318), "clients on the host export their spans to Jaeger too"
        assert _published(jaeger, 16686), "the UI, where `sandbus trace` links to"


def test_nodes_send_metrics_to_prometheus_and_none_to_jaeger(compose: dict[str, Any]) -> None:
    services = _services(compose)
    for name, svc in _nodes(compose).items():
        env = _env(svc)
        assert metrics_configured(env), f"{name} sends no metrics"
        assert env.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL",
                                                                      "http/protobuf")) == "http/protobuf"
        endpoint = urlsplit(_signal_endpoint(env, "metrics"))
        assert endpoint.hostname in services, f"{name} exports metrics to {endpoint.hostname}, not a service"
        prometheus = services[str(endpoint.hostname)]
        assert str(prometheus.get("image", "")).startswith("prom/prometheus:"), \
            f"{name} sends metrics to {endpoint.hostname}, which is not Prometheus (Jaeger answers 404)"
        assert endpoint.hostname in svc["depends_on"]
        # Prometheus 3's OTLP receiver: switched on by a flag, on the path it serves
        assert "--web.enable-otlp-receiver" in prometheus["command"]
        assert (endpoint.port, endpoint.path) == (9090, "/api/v1/otlp/v1/metrics")
        assert not any(str(a).startswith("--web.listen-address") for a in prometheus["command"])
        interval = int(env.get("OTEL_METRIC_EXPORT_INTERVAL", "60000"))
        assert 1000 <= interval <= 60000


def test_prometheus_is_a_version_with_the_otlp_receiver_and_keeps_its_config_and_data(
        compose: dict[str, Any]) -> None:
    (prometheus,) = [svc for svc in _services(compose).values()
                     if str(svc.get("image", "")).startswith("prom/prometheus:")]
    tag = str(prometheus["image"]).split(":", 1)[1]
    match = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)", tag)
    assert match, f"pin an exact version, not {tag!r}"
    assert int(match[1]) >= 3, "--web.enable-otlp-receiver came with Prometheus 3"
    args = dict(a.split("=", 1) for a in prometheus["command"] if "=" in a)
    mounts = dict((target, source) for source, target in _volume_mounts(prometheus))
    config_source = mounts[args["--config.file"]]
    assert config_source.startswith("./")
    config = yaml.safe_load((DEPLOY / config_source).read_text(encoding="utf-8"))
    assert {"service.name", "service.instance.id"} <= set(config["otlp"]["promote_resource_attributes"])
    assert config["storage"]["tsdb"]["out_of_order_time_window"]
    assert "scrape_configs" not in config, "the nodes push their metrics: nothing to scrape"
    data = mounts[args["--storage.tsdb.path"]]
    assert not data.startswith((".", "/")), "Prometheus keeps its data in a named volume"
    assert _published(prometheus, 9090)


# -- Dockerfile and .dockerignore ---------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending
    return out


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins, ``!`` re-includes, ``**`` spans directories, and a
    pattern that matches a directory excludes everything below it."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_dockerfile_copies_existing_sources_from_defined_stages() -> None:
    instructions = _instructions()
    stages = {m[1] for word, rest in instructions if word == "FROM"
              for m in [re.search(r"\bAS\s+(\S+)", rest, re.IGNORECASE)] if m}
    copied_to: set[str] = set()
    for word, rest in instructions:
        if word != "COPY":
            continue
        args = shlex.split(rest)
        flags = [a for a in args if a.startswith("--")]
        *sources, dest = [a for a in args if not a.startswith("--")]
        stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
        if stage is None:  # from the build context: the repository root (compose: context ..)
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        else:
            assert stage in stages, f"COPY --from={stage}: no such stage"
            copied_to.add(dest)
    # the node's entry point reads only what the last stage copied in
    entry = next(rest for word, rest in instructions if word == "ENTRYPOINT")
    argv = yaml.safe_load(entry)  # the JSON form
    for flag in ("--plugins", "--policy"):
        assert argv[argv.index(flag) + 1] in copied_to, flag


def test_dockerfile_installs_extras_that_exist_and_builds_every_plugin_kind() -> None:
    text = " ".join(rest for _, rest in _instructions())
    extras = re.findall(r"'\.\[([a-z,]+)\]'", text)
    assert extras == ["host"]
    defined = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"]
    assert "host" in defined
    assert "plugins/build.sh" in text
    assert "npm" in text  # Node.js for the AssemblyScript plugins (Debian bookworm's is too old)
    assert "node:22" in text
    assert "componentize-py" in text


def test_dockerignore_keeps_the_context_to_sources() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    for path in (".venv", ".venv/bin/python", "sdk/guest/assemblyscript/node_modules/.bin/asc",
                 "plugins/build/echo.wasm", ".git/HEAD", "host/__pycache__/x.pyc",
                 "host/sandbox/_native.cpython-311-x86_64-linux-gnu.so", ".mypy_cache/x", "sandbus.egg-info/PKG-INFO"):
        assert _dockerignore_excludes(path, patterns), path
    for path in ("pyproject.toml", "setup.py", "host/sandbox/_native.c", "sandbus/__init__.py", "sdk/guest/c/sandbus.h",
                 "sdk/guest/assemblyscript/package-lock.json", "plugins/build.sh", "plugins/echo/echo.wat",
                 "plugins/policy.toml", "host/authoring/build.py"):
        assert not _dockerignore_excludes(path, patterns), path
        assert (REPO / path).exists(), path
