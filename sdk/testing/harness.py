"""``PluginHarness``: load one plugin the way a node would, call it, and assert on what happened.

    with PluginHarness("plugins/build/text_processor.wasm") as plugin:
        assert plugin.call_ok("handle_request", {"action": "get_status"}) == {"status": "running"}
        plugin.expect_error(PayloadTooLargeError, "handle_request", "x" * 2_000_000)
        assert plugin.audit.kinds() == ["limit.payload"]

What "the way a node would" means: when the plugin has a manifest (``NAME.toml`` beside the
module, or the project's), the manifest is validated and resolved against an operator policy --
:meth:`sandbus.host.lifecycle.policy.Policy.default` unless the test passes one -- exactly as the plugin manager does,
so the limits, capabilities and ``[config]`` a test runs under are the ones a default node grants.
``limits``, ``capabilities`` and ``config`` then override parts of that for the test at hand.

Everything the sandbox reports is collected: audit events (limit hits, denied permissions) in
:attr:`PluginHarness.audit`, the plugin's log lines in :attr:`PluginHarness.logs`, and topics it
published (through a recording ``publish`` host function, checked against the granted
``publish_topics`` and bounded by :data:`HARNESS_MAX_PAYLOAD`, as on a node) in :attr:`PluginHarness.published`.

Requests the plugin makes to other plugins (the ``request`` host function) never leave the test:
:meth:`PluginHarness.on_request` stubs the target plugins' replies, every request is recorded in
:attr:`PluginHarness.requested`, and ``request_plugins`` is checked as on a node::

    with PluginHarness("summarizer") as plugin:
        plugin.on_request("text_processor.handle_request", lambda req: {"success": True, "result": 42})
        plugin.call_ok("handle_request", {"text": "..."})
        assert plugin.requested[0].target == "text_processor.handle_request"

The host runtime (wasmtime) is imported when a harness is created, not when ``sandbus.sdk.testing`` is
imported: client applications import ``sdk`` without ever loading wasmtime.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar

import orjson

from sandbus.sdk.errors import (
    AbiViolationError,
    PluginNotFoundError,
    RequestTimeoutError,
    SandbusError,
    SecurityViolationError,
)
from sandbus.sdk.testing._locate import locate_plugin

if TYPE_CHECKING:
    from sandbus.host.lifecycle.manifest import Manifest
    from sandbus.host.lifecycle.policy import Policy
    from sandbus.host.sandbox import AuditEvent, CallContext, CallResult, Capabilities, HostFunctions, Limits, Sandbox

__all__ = ["AuditLog", "LogLine", "PluginFactory", "PluginHarness", "Published", "Requested"]

E = TypeVar("E", bound=BaseException)

#: The largest ``publish`` payload and ``request`` body the harness reads from the guest: a node's
#: limit is its NATS server's ``max_payload``, 1 MiB unless the server is configured otherwise. The
#: length is checked before a byte is copied, as on a node.
HARNESS_MAX_PAYLOAD = 1024 * 1024


class AuditLog(list["AuditEvent"]):
    """The audit events of a harness, in order; callable, so it can be a sandbox's ``on_audit``."""

    def __call__(self, event: AuditEvent) -> None:
        self.append(event)

    def kinds(self) -> list[str]:
        """Just the kinds (``limit.fuel``, ``security.env_denied``...), for compact assertions."""
        return [e.kind for e in self]


@dataclass(frozen=True)
class LogLine:
    """One line the plugin logged (``sandbus_v1.log``, stdout at INFO, stderr at WARNING)."""

    level: int
    message: str

    @property
    def level_name(self) -> str:
        return logging.getLevelName(self.level) if self.level != 5 else "TRACE"


@dataclass(frozen=True)
class Published:
    """A message the plugin published: the topic and the decoded JSON payload."""

    topic: str
    payload: Any


@dataclass(frozen=True)
class Requested:
    """A request the plugin made with the ``request`` host function: ``"plugin.function"`` and the
    decoded JSON body."""

    target: str
    payload: Any


#: What :meth:`PluginHarness.on_request` accepts: a function of the decoded request, or a fixed reply.
RequestStub = Callable[[Any], Any]


class _Collector(logging.Handler):
    def __init__(self, lines: list[LogLine]) -> None:
        super().__init__(level=1)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(LogLine(record.levelno, record.getMessage()))


# Plugin loggers are per plugin name; two harnesses of one plugin share it. The level is lowered
# (so debug and trace lines reach the handlers) while at least one harness listens.
_listeners: dict[str, int] = {}
_saved_levels: dict[str, int] = {}
_listeners_lock = threading.Lock()


def _listen(logger: logging.Logger) -> None:
    with _listeners_lock:
        if _listeners.get(logger.name, 0) == 0:
            _saved_levels[logger.name] = logger.level
            logger.setLevel(1)
        _listeners[logger.name] = _listeners.get(logger.name, 0) + 1


def _unlisten(logger: logging.Logger) -> None:
    with _listeners_lock:
        _listeners[logger.name] -= 1
        if _listeners[logger.name] == 0:
            logger.setLevel(_saved_levels.pop(logger.name))
            del _listeners[logger.name]


class PluginHarness:
    """One plugin in a sandbox, with everything it reports collected for assertions.

    Parameters:
        plugin: a ``.wasm`` file, a plugin project directory (built first when its sources are
            newer than ``build/NAME.wasm``) or a directory holding one ``.wasm``.
        policy: the operator policy the manifest is resolved against: a :class:`sandbus.host.lifecycle.policy.Policy`
            or the path of a policy TOML file (default: :meth:`Policy.default`, deny all but compute).
            Needs a manifest.
        limits: a :class:`sandbus.host.sandbox.Limits` replacing the resolved limits, or a mapping of
            ``Limits`` fields overriding some of them (``{"fuel": 10_000, "timeout_s": 0.5}``).
        capabilities: a :class:`sandbus.host.sandbox.Capabilities` replacing the resolved grant.
        config: replaces the manifest's ``[config]`` (what ``sandbus_init`` receives).
        manifest: the manifest to use (default: found beside the module); ``False`` ignores any
            manifest, so defaults apply (``Limits()``, nothing granted).
        host_functions: extra host functions (they override the built-in ones of the same name).
        build: build a project directory when it is stale.
        name: the plugin's name in errors and events (default: the manifest's, else the file stem).
        data_root: where the manifest's ``read_files`` / ``write_files`` resolve (default:
            ``<module dir>/data/<name>``, as for a node's plugin directory).

    Raises:
        ManifestError: the manifest is invalid. SecurityViolationError: the policy refuses the
        plugin (a required capability, a resource above a ceiling) or the module does not match the
        manifest's sha256. Any sandbox load error (InvalidModuleError, AbiViolationError,
        PluginInitError...) as a node would report it.
    """

    def __init__(
        self,
        plugin: str | Path,
        *,
        policy: Policy | str | Path | None = None,
        limits: Limits | Mapping[str, Any] | None = None,
        capabilities: Capabilities | None = None,
        config: Mapping[str, Any] | None = None,
        manifest: str | Path | bool = True,
        host_functions: HostFunctions | None = None,
        build: bool = True,
        name: str | None = None,
        data_root: str | Path | None = None,
    ) -> None:
        from sandbus.host.lifecycle.manifest import load_manifest
        from sandbus.host.lifecycle.policy import Policy, SendLimits, load_policy, resolve
        from sandbus.host.node.hostfuncs import BusBridge
        from sandbus.host.node.sendlimit import SendLimiter
        from sandbus.host.sandbox import Capabilities, HostFunction, Limits, Sandbox

        self.path, found = locate_plugin(plugin, build=build)
        if manifest is True:
            manifest_path = found
        elif manifest is False:
            manifest_path = None
        else:
            manifest_path = Path(manifest)
        wasm = self.path.read_bytes()
        self.manifest: Manifest | None = None
        self.publish_topics: tuple[str, ...] = ()
        self.request_plugins: tuple[str, ...] = ()
        #: What a node would let the plugin send (publish + request), per second and per call.
        self.send_limits = SendLimits()
        self._sends = SendLimiter()
        base_limits, base_caps, base_config = Limits(), Capabilities(), {}
        if manifest_path is not None:
            self.manifest = load_manifest(manifest_path, expected_name=name or self.path.stem)
            self.manifest.verify_wasm(wasm)
            if policy is None:
                policy = Policy.default()
            elif not isinstance(policy, Policy):
                policy = load_policy(Path(policy))
            root = Path(data_root) if data_root is not None else self.path.parent / "data" / self.manifest.name
            grant = resolve(self.manifest, policy, data_root=root, host_env=os.environ)
            base_limits, base_caps, base_config = grant.limits, grant.capabilities, dict(self.manifest.config)
            self.publish_topics = grant.publish_topics
            self.request_plugins = grant.request_plugins
            self.send_limits = grant.send_limits
        elif policy is not None:
            raise ValueError(f"a policy is resolved against a manifest, and {self.path} has none "
                             f"(put {self.path.stem}.toml beside it, or pass manifest=PATH)")
        if isinstance(limits, Mapping):
            base_limits = Limits(**{**base_limits.model_dump(), **limits})
        elif limits is not None:
            base_limits = limits
        self.name = name or (self.manifest.name if self.manifest is not None else self.path.stem)
        self.limits: Limits = base_limits
        self.capabilities: Capabilities = capabilities if capabilities is not None else base_caps
        self.audit = AuditLog()
        self.logs: list[LogLine] = []
        self.published: list[Published] = []
        self.requested: list[Requested] = []
        self._stubs: dict[str, RequestStub] = {}
        # Every host function a node offers, so any plugin links; publish records and request answers
        # from stubs instead of going to NATS (the others need a node: they fail the call with a BusError).
        funcs = BusBridge().host_functions()
        funcs.add(HostFunction("publish", ("i32",) * 4, ("i32",), self._publish, capability="messaging"))
        funcs.add(HostFunction("request", ("i32",) * 6, ("i32",), self._request, capability="messaging"))
        funcs = funcs.merged(host_functions)
        self._logger = logging.getLogger(f"sandbus.plugin.{self.name}")
        self._handler = _Collector(self.logs)
        self._logger.addHandler(self._handler)
        _listen(self._logger)
        self._closed = False
        try:
            self.sandbox: Sandbox = Sandbox(wasm, name=self.name, limits=self.limits,
                                            capabilities=self.capabilities, host_functions=funcs,
                                            on_audit=self.audit,
                                            config=config if config is not None else base_config)
        except BaseException:
            self._detach()
            raise

    # -- calls -------------------------------------------------------------------------------------

    @property
    def functions(self) -> tuple[str, ...]:
        """The plugin's callable functions."""
        return self.sandbox.functions

    def call(self, function: str = "handle_request", request: Any = None) -> Any:
        """Call ``function`` with a JSON-able request; returns the decoded reply. Errors are raised
        typed (``OutOfFuelError``, ``SecurityViolationError``...), as a node's caller would get them."""
        return self.sandbox.call(function, request)

    def call_bytes(self, function: str, payload: bytes, *, validate: bool = True) -> bytes:
        """Call with raw request bytes; the reply bytes (checked to be JSON unless ``validate`` is False)."""
        return self.sandbox.call_bytes(function, payload, validate=validate)

    def call_detailed(self, function: str = "handle_request", request: Any = None) -> CallResult:
        """Call and return the reply with its fuel used, memory and duration."""
        return self.sandbox.call_detailed(function, orjson.dumps(request))

    def call_ok(self, function: str = "handle_request", request: Any = None) -> Any:
        """Call and return ``result`` of a ``{"success": true, ...}`` reply; fail the test otherwise.

        Raises:
            AssertionError: the reply is not the envelope, or says ``"success": false``.
        """
        reply = self.call(function, request)
        if not isinstance(reply, dict) or "success" not in reply:
            raise AssertionError(f"{self.name}.{function} did not reply with the envelope "
                                 f'{{"success", "result", "error"}}: {reply!r}')
        if reply["success"] is not True:
            raise AssertionError(f"{self.name}.{function} failed: {reply.get('error')!r}")
        return reply.get("result")

    def expect_error(self, error_type: type[E], function: str = "handle_request", request: Any = None, *,
                     match: str | None = None) -> E:
        """Call and return the error, which must be an ``error_type`` (whose message matches the regex
        ``match``, if given); fail the test if the call succeeds or fails otherwise.

            err = plugin.expect_error(OutOfFuelError, "handle_request", {"loop": True})
            assert err.details["limit"] == 10_000
        """
        try:
            reply = self.call(function, request)
        except error_type as e:
            if match is not None and not re.search(match, str(e)):
                raise AssertionError(f"{type(e).__name__} raised, but {str(e)!r} does not match {match!r}") from e
            return e
        except SandbusError as e:
            raise AssertionError(f"expected {error_type.__name__} from {self.name}.{function}, "
                                 f"got {type(e).__name__}: {e}") from e
        raise AssertionError(f"expected {error_type.__name__} from {self.name}.{function}, "
                             f"but it replied {reply!r}")

    def health(self) -> bool:
        """What ``sandbus_health`` says (True without the export)."""
        return self.sandbox.health()

    def clear(self) -> None:
        """Forget the audit events, log lines, published messages and requests collected so far
        (the :meth:`on_request` stubs stay)."""
        self.audit.clear()
        self.logs.clear()
        self.published.clear()
        self.requested.clear()

    def log_messages(self, min_level: int = 0) -> list[str]:
        """The logged messages at ``min_level`` or above (``logging.WARNING``...)."""
        return [line.message for line in self.logs if line.level >= min_level]

    # -- the recording publish host function -------------------------------------------------------

    def _publish(self, ctx: CallContext, topic_ptr: int, topic_len: int, data_ptr: int, data_len: int) -> int:
        from sandbus.host.lifecycle.manifest import subject_matches
        from sandbus.host.sandbox import AuditLevel
        from sandbus.host.sandbox.hostfuncs import read_bounded, read_str_bounded
        from sandbus.sdk.subjects import MAX_TOPIC_LENGTH, check_topic

        topic = read_str_bounded(ctx, topic_ptr, topic_len, MAX_TOPIC_LENGTH, "publish topic")
        try:
            check_topic(topic)
        except ValueError as e:
            raise AbiViolationError(f"publish: {e}", plugin=ctx.plugin) from e
        if not any(subject_matches(p, topic) for p in self.publish_topics):
            ctx.auditor.emit(AuditLevel.CRITICAL, "security.publish_denied", ctx.plugin,
                             f"publish to {topic!r} denied (granted: {list(self.publish_topics)})", topic=topic)
            raise SecurityViolationError(
                f"publishing to {topic!r} was not granted (manifest [permissions] publish_topics: "
                f"{list(self.publish_topics)})", plugin=ctx.plugin, topic=topic)
        self._sends.check(ctx, self.send_limits, f"publish to {topic!r}", topic=topic)
        data = read_bounded(ctx, data_ptr, data_len, HARNESS_MAX_PAYLOAD, "publish payload")
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise AbiViolationError(f"publish: payload is not valid JSON: {e}", plugin=ctx.plugin) from e
        self.published.append(Published(topic, payload))
        return 0

    # -- the stubbed request host function ------------------------------------------------------------

    def on_request(self, target: str, reply: RequestStub | Any) -> None:
        """Answer the plugin's requests to ``target`` with ``reply`` instead of a real plugin.

        ``target`` is ``"plugin.function"``, ``"plugin"`` (its ``handle_request``, as in the ABI),
        ``"plugin.*"`` (any function of it) or ``"*"`` (any request); the most specific stub wins.
        ``reply`` is called with the decoded request and returns the reply: a JSON-able value, or
        ``bytes`` sent as they are. A value that is not callable is the reply to every request.

        What the plugin then sees, as from a node: the reply; a :class:`~sandbus.sdk.errors.SandbusError` the
        stub raises arrives as the target's error reply (``REQUEST_EREMOTE``), except
        :class:`~sandbus.sdk.errors.PluginNotFoundError` (``REQUEST_ENOTFOUND``) and
        :class:`~sandbus.sdk.errors.RequestTimeoutError` (``REQUEST_ETIMEOUT``). A target without a stub is
        one that no node serves (``REQUEST_ENOTFOUND``). Stubs do not bypass permissions: a target
        the manifest's ``request_plugins`` does not allow is a security violation, as on a node.
        """
        from sandbus.host.node.hostfuncs import parse_target

        if target != "*" and not target.endswith(".*"):
            try:
                plugin, function = parse_target(target)
            except ValueError as e:
                raise ValueError(f"on_request: {e}") from None
            target = f"{plugin}.{function}"
        self._stubs[target] = reply if callable(reply) else (lambda _request: reply)

    def _request(self, ctx: CallContext, target_ptr: int, target_len: int, json_ptr: int, json_len: int,
                 buf_ptr: int, buf_cap: int) -> int:
        from sandbus.host.lifecycle.manifest import request_matches
        from sandbus.host.node.hostfuncs import (
            MAX_TARGET,
            REQUEST_ENOTFOUND,
            REQUEST_EREMOTE,
            REQUEST_ETIMEOUT,
            deliver_result,
            keep_result,
            parse_target,
        )
        from sandbus.host.sandbox import AuditLevel
        from sandbus.host.sandbox.hostfuncs import read_bounded, read_str_bounded

        try:
            plugin, function = parse_target(read_str_bounded(ctx, target_ptr, target_len, MAX_TARGET,
                                                             "request target"))
        except ValueError as e:
            raise AbiViolationError(f"request: {e}", plugin=ctx.plugin) from e
        target = f"{plugin}.{function}"
        granted = list(self.request_plugins)
        if not any(request_matches(p, plugin, function) for p in granted):
            ctx.auditor.emit(AuditLevel.CRITICAL, "security.request_denied", ctx.plugin,
                             f"request to {target!r} denied (granted: {granted})", target=target)
            raise SecurityViolationError(
                f"requesting {target!r} was not granted (manifest [permissions] request_plugins: {granted})",
                plugin=ctx.plugin, target=target)
        self._sends.check(ctx, self.send_limits, f"request to {target!r}", target=target)
        try:
            payload = orjson.loads(read_bounded(ctx, json_ptr, json_len, HARNESS_MAX_PAYLOAD,
                                                f"request to {target!r}"))
        except orjson.JSONDecodeError as e:
            raise AbiViolationError(f"request to {target!r}: body is not valid JSON: {e}",
                                    plugin=ctx.plugin) from e
        self.requested.append(Requested(target, payload))
        stub = self._stubs.get(target) or self._stubs.get(f"{plugin}.*") or self._stubs.get("*")
        try:
            if stub is None:
                raise PluginNotFoundError(f"no node serves plugin {plugin!r} (the test has no "
                                          f"on_request stub for {target!r})", plugin=plugin, target=target)
            reply = stub(payload)
        except SandbusError as e:
            status = (REQUEST_ENOTFOUND if isinstance(e, PluginNotFoundError)
                      else REQUEST_ETIMEOUT if isinstance(e, RequestTimeoutError) else REQUEST_EREMOTE)
            keep_result(ctx, orjson.dumps(e.to_dict(), default=str))
            return status
        return deliver_result(ctx, reply if isinstance(reply, bytes) else orjson.dumps(reply), buf_ptr, buf_cap)

    # -- lifetime ----------------------------------------------------------------------------------

    def _detach(self) -> None:
        self._logger.removeHandler(self._handler)
        _unlisten(self._logger)

    def close(self) -> None:
        """Shut the plugin's instances down (``sandbus_shutdown``) and stop collecting its logs."""
        if self._closed:
            return
        self._closed = True
        try:
            self.sandbox.close()
        finally:
            self._detach()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PluginHarness({self.name!r}, path={str(self.path)!r}, functions={self.functions})"


class PluginFactory(Protocol):
    """The ``sandbus_plugin`` fixture: makes harnesses and closes them after the test."""

    def __call__(
        self,
        plugin: str | Path,
        *,
        policy: Policy | str | Path | None = ...,
        limits: Limits | Mapping[str, Any] | None = ...,
        capabilities: Capabilities | None = ...,
        config: Mapping[str, Any] | None = ...,
        manifest: str | Path | bool = ...,
        host_functions: HostFunctions | None = ...,
        build: bool = ...,
        name: str | None = ...,
        data_root: str | Path | None = ...,
    ) -> PluginHarness: ...
