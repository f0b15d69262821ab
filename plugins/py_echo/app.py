"""py_echo - the echo plugin in Python, a WebAssembly component built with componentize-py against
the sandbus world (sdk/guest/python/wit/sandbus.wit) and the helper module sdk/guest/python/sandbus_guest.py.

Functions (every one takes and returns UTF-8 JSON):
  echo            the request, as it came
  handle_request  {"success":true,"result":{"echo":<request>},"error":null}; a request that is not
                  JSON gets {"success":false,"result":null,"error":"JSONDecodeError: ..."}
  now             {"success":true,"result":{"now_ms":<unix ms>},"error":null} (needs the clock capability)
  env             {"name":"VAR"} -> {"success":true,"result":{"name":"VAR","value":"..."|null},...}
                  (the variable must be granted)
  spin            {"iterations":N} -> counts to N; shows that fuel and timeouts stop a busy guest
  remember        {"key": K, "value": V?} -> stores V under K when given (kv-put), then reads K back
                  (kv-get): {"key": K, "value": ...|null}; needs the storage capability and a host with
                  the bus's key-value store
  announce        {"topic": T, "payload": P} -> publishes P onto T (messaging capability, publish_topics)
  ask             {"target": "plugin.function", "payload": P} -> the target's reply to P, or a failure
                  naming the error code (messaging capability, request_plugins)
  probe           {"what": "clock" | "sleep" | "random" | "environ" | "file" | "socket" | "memory", ...} touches one
                  WASI facility through the Python standard library and says what happened: a tour of
                  what the sandbox allows a component (host/sandbox/component.py has the list)
"""

import os
import socket
import time
from typing import Any

from sandbus_guest import (
    Plugin,
    PluginError,
    debug,
    function,
    getenv,
    kv_get,
    kv_put,
    publish,
    request,
    time_ms,
)


class WitWorld(Plugin):
    @function(raw=True)
    def echo(self, request: str) -> str:
        return request

    @function("handle_request")
    def handle(self, request: Any) -> Any:
        debug("py_echo: one request")
        return {"echo": request}

    @function
    def now(self, request: Any) -> Any:
        return {"now_ms": time_ms()}

    @function
    def env(self, request: Any) -> Any:
        if not isinstance(request, dict) or not isinstance(request.get("name"), str):
            raise PluginError('expected {"name": "<variable>"}')
        return {"name": request["name"], "value": getenv(request["name"])}

    @function
    def spin(self, request: Any) -> Any:
        n = int(request["iterations"])
        acc = 0
        for _ in range(n):
            acc = (acc * 6364136223846793005 + 1442695040888963407) & 0xFFFF_FFFF_FFFF_FFFF
        return {"iterations": n, "acc": str(acc)}

    @function
    def remember(self, request: Any) -> Any:
        key = str(request["key"])
        if "value" in request:
            kv_put(key, str(request["value"]))
        value = kv_get(key)
        return {"key": key, "value": None if value is None else value.decode()}

    @function
    def announce(self, request: Any) -> Any:
        publish(str(request["topic"]), request.get("payload"))
        return {"published": request["topic"]}

    @function
    def ask(self, req: Any) -> Any:
        return {"reply": request(str(req["target"]), req.get("payload"))}

    @function
    def probe(self, request: Any) -> Any:
        what = request.get("what") if isinstance(request, dict) else None
        if what == "clock":  # wasi:clocks/wall-clock: needs the clock grant
            return {"time": time.time()}
        if what == "sleep":  # a monotonic-clock timer: never available
            time.sleep(float(request.get("seconds", 0.01)))
            return {"slept": True}
        if what == "random":  # wasi:random: always available to components
            return {"random": os.urandom(8).hex()}
        if what == "environ":  # wasi:cli/environment: only the granted variables
            return {"environ": dict(os.environ)}
        if what == "file":  # wasi:filesystem: only granted directories
            with open(str(request["path"]), encoding="utf-8") as f:
                return {"content": f.read(4096)}
        if what == "memory":  # the memory limit: MemoryError traps, the host reports MemoryLimitError
            hoard = []
            while True:
                hoard.append(bytearray(1 << 20))
        if what == "socket":  # wasi:sockets: never available
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.connect((str(request.get("host", "127.0.0.1")), int(request.get("port", 80))))
                return {"connected": True}
        raise PluginError('expected {"what": "clock" | "sleep" | "random" | "environ" | "file" | "socket" | "memory"}')
