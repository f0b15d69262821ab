// A counter kept in an Extism var: each call adds one and answers the new count.
import { Host, Var } from "@extism/as-pdk";

export function count(): i32 {
  const stored = Var.getString("count");
  const n = (stored === null ? 0 : I32.parseInt(stored)) + 1;
  Var.set("count", Uint8Array.wrap(String.UTF8.encode(n.toString())));
  Host.output(Uint8Array.wrap(String.UTF8.encode(n.toString())));
  return 0;
}

// Forgets the counter.
export function reset(): i32 {
  Var.remove("count");
  return 0;
}
