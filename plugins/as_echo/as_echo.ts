/**
 * as_echo - the echo plugin in AssemblyScript, written against the
 * AssemblyScript guest SDK (sdk/guest/assemblyscript, package @sandbus/guest).
 * Guest ABI v1, see docs/abi.md. Built by plugins/build.sh with
 *   asc as_echo.ts -O3 --runtime minimal --use abort=<sdk>/sandbusAbort
 *
 * Functions (every one takes and returns UTF-8 JSON):
 *   echo            the request, byte for byte (like plugins/echo)
 *   handle_request  {"success":true,"result":{"echo":<request>},"error":null};
 *                   a request that is not valid JSON gets
 *                   {"success":false,"result":null,"error":"invalid JSON: <reason>"}
 *   now             {"success":true,"result":{"now_ms":<unix ms>},"error":null}
 *                   (needs the clock capability: without it the call fails)
 *   env             request {"name":"VAR"} -> {"success":true,"result":{"name":"VAR","value":"..."|null},...}
 *                   (the variable must be granted: otherwise the call fails)
 *   spin            request {"iterations":N} -> counts to N; shows that fuel and
 *                   timeouts stop a busy guest
 */
import {
  envelopeError, getenv, jsonGet, jsonGetString, jsonStrerror, jsonString, jsonValidate, JSON_OK, JsonType,
  log, LogLevel, replyError, replyOk, replyRaw, requestText, timeMs,
} from "../../sdk/guest/assemblyscript";

// The three required ABI exports come from the SDK.
export { sandbus_abi_version, sandbus_alloc, sandbus_dealloc } from "../../sdk/guest/assemblyscript";

/** The request, copied into a fresh block (the host owns and frees the request buffer). */
export function echo(ptr: usize, len: u32): u64 {
  return replyRaw(ptr, <usize>len);
}

export function handle_request(ptr: usize, len: u32): u64 {
  const request = requestText(ptr, len);
  const rc = jsonValidate(request);
  if (rc != JSON_OK) return replyError("invalid JSON: " + jsonStrerror(rc));
  log(LogLevel.Debug, "as_echo: request of " + len.toString() + " bytes");
  return replyOk('{"echo":' + request + "}");
}

export function now(ptr: usize, len: u32): u64 {
  return replyOk('{"now_ms":' + timeMs().toString() + "}");
}

export function env(ptr: usize, len: u32): u64 {
  const request = requestText(ptr, len);
  const name = jsonGetString(request, "name");
  if (name === null) return replyError('expected {"name": "<variable>"}');
  const value = getenv(name);
  return replyOk('{"name":' + jsonString(name) + ',"value":' + (value !== null ? jsonString(value) : "null") + "}");
}

export function spin(ptr: usize, len: u32): u64 {
  const request = requestText(ptr, len);
  const v = jsonGet(request, "iterations");
  if (!v.ok || v.type != JsonType.Number) return replyError('expected {"iterations": <number>}');
  const n = <u64>parseFloat(v.raw);
  let acc: u64 = 0;
  for (let i: u64 = 0; i < n; i++) {
    acc = acc * 6364136223846793005 + 1442695040888963407; // keeps the loop from being folded away
  }
  return replyOk('{"iterations":' + n.toString() + ',"acc":' + jsonString(acc.toString()) + "}");
}

/** Optional: the configuration JSON of this instance. 0 = success. */
export function sandbus_init(ptr: usize, len: u32): i32 {
  const config = requestText(ptr, len);
  if (jsonValidate(config) != JSON_OK) {
    log(LogLevel.Error, envelopeError("as_echo: config is not valid JSON"));
    return 1;
  }
  return 0;
}

/** Optional: 0 = healthy. */
export function sandbus_health(): i32 {
  return 0;
}
