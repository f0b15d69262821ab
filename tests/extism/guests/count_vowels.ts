// Extism's count_vowels example: counts the vowels of the input (the set from the "vowels" config key, if
// given), keeps a running total across calls in a var, and answers JSON.
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
  // Host.output of the UTF-8 bytes: the PDK's outputString sizes its buffer by UTF-16 length.
  Host.output(Uint8Array.wrap(String.UTF8.encode(out)));
  return 0;
}
