// Fails the way the PDK offers: error_set with a message, then a non-zero return.
import { Host, Memory } from "@extism/as-pdk";
import { error_set } from "@extism/as-pdk/lib/env";

export function fail(): i32 {
  error_set(Memory.allocateString("refused: " + Host.inputString()).offset);
  return 1;
}

// A non-zero return without a message.
export function fail_silently(): i32 {
  return 7;
}
