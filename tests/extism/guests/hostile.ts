// Plugins that attack their host: a loop that never ends, memory that never stops growing, an output, a var
// and an error message as large as the input asks for.
import { Host, Memory, Var } from "@extism/as-pdk";
import { error_set } from "@extism/as-pdk/lib/env";

let spins: u64 = 0;

export function spin(): i32 {
  // The global store keeps the optimizer from proving the loop empty.
  while (Host.input().length >= 0) spins += 1;
  return 0;
}

const hoard = new Array<Uint8Array>();

export function bomb(): i32 {
  for (;;) {
    const block = new Uint8Array(1 << 20);
    block[0] = 1;
    hoard.push(block);
  }
  return 0;
}

// Answers as many bytes of "x" as the decimal input says.
export function huge(): i32 {
  const n = I32.parseInt(Host.inputString());
  const out = new Uint8Array(n);
  out.fill(0x78);
  Host.output(out);
  return 0;
}

// Stores a var of as many bytes as the decimal input says.
export function var_bomb(): i32 {
  Var.set("big", new Uint8Array(I32.parseInt(Host.inputString())));
  return 0;
}

// Fails with an error message of as many bytes as the decimal input says, with control characters in it.
export function fail_loudly(): i32 {
  const n = I32.parseInt(Host.inputString());
  const message = new Uint8Array(n);
  message.fill(0x79);
  if (n > 2) {
    message[0] = 0x1b; // ESC: a terminal escape, if printed raw
    message[1] = 0x0a;
  }
  error_set(Memory.allocateBytes(message).offset);
  return 1;
}
