// A misbehaving AssemblyScript guest for tests/guests/test_assemblyscript.py (built there with the SDK's asc).
import { log, LogLevel, replyOk, requestText } from "../../../sdk/guest/assemblyscript";

export { sandbus_abi_version, sandbus_alloc, sandbus_dealloc } from "../../../sdk/guest/assemblyscript";

/** An uncaught throw: aborts through the SDK's sandbusAbort (logged, then a trap). */
export function boom(ptr: usize, len: u32): u64 {
  throw new Error("boom: " + requestText(ptr, len));
}

let hoard = new Array<ArrayBuffer>();

/**
 * Keeps every block reachable from a global until memory runs out. Small blocks: the allocator traps
 * when memory.grow fails, and the host calls that a memory limit when memory is within a page of it.
 */
export function hog(ptr: usize, len: u32): u64 {
  for (;;) hoard.push(new ArrayBuffer(4096));
  return 0;
}

let calls = 0;
let kept: string = "";

/** Global state survives across calls (and across the collections sandbus_alloc runs). */
export function count(ptr: usize, len: u32): u64 {
  calls++;
  kept = kept.length > 1000 ? "" : kept + requestText(ptr, len);
  log(LogLevel.Debug, "count " + calls.toString());
  return replyOk('{"calls":' + calls.toString() + ',"kept":' + kept.length.toString() + "}");
}
