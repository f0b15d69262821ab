// GETs the URL given as input through the host's http_request and answers "<status>\n<body>".
import { Host, Memory } from "@extism/as-pdk";
import { http_request, length } from "@extism/as-pdk/lib/env";

// Part of the Extism host ABI, not declared by the AssemblyScript PDK 1.0.0.
@external("extism:host/env", "http_status_code")
declare function http_status_code(): i32;

export function fetch(): i32 {
  const url = Host.inputString();
  const request = '{"method":"GET","url":"' + url + '","headers":{"x-plugin":"extism-as"}}';
  const response = http_request(Memory.allocateString(request).offset, 0);
  const body = response == 0 ? "" : new Memory(response, length(response)).toString();
  const out = http_status_code().toString() + "\n" + body;
  Host.output(Uint8Array.wrap(String.UTF8.encode(out)));
  return 0;
}
