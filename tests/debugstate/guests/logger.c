/* A plugin that logs, for tests/debugstate.
 *
 *   handle_request  echoes its input, logs nothing
 *   say             {"text": S, "level": L, "n": N}: logs S N times (default once) at level L (default info)
 *   one             logs one short line (the benchmark's per-call line)
 *   ten             logs ten short lines
 *   err             {"text": S}: writes S and a newline to stderr
 *   boom            traps (unreachable)
 */
#include "sandbus.h"
#include <stdio.h>
#include <stdlib.h>

static long long num(const uint8_t *in, uint32_t len, const char *key, long long dflt)
{
    sandbus_json_value v;
    if (sandbus_json_get(in, len, key, &v) != SANDBUS_JSON_OK)
        return dflt;
    return strtoll((const char *)v.ptr, NULL, 10);
}

SANDBUS_EXPORT(handle_request)
uint64_t handle_request(const uint8_t *in, uint32_t len)
{
    return sandbus_reply((const char *)in, len);
}

SANDBUS_EXPORT(say)
uint64_t say(const uint8_t *in, uint32_t len)
{
    char *text = NULL;
    size_t text_len = 0;
    if (sandbus_json_get_string(in, len, "text", &text, &text_len) != SANDBUS_JSON_OK)
        return sandbus_reply_str("{\"error\":\"text?\"}");
    int level = (int)num(in, len, "level", SANDBUS_LOG_INFO);
    long long n = num(in, len, "n", 1);
    for (long long i = 0; i < n; i++)
        sandbus_log_n(level, text, text_len);
    free(text);
    return sandbus_reply_str("{\"ok\":true}");
}

SANDBUS_EXPORT(one)
uint64_t one(const uint8_t *in, uint32_t len)
{
    (void)in;
    (void)len;
    sandbus_log(SANDBUS_LOG_INFO, "handled one request");
    return sandbus_reply_str("{\"ok\":true}");
}

SANDBUS_EXPORT(ten)
uint64_t ten(const uint8_t *in, uint32_t len)
{
    (void)in;
    (void)len;
    for (int i = 0; i < 10; i++)
        sandbus_log(SANDBUS_LOG_INFO, "handled one request, line of ten");
    return sandbus_reply_str("{\"ok\":true}");
}

SANDBUS_EXPORT(err)
uint64_t err(const uint8_t *in, uint32_t len)
{
    char *text = NULL;
    size_t text_len = 0;
    if (sandbus_json_get_string(in, len, "text", &text, &text_len) != SANDBUS_JSON_OK)
        return sandbus_reply_str("{\"error\":\"text?\"}");
    fwrite(text, 1, text_len, stderr);
    fputc('\n', stderr);
    fflush(stderr);
    free(text);
    return sandbus_reply_str("{\"ok\":true}");
}

SANDBUS_EXPORT(boom)
uint64_t boom(const uint8_t *in, uint32_t len)
{
    (void)in;
    (void)len;
    __builtin_trap();
}
