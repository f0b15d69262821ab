// count_vowels: Extism's classic example plugin, written with Extism's AssemblyScript PDK. The same .wasm
// runs in any Extism host and in sandbus (docs/guide.md, "Extism plugins").
//
//   input:   any bytes (text)
//   output:  {"count":<vowels in the input>,"total":<running total>,"vowels":"<the set counted>"}  (JSON)
//
// The set of vowels is the "vowels" key of the manifest's [config] (aeiouAEIOU when unset); the running
// total lives in a var, so it is per instance: a node runs several.
// plugins/build.sh compiles it with asc and the PDK this directory's package-lock.json pins.
import { Config, Host, Var } from "@extism/as-pdk";

const VOWELS = "aeiouAEIOU";

export function count_vowels(): i32 {
  const input = Host.input();
  const configured = Config.get("vowels");
  const vowels = configured === null ? VOWELS : configured;
  let count = 0;
  for (let i = 0; i < input.length; i++) {
    if (vowels.includes(String.fromCharCode(input[i]))) count += 1;
  }
  const before = Var.getString("total");
  const total = (before === null ? 0 : I32.parseInt(before)) + count;
  Var.set("total", Uint8Array.wrap(String.UTF8.encode(total.toString())));
  const out = '{"count":' + count.toString() + ',"total":' + total.toString() + ',"vowels":"' + vowels + '"}';
  // Host.output of the UTF-8 bytes (the PDK's outputString sizes its buffer in UTF-16 units).
  Host.output(Uint8Array.wrap(String.UTF8.encode(out)));
  return 0;
}
