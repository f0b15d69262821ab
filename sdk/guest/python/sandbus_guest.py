"""Helpers for sandbus plugins written in Python, built into components with componentize-py.

A plugin is a module (``app.py``) defining ``class WitWorld(Plugin)``; componentize-py finds the class
by that name and exports it as the world ``sandbus:plugin/plugin`` (``sdk/guest/python/wit``)::

    from sandbus_guest import Plugin, PluginError, function, info

    class WitWorld(Plugin):
        @function("handle_request")            # JSON in, JSON-able result out, wrapped in the envelope
        def handle(self, request):
            if "text" not in request:
                raise PluginError("missing 'text'")  # -> {"success": false, ..., "error": "missing 'text'"}
            info("got a request")
            return {"upper": request["text"].upper()}

        @function(raw=True)                    # request text in, reply text out, nothing added
        def echo(self, request: str) -> str:
            return request

Build: ``componentize-py -d sdk/guest/python/wit -w plugin componentize app -p . -p sdk/guest/python -o app.wasm``
(``plugins/build.sh`` does this for ``plugins/<name>/app.py``).

Why a base class: the world has *one* entry point, ``handle-request(function, request)``; ``Plugin`` dispatches
it to the decorated methods, turns exceptions into plugin-level failures (a normal reply with
``"success": false``, the instance survives) and leaves ``MemoryError`` / ``RecursionError`` alone, so that
they trap and the host discards the instance, as it does for a trapping C plugin.

The host functions mirror the C header's helpers (``log``, ``time_ms``, ``getenv``, ``publish``, ``request``,
``kv_*``, ``http_request``). A call the plugin is not allowed to make stops the whole call on the host side with a
security violation; the plugin cannot catch it.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, overload

from componentize_py_types import Err  # type: ignore[import-not-found]
from wit_world import WitWorld as _World  # type: ignore[import-not-found]
from wit_world.imports import host as _host  # type: ignore[import-not-found]

__all__ = [
    "DEBUG",
    "ERROR",
    "INFO",
    "TRACE",
    "WARN",
    "Plugin",
    "PluginError",
    "debug",
    "error",
    "function",
    "getenv",
    "http_request",
    "info",
    "kv_delete",
    "kv_get",
    "kv_put",
    "log",
    "publish",
    "request",
    "RequestFailed",
    "time_ms",
    "warning",
]

#: Log levels of ``log`` (the host maps them onto Python logging levels).
TRACE, DEBUG, INFO, WARN, ERROR = 0, 1, 2, 3, 4

F = TypeVar("F", bound=Callable[..., Any])


# -- host functions ------------------------------------------------------------------------------


def log(level: int, message: str) -> None:
    """One line in the plugin's log (counts against the per-call log cap)."""
    _host.log(level, message)


def debug(message: str) -> None:
    log(DEBUG, message)


def info(message: str) -> None:
    log(INFO, message)


def warning(message: str) -> None:
    log(WARN, message)


def error(message: str) -> None:
    log(ERROR, message)


def time_ms() -> int:
    """Unix time in milliseconds. Needs the ``clock`` capability (so do ``time.time()`` & co)."""
    return int(_host.time_now_ms())


def getenv(name: str) -> str | None:
    """A granted environment variable (None: granted but unset). ``os.environ`` shows the same granted set."""
    value = _host.env_get(name)
    return None if value is None else str(value)


def publish(topic: str, payload: Any) -> None:
    """Publish ``payload`` (JSON-able) onto ``topic``. Needs ``messaging`` and a matching ``publish_topics``
    entry, which the operator policy's ``[messaging] publish_topics`` must allow too."""
    _host.publish(topic, json.dumps(payload, separators=(",", ":")))


def kv_get(key: str) -> bytes | None:
    """This plugin's value under ``key`` (``storage`` capability), or None."""
    value = _host.kv_get(key)
    return None if value is None else bytes(value)


def kv_put(key: str, value: bytes | str) -> None:
    """Store ``value`` (str is stored as UTF-8) under ``key``; 64 KiB at most."""
    _host.kv_put(key, value.encode() if isinstance(value, str) else bytes(value))


def kv_delete(key: str) -> None:
    _host.kv_delete(key)


def http_request(method: str, url: str, *, headers: dict[str, str] | None = None,
                 body: Any = None) -> dict[str, Any]:
    """An HTTP request to a host the manifest and the operator allow (``network`` capability).

    Returns ``{"status": int, "headers": {...}, "body": str}``. No redirects are followed.
    """
    request = {"method": method, "url": url, "headers": headers or {}, "body": body}
    reply = json.loads(_host.http_request(json.dumps(request)))
    if not isinstance(reply, dict):
        raise PluginError(f"http_request: unexpected reply {reply!r}")
    return reply


# -- the plugin ----------------------------------------------------------------------------------


class PluginError(Exception):
    """A plugin-level failure: the reply becomes ``{"success": false, "result": null, "error": <message>}``."""


class RequestFailed(PluginError):
    """A :func:`request` that got no reply: the target failed, nobody serves it, or it timed out.

    ``code`` is the error code (``plugin.not_found``, ``request.timeout``, or the target's own);
    uncaught, it becomes this plugin's failure reply, like any :class:`PluginError`.
    """

    def __init__(self, error: dict[str, Any]) -> None:
        self.code = str(error.get("code", "error"))
        self.error = error
        super().__init__(f"{self.code}: {error.get('message', '')}")


def request(target: str, payload: Any = None) -> Any:
    """Call another plugin's function (``"plugin.function"``, or ``"plugin"`` for handle_request) with a
    JSON-able payload; returns its decoded reply. Needs ``messaging`` and a matching
    ``[permissions] request_plugins`` entry, within the operator policy's ``[messaging] request_plugins``.
    Raises :class:`RequestFailed` when no reply comes."""
    try:
        # componentize-py: an imported function returning result<T, E> returns T or raises Err(E)
        reply = _host.request(target, json.dumps(payload, separators=(",", ":")))
    except Err as e:
        try:
            error = json.loads(e.value)
        except ValueError:
            error = {"code": "error", "message": str(e.value)}
        raise RequestFailed(error if isinstance(error, dict) else {"message": str(error)}) from None
    return json.loads(reply)


@overload
def function(name: F, /) -> F: ...


@overload
def function(name: str | None = None, /, *, raw: bool = False) -> Callable[[F], F]: ...


def function(name: Any = None, /, *, raw: bool = False) -> Any:
    """Mark a ``Plugin`` method as the callable function ``name`` (default: the method's name).

    Default style: the method gets the decoded request and returns a JSON-able result, which is
    wrapped in ``{"success": true, "result": ..., "error": null}``. ``raw=True``: the method gets the
    request text and returns the reply text as it is (it must be JSON).
    """

    def mark(method: F, fname: str | None = None) -> F:
        method._sandbus_function = (fname or method.__name__, raw)  # type: ignore[attr-defined]
        return method

    if callable(name):
        return mark(name)
    return lambda method: mark(method, name)


def _envelope_ok(result: Any) -> str:
    return json.dumps({"success": True, "result": result, "error": None}, separators=(",", ":"))


class Plugin(_World):  # type: ignore[misc]
    """Base class of a plugin's ``WitWorld``: dispatch, error handling, ``init`` and ``health``.

    Override ``setup(config)`` to read the configuration (raise to fail start-up) and ``healthy()``
    to report health.
    """

    #: function name -> (method name, raw); filled per subclass from the @function marks.
    _functions: ClassVar[dict[str, tuple[str, bool]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: dict[str, tuple[str, bool]] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                mark = getattr(value, "_sandbus_function", None)
                if mark is not None:
                    found[mark[0]] = (attr, mark[1])
        cls._functions = found

    # -- the world's exports (called by the host) ------------------------------------------------

    def handle_request(self, function: str, request: str) -> str:
        entry = self._functions.get(function)
        if entry is None:
            raise Err(f"unknown function {function!r}; this plugin has: {', '.join(sorted(self._functions))}")
        attr, raw = entry
        method = getattr(self, attr)
        if not raw:
            try:
                decoded = json.loads(request)
            except ValueError as e:
                raise Err(f"request is not valid JSON: {e}") from None
        try:
            if raw:
                return str(method(request))
            return _envelope_ok(method(decoded))
        except (MemoryError, RecursionError):
            raise  # trap: the host discards this instance
        except PluginError as e:
            raise Err(str(e)) from None
        except Exception as e:
            error(f"{function}: {''.join(traceback.format_exception(e)).rstrip()}")
            raise Err(f"{type(e).__name__}: {e}") from None

    def init(self, config: str) -> None:
        try:
            self.setup(json.loads(config))
        except (MemoryError, RecursionError):
            raise
        except Exception as e:
            raise Err(f"{type(e).__name__}: {e}") from None

    def health(self) -> bool:
        try:
            return bool(self.healthy())
        except Exception:
            print(traceback.format_exc(), file=sys.stderr)
            return False

    # -- hooks for plugins -----------------------------------------------------------------------

    def setup(self, config: Any) -> None:
        """The plugin's configuration (a JSON object), once per instance, before any call."""

    def healthy(self) -> bool:
        """Health between calls; False (or an exception) marks the plugin unhealthy."""
        return True
