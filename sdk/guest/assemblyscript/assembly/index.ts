/**
 * @sandbus/guest - AssemblyScript SDK for sandbus guest plugins (Guest ABI v1).
 *
 * The same surface as the C header sdk/guest/c/sandbus.h, in AssemblyScript:
 *
 *   - the required ABI exports sandbus_abi_version, sandbus_alloc and
 *     sandbus_dealloc. A plugin's entry file re-exports them (AssemblyScript
 *     only turns exports of the entry file into wasm exports):
 *
 *         export { sandbus_abi_version, sandbus_alloc, sandbus_dealloc } from "@sandbus/guest";
 *
 *     A callable function has the wasm type (i32, i32) -> i64:
 *
 *         export function handle_request(ptr: usize, len: u32): u64 {
 *           const request = requestText(ptr, len);
 *           return replyOk(request);
 *         }
 *
 *   - host imports (module "sandbus_v1": log, time_now_ms, env_get, publish,
 *     request, kv_get / kv_put / kv_delete, http_request, take_result) and helpers
 *     around them. AssemblyScript compiles only what is reachable, so a host
 *     function the plugin never calls is not in its import section (like the
 *     `static inline` helpers of the C header).
 *   - replies: pack, reply, replyBytes, replyOk, replyError;
 *   - a small JSON writer (jsonString, jsonEscape) and a validating reader
 *     (jsonValidate, jsonGet, jsonGetString, jsonDecodeString).
 *
 * Memory (docs/abi.md): the host allocates the request with sandbus_alloc and
 * frees it itself; the reply is a fresh block that sandbus_dealloc frees.
 * Both are raw `heap.alloc` blocks, outside the garbage collector, so the
 * host's pointers are never moved or collected.
 *
 * Runtime: build with `--runtime minimal` (plugins/build.sh does). The
 * minimal runtime is TLSF plus a mark & sweep collector that only runs when
 * asked to, and asking is only safe while no AssemblyScript frame is on the
 * stack. sandbus_alloc is exactly such a moment: the host calls it before
 * every call, from outside. So the SDK collects there, and the garbage of
 * one call is freed before the next; objects reachable from globals survive.
 * `--runtime stub` never frees anything (every call's garbage would pile up
 * until the instance hits its memory limit), so the SDK refuses to compile
 * with it. `--runtime incremental` works too (its collector runs by itself,
 * at the price of a shadow stack on every call).
 *
 * Errors: build with `--use abort=<this file>/sandbusAbort` (plugins/build.sh
 * does): a failed assertion or an uncaught `throw` then logs its message at
 * error level through sandbus_v1.log and traps, instead of importing
 * `env.abort`, which the host does not provide.
 */

// ---------------------------------------------------------------------------
// ABI constants
// ---------------------------------------------------------------------------

/** The Guest ABI version this SDK implements. */
export const ABI_VERSION: i32 = 1;

/** Log levels for log() (the `level` argument of sandbus_v1.log). */
export enum LogLevel {
  Trace = 0,
  Debug = 1,
  Info = 2,
  Warn = 3,
  Error = 4,
}

// ---------------------------------------------------------------------------
// Host imports (raw). Prefer the helpers below.
// ---------------------------------------------------------------------------

/** log(level, ptr, len): one UTF-8 log line. */
// @ts-ignore: decorator
@external("sandbus_v1", "log")
export declare function host_log(level: i32, ptr: usize, len: u32): void;

/** time_now_ms(): Unix time in ms. Needs the clock capability (else the call fails). */
// @ts-ignore: decorator
@external("sandbus_v1", "time_now_ms")
export declare function host_time_now_ms(): i64;

/** env_get(name, name_len, buf, cap): full byte length of the value (writes min(len, cap) bytes), -1 if unset. */
// @ts-ignore: decorator
@external("sandbus_v1", "env_get")
export declare function host_env_get(name: usize, nameLen: u32, buf: usize, cap: u32): i32;

/** publish(topic, topic_len, json, json_len): 0. Needs messaging + a matching publish_topics entry (that the
 * operator policy's [messaging] publish_topics allows too). */
// @ts-ignore: decorator
@external("sandbus_v1", "publish")
export declare function host_publish(topic: usize, topicLen: u32, json: usize, jsonLen: u32): i32;

/** kv_get(key, key_len, buf, cap): full length (writes min(len, cap) bytes) or -1 if absent. Needs storage. */
// @ts-ignore: decorator
@external("sandbus_v1", "kv_get")
export declare function host_kv_get(key: usize, keyLen: u32, buf: usize, cap: u32): i32;

/** kv_put(key, key_len, value, value_len): 0 on success (64 KiB per value; the store has a quota). */
// @ts-ignore: decorator
@external("sandbus_v1", "kv_put")
export declare function host_kv_put(key: usize, keyLen: u32, value: usize, valueLen: u32): i32;

/** kv_delete(key, key_len): 0 on success. */
// @ts-ignore: decorator
@external("sandbus_v1", "kv_delete")
export declare function host_kv_delete(key: usize, keyLen: u32): i32;

/** http_request(req_json, len, buf, cap): like kv_get, with a {"status","headers","body"} JSON reply. Needs network. */
// @ts-ignore: decorator
@external("sandbus_v1", "http_request")
export declare function host_http_request(req: usize, reqLen: u32, buf: usize, cap: u32): i32;

/**
 * request(target, target_len, json, json_len, buf, cap): call "plugin.function" (or "plugin": its
 * handle_request) and wait for the reply. Returns the reply's full length (writes min(len, cap)
 * bytes) or a negative REQUEST_E* code, the error JSON then being in take_result. Needs messaging
 * and a matching request_plugins entry that the operator policy's [messaging] request_plugins allows too
 * (else the call fails). Prefer request().
 */
// @ts-ignore: decorator
@external("sandbus_v1", "request")
export declare function host_request(target: usize, targetLen: u32, json: usize, jsonLen: u32, buf: usize,
                                     cap: u32): i32;

/** take_result(buf, cap): the last kv_get / http_request / request result again (-1 if none). */
// @ts-ignore: decorator
@external("sandbus_v1", "take_result")
export declare function host_take_result(buf: usize, cap: u32): i32;

// ---------------------------------------------------------------------------
// Required ABI exports
// ---------------------------------------------------------------------------

if (ASC_RUNTIME == 0) {
  ERROR("@sandbus/guest: build with --runtime minimal (or incremental); the stub runtime never frees memory");
}

/** Returns ABI_VERSION (1). */
export function sandbus_abi_version(): i32 {
  return ABI_VERSION;
}

/**
 * Returns a pointer to `size` writable bytes; `heap.alloc` never returns 0,
 * so sizes the runtime cannot ever satisfy are refused with 0 up front (a
 * size it merely cannot satisfy *now* traps when memory.grow fails, which
 * the host reports as a memory limit).
 */
export function sandbus_alloc(size: u32): usize {
  // The host calls this from outside, before each call: no AssemblyScript
  // frame holds a reference, so a full collection is safe here.
  if (ASC_RUNTIME == 1) __collect();
  if (size > 0x3FFF_FFF0) return 0;
  return heap.alloc(<usize>size);
}

/** Frees a block from sandbus_alloc or a reply. 0 is ignored. */
export function sandbus_dealloc(ptr: usize, size: u32): void {
  if (ptr != 0) heap.free(ptr);
}

let aborting = false;

/**
 * Replacement for `abort` (asc --use abort=.../sandbusAbort): logs the message
 * and where it came from at error level, then traps. The host turns the trap
 * into a TrapError and discards the instance.
 */
export function sandbusAbort(message: string | null, fileName: string | null, line: u32, column: u32): void {
  if (!aborting) {
    aborting = true; // an abort while logging (out of memory) must not recurse
    let text = "abort: " + (message !== null ? message : "(no message)");
    if (fileName !== null) text += " at " + fileName + ":" + line.toString() + ":" + column.toString();
    log(LogLevel.Error, text);
  }
  unreachable();
}

// ---------------------------------------------------------------------------
// Requests and replies
// ---------------------------------------------------------------------------

/** The request at [ptr, ptr+len) decoded from UTF-8 (invalid sequences become U+FFFD). */
export function requestText(ptr: usize, len: u32): string {
  return String.UTF8.decodeUnsafe(ptr, <usize>len);
}

/** A copy of the request bytes at [ptr, ptr+len). */
export function requestBytes(ptr: usize, len: u32): Uint8Array {
  const out = new Uint8Array(<i32>len);
  memory.copy(out.dataStart, ptr, <usize>len);
  return out;
}

/** Pack a reply pointer and length into the i64 a callable function returns: (ptr << 32) | len. */
// @ts-ignore: decorator
@inline
export function pack(ptr: usize, len: usize): u64 {
  return (<u64>ptr << 32) | <u64>(<u32>len);
}

/** Copy `len` bytes at `ptr` into a fresh heap block (what the host frees) and pack it. */
export function replyRaw(ptr: usize, len: usize): u64 {
  const block = heap.alloc(len);
  memory.copy(block, ptr, len);
  return pack(block, len);
}

/**
 * Reply with a JSON text: encoded to UTF-8 in a fresh heap block. Unpaired
 * surrogates become U+FFFD, so the reply is always valid UTF-8.
 */
export function reply(json: string): u64 {
  const n = <usize>String.UTF8.byteLength(json);
  const block = heap.alloc(n);
  String.UTF8.encodeUnsafe(changetype<usize>(json), json.length, block, false, String.UTF8.ErrorMode.REPLACE);
  return pack(block, n);
}

/** Reply with bytes (which must be UTF-8 JSON), copied into a fresh heap block. */
export function replyBytes(data: Uint8Array): u64 {
  return replyRaw(data.dataStart, <usize>data.byteLength);
}

/** `{"success":true,"result":<resultJson>,"error":null}`; `resultJson` must be valid JSON. */
export function envelopeOk(resultJson: string): string {
  return '{"success":true,"result":' + resultJson + ',"error":null}';
}

/** `{"success":false,"result":null,"error":"<message, escaped>"}`. */
export function envelopeError(message: string): string {
  return '{"success":false,"result":null,"error":' + jsonString(message) + "}";
}

/** Reply with the success envelope around `resultJson` (valid JSON). */
export function replyOk(resultJson: string): u64 {
  return reply(envelopeOk(resultJson));
}

/** Reply with the failure envelope: a plugin-level error, not a trap (the instance stays). */
export function replyError(message: string): u64 {
  return reply(envelopeError(message));
}

// ---------------------------------------------------------------------------
// Host helpers
// ---------------------------------------------------------------------------

/** Log `message` at `level` (LogLevel). Lines count against the per-call log cap. */
export function log(level: i32, message: string): void {
  const buf = String.UTF8.encode(message, false, String.UTF8.ErrorMode.REPLACE);
  host_log(level, changetype<usize>(buf), <u32>buf.byteLength);
}

/** Log `len` bytes of UTF-8 at `ptr`. */
export function logBytes(level: i32, ptr: usize, len: u32): void {
  host_log(level, ptr, len);
}

/** Unix time in milliseconds. Requires the clock capability: without it the call fails. */
export function timeMs(): i64 {
  return host_time_now_ms();
}

/** Results of unknown length: retry once with a buffer of the announced size (take_result or the same call). */
const FIRST_CAP: i32 = 1024;

/**
 * Value of environment variable `name`, or null when the operator granted it
 * but the host does not set it. Asking for a variable that was not granted
 * fails the call (security violation).
 */
export function getenv(name: string): string | null {
  const key = String.UTF8.encode(name);
  let cap = FIRST_CAP;
  for (;;) {
    const buf = new ArrayBuffer(cap);
    const n = host_env_get(changetype<usize>(key), <u32>key.byteLength, changetype<usize>(buf), <u32>cap);
    if (n < 0) return null;
    if (n <= cap) return String.UTF8.decodeUnsafe(changetype<usize>(buf), <usize>n);
    cap = n; // the value is longer than the buffer: ask again with room for it
  }
  return null; // not reached (the compiler wants a return after an endless loop)
}

/** Publish JSON onto `topic` as a PluginMessage. Needs the messaging capability and a matching publish_topics entry,
 * within the operator policy's [messaging] publish_topics. */
export function publish(topic: string, json: string): i32 {
  const t = String.UTF8.encode(topic);
  const j = String.UTF8.encode(json, false, String.UTF8.ErrorMode.REPLACE);
  return host_publish(changetype<usize>(t), <u32>t.byteLength, changetype<usize>(j), <u32>j.byteLength);
}

/** The bytes of a kv_get / http_request / request result whose full length is `n`, buffer `buf` of `cap` bytes. */
function fetchResult(n: i32, buf: ArrayBuffer, cap: i32): Uint8Array {
  if (n > cap) {
    buf = new ArrayBuffer(n);
    const again = host_take_result(changetype<usize>(buf), <u32>n);
    if (again != n) unreachable(); // the host promised the same result
  }
  return Uint8Array.wrap(buf, 0, n);
}

/** The reply arrived (request()). */
export const REQUEST_OK: i32 = 0;
/** The target's call failed (trap, limit, unknown function...): `body` is its error JSON. */
export const REQUEST_EREMOTE: i32 = -1;
/** No node serves the target plugin. */
export const REQUEST_ENOTFOUND: i32 = -2;
/** No reply in time. */
export const REQUEST_ETIMEOUT: i32 = -3;

/** The outcome of request(): `status` is REQUEST_OK or a REQUEST_E* code. */
export class Reply {
  constructor(
    /** REQUEST_OK or a negative REQUEST_E* code. */
    public status: i32,
    /** The reply JSON, or on failure the error JSON {"code","message","plugin","details"}. */
    public body: string,
  ) {}

  /** Whether the target replied (its reply may still be a `"success": false` envelope). */
  get ok(): bool {
    return this.status == REQUEST_OK;
  }
}

/**
 * Call `target` ("plugin.function", or "plugin" for its handle_request) with `json` and wait for
 * the reply, as a client would (any node serving the target may answer; the wait is bounded).
 * Needs the messaging capability and a manifest request_plugins entry allowing the target (within the
 * operator policy's [messaging] request_plugins): a
 * target that is not granted fails the whole call (security violation), as does a malformed one.
 */
export function request(target: string, json: string): Reply {
  const t = String.UTF8.encode(target);
  const j = String.UTF8.encode(json, false, String.UTF8.ErrorMode.REPLACE);
  const buf = new ArrayBuffer(FIRST_CAP);
  let status: i32 = REQUEST_OK;
  let n = host_request(changetype<usize>(t), <u32>t.byteLength, changetype<usize>(j), <u32>j.byteLength,
                       changetype<usize>(buf), <u32>FIRST_CAP);
  if (n < 0) {
    status = n; // the error JSON waits in take_result
    n = host_take_result(changetype<usize>(buf), <u32>FIRST_CAP);
    if (n < 0) unreachable(); // the host always leaves it
  }
  const out = fetchResult(n, buf, FIRST_CAP);
  return new Reply(status, String.UTF8.decodeUnsafe(out.dataStart, <usize>out.byteLength));
}

/** This plugin's value under `key`, or null if absent. Needs the storage capability. */
export function kvGet(key: string): Uint8Array | null {
  const k = String.UTF8.encode(key);
  const buf = new ArrayBuffer(FIRST_CAP);
  const n = host_kv_get(changetype<usize>(k), <u32>k.byteLength, changetype<usize>(buf), <u32>FIRST_CAP);
  if (n < 0) return null;
  return fetchResult(n, buf, FIRST_CAP);
}

/** kvGet decoded from UTF-8. */
export function kvGetString(key: string): string | null {
  const v = kvGet(key);
  if (v === null) return null;
  return String.UTF8.decodeUnsafe(v.dataStart, <usize>v.byteLength);
}

/** Store `value` under `key` (64 KiB max). Returns 0. */
export function kvPut(key: string, value: Uint8Array): i32 {
  const k = String.UTF8.encode(key);
  return host_kv_put(changetype<usize>(k), <u32>k.byteLength, value.dataStart, <u32>value.byteLength);
}

/** Store a string (as UTF-8) under `key`. */
export function kvPutString(key: string, value: string): i32 {
  return kvPut(key, Uint8Array.wrap(String.UTF8.encode(value)));
}

/** Remove `key`. Returns 0. */
export function kvDelete(key: string): i32 {
  const k = String.UTF8.encode(key);
  return host_kv_delete(changetype<usize>(k), <u32>k.byteLength);
}

/**
 * An HTTP request described as {"method","url","headers","body"}; returns
 * {"status","headers","body"} JSON. Only hosts the manifest and the operator
 * allow (network capability).
 */
export function httpRequest(requestJson: string): string {
  const r = String.UTF8.encode(requestJson);
  const buf = new ArrayBuffer(FIRST_CAP);
  const n = host_http_request(changetype<usize>(r), <u32>r.byteLength, changetype<usize>(buf), <u32>FIRST_CAP);
  if (n < 0) unreachable();
  const out = fetchResult(n, buf, FIRST_CAP);
  return String.UTF8.decodeUnsafe(out.dataStart, <usize>out.byteLength);
}

/** The last kv_get / http_request / request result again, or null if there is none. */
export function takeResult(): Uint8Array | null {
  const n = host_take_result(0, 0);
  if (n < 0) return null;
  const buf = new ArrayBuffer(n);
  host_take_result(changetype<usize>(buf), <u32>n);
  return Uint8Array.wrap(buf);
}

// ---------------------------------------------------------------------------
// JSON writer
// ---------------------------------------------------------------------------

const HEX = "0123456789abcdef";

/**
 * The contents of a JSON string for `s` (no surrounding quotes): '"' and '\'
 * are backslash-escaped, control characters become \b \f \n \r \t or \u00XX,
 * DEL becomes \u007f, and unpaired surrogates become U+FFFD (they have no
 * UTF-8 form).
 */
export function jsonEscape(s: string): string {
  const n = s.length;
  let i = 0;
  // fast path: nothing to escape
  for (; i < n; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x20 || c == 0x22 || c == 0x5c || c == 0x7f || (c >= 0xd800 && c <= 0xdfff)) break;
  }
  if (i == n) return s;
  const parts = new Array<string>();
  let run = 0;
  for (i = 0; i < n; i++) {
    const c = s.charCodeAt(i);
    let esc: string | null = null;
    if (c == 0x22) esc = '\\"';
    else if (c == 0x5c) esc = "\\\\";
    else if (c == 0x08) esc = "\\b";
    else if (c == 0x0c) esc = "\\f";
    else if (c == 0x0a) esc = "\\n";
    else if (c == 0x0d) esc = "\\r";
    else if (c == 0x09) esc = "\\t";
    else if (c < 0x20 || c == 0x7f) esc = "\\u00" + HEX.charAt(c >> 4) + HEX.charAt(c & 15);
    else if (c >= 0xd800 && c <= 0xdbff) {
      const next = i + 1 < n ? s.charCodeAt(i + 1) : 0;
      if (next >= 0xdc00 && next <= 0xdfff) {
        i++; // a valid pair: keep both halves
        continue;
      }
      esc = "\ufffd";
    } else if (c >= 0xdc00 && c <= 0xdfff) esc = "\ufffd";
    if (esc === null) continue;
    if (i > run) parts.push(s.substring(run, i));
    parts.push(esc);
    run = i + 1;
  }
  if (run < n) parts.push(s.substring(run));
  return parts.join("");
}

/** `s` as a JSON string, quotes included. */
export function jsonString(s: string): string {
  return '"' + jsonEscape(s) + '"';
}

// ---------------------------------------------------------------------------
// JSON reader (validating, non-recursive; works on the decoded request text)
// ---------------------------------------------------------------------------

/** Result codes of the JSON reader (the same values as the C header's). */
export const JSON_OK: i32 = 0;
export const JSON_ENOTFOUND: i32 = -1;
export const JSON_EEMPTY: i32 = -2;
export const JSON_ESYNTAX: i32 = -3;
export const JSON_ENOTOBJECT: i32 = -4;
export const JSON_EDEPTH: i32 = -5;
export const JSON_ETRAILING: i32 = -6;
export const JSON_ETYPE: i32 = -7;

/** Maximum nesting of arrays/objects the reader accepts. */
export const JSON_MAX_DEPTH: i32 = 512;

/** Kind of a JSON value. */
export enum JsonType {
  Invalid = 0,
  Object,
  Array,
  String,
  Number,
  True,
  False,
  Null,
}

/** A human-readable reason for a reader result code. */
export function jsonStrerror(code: i32): string {
  switch (code) {
    case JSON_OK: return "ok";
    case JSON_ENOTFOUND: return "member not found";
    case JSON_EEMPTY: return "empty input";
    case JSON_ESYNTAX: return "malformed JSON";
    case JSON_ENOTOBJECT: return "not a JSON object";
    case JSON_EDEPTH: return "JSON nested too deeply";
    case JSON_ETRAILING: return "trailing data after JSON value";
    case JSON_ETYPE: return "value has the wrong type";
    default: return "unknown error";
  }
}

/**
 * The outcome of a lookup: `code` (JSON_OK or an error), and on success the
 * value's `type` and `raw` source text (a string keeps its quotes and
 * escapes), ready to be copied verbatim into another JSON document.
 */
export class JsonValue {
  constructor(public code: i32, public type: JsonType = JsonType.Invalid, public raw: string = "") {}

  get ok(): bool {
    return this.code == JSON_OK;
  }
}

function isWs(c: i32): bool {
  return c == 0x20 || c == 0x09 || c == 0x0a || c == 0x0d;
}

function skipWs(s: string, i: i32): i32 {
  const n = s.length;
  while (i < n && isWs(s.charCodeAt(i))) i++;
  return i;
}

function hexVal(c: i32): i32 {
  if (c >= 0x30 && c <= 0x39) return c - 0x30;
  if (c >= 0x61 && c <= 0x66) return c - 0x61 + 10;
  if (c >= 0x41 && c <= 0x46) return c - 0x41 + 10;
  return -1;
}

function hex4(s: string, i: i32): i32 {
  if (i + 4 > s.length) return -1;
  let v = 0;
  for (let k = 0; k < 4; k++) {
    const h = hexVal(s.charCodeAt(i + k));
    if (h < 0) return -1;
    v = (v << 4) | h;
  }
  return v;
}

// Scanner state: the position after the last successful skip (AssemblyScript has no out-parameters).
let pos: i32 = 0;

/** Skip the string whose opening quote is at s[i]; sets `pos` past the closing quote. */
function skipString(s: string, i: i32): i32 {
  const n = s.length;
  i++;
  while (i < n) {
    const c = s.charCodeAt(i);
    if (c == 0x22) {
      pos = i + 1;
      return JSON_OK;
    }
    if (c < 0x20) return JSON_ESYNTAX;
    if (c == 0x5c) {
      if (i + 1 >= n) return JSON_ESYNTAX;
      const e = s.charCodeAt(i + 1);
      if (e == 0x75) { // u
        if (hex4(s, i + 2) < 0) return JSON_ESYNTAX;
        i += 6;
      } else if (e == 0x22 || e == 0x5c || e == 0x2f || e == 0x62 || e == 0x66 || e == 0x6e || e == 0x72 || e == 0x74) {
        i += 2;
      } else {
        return JSON_ESYNTAX;
      }
    } else {
      i++;
    }
  }
  return JSON_ESYNTAX; // unterminated
}

function isDigit(c: i32): bool {
  return c >= 0x30 && c <= 0x39;
}

/** Skip a number at s[i] (JSON grammar: -?int frac? exp?); sets `pos`. */
function skipNumber(s: string, i: i32): i32 {
  const n = s.length;
  if (i < n && s.charCodeAt(i) == 0x2d) i++;
  if (i >= n) return JSON_ESYNTAX;
  const first = s.charCodeAt(i);
  if (first == 0x30) i++;
  else if (first >= 0x31 && first <= 0x39) {
    while (i < n && isDigit(s.charCodeAt(i))) i++;
  } else return JSON_ESYNTAX;
  if (i < n && s.charCodeAt(i) == 0x2e) {
    i++;
    if (i >= n || !isDigit(s.charCodeAt(i))) return JSON_ESYNTAX;
    while (i < n && isDigit(s.charCodeAt(i))) i++;
  }
  if (i < n && (s.charCodeAt(i) == 0x65 || s.charCodeAt(i) == 0x45)) {
    i++;
    if (i < n && (s.charCodeAt(i) == 0x2b || s.charCodeAt(i) == 0x2d)) i++;
    if (i >= n || !isDigit(s.charCodeAt(i))) return JSON_ESYNTAX;
    while (i < n && isDigit(s.charCodeAt(i))) i++;
  }
  pos = i;
  return JSON_OK;
}

function skipLiteral(s: string, i: i32, word: string): i32 {
  if (s.length - i < word.length || s.substring(i, i + word.length) != word) return JSON_ESYNTAX;
  pos = i + word.length;
  return JSON_OK;
}

// Type of the last value skipped by skipValue, and where it started.
let lastType: JsonType = JsonType.Invalid;
let lastStart: i32 = 0;

/**
 * Skip one complete JSON value starting at s[i] (leading whitespace allowed).
 * On success `pos` is just past it, `lastStart` / `lastType` describe it.
 * Iterative: nesting is bounded by JSON_MAX_DEPTH, not by the wasm stack.
 */
function skipValue(s: string, i: i32): i32 {
  const n = s.length;
  const isObject = new StaticArray<bool>(JSON_MAX_DEPTH);
  let depth = 0;
  let expectKey = false;
  let rc: i32;
  i = skipWs(s, i);
  if (i >= n) return JSON_EEMPTY;
  const start = i;
  let type = JsonType.Invalid;
  for (;;) {
    i = skipWs(s, i);
    if (i >= n) return JSON_ESYNTAX;
    if (expectKey) {
      if (s.charCodeAt(i) != 0x22) return JSON_ESYNTAX;
      if ((rc = skipString(s, i)) != JSON_OK) return rc;
      i = skipWs(s, pos);
      if (i >= n || s.charCodeAt(i) != 0x3a) return JSON_ESYNTAX;
      i = skipWs(s, i + 1);
      if (i >= n) return JSON_ESYNTAX;
      expectKey = false;
    }
    const c = s.charCodeAt(i);
    let t: JsonType;
    if (c == 0x7b || c == 0x5b) { // { [
      if (depth >= JSON_MAX_DEPTH) return JSON_EDEPTH;
      const obj = c == 0x7b;
      isObject[depth] = obj;
      t = obj ? JsonType.Object : JsonType.Array;
      if (depth == 0) type = t;
      depth++;
      i = skipWs(s, i + 1);
      if (i >= n) return JSON_ESYNTAX;
      if (s.charCodeAt(i) == (obj ? 0x7d : 0x5d)) {
        depth--;
        i++;
      } else {
        expectKey = obj;
        continue;
      }
    } else {
      if (c == 0x22) { t = JsonType.String; rc = skipString(s, i); }
      else if (c == 0x74) { t = JsonType.True; rc = skipLiteral(s, i, "true"); }
      else if (c == 0x66) { t = JsonType.False; rc = skipLiteral(s, i, "false"); }
      else if (c == 0x6e) { t = JsonType.Null; rc = skipLiteral(s, i, "null"); }
      else if (c == 0x2d || isDigit(c)) { t = JsonType.Number; rc = skipNumber(s, i); }
      else return JSON_ESYNTAX;
      if (rc != JSON_OK) return rc;
      if (depth == 0) type = t;
      i = pos;
    }
    // after a value: close containers or move to the next element
    for (;;) {
      if (depth == 0) {
        pos = i;
        lastStart = start;
        lastType = type;
        return JSON_OK;
      }
      i = skipWs(s, i);
      if (i >= n) return JSON_ESYNTAX;
      const d = s.charCodeAt(i);
      const obj = isObject[depth - 1];
      if (d == 0x2c) { // ,
        i++;
        expectKey = obj;
        break;
      }
      if (d == (obj ? 0x7d : 0x5d)) {
        depth--;
        i++;
        continue;
      }
      return JSON_ESYNTAX;
    }
  }
  return JSON_ESYNTAX; // not reached
}

/** Check that `json` is exactly one valid JSON value (surrounding whitespace allowed): JSON_OK or an error code. */
export function jsonValidate(json: string): i32 {
  const rc = skipValue(json, 0);
  if (rc != JSON_OK) return rc;
  if (skipWs(json, pos) != json.length) return JSON_ETRAILING;
  return JSON_OK;
}

/**
 * Decode the raw text of a JSON string token (quotes included, as in
 * JsonValue.raw) into a string. Unpaired surrogate escapes become U+FFFD.
 */
export function jsonDecodeString(raw: string): string {
  const end = raw.length - 1;
  let i = 1;
  let hasEscape = false;
  for (let k = 1; k < end; k++) {
    if (raw.charCodeAt(k) == 0x5c) {
      hasEscape = true;
      break;
    }
  }
  if (!hasEscape) return raw.substring(1, end);
  const units = new Array<i32>();
  while (i < end) {
    const c = raw.charCodeAt(i);
    if (c != 0x5c) {
      units.push(c);
      i++;
      continue;
    }
    const e = raw.charCodeAt(i + 1);
    i += 2;
    if (e == 0x62) units.push(0x08);
    else if (e == 0x66) units.push(0x0c);
    else if (e == 0x6e) units.push(0x0a);
    else if (e == 0x72) units.push(0x0d);
    else if (e == 0x74) units.push(0x09);
    else if (e == 0x75) {
      let cp = hex4(raw, i);
      i += 4;
      if (cp >= 0xd800 && cp <= 0xdbff) {
        const lo = i + 6 <= end && raw.charCodeAt(i) == 0x5c && raw.charCodeAt(i + 1) == 0x75 ? hex4(raw, i + 2) : -1;
        if (lo >= 0xdc00 && lo <= 0xdfff) {
          units.push(cp);
          units.push(lo);
          i += 6;
          continue;
        }
        cp = 0xfffd;
      } else if (cp >= 0xdc00 && cp <= 0xdfff) {
        cp = 0xfffd;
      }
      units.push(cp);
    } else units.push(e); // " \ /
  }
  // A literal (unescaped) unpaired surrogate in the text stays as it is; jsonEscape fixes it on the way out.
  return String.fromCharCodes(units);
}

/**
 * Find member `key` of the top-level object in `json`. The whole document is
 * validated first, so a malformed request is reported even when the key
 * comes early. If the key occurs more than once the last one wins.
 * The result's code: JSON_OK (found), JSON_ENOTFOUND (valid object without
 * it), JSON_ENOTOBJECT, or the validation error.
 */
export function jsonGet(json: string, key: string): JsonValue {
  const rc = jsonValidate(json);
  if (rc != JSON_OK) return new JsonValue(rc);
  let i = skipWs(json, 0);
  if (json.charCodeAt(i) != 0x7b) return new JsonValue(JSON_ENOTOBJECT);
  i++;
  let found: JsonValue = new JsonValue(JSON_ENOTFOUND);
  const n = json.length;
  for (;;) {
    i = skipWs(json, i);
    if (i >= n || json.charCodeAt(i) == 0x7d) break;
    if (json.charCodeAt(i) == 0x2c) i = skipWs(json, i + 1);
    const kStart = i;
    skipString(json, i); // the document is valid: cannot fail
    const rawKey = json.substring(kStart, pos);
    i = skipWs(json, pos) + 1; // past ':'
    skipValue(json, i);
    if (jsonDecodeString(rawKey) == key) {
      found = new JsonValue(JSON_OK, lastType, json.substring(lastStart, pos));
    }
    i = pos;
  }
  return found;
}

/** The decoded string member `key` of the top-level object, or null (absent, not a string, or invalid JSON). */
export function jsonGetString(json: string, key: string): string | null {
  const v = jsonGet(json, key);
  if (!v.ok || v.type != JsonType.String) return null;
  return jsonDecodeString(v.raw);
}
