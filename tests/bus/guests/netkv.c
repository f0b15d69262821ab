/* Storage and network through host functions. Requests are JSON strings (no escapes). */
#include "sandbus.h"
#include <stdio.h>
#include <stdlib.h>

static void arg(const uint8_t *in, uint32_t len, char *out, size_t cap)
{
    size_t n = 0;
    if (len >= 2 && in[0] == '"')
        for (uint32_t i = 1; i + 1 < len && n + 1 < cap; i++)
            out[n++] = (char)in[i];
    out[n] = 0;
}

/* "key": stores {"stored":"key"} under key, reads it back, returns what was read. */
SANDBUS_EXPORT(kv_roundtrip)
uint64_t kv_roundtrip(const uint8_t *in, uint32_t len)
{
    char key[128], value[256], back[256];
    arg(in, len, key, sizeof key);
    int n = snprintf(value, sizeof value, "{\"stored\":\"%s\"}", key);
    if (sandbus_host_kv_put(key, (uint32_t)strlen(key), value, (uint32_t)n) != 0)
        return sandbus_reply_str("{\"error\":\"put\"}");
    int32_t got = sandbus_host_kv_get(key, (uint32_t)strlen(key), back, sizeof back);
    if (got < 0)
        return sandbus_reply_str("{\"error\":\"missing\"}");
    sandbus_host_kv_delete(key, (uint32_t)strlen(key));
    if (sandbus_host_kv_get(key, (uint32_t)strlen(key), back + got, sizeof back - (size_t)got) != -1)
        return sandbus_reply_str("{\"error\":\"not deleted\"}");
    return sandbus_reply(back, (size_t)got);
}

/* "url": GET it; the reply is the host's response JSON (fetched again if longer than 64 bytes). */
SANDBUS_EXPORT(http_get)
uint64_t http_get(const uint8_t *in, uint32_t len)
{
    char url[256], req[512], small[64];
    arg(in, len, url, sizeof url);
    int n = snprintf(req, sizeof req, "{\"method\":\"GET\",\"url\":\"%s\"}", url);
    int32_t full = sandbus_host_http_request(req, (uint32_t)n, small, sizeof small);
    char *buf = malloc((size_t)full);
    if (!buf)
        return sandbus_reply_str("{\"error\":\"oom\"}");
    sandbus_host_take_result(buf, (uint32_t)full);
    uint64_t r = sandbus_reply(buf, (size_t)full);
    free(buf);
    return r;
}
