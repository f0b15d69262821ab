// count_vowels: Extism's classic example plugin, written with Extism's AssemblyScript PDK. The same .wasm
// runs in any Extism host and in sandbus (docs/guide.md, "Extism plugins").
//
//   input:   any bytes (text)
//   output:  {"count":<vowels>,"total":<vowels>,"vowels":"aeiouAEIOU"}  (JSON: the manifest says so)
//
// plugins/build.sh compiles it with asc and the PDK this directory's package-lock.json pins.
import { Host } from "@extism/as-pdk";

const VOWELS = "aeiouAEIOU";

export function count_vowels(): i32 {
  const input = Host.input();
  let count = 0;
  for (let i = 0; i < input.length; i++) {
    if (VOWELS.includes(String.fromCharCode(input[i]))) count += 1;
  }
  const out = '{"count":' + count.toString() + ',"total":' + count.toString() + ',"vowels":"' + VOWELS + '"}';
  // Host.output of the UTF-8 bytes (the PDK's outputString sizes its buffer in UTF-16 units).
  Host.output(Uint8Array.wrap(String.UTF8.encode(out)));
  return 0;
}
