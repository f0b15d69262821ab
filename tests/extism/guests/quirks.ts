// A known flaw of the AssemblyScript PDK 1.0.0, kept to compare hosts on it: Host.outputString allocates and
// outputs s.length bytes (UTF-16 code units) but stores the longer UTF-8 encoding, so non-ASCII text comes
// back cut short and the extra bytes land past the end of the block.
import { Host } from "@extism/as-pdk";

export function shout(): i32 {
  Host.outputString(Host.inputString() + "!");
  return 0;
}
