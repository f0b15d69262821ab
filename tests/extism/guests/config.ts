// Reads the configuration key named by the input; a missing key is a failure with a message.
import { Config, Host, Memory } from "@extism/as-pdk";
import { error_set } from "@extism/as-pdk/lib/env";

export function get_config(): i32 {
  const key = Host.inputString();
  const value = Config.get(key);
  if (value === null) {
    error_set(Memory.allocateString("no config key: " + key).offset);
    return 1;
  }
  Host.output(Uint8Array.wrap(String.UTF8.encode(value)));
  return 0;
}
