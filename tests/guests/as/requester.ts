// An AssemblyScript guest calling other plugins with the SDK's request() (tests/guests/test_assemblyscript.py).
import { jsonGet, jsonGetString, reply, request, requestText } from "../../../sdk/guest/assemblyscript";

export { sandbus_abi_version, sandbus_alloc, sandbus_dealloc } from "../../../sdk/guest/assemblyscript";

/** {"target": T, "payload": P} -> {"status": S, "ok": true|false, "body": <the reply, or the error JSON>} */
export function handle_request(ptr: usize, len: u32): u64 {
  const text = requestText(ptr, len);
  const target = jsonGetString(text, "target");
  const payload = jsonGet(text, "payload");
  if (target === null || !payload.ok) return reply('{"error":"bad request"}');
  const r = request(target, payload.raw);
  return reply('{"status":' + r.status.toString() + ',"ok":' + (r.ok ? "true" : "false") + ',"body":' + r.body + "}");
}
