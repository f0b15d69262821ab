// Plugins that attack their host: a loop that never ends, memory that never stops growing, an output
// as large as the input asks for.
import { Host } from "@extism/as-pdk";

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
