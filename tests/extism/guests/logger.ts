// Logs its input at every level the PDK offers, then echoes it.
import { Host, LogLevel } from "@extism/as-pdk";

export function log_all(): i32 {
  const text = Host.inputString();
  Host.log(LogLevel.Debug, "debug: " + text);
  Host.log(LogLevel.Info, "info: " + text);
  Host.log(LogLevel.Warn, "warn: " + text);
  Host.log(LogLevel.Error, "error: " + text);
  Host.output(Host.input());
  return 0;
}
