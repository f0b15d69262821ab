// Counts the vowels of the input and answers JSON, like Extism's own count_vowels example.
import { Host } from "@extism/as-pdk";

const VOWELS = "aeiouAEIOU";

export function count_vowels(): i32 {
  const input = Host.input();
  let count = 0;
  for (let i = 0; i < input.length; i++) {
    if (VOWELS.includes(String.fromCharCode(input[i]))) count += 1;
  }
  const out = '{"count":' + count.toString() + ',"total":' + count.toString() + ',"vowels":"' + VOWELS + '"}';
  // Host.output of the UTF-8 bytes: the PDK's outputString sizes its buffer by UTF-16 length.
  Host.output(Uint8Array.wrap(String.UTF8.encode(out)));
  return 0;
}
