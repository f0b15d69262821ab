// Echoes its input: binary data (every byte value) must come back unchanged.
import { Host } from "@extism/as-pdk";

export function reflect(): i32 {
  Host.output(Host.input());
  return 0;
}
